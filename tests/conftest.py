"""Shared fixtures: one local Ray instance for the whole session, an SQLite-backed MLflow."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory):
    """Commands' default logs (`tsesnet.common.console.log_dir`) in the session's temp folder, not
    the user's home: every `tsesnet` a test starts inherits this."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items):
    """A test that needs the session's Ray (directly or through a fixture such as `tiny_store`)
    is slow whatever its own marks say: `make test-fast` (`-m "not slow"`) starts no Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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
