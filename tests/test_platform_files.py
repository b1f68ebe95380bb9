"""What `platform/` ships, checked as its users meet it.

- `local_cluster.sh`: a head beside another Ray listens on loopback only (`ss -ltnp`), refuses
  taken ports and a second start, makes a readable token private, and `stop` ends it alone.
- The token file: private whoever creates it (`data_store.local_ray`), and the platform's own
  local Ray starts without Ray's token notice.
- `mlflow_server.sh`: authentication on, no secret on a command line, refusals in one line.
- `cluster.yaml` against Ray's own cluster-launcher schema; `rayjob.yaml`'s image, token Secret,
  volume and NetworkPolicy; the Dockerfile's sources; the lock files against `pyproject.toml`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_head import (
    BIN,
    ROOT,
    free_ports,
    head_env,
    head_pids,
    is_loopback,
    kill_leftovers,
    listeners,
    script,
)
from packaging.requirements import Requirement
from packaging.version import Version

from data_store import local_ray

PLATFORM = ROOT / "platform"
IMAGE = "REGISTRY/tsesnet:0.1.0-gpu"
TOKEN_SECRET = "tsesnet-ray-token"
SHARED_CLAIM = "tsesnet-shared"


# ---------------------------------------------------------------- the local cluster script


def _assert_refused(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert words in line, line


def _listeners_when(temp_dir: str, ports: set[int], seconds: float) -> list:
    """The head's listeners once all of `ports` are among them (the Ray Client server and the
    dashboard come up a few seconds after `ray start` returns)."""
    deadline = time.time() + seconds
    while True:
        bound = listeners(head_pids(temp_dir))
        if ports <= {port for _, port, _ in bound} or time.time() > deadline:
            assert ports <= {port for _, port, _ in bound}, (ports, bound)
            return bound
        time.sleep(1)


@pytest.mark.slow
def test_local_cluster_stays_local_and_stops_only_itself(ray_session, tmp_path):
    other = ray_session  # another Ray on this machine, as a colleague's would be
    env = head_env(tmp_path / "home")
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("0" * 64)
    token.chmod(0o644)
    try:
        started = script("start", env)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert f"{token} was readable by others (mode 644); set it to 0600" in started.stdout
        assert stat.S_IMODE(token.stat().st_mode) == 0o600

        wanted = {int(env[name]) for name in ("RAY_PORT", "DASHBOARD_PORT", "CLIENT_PORT")}
        bound = _listeners_when(env["RAY_TEMP_DIR"], wanted, seconds=60)
        beyond = [b for b in bound if not is_loopback(b[0])]
        assert not beyond, f"listening beyond loopback: {beyond}"

        _assert_refused(script("start", env), "already running")
        clash = dict(head_env(tmp_path / "home"), DASHBOARD_PORT=env["DASHBOARD_PORT"])
        _assert_refused(script("start", clash), f"port {env['DASHBOARD_PORT']} (DASHBOARD_PORT)")

        stopped = script("stop", env, timeout=60)
        assert stopped.returncode == 0 and "stopped the head" in stopped.stdout, stopped.stderr
        assert not head_pids(env["RAY_TEMP_DIR"])
        assert other.get(other.remote(lambda: 41).remote(), timeout=60) + 1 == 42
    finally:
        script("stop", env, timeout=60)
        kill_leftovers(env["RAY_TEMP_DIR"])


BYSTANDER = """
import sys, time
f = open(sys.argv[1], "w")  # a file open in the shared temp dir, as a Ray driver's log is
print("ready", flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (this machine's init reaps late)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.slow
def test_local_cluster_in_a_shared_temp_dir_acts_only_on_what_it_started(tmp_path):
    """RAY_TEMP_DIR shared with another Ray (Ray's own default, /tmp/ray): a process of that
    other Ray (a driver with a log open there and the folder on its command line) neither makes
    `start` refuse nor is signalled by `stop`. A new RAY_AUTH_TOKEN_PATH is generated, 0600."""
    home = tmp_path / "home"
    env = head_env(home)
    shared = env["RAY_TEMP_DIR"]
    os.makedirs(f"{shared}/session_other/logs")
    bystander = subprocess.Popen(
        [sys.executable, "-c", BYSTANDER, f"{shared}/session_other/logs/driver.log"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bystander.stdout.readline() == "ready\n"
    token = home / "tokens" / "new" / "ray_token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        started = script("start", env)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
        (record,) = re.findall(r"PIDs recorded in (\S+)\.", started.stdout)
        recorded = {int(line.split()[0]) for line in Path(record).read_text().splitlines()[1:]}
        assert recorded and bystander.pid not in recorded
        _assert_refused(script("start", env), "already running")
        # a recorded pid whose process is now another one (another start time) is left alone
        with open(record, "a") as f:
            f.write(f"{bystander.pid} 1\n")
        stopped = script("stop", env, timeout=60)
        assert stopped.returncode == 0 and "stopped the head" in stopped.stdout, stopped.stderr
        assert bystander.poll() is None, "stop signalled a process it did not start"
        alive = {pid for pid in recorded if _running(pid)}
        assert not alive, alive
        assert script("stop", env).stdout.startswith("no head started by this script")
    finally:
        bystander.kill()
        script("stop", env, timeout=60)
        kill_leftovers(shared)


def test_local_cluster_refuses_an_empty_token_file(tmp_path):
    env = head_env(tmp_path / "home")
    (tmp_path / "empty").write_text("")
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "empty")
    _assert_refused(script("start", env), f"{tmp_path / 'empty'} is empty")


# ---------------------------------------------------------------- the token file


def test_token_file_made_private_with_one_line(tmp_path, capsys):
    path = tmp_path / "auth_token"
    path.write_text("t" * 64)
    path.chmod(0o644)
    assert local_ray.make_token_private(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(path) in line and "0644" in line and "0600" in line
    assert local_ray.make_token_private(path) is False  # already private: silent
    assert local_ray.make_token_private(tmp_path / "missing") is False
    assert capsys.readouterr().err == ""


def test_new_token_is_private_and_never_overwritten(tmp_path):
    path = tmp_path / "new" / ".ray" / "auth_token"
    assert local_ray.write_private_token(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", path.read_text())
    before = path.read_text()
    assert local_ray.write_private_token(path) is False and path.read_text() == before


@pytest.mark.slow
def test_private_local_ray_is_quiet_and_its_token_private(tmp_path):
    # `import ray` first: the platform must also work when Ray read its config before connect().
    code = (
        "import ray\n"
        "from tsesnet.common.cluster import connect\n"
        "r = connect()\n"
        "print('answer', r.get(r.remote(lambda: 7).remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert out.returncode == 0 and "answer 7" in out.stdout, out.stderr[-3000:]
    assert "Token authentication is enabled" not in out.stderr + out.stdout
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


# ---------------------------------------------------------------- the MLflow server script


def _mlflow_script(env: dict, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(PLATFORM / "mlflow_server.sh")], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"MLFLOW_HOST": "0.0.0.0"}, "authentication is off"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db:5432/mlflow"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u@db/mlflow?password=pw"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "POSTGRESQL://u:pw@db/mlflow"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://u:pw@db/m"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "mysql://db/m?ssl=1&PassWord=pw"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "mssql://db/m;Pwd=pw"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://db/m?pass%77ord=pw"}, "holds a password"),
        ({"MLFLOW_ARTIFACTS_DESTINATION": "s3://AKIA:secret@bucket/x"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://db/m?sslmode=require&token=t"}, "holds a"),
        # no secret: the next check speaks
        (
            {
                "MLFLOW_BACKEND_STORE_URI": "postgresql://u@db:5432/m?sslmode=require",
                "MLFLOW_AUTH_CONFIG_PATH": "/nonexistent/auth.ini",
            },
            "is not readable",
        ),
        ({"MLFLOW_AUTH_CONFIG_PATH": "/nonexistent/auth.ini"}, "is not readable"),
    ],
)
def test_mlflow_server_refuses_insecure_settings(settings, problem, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **settings)
    out = _mlflow_script(env)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert problem in line, line


def _wait_http(url: str, seconds: float, auth: tuple | None = None) -> int:
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            return requests.get(url, auth=auth, timeout=30).status_code
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(1)
    raise TimeoutError(url)


@pytest.mark.slow
def test_mlflow_server_authenticates_and_keeps_secrets_off_argv(tmp_path):
    pytest.importorskip("flask_wtf", reason="MLflow's basic auth needs mlflow[auth] (Flask-WTF)")
    password = "pw-" + os.urandom(8).hex()
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    ini.chmod(0o600)
    (port,) = free_ports(1)
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_BACKEND_STORE_URI=backend,
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
    )
    server = subprocess.Popen(
        ["bash", str(PLATFORM / "mlflow_server.sh")], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _wait_http(url, 240) == 401  # no credentials
        assert _wait_http(url, 30, auth=("admin", password)) == 200
        argv = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in argv and backend not in argv and str(ini) not in argv
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


# ---------------------------------------------------------------- cluster launcher and KubeRay


def _commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands")
    keys += ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k, [])]


def test_cluster_yaml_is_valid_for_ray_and_secure():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((PLATFORM / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"] == IMAGE
    commands = _commands(config)
    text = "\n".join(commands)
    assert "0.0.0.0" not in text
    assert re.search(r"--dashboard-host=\"\$\(hostname -I", text)  # the private address
    assert "pip install" not in text  # everything comes from the image's lock
    assert not re.search(r"://[^/@:\s]+:[^/@\s]+@", text), "a password in a URI"
    (mlflow,) = [c for c in commands if "mlflow_server.sh" in c]
    assert "bash /app/platform/mlflow_server.sh" in mlflow
    assert (PLATFORM / "mlflow_server.sh").is_file()  # /app is this repository in the image
    assert "MLFLOW_AUTH_CONFIG_PATH=" in mlflow and "PGPASSFILE=" in mlflow
    assert "RAY_AUTH_MODE=token ray start --head" in text
    assert "install -m 600 /shared/secrets/auth_token ~/.ray/auth_token" in text


def test_rayjob_yaml_names_the_image_token_volume_and_policy():
    job, policy = yaml.safe_load_all((PLATFORM / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and policy["kind"] == "NetworkPolicy"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == IMAGE
        volumes = pod["spec"]["volumes"]
        claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes}
        assert SHARED_CLAIM in claims
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    submitter = job["spec"]["submitterPodTemplate"]
    assert submitter["spec"]["containers"][0]["image"] == IMAGE
    labels = policy["spec"]["podSelector"]["matchLabels"]
    for pod in [*pods, submitter]:
        assert pod["metadata"]["labels"] == labels  # the policy covers every pod of the job
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": labels}}]}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (ROOT / config.removeprefix("/app/")).is_file()
    header = (PLATFORM / "rayjob.yaml").read_text()
    assert f"kubectl create secret generic {TOKEN_SECRET} --from-literal=auth_token=" in header


def test_platform_files_name_only_files_that_exist():
    for path in PLATFORM.iterdir():
        if path.is_file() and path.suffix not in (".lock",):
            for ref in re.findall(r"platform/[\w./${}-]+\w", path.read_text()):
                ref = ref.replace("${VARIANT}", "gpu").replace("$VARIANT", "gpu")
                assert (ROOT / ref).exists(), f"{path.name} names {ref}"
    assert "requirements.txt" not in (PLATFORM / "runtime_env.yaml").read_text()


# ---------------------------------------------------------------- the image and its locks


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (PLATFORM / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split()[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_copies_what_exists_and_runs_as_a_user():
    steps = _dockerfile_instructions()
    copies = [args.split() for op, args in steps if op == "COPY"]
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "RUN" and "tsesnet --help" in args for op, args in steps)
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["VARIANT"] == "gpu" and args["BASE_IMAGE"].startswith("nvidia/cuda:")
    for variant in ("gpu", "cpu"):
        assert (PLATFORM / f"requirements-{variant}.lock").is_file()
    ignored = (PLATFORM / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "*.zarr", "mlflow.db"} <= set(ignored)


def _lock(variant: str) -> dict[str, Version]:
    pins = {}
    for line in (PLATFORM / f"requirements-{variant}.lock").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, version = line.strip().partition("==")
            assert sep, f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def _wanted() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (PLATFORM / "image-requirements.in").read_text().splitlines()
    extra = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    return [Requirement(r) for r in [*project["dependencies"], *extra]]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_lock_satisfies_pyproject(variant):
    pins = _lock(variant)
    for req in _wanted():
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req} is not in requirements-{variant}.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert pins["torch"].base_version == "2.13.0"
    nvidia = sorted(n for n in pins if n.startswith("nvidia-"))
    if variant == "gpu":
        assert pins["torch"].local is None and "nvidia-cuda-runtime" in nvidia
    else:
        assert str(pins["torch"]) == "2.13.0+cpu" and not nvidia and "triton" not in pins


def _engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine):
            ok = subprocess.run([engine, "info"], capture_output=True, timeout=60)
            if ok.returncode == 0:
                return engine
    return None


@pytest.mark.slow
def test_cpu_image_builds_and_answers_help(tmp_path):
    engine = _engine()
    if engine is None:
        pytest.skip("no working docker or podman engine on this machine")
    pulled = subprocess.run([engine, "pull", "ubuntu:24.04"], capture_output=True, timeout=300)
    if pulled.returncode != 0:
        pytest.skip(f"{engine} cannot pull the base image here: {pulled.stderr.decode()[-200:]}")
    tag = "localhost/tsesnet-test:cpu"
    build = subprocess.run(
        [engine, "build", "-f", "platform/Dockerfile", "--build-arg", "VARIANT=cpu",
         "--build-arg", "BASE_IMAGE=ubuntu:24.04", "-t", tag, "."],
        cwd=ROOT, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([engine, "run", "--rm", tag], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "usage: tsesnet" in run.stdout
