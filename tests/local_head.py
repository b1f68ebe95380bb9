"""A Ray head started by `platform/local_cluster.sh` on free ports, for the tests, and its sockets.

The head gets its own HOME (so its own token), its own temp dir and free ports, so it never meets
the session's Ray or another engineer's. It is stopped with the script's own `stop`; whatever
survives that is killed by PID (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rehearsal_cluster  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "platform" / "local_cluster.sh"
PORT_VARS = (
    "RAY_PORT",
    "DASHBOARD_PORT",
    "CLIENT_PORT",
    "AGENT_PORT",
    "DASHBOARD_METRIC_PORT",
    "AUTOSCALER_METRIC_PORT",
)
# Variables of the test process that would change what the head or its clients do.
DROPPED = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "XDG_STATE_HOME",  # the user's own HOME holds the state (the session sets one for logs)
    "MLFLOW_ARTIFACTS_DESTINATION",
)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_env(home: Path) -> dict[str, str]:
    """The environment of a user who runs the script: HOME, PATH with this venv, free ports."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(
        HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        NUM_CPUS="2",
        STOP_GRACE="3",
        # Short: Ray's unix socket paths live under it.
        RAY_TEMP_DIR=tempfile.mkdtemp(prefix="th", dir="/tmp"),
    )
    env.update(zip(PORT_VARS, map(str, free_ports(len(PORT_VARS))), strict=True))
    return env


def script(action: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `platform/local_cluster.sh ACTION` as a user would."""
    return subprocess.run(
        ["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout
    )


def head_pids(temp_dir: str) -> set[int]:
    """Processes whose command line or open files are inside `temp_dir` (this test excepted):
    the rule the cluster rehearsal finds its nodes' processes by (`platform/rehearsal.py`)."""
    return rehearsal_cluster.load().pids_in(Path(temp_dir))


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket those processes listen on (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        local, users = fields[3], " ".join(fields[5:])
        owners = {int(p.split(",")[0]) for p in users.split("pid=")[1:]}
        if owners & pids:
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port), users.split('"')[1]))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address ([::ffff:127.0.0.1])."""
    address = address.removeprefix("::ffff:")
    return address.startswith("127.") or address == "::1"


def kill_leftovers(temp_dir: str) -> None:
    """SIGKILL whatever of the head is still there (after the script's own stop)."""
    for pid in head_pids(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and head_pids(temp_dir):
        time.sleep(0.3)


@contextlib.contextmanager
def local_head(home: Path):
    """Start the script's head for a test; yield its environment; stop it whatever happens."""
    env = head_env(home)
    try:
        started = script("start", env)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield env
    finally:
        script("stop", env, timeout=60)
        kill_leftovers(env["RAY_TEMP_DIR"])
