"""Every private name of a third-party library that `data_store` uses, and the versions it is
checked on: the one place to change when Zarr or Ray moves one.

A private name has no deprecation period, so each is listed in `PRIVATE` with what it is for;
`tests/test_compat.py` imports every one of them (and `tsesnet.compat`'s) on the installed
versions and fails naming the library, its version and the name if one is gone. Nothing here
imports Zarr or Ray until a function is called. `tsesnet.compat` holds the `tsesnet` package's
own private names and uses `Private` from here (data_store never imports tsesnet).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The versions the private names here and in `tsesnet.compat` are known to exist in: the same
# ranges pyproject.toml pins (tests/test_compat.py checks that they agree, and checks every name
# on the versions installed).
SUPPORTED = {
    "ray": ">=2.60,<2.61",
    "zarr": ">=3.1.3,<4",
    "torch": "==2.13.0",
    "mlflow": ">=3.17,<4",
}


@dataclass(frozen=True)
class Private:
    """One private name of a library: `module` (and `name` in it, None for the module itself)."""

    library: str
    module: str
    name: str | None
    why: str

    @property
    def where(self) -> str:
        return self.module if self.name is None else f"{self.module}.{self.name}"

    def load(self) -> Any:
        """The module or attribute; an ImportError naming the library version if it is gone."""
        return _load(self)


@functools.cache  # some are called per operator (model-summary's dispatch mode)
def _load(private: Private) -> Any:
    try:
        found = importlib.import_module(private.module)
        return found if private.name is None else getattr(found, private.name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"{private.library} {version(private.library)} has no {private.where} (used for "
            f"{private.why}); this project supports {private.library}"
            f"{SUPPORTED.get(private.library, '')}"
        ) from exc


def version(library: str) -> str:
    """The installed version of `library` ("not installed" when it is not)."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


ZARR_SYNC = Private(
    "zarr",
    "zarr.core.sync",
    "sync",
    "reading a region's image and mask chunks concurrently on Zarr's event loop",
)
RAY_CONFIG = Private(
    "ray",
    "ray._raylet",
    "Config",
    "re-reading RAY_AUTH_MODE after Ray was imported, as Ray itself does when it turns token "
    "authentication on",
)
PRIVATE = (ZARR_SYNC, RAY_CONFIG)


def zarr_sync(coroutine: Awaitable[T]) -> T:
    """Run a coroutine of Zarr's async API to its end on Zarr's own event loop."""
    return ZARR_SYNC.load()(coroutine)


def reinitialize_ray_config() -> None:
    """Make Ray's C++ config read the environment again (Ray must already be imported)."""
    RAY_CONFIG.load().initialize("")
