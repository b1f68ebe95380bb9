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
        from ray._raylet import Config

        Config.initialize("")


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
