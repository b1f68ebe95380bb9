"""`ray job submit` end to end against a real Ray head with token authentication.

The head is started with `ray start` on free ports with its own temp dir and HOME (its own token),
so it never meets the session's Ray. Clients run in subprocesses because Ray reads
`RAY_AUTH_MODE` when it is imported. The head's processes are stopped by PID at the end (never
`ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CLIENT = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient, JobStatus

address, spec = sys.argv[1], json.loads(sys.argv[2])
out = {}
try:
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"],
                            submission_id=spec["submission_id"])
    out["submitted"] = job
    if spec.get("wait"):
        deadline = time.time() + spec["wait"]
        while time.time() < deadline:
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
        out["status"] = str(client.get_job_status(job).value)
        out["logs"] = client.get_job_logs(job)[-6000:]
except Exception as err:  # refused submissions land here
    out["error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_with(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(p.name))
    return pids


def _stop_head(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, the processes of the head started with this temp dir."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_with(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and _pids_with(temp_dir):
            time.sleep(0.3)


@pytest.fixture()
def token_head(tmp_path):
    """A Ray head on 127.0.0.1 with token authentication; yields (dashboard URL, env)."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths
    env = dict(
        os.environ,
        HOME=str(home),
        RAY_AUTH_MODE="token",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True
    )
    assert (home / ".ray" / "auth_token").is_file()
    (gcs, dash, client, agent, agent_grpc, rt_agent, metrics, om, nm) = _free_ports(9)
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(rt_agent),
        "--metrics-export-port",
        str(metrics),
        "--object-manager-port",
        str(om),
        "--node-manager-port",
        str(nm),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(temp_dir)


def _client(address: str, spec: dict, env: dict, timeout: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, address, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_job_submit_with_token(token_head, tiny_store, tmp_path):
    address, env = token_head
    runtime_env = yaml.safe_load((ROOT / "platform" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(ROOT)
    db = tmp_path / "mlflow.db"
    runtime_env["env_vars"] = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    spec = {
        "entrypoint": (
            f"{sys.executable} -m tsesnet.cli train --store {tiny_store} "
            "--config platform/configs/tiny.yaml --name job-tiny "
            f"--set run.storage_path={tmp_path / 'ray_results'}"
        ),
        "runtime_env": runtime_env,
        "submission_id": "tsesnet-job-tiny",
    }

    # Without the token (no RAY_AUTH_MODE, an empty HOME): refused.
    anon_home = tmp_path / "anon"
    anon_home.mkdir()
    anon_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    anon_env["HOME"] = str(anon_home)
    refused = _client(address, dict(spec, submission_id="anon"), anon_env, timeout=120)
    assert "error" in refused and "submitted" not in refused, refused
    assert any(w in refused["error"].lower() for w in ("auth", "401", "403", "token")), refused
    print(f"\nsubmission without the token: {refused['error'][:300]}")

    # With the token: runs one tiny epoch, tracked and registered.
    out = _client(address, dict(spec, wait=420), env, timeout=480)
    assert out.get("status") == "SUCCEEDED", out
    assert "registered tsesnet" in out["logs"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tsesnet")
    (run,) = client.search_runs([exp.experiment_id], "tags.`tsesnet.run_name` = 'job-tiny'")
    assert run.info.status == "FINISHED" and "val_dice" in run.data.metrics
    (mv,) = client.search_model_versions("name = 'tsesnet'")
    assert mv.run_id == run.info.run_id
    assert (tmp_path / "ray_results" / "job-tiny").is_dir()
