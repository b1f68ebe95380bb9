"""The platform's private local Ray: how `ingest` and every `tsesnet` driver start one.

A new local instance (`address="local"`: never a cluster some earlier `ray start` left on this
machine), its dashboard on and bound to 127.0.0.1. It lives in the lowest layer because ingest,
the lowest user of Ray, starts one too; `tsesnet.common.cluster.connect` uses it.

Token authentication. Ray 2.60 turns token authentication on for a new local `ray.init()` when
`RAY_AUTH_MODE` is unset, and says so on every start ("Token authentication is enabled ... Set
RAY_AUTH_MODE=disabled to opt out"); it also writes a missing `~/.ray/auth_token` readable by
everyone (mode 0644). For its private local instance the platform states the mode Ray would pick
anyway (`RAY_AUTH_MODE=token`: Ray prints nothing when the mode is set), writes a missing token
file itself with mode 0600, and makes a token file it finds readable by others private, saying
so in one line. A cluster reached through `$RAY_ADDRESS` keeps the mode its user set.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: What the workers of a driver need to reach object storage (the store, checkpoints, prediction
#: output) and the tracking server. Ray's workers get the environment their raylet started with,
#: not the driver's: these travel in the job's runtime env (`connect`, `tsesnet submit`). boto3,
#: s3fs and pyarrow all read AWS_ENDPOINT_URL, so it reaches the store, Ray Train's
#: `storage_path` and MLflow's S3 artifacts alike (FSSPEC_S3_ENDPOINT_URL reaches only fsspec).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    # Ray Train's wait for room for its workers (`tsesnet.training.driver.start_attempts`).
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
)
#: Set by Ray in a submitted job's driver: its runtime env already reaches every worker.
JOB_ENV_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def forwarded_env() -> dict[str, str]:
    """The `FORWARDED_ENV` variables set here (empty ones left out)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def connect(*, log_to_driver: bool = True, **local_kwargs):
    """The one way a driver reaches Ray; returns the `ray` module.

    An initialised session is used as it is. With `$RAY_ADDRESS`, the cluster there is joined
    and `forwarded_env` becomes the job's runtime env (unless this driver is a submitted job,
    whose runtime env already carries it). Otherwise a new private local instance starts
    (`init_local`, with `local_kwargs`).
    """
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        make_token_private(token_path())
        env = forwarded_env()
        extra = (
            {"runtime_env": {"env_vars": env}} if env and JOB_ENV_MARKER not in os.environ else {}
        )
        ray.init(configure_logging=False, log_to_driver=log_to_driver, **extra)
        return ray
    return init_local(log_to_driver=log_to_driver, **local_kwargs)


def init_local(**kwargs):
    """Start a new private local Ray (token auth prepared, dashboard on 127.0.0.1); return `ray`.

    Args:
        **kwargs: more `ray.init` arguments (`num_cpus`, `log_to_driver`, ...).
    """
    import ray

    prepare_private_auth()
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        **kwargs,
    )
    return ray


def token_path() -> Path:
    """Where Ray reads its token from: `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def prepare_private_auth() -> None:
    """Set up token authentication for a new private local Ray, before `ray.init()`.

    Sets `RAY_AUTH_MODE=token` unless the user set a mode (Ray's own default for a new local
    instance, stated so that Ray does not print its notice) and, in token mode without
    `$RAY_AUTH_TOKEN`, makes sure the token file exists with mode 0600.
    """
    if AUTH_MODE_ENV not in os.environ:
        os.environ[AUTH_MODE_ENV] = "token"
        _reload_ray_config()
    if os.environ[AUTH_MODE_ENV].lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if not write_private_token(path):
        make_token_private(path)


def _reload_ray_config() -> None:
    """Make an already imported Ray see a changed `RAY_AUTH_MODE`.

    Ray reads the mode into its C++ config when `ray._raylet` is imported; Ray itself re-reads it
    this way when it turns token mode on (`authentication_token_setup._enable_token_auth`).
    """
    if "ray._raylet" in sys.modules:
        from data_store.compat import reinitialize_ray_config

        reinitialize_ray_config()


def write_private_token(path: Path) -> bool:
    """Write a new random token to `path` with mode 0600 if no file is there; True if written.

    The token has the form `ray get-auth-token --generate` writes (256 random bits, hex).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return True


def make_token_private(path: Path) -> bool:
    """Set a token file that others can read or write to mode 0600; True if its mode changed.

    Prints one line to stderr when it changes the mode; a missing file is left alone.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not mode & 0o077:
        return False
    path.chmod(0o600)
    print(
        f"tsesnet: the Ray token file {path} was readable by others (mode {mode:04o}); "
        "set it to 0600",
        file=sys.stderr,
        flush=True,
    )
    return True
