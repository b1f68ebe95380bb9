"""Shared fixtures: one local Ray instance for the whole session, an SQLite-backed MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """Commands' default logs (`tsesnet.common.console.log_dir`) in the session's temp folder, not
    the user's home: every `tsesnet` a test starts inherits this."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    yield
    mp.undo()


#: The files that take minutes, run first: under `make test` (2 processes, whole files each) the
#: other process fills the waits of the longest with the short files instead of leaving a tail.
LONGEST_FIRST = ("test_rehearsal.py", "test_readme.py", "test_sweep.py", "test_train.py")


def pytest_configure(config):
    """Once per run, before pytest-xdist starts its processes: the user's Ray token file, which
    the first Ray started on a machine writes (`data_store.local_ray`), so that two test
    processes starting their first Ray at once never race to create it."""
    if not hasattr(config, "workerinput"):  # the controlling process (or a run without -n)
        from data_store.local_ray import token_path, write_private_token

        if not os.environ.get("RAY_AUTH_TOKEN"):
            write_private_token(token_path())


def pytest_collection_modifyitems(config, items):
    """A test that needs the session's Ray (directly or through a fixture such as `tiny_store`)
    is slow whatever its own marks say: `make test-fast` (`-m "not slow"`) starts no Ray. The
    files in `LONGEST_FIRST` go first (in that order; the rest as collected)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray on this machine's CPUs, started once; the dashboard on (Train V2 needs it)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            # "local": never attach to a cluster some `ray start` left in /tmp/ray.
            address="local",
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """MLflow keeps the tracking URI that `runs.configure` gave it process-wide (and exports it
    to the environment); forget it after each test so that the next one reads its own."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # also unsets the variable
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite tracking database and artifact folder under tmp_path, via the environment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    return uri


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, ray_session):
    """A synthetic store of 4 labelled cases (3 phases, 16x32x32, 2 folds), built once per session.

    For the tiny training preset (`tsesnet/configs/tiny.yaml`): fold 0 gives 2 training and
    2 validation cases.
    """
    from data_store.ingest import ingest
    from data_store.phantom import SynthConfig
    from data_store.synth import write_cohort

    d = tmp_path_factory.mktemp("tiny_store")
    write_cohort(d / "raw", 4, seed=0, config=SynthConfig(shape=(16, 32, 32), phases=3))
    ingest(d / "raw", d / "tiny.zarr", folds=2, progress=False)
    return d / "tiny.zarr"


@dataclass(frozen=True)
class TrainedTiny:
    """The session's one trained model: a 2-epoch tiny training typed as a user would.

    Attributes:
        folder: the command's working folder (its MLflow files, `ray/` its storage_path).
        tracking_uri: the SQLite tracking URI it logged to.
        artifacts: its MLflow artifact folder.
        run_name: the run's name (`--name`).
        model_uri: the registered version (``models:/tsesnet/1``, also @champion).
        output: the finished command, stdout and stderr as the user's console got them.
    """

    folder: Path
    tracking_uri: str
    artifacts: str
    run_name: str
    model_uri: str
    output: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_store):
    """`tsesnet train` of the tiny preset for 2 epochs on `tiny_store`, run once per session
    (stdout and stderr piped, not a terminal: the quiet console), for the tests that need a
    trained, tracked and registered model rather than the training itself. Read it, never
    write to it: tests that change a run or the registry train their own."""
    folder = tmp_path_factory.mktemp("trained_tiny")
    uri, artifacts, name = f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlartifacts"), "quiet"
    argv = [
        sys.executable, "-m", "tsesnet.cli", "train", "--store", str(tiny_store),
        "--config", str(ROOT / "tsesnet" / "configs" / "tiny.yaml"), "--set", "schedule.epochs=2",
        "--set", f"run.storage_path={folder / 'ray'}", "--name", name,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, as typed
    env.update(
        MLFLOW_TRACKING_URI=uri, MLFLOW_ARTIFACTS_DESTINATION=artifacts, PYTHONPATH=str(ROOT)
    )
    out = subprocess.run(argv, env=env, cwd=folder, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return TrainedTiny(folder, uri, artifacts, name, "models:/tsesnet/1", out)
