"""The alias gate against an MLflow tracking server over HTTP, as on a cluster: registrations at
the same moment decide one at a time (in version order), so @champion ends on the best.

The server is `platform/mlflow_server.sh` (a real `mlflow server`) on a free loopback port with an
SQLite backend, started once for the module (it takes seconds to minutes to answer on a loaded
machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_honest_runs import (
    REGISTER,
    TINY,
    assert_decided_one_at_a_time,
)  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`platform/mlflow_server.sh` on 127.0.0.1 (SQLite backend, artifacts served): its URL."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = (d / "server.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW=str(Path(sys.executable).parent / "mlflow"), MLFLOW_PORT=str(port),
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{d / 'mlflow.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=str(d / "artifacts"),
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(ROOT / "platform" / "mlflow_server.sh")], stdout=log, stderr=subprocess.STDOUT,
        cwd=d, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer in 600 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _env(url: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=url, PYTHONPATH=str(ROOT))
    return env


def _register_at_once(url: str, tmp_path: Path, dices_delays) -> list[str]:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER, str(TINY), dice, str(go), delay],
            env=_env(url, tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for dice, delay in dices_delays
    ]
    time.sleep(10)  # all imported and waiting
    go.touch()
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0].strip().splitlines()[-1] for o in outs]


@pytest.mark.slow
def test_two_promotes_against_a_tracking_server_end_on_the_best(server, tmp_path):
    """Before: over HTTP the gate took no lock (only an `flock` beside an SQLite file), so two
    registrations both read "no champion" (or the old one) and the worse one, moving the alias
    last, kept @champion. Now each waits for the lower versions to decide first."""
    import mlflow

    t0 = time.monotonic()
    said = _register_at_once(server, tmp_path, (("0.7", "0"), ("0.5", "0"), ("0.6", "0")))
    print(f"three registrations took {time.monotonic() - t0:.1f} s")
    client = mlflow.MlflowClient(server)
    champion = client.get_model_version_by_alias("tsesnet", "champion")
    assert float(champion.tags["val_dice"]) == 0.7, said
    assert_decided_one_at_a_time(client, said)
