"""Names that become paths and MLflow queries: one safe character set, one way to build them.

Run, sweep and trial names name folders under `run.storage_path` and are searched for in
MLflow, so they are letters, digits and `-_.`, not starting with a dot: nothing a user types can
climb out of the storage folder or break a search filter.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_store.errors import InputError

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
MAX_LENGTH = 128


def check(name: str, what: str = "name", *, param: bool = True) -> str:
    """Return `name` if it is a safe name, else raise a one-line `InputError` naming `what`.

    Args:
        name: the name to check.
        what: where it came from: a parameter (the caller's, e.g. ``name``), or a config key.
        param: `what` is a parameter, shown by each caller's name for it (`InputError.param`:
            the command line's flag); False shows it as written (a config key).
    """
    if not isinstance(name, str) or not _SAFE.fullmatch(name) or len(name) > MAX_LENGTH:
        problem = (
            f"{name!r} is not a valid name: use letters, digits, '-', '_' and '.' (not first), "
            f"at most {MAX_LENGTH} characters"
        )
        if param:
            raise InputError(problem, param=what)
        raise InputError(f"{what} {problem}")
    return name


def clean(text: str) -> str:
    """`text` with every run of other characters replaced by '-' (for derived names)."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).lstrip(".-") or "x"
    return out[:MAX_LENGTH]


def store_stem(store: str | Path) -> str:
    """The store's folder name without `.zarr` (`/data/bts.zarr` -> `bts`), cleaned."""
    return clean(Path(str(store).rstrip("/")).name.removesuffix(".zarr") or "store")


def join(*parts: str) -> str:
    """Parts joined with '-', each cleaned: the one rule for derived run and sweep names."""
    return clean("-".join(str(p) for p in parts))
