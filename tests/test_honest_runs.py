"""Runs that end honestly: a diverged run registers nothing; bad names, resources, tracking
URIs and flags are refused before Ray starts, in one line; a signal at any moment ends the run
KILLED; one run name is never trained twice at once.

Trainings use the tiny preset on the session's Ray (through ``RAY_ADDRESS``, as on a cluster)
and an SQLite MLflow under tmp_path, driven through the `tsesnet` CLI as a user types it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tsesnet" / "configs" / "tiny.yaml"
TSESNET = str(Path(sys.executable).parent / "tsesnet")


def _env(tmp_path: Path, ray_session=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "mlartifacts"),
        PYTHONPATH=str(ROOT),
    )
    if ray_session is not None:
        env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    return env


def _train_cmd(store, tmp_path: Path, name: str, *sets: str) -> list[str]:
    cmd = [TSESNET, "train", "--store", str(store), "--config", str(TINY), "--name", name,
           "--set", f"run.storage_path={tmp_path / 'ray'}"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    return cmd


def _client(tmp_path: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _run_of(client, name: str):
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tsesnet").experiment_id],
        filter_string=f"tags.`tsesnet.run_name` = '{name}'",
    )
    return run


@pytest.mark.slow
def test_a_diverged_run_stops_in_one_line_and_registers_nothing(tiny_store, ray_session, tmp_path):
    """optim.lr=1e9: the loss becomes NaN. Before: the run went on and registered an all-NaN
    @champion, exit 0."""
    cmd = _train_cmd(tiny_store, tmp_path, "diverged", "optim.lr=1e9", "schedule.epochs=3")
    out = subprocess.run(
        cmd, env=_env(tmp_path, ray_session), cwd=tmp_path, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run diverged diverged at epoch "), last
    assert "nothing registered; lower optim.lr (now 1e+09)" in last and "nan" in last, last
    assert "registered tsesnet" not in out.stdout
    client = _client(tmp_path)
    assert client.search_model_versions("name = 'tsesnet'") == []
    run = _run_of(client, "diverged")
    assert run.info.status == "FAILED" and "tsesnet.diverged" in run.data.tags


def _tsesnet(tmp_path: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TSESNET, *argv], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _one_error_line(out: subprocess.CompletedProcess, code: int = 2) -> str:
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    return line


@pytest.mark.parametrize("alias", ["V1", "v2", "Latest", "LATEST", "a.b"])
def test_promote_refuses_reserved_and_invalid_aliases_in_one_line(tmp_path, alias):
    """Before: `--alias V1` passed the case-sensitive check and MLflow's refusal came out as a
    traceback."""
    client = _client(tmp_path)
    client.create_registered_model("m")
    (tmp_path / "weights").mkdir()
    client.create_model_version("m", str(tmp_path / "weights"))
    line = _one_error_line(_tsesnet(tmp_path, "models", "promote", "m", "1", "--alias", alias))
    assert f"--alias {alias!r}" in line
    assert client.get_registered_model("m").aliases == {}  # nothing changed


def test_an_invalid_registered_model_name_is_refused_before_ray_starts(tmp_path):
    """Before: the whole training ran, then registering failed. The store is not even read."""
    for name in ("a/b", "x:y", " "):
        line = _one_error_line(
            _tsesnet(
                tmp_path,
                "train",
                "--store",
                str(tmp_path / "missing.zarr"),
                "--config",
                str(TINY),
                "--set",
                f"run.registered_model_name={name}",
            )  # fmt: skip
        )
        assert "run.registered_model_name" in line and "not a valid name" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_workers_that_cannot_be_placed_are_refused_in_one_line(
    tiny_store, ray_session, tmp_path, where
):
    """run.cpus_per_worker=100 on a 2-CPU machine: before, Ray waited for the CPUs forever.
    Local: checked against os.cpu_count before Ray starts; on a cluster (RAY_ADDRESS), against
    its nodes once connected. Nothing is created (no MLflow database, no run folder)."""
    env = _env(tmp_path, ray_session if where == "cluster" else None)
    start = time.monotonic()
    out = subprocess.run(
        _train_cmd(tiny_store, tmp_path, "greedy", "run.cpus_per_worker=100"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert time.monotonic() - start < 60
    line = _one_error_line(out)
    assert "run.workers=1 x (run.cpus_per_worker=100) cannot be placed" in line, line
    assert ("this machine" if where == "local" else "the Ray cluster's nodes") in line, line
    assert "Ray would wait forever" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_max_image_gib_must_be_a_positive_number(tmp_path, value):
    """Before: `nan` gave a traceback (int(nan)); 0 silently meant the default."""
    from nifti_factory import write_layout_cohort

    write_layout_cohort("nnunet", tmp_path / "src", n_cases=1)
    out = _tsesnet(tmp_path, "ingest", str(tmp_path / "src"), str(tmp_path / "store"),
                   "--max-image-gib", value)  # fmt: skip
    line = _one_error_line(out)
    assert line == f"error: --max-image-gib must be a positive number of GiB, got {float(value):g}"
    assert not (tmp_path / "store").exists()


def _newer_schema_db(path: Path) -> None:
    """An MLflow database whose schema revision this MLflow does not know (a newer MLflow's)."""
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(f"sqlite:///{path}", path.parent.as_uri()).engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'")


@pytest.mark.parametrize("case", ["not a database", "unwritable", "newer schema", "no server"])
def test_an_unusable_tracking_uri_is_refused_before_ray_starts(tiny_store, tmp_path, case):
    """Before: tracebacks, and 274 s of silence for a server with nothing listening."""
    from local_head import free_ports

    db = tmp_path / "db" / "mlflow.db"
    db.parent.mkdir()
    if case == "not a database":
        db.write_text("these are my notes\n")
        uri, words = f"sqlite:///{db}", f"{db} is not an SQLite database"
    elif case == "unwritable":
        uri, words = "sqlite:////proc/tsesnet/mlflow.db", "cannot write in /proc"
    elif case == "newer schema":
        _newer_schema_db(db)
        uri, words = f"sqlite:///{db}", "(revision f0f0f0f0f0f0) was written by a newer MLflow"
    else:
        (port,) = free_ports(1)
        uri = f"http://user:s3cret@127.0.0.1:{port}"
        words = f"no tracking server answers at 127.0.0.1:{port} (Connection refused within 3 s)"
    before = db.read_bytes() if db.exists() else None
    env = dict(_env(tmp_path), MLFLOW_TRACKING_URI=uri)
    start = time.monotonic()
    out = subprocess.run(
        _train_cmd(tiny_store, tmp_path, "tracked"), env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert time.monotonic() - start < 45
    line = _one_error_line(out)
    assert line.startswith("error: MLFLOW_TRACKING_URI=") and words in line, line
    assert "s3cret" not in out.stderr
    assert not (tmp_path / "ray").exists()  # nothing claimed
    assert (db.read_bytes() if db.exists() else None) == before  # nothing changed


def _signal_during_start(tiny_store, ray_session, tmp_path, name, signum, after) -> int:
    """Start `tsesnet train` and send `signum` `after` seconds after its output first shows the
    MLflow run (None: after 1.5 s of start-up); its exit status."""
    import signal

    proc = subprocess.Popen(
        _train_cmd(tiny_store, tmp_path, name, "schedule.epochs=3"),
        env=_env(tmp_path, ray_session), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        if after is None:
            time.sleep(1.5)
        else:
            for line in proc.stdout:
                if f"run {name}: MLflow run" in line:
                    break
            time.sleep(after)
        proc.send_signal(signum)
        rest = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert "registered tsesnet" not in rest, rest[-3000:]
    assert signal.Signals(signum).name in rest or after is None, rest[-3000:]
    return proc.returncode


@pytest.mark.slow
def test_a_signal_at_any_moment_ends_the_run_killed_and_registers_nothing(
    tiny_store, ray_session, tmp_path
):
    """Before: SIGTERM shortly after start was swallowed in 2 of 3 tries (the run went on,
    registered and exited 0). Now at every moment tried: exit 128+signal, the MLflow run (if
    one was created) KILLED, no model version."""
    import signal

    tries = [
        ("term-at-plan", signal.SIGTERM, 0.0),
        ("term-at-ray", signal.SIGTERM, 2.0),
        ("term-in-fit", signal.SIGTERM, 6.0),
        ("int-at-start", signal.SIGINT, None),
        ("term-at-start", signal.SIGTERM, None),
    ]
    for name, signum, after in tries:
        code = _signal_during_start(tiny_store, ray_session, tmp_path, name, signum, after)
        assert code in (128 + signum, -signum), (name, code)
        if after is not None:
            assert code == 128 + signum, (name, code)
    client = _client(tmp_path)
    assert client.search_model_versions("name = 'tsesnet'") == []
    experiment = client.get_experiment_by_name("tsesnet")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert {r.data.tags["tsesnet.run_name"] for r in runs} >= {
        n for n, _, a in tries if a is not None
    }
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.data.tags, r.info.status) for r in runs]


@pytest.mark.slow
def test_one_run_name_is_never_trained_twice_at_once(tiny_store, ray_session, tmp_path):
    """Before: two `tsesnet train --name twin` started together shared one MLflow run and one
    checkpoint folder. Now the second refuses at once, naming the first's host and pid."""
    import signal

    from data_store.location import this_host

    first = subprocess.Popen(
        _train_cmd(tiny_store, tmp_path, "twin", "schedule.epochs=20"),
        env=_env(tmp_path, ray_session), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in first.stdout:
            if "run twin: MLflow run" in line:
                break
        start = time.monotonic()
        second = subprocess.run(
            _train_cmd(tiny_store, tmp_path, "twin", "schedule.epochs=20"),
            env=_env(tmp_path, ray_session), cwd=tmp_path, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert time.monotonic() - start < 60
        line = _one_error_line(second)
        assert line.startswith(
            f"error: run twin is already being trained by pid {first.pid} on {this_host()} "
        ), line
        assert "choose another --name" in line
        assert first.poll() is None  # the first goes on
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        first.kill()
    client = _client(tmp_path)
    run = _run_of(client, "twin")  # one run of that name
    assert run.info.status == "KILLED"
    assert not (tmp_path / "ray" / "twin" / ".lock").exists()  # released


REGISTER = """
import sys, time
from pathlib import Path
from tsesnet.training.config import load_config
from tsesnet.model import TSESNet
from tsesnet.tracking import runs
from tsesnet.tracking.registry import log_and_register

tiny, dice, go = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
cfg = load_config(tiny)
config = cfg.model.config(patch=(16, 32, 32))
weights = TSESNet(config).state_dict()
import dataclasses, mlflow
experiment = runs.ensure_database("tsesnet")
run = mlflow.MlflowClient().create_run(experiment)
while not go.exists():
    time.sleep(0.01)
time.sleep(float(sys.argv[4]))
from tsesnet.tracking.protocol import ValidationProtocol
reg = log_and_register(
    run_id=run.info.run_id, weights=weights, model_config=dataclasses.asdict(config),
    patch=(16, 32, 32), phases=3, val_dice=dice,
    lineage={"store_fingerprint": "f" * 16, "fold": 0, "store": "/s", "run_name": "r",
             "git_commit": "c"},
    validation=ValidationProtocol("f" * 16, 0, ("a", "b"), (16, 32, 32), 0.5, "logits > 0"),
)
print(reg.version, reg.alias, flush=True)
"""


@pytest.mark.slow
def test_the_alias_gate_is_atomic(tmp_path):
    """Three registrations under the same protocol at once (Dice 0.7 first, then 0.5 and 0.6):
    @champion ends on the best. Before: each read the champion, then set the alias a moment
    later, so a worse version registered last took @champion from a better one."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER, str(TINY), dice, str(go), delay],
            env=_env(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for dice, delay in (("0.7", "0"), ("0.5", "0.3"), ("0.6", "0.6"))
    ]
    time.sleep(8)  # all three imported and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    client = _client(tmp_path)
    champion = client.get_model_version_by_alias("tsesnet", "champion")
    assert float(champion.tags["val_dice"]) == 0.7, [o[0] for o in outs]
    assert_decided_one_at_a_time(client, [o[0] for o in outs])


def assert_decided_one_at_a_time(client, said) -> None:
    """Each version decided against the champion of its turn, in version order, as if the
    registrations had run one after another (whichever order they were created in)."""
    best = float("-inf")
    for v in sorted(client.search_model_versions("name = 'tsesnet'"), key=lambda v: int(v.version)):
        dice = float(v.tags["val_dice"])
        want = "champion" if dice > best else "challenger"
        assert v.tags["registered_as"] == want, (said, v.version, v.tags["registration_reason"])
        assert v.tags["tsesnet.gate"] == "done"
        best = max(best, dice)
