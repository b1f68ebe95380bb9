#!/usr/bin/env python3
"""A cluster on one machine, to rehearse what a real one does before you move to it.

    platform/rehearsal.sh up [--nodes N] [--cpus-per-node C]   # start it; prints what to export
    eval "$(platform/rehearsal.sh env)"                       # point tsesnet at it
    platform/rehearsal.sh status                               # what runs, where it listens
    platform/rehearsal.sh outage s3|mlflow SECONDS             # make a server unreachable
    platform/rehearsal.sh down                                 # stop all of it

What runs, every part in its own process, every listener on 127.0.0.1 where the part allows:

- an S3 API (moto's server) with the bucket ``tsesnet``, behind a TCP proxy: an outage closes
  the proxy's connections and refuses new ones for a while; the bucket survives it (moto keeps
  objects in memory, so stopping it would lose them);
- an MLflow tracking server (``platform/mlflow_server.sh``: basic authentication on, runs and the
  registry in SQLite, artifacts on S3 through the server), also behind a proxy;
- a Ray head (no CPUs: it runs the GCS, the dashboard, job drivers) and N worker nodes, each its
  own ``ray start`` with its own temp dir and ports, token authentication on.

The raylets get no S3 or MLflow settings: what a job needs reaches it the documented way, from
the environment of the command that starts it (`tsesnet submit` carries it in the job's runtime
env; a driver connecting with ``RAY_ADDRESS`` passes it to its workers).

Everything is recorded in ``state.json`` under the rehearsal's folder (``--dir``, default
``/tmp/tsesnet-rh-$UID``), with each process's PID and start time: ``down`` signals only the
processes it started (never ``ray stop``, which stops every Ray of this user on the machine).
The tests import this file (``tests/rehearsal_cluster.py``) and use the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "tsesnet"
REGION = "us-east-1"
DEFAULT_DIR = Path(f"/tmp/tsesnet-rh-{os.getuid()}")
START_TIMEOUT_S = 240
# What a client of the rehearsal needs beyond RAY_*: given to drivers, never to the raylets.
CLIENT_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
# Variables of the caller that would point the parts somewhere else.
DROPPED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    *CLIENT_KEYS,
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_AUTH_CONFIG_PATH",
)


class RehearsalError(RuntimeError):
    """A part did not start or stop; the message is one line naming it and its log."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


@dataclass
class Proc:
    """A process this rehearsal started: signalled only while its PID has the same start time."""

    name: str
    pid: int
    started: int | None
    log: str

    def alive(self) -> bool:
        return self.started is not None and start_time(self.pid) == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)  # each part is a session leader: its children too


def spawn(name: str, argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> Proc:
    """Start `argv` in a session of its own (so `down` can signal its whole process group)."""
    with open(log, "ab") as out:
        p = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    return Proc(name, p.pid, start_time(p.pid), str(log))


def wait_until(check, what: str, log: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RehearsalError(f"{what} did not come up in {timeout:.0f} s (log: {log})")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def http_status(url: str, auth: tuple[str, str] | None = None) -> int | None:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth:
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


# --------------------------------------------------------------------------- the rehearsal


@dataclass
class Rehearsal:
    """The rehearsal cluster recorded in ``DIR/state.json``.

    Attributes:
        dir: its folder (temp dirs, logs, token, databases).
        ports: name -> port on 127.0.0.1.
        procs: what was started, in start order.
        client_env: what a client exports (`env` prints it).
        nodes: worker node names, in start order.

    ``state.json`` (mode 0600) holds the MLflow admin password and the S3 keys with the rest.
    """

    dir: str
    ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    client_env: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------- state

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @classmethod
    def load(cls, folder: Path = DEFAULT_DIR) -> Rehearsal:
        state = folder / "state.json"
        if not state.is_file():
            raise RehearsalError(f"no rehearsal cluster in {folder} (start one: rehearsal.sh up)")
        raw = json.loads(state.read_text())
        raw["procs"] = [Proc(**p) for p in raw["procs"]]
        return cls(**raw)

    def save(self) -> None:
        tmp = self.path / "state.json.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.path / "state.json")

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client: Ray address and token, S3 endpoint, MLflow server."""
        return dict(self.client_env)

    def base_env(self) -> dict[str, str]:
        """This process's environment without anything that points elsewhere; the venv first."""
        env = {k: v for k, v in os.environ.items() if k not in DROPPED}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def ray_env(self) -> dict[str, str]:
        """The environment of `ray start`: token authentication, nothing about S3 or MLflow."""
        env = self.base_env()
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.path / "ray_token"),
            # Ray's workers run at niceness 15 by default; the drivers here run at 0.
            RAY_worker_niceness="0",
        )
        if "ray-dash-metrics" in self.ports:  # Ray's fixed defaults would clash with another Ray
            env["DASHBOARD_METRIC_PORT"] = str(self.ports["ray-dash-metrics"])
            env["AUTOSCALER_METRIC_PORT"] = str(self.ports["ray-as-metrics"])
        return env

    # ----------------------------------------------------------------- up

    def up(self, nodes: int = 2, cpus_per_node: int = 1) -> None:
        """Start every part (see the module docstring); on failure stop what started."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.path / "logs").mkdir(exist_ok=True)
        try:
            self._start_s3()
            wait_mlflow = self._start_mlflow()  # it starts slowly: Ray starts meanwhile
            self._start_head()
            for _ in range(nodes):
                self.add_node(cpus_per_node)
            wait_mlflow()
        except BaseException:
            self.down()
            raise

    def _log(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.log"

    def _proxy(self, name: str, target: int) -> None:
        port = free_port()
        self.ports[name] = port
        argv = [sys.executable, __file__, "proxy", str(port), str(target), str(self._flag(name))]
        self.procs.append(spawn(f"{name}-proxy", argv, self.base_env(), self._log(f"{name}-proxy")))
        wait_until(lambda: port_open(port), f"the {name} proxy", str(self._log(f"{name}-proxy")))

    def _flag(self, name: str) -> Path:
        return self.path / f"outage-{name}"

    def _trip(self, name: str) -> Path:
        return trip_file(self._flag(name))

    def _start_s3(self) -> None:
        port = free_port()
        self.ports["s3-server"] = port
        argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        self.procs.append(spawn("s3", argv, self.base_env(), self._log("s3")))
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{port}/") is not None,
            "moto",
            str(self._log("s3")),
        )
        self._proxy("s3", port)
        key, secret = "rehearsal", secrets.token_hex(16)
        self.client_env.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.ports['s3']}",
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_DEFAULT_REGION=REGION,
        )
        import boto3

        boto3.client("s3", endpoint_url=self.client_env["AWS_ENDPOINT_URL"],
                     aws_access_key_id=key, aws_secret_access_key=secret,
                     region_name=REGION).create_bucket(Bucket=BUCKET)  # fmt: skip
        self.save()

    def _start_mlflow(self):
        """Starts the MLflow server; returns the function that waits for it (and its proxy)."""
        password = secrets.token_hex(12)
        ini = self.path / "mlflow-auth.ini"
        fd = os.open(ini, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.path / 'mlflow-auth.db'}\n"
                f"admin_username = admin\nadmin_password = {password}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
        port = free_port()
        self.ports["mlflow-server"] = port
        env = self.base_env()
        env.update(
            {k: v for k, v in self.client_env.items() if k.startswith("AWS_")},
            MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=str(port),
            MLFLOW_WORKERS="1",
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_BACKEND_STORE_URI=f"sqlite:///{self.path / 'mlflow.db'}",
            MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/mlartifacts",
            # The proxy's address is what clients put in their Host header.
            MLFLOW_SERVER_ALLOWED_HOSTS="127.0.0.1,127.0.0.1:*,localhost,localhost:*",
        )
        argv = ["bash", str(ROOT / "platform" / "mlflow_server.sh")]
        self.procs.append(spawn("mlflow", argv, env, self._log("mlflow"), cwd=self.path))
        self.save()

        def wait() -> None:
            auth = ("admin", password)
            url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
            wait_until(
                lambda: http_status(url, auth) == 200, "the MLflow server", str(self._log("mlflow"))
            )
            self._proxy("mlflow", port)
            self.client_env.update(
                MLFLOW_TRACKING_URI=f"http://127.0.0.1:{self.ports['mlflow']}",
                MLFLOW_TRACKING_USERNAME="admin",
                MLFLOW_TRACKING_PASSWORD=password,
            )
            self.save()

        return wait

    def _ray(self, name: str, args: list[str]) -> None:
        """`ray start ARGS` (it daemonises its processes); records them by their temp dir."""
        temp = self.path / name
        temp.mkdir(exist_ok=True)
        log = self._log(name)
        argv = [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1",
                "--temp-dir", str(temp), "--disable-usage-stats", *args]  # fmt: skip
        with open(log, "ab") as out:
            done = subprocess.run(argv, env=self.ray_env(), stdout=out, stderr=out, timeout=300)
        found = [Proc(f"{name}:{pid}", pid, start_time(pid), str(log)) for pid in pids_in(temp)]
        self.procs.extend(found)
        self.save()
        if done.returncode != 0:
            raise RehearsalError(f"ray start for {name} failed (log: {log})")

    def _start_head(self) -> None:
        token = self.path / "ray_token"
        if not token.exists():
            fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        for name in (
            "gcs",
            "dashboard",
            "client",
            "agent",
            "metrics",
            "dash-metrics",
            "as-metrics",
        ):
            self.ports[f"ray-{name}"] = free_port()
        p = self.ports
        self._ray("head", [
            "--head", "--port", str(p["ray-gcs"]), "--num-cpus", "0",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p["ray-dashboard"]),
            "--ray-client-server-port", str(p["ray-client"]),
            "--dashboard-agent-listen-port", str(p["ray-agent"]),
            "--metrics-export-port", str(p["ray-metrics"]),
        ])  # fmt: skip
        dash = f"http://127.0.0.1:{p['ray-dashboard']}"
        wait_until(
            lambda: port_open(p["ray-dashboard"]), "the Ray dashboard", str(self._log("head"))
        )
        self.client_env.update(
            RAY_ADDRESS=f"127.0.0.1:{p['ray-gcs']}",
            RAY_API_SERVER_ADDRESS=dash,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
        )
        self.save()

    def add_node(self, cpus: int = 1) -> str:
        """Start one more worker node with `cpus` CPUs; returns its name (``node1``...)."""
        name = f"node{len(self.nodes) + 1}"
        while (self.path / name).exists():
            name += "x"
        ports = [str(free_port()) for _ in range(4)]
        self._ray(name, [
            "--address", self.client_env["RAY_ADDRESS"], "--num-cpus", str(cpus),
            "--node-manager-port", ports[0], "--object-manager-port", ports[1],
            "--dashboard-agent-listen-port", ports[2], "--metrics-export-port", ports[3],
            "--resources", json.dumps({name: 1}),
        ])  # fmt: skip
        self.nodes.append(name)
        self.save()
        return name

    def node_procs(self, name: str) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith(f"{name}:")]

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node (its raylet, workers, agents): a machine lost."""
        temp = self.path / name
        for _ in range(3):  # workers the raylet forked meanwhile are found on the next pass
            for pid in pids_in(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)

    # ----------------------------------------------------------------- outages

    @contextlib.contextmanager
    def outage(self, name: str):
        """While inside, the `name` server ("s3" or "mlflow") is unreachable."""
        flag = self._flag(name)
        flag.touch()
        try:
            yield
        finally:
            flag.unlink(missing_ok=True)

    def outage_when(self, name: str, pattern: bytes) -> None:
        """Arm an outage of the `name` server that begins the moment a client sends `pattern`
        (e.g. a request for a key): the request carrying it is cut, and the server stays
        unreachable until `end_outage`. A fault at a chosen step, not at a moment in time."""
        self._trip(name).write_bytes(pattern)

    def outage_on(self, name: str) -> bool:
        """Whether the `name` server is unreachable now."""
        return self._flag(name).exists()

    def end_outage(self, name: str) -> None:
        """Make the `name` server reachable again (and disarm a pending `outage_when`)."""
        self._trip(name).unlink(missing_ok=True)
        self._flag(name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- status, down

    def status_lines(self) -> list[str]:
        out = [f"rehearsal cluster in {self.dir}"]
        for p in self.procs:
            if ":" not in p.name:
                out.append(f"  {p.name:<14} pid {p.pid:<7} {'running' if p.alive() else 'gone'}")
        for name in ["head", *self.nodes]:
            alive = sum(p.alive() for p in self.node_procs(name))
            out.append(
                f"  ray {name:<10} {alive} of {len(self.node_procs(name))} processes running"
            )
        for name in ("s3", "mlflow"):
            down = " (outage on)" if self._flag(name).exists() else ""
            out.append(f"  {name} at 127.0.0.1:{self.ports.get(name)}{down}")
        out.append(f"  Ray job API {self.client_env.get('RAY_API_SERVER_ADDRESS')}")
        return out

    def down(self) -> None:
        """Stop the worker nodes, the head, then the servers: SIGTERM, then SIGKILL."""
        folders = [self.path / n for n in [*self.nodes, "head"]]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for p in reversed(self.procs):
                p.signal(sig)
            for folder in folders:  # processes Ray started after `up` recorded its own
                for pid in pids_in(folder):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (
                any(p.alive() for p in self.procs) or any(pids_in(f) for f in folders)
            ):
                time.sleep(0.3)
        for name in ("s3", "mlflow"):
            self.end_outage(name)
        (self.path / "state.json").unlink(missing_ok=True)


def pids_in(folder: Path) -> set[int]:
    """Processes whose command line or an open file is inside `folder` (this one excepted)."""
    marker = str(folder).rstrip("/") + "/"
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
                continue
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(marker):
                        found.add(int(proc.name))
                        break
    return found


# --------------------------------------------------------------------------- the proxy


def trip_file(flag: Path) -> Path:
    """Where an armed outage's pattern waits (`Rehearsal.outage_when`)."""
    return flag.with_name(flag.name + ".trip")


def proxy(listen: int, target: int, flag: Path) -> None:
    """Forward 127.0.0.1:`listen` to 127.0.0.1:`target`; while `flag` exists, drop every
    connection and refuse new ones (the server looks unreachable; its state survives). While
    `trip_file(flag)` holds a pattern, the first client bytes that contain it create `flag`."""
    import asyncio

    live: set[asyncio.StreamWriter] = set()
    trip = trip_file(flag)

    def tripped(seen: bytes) -> bool:
        with contextlib.suppress(OSError):
            pattern = trip.read_bytes()
            if pattern and pattern in seen:
                flag.touch()
                trip.unlink(missing_ok=True)
                return True
        return False

    async def pipe(reader, writer, watch_for_trip=False):
        tail = b""  # the end of the previous read: a pattern split across two reads is seen
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if watch_for_trip and trip.exists():
                    if tripped(tail + data):
                        writer.transport.abort()
                        break
                    tail = data[-256:]
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def handle(reader, writer):
        if flag.exists():
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        live.update((writer, up_writer))
        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer))
        finally:
            live.difference_update((writer, up_writer))

    async def watch():
        while True:
            if flag.exists():
                for w in list(live):
                    w.transport.abort()
            await asyncio.sleep(0.2)

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await asyncio.gather(server.serve_forever(), watch())

    asyncio.run(main())


# --------------------------------------------------------------------------- command line


def exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rehearsal.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"its folder ({DEFAULT_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start it and print the environment to export")
    up.add_argument("--nodes", type=int, default=2, help="Ray worker nodes (2)")
    up.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each worker node (1)")
    sub.add_parser("env", help='print the environment to export (eval "$(rehearsal.sh env)")')
    sub.add_parser("status", help="what runs")
    sub.add_parser("down", help="stop everything it started")
    add = sub.add_parser("add-node", help="start one more worker node")
    add.add_argument("--cpus", type=int, default=1)
    kill = sub.add_parser("kill-node", help="SIGKILL a worker node (a machine lost)")
    kill.add_argument("name")
    out = sub.add_parser("outage", help="make a server unreachable for SECONDS")
    out.add_argument("server", choices=("s3", "mlflow"))
    out.add_argument("seconds", type=float)
    px = sub.add_parser("proxy", help=argparse.SUPPRESS)
    px.add_argument("listen", type=int)
    px.add_argument("target", type=int)
    px.add_argument("flag", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "proxy":
            proxy(args.listen, args.target, args.flag)
            return 0
        if args.command == "up":
            if (args.dir / "state.json").exists():
                raise RehearsalError(
                    f"a rehearsal cluster is recorded in {args.dir}: stop it first (down)"
                )
            r = Rehearsal(str(args.dir))
            print(
                f"starting the rehearsal cluster in {args.dir} (about 2 minutes)...",
                file=sys.stderr,
            )
            r.up(args.nodes, args.cpus_per_node)
            print("\n".join(r.status_lines()), file=sys.stderr)
            print(exports(r.env))
            print(
                f"# bucket: s3://{BUCKET}   stop it with: platform/rehearsal.sh down",
                file=sys.stderr,
            )
            return 0
        r = Rehearsal.load(args.dir)
        if args.command == "env":
            print(exports(r.env))
        elif args.command == "status":
            print("\n".join(r.status_lines()))
        elif args.command == "down":
            r.down()
            print(f"stopped the rehearsal cluster in {args.dir}")
        elif args.command == "add-node":
            print(r.add_node(args.cpus))
        elif args.command == "kill-node":
            r.kill_node(args.name)
        elif args.command == "outage":
            with r.outage(args.server):
                time.sleep(args.seconds)
        return 0
    except (RehearsalError, subprocess.TimeoutExpired, OSError) as err:
        print(f"rehearsal: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
