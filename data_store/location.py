"""Where a store lives, the rule for the names in it, and who owns a temporary entry.

A store is a local folder or an fsspec URL (`StoreLocation`). Every key this package reads or
writes is built from the store's root, a case ID and fixed names, and a case ID is only ever
used after `check_case_id` accepted it: IDs come from file names at ingest and from the index
of a store that may have travelled between sites, and neither is trusted.

Temporary entries (``.tmp-CASE@HOST.PID.UUID`` while a case is written, ``.old-CASE@HOST.PID.UUID``
while a stored case is being replaced) carry the host and process that made them (`Owner`), so
a clean-up removes only its own entries or those of a process on this host that is gone, never
the in-flight entry of another writer. Entries named before owners were recorded
(``.tmp-CASE-UUID``) have no owner (`parse_entry` gives None).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from data_store.errors import InputError

__all__ = [
    "MAX_CASE_ID_BYTES",
    "OLD_PREFIX",
    "TMP_PREFIX",
    "Owner",
    "StoreLocation",
    "TempEntry",
    "check_case_id",
    "parse_entry",
    "temp_name",
]

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
#: Long enough for any public cohort's IDs; short enough that ``.tmp-ID@HOST.PID.UUID`` stays
#: under the 255-byte file-name limit of common file systems with a 64-byte host name.
MAX_CASE_ID_BYTES = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def check_case_id(case_id: Any, *, store: str | None = None) -> str:
    """Returns `case_id` if it can name one entry of a store folder (and one output file).

    The rule: a non-empty string of at most `MAX_CASE_ID_BYTES` UTF-8 bytes, without ``/``,
    ``\\``, ``:`` or control characters, not starting with ``.`` or ``__`` (hidden entries,
    ``..``, Zarr's reserved names) and not ``zarr.json``. Ingest applies it to IDs taken from
    file names, `open_store` to every ID of a store's index, and prediction to its output names.

    Args:
        case_id: the ID to check (any type: an index read from disk may hold anything).
        store: the store the ID was read from, named in the message.

    Raises:
        InputError: naming the ID (and the store), saying what is wrong with it.
    """
    why = _case_id_problem(case_id)
    if why is None:
        return case_id
    if store is not None:
        raise InputError(f"the index lists case ID {case_id!r}, which {why}", path=store)
    printable = isinstance(case_id, str) and case_id and not _CONTROL.search(case_id)
    raise InputError(f"case ID {case_id!r} {why}", case=case_id if printable else None)


def _case_id_problem(case_id: Any) -> str | None:
    """What is wrong with a case ID (completing "case ID X ..."), or None."""
    if not isinstance(case_id, str):
        return f"is a {type(case_id).__name__}, not a string"
    if not case_id:
        return "is empty"
    if len(case_id.encode("utf-8", "surrogatepass")) > MAX_CASE_ID_BYTES:
        return f"is longer than {MAX_CASE_ID_BYTES} bytes"
    if (
        any(c in case_id for c in "/\\:")
        or _CONTROL.search(case_id)
        or case_id.startswith((".", "__"))
        or case_id == "zarr.json"
    ):
        return (
            "is not a valid store name (no '/', '\\', ':' or control characters, "
            "not starting with '.' or '__')"
        )
    return None


# --------------------------------------------------------------------------- owners


@dataclass(frozen=True)
class Owner:
    """A process on a host: who holds a lock or made a temporary entry.

    Attributes:
        host: the host name, reduced to letters, digits and ``-`` (it is part of entry names).
        pid: the process ID on that host.
    """

    host: str
    pid: int

    @classmethod
    def me(cls) -> Owner:
        """This process."""
        return cls(this_host(), os.getpid())

    @property
    def here(self) -> bool:
        """Whether the owner runs on this host (only then can its liveness be checked)."""
        return self.host == this_host()

    def running(self) -> bool | None:
        """True/False for a process on this host, None for another host (cannot be known)."""
        if not self.here:
            return None
        return pid_running(self.pid)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def this_host() -> str:
    """This machine's host name as entry names hold it (see `Owner.host`)."""
    return _HOST_UNSAFE.sub("-", socket.gethostname())[:64] or "localhost"


def pid_running(pid: int) -> bool:
    """Whether a process with this ID exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # Linux: a zombie (killed, not yet reaped by its parent) no longer writes anything
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class TempEntry:
    """A parsed ``.tmp-`` / ``.old-`` entry name.

    Attributes:
        name: the entry name.
        kind: "tmp" (a case being written) or "old" (a stored case moved aside).
        case_id: the case it belongs to.
        owner: who made it, or None for names written before owners were recorded.
    """

    name: str
    kind: str
    case_id: str
    owner: Owner | None


def temp_name(kind: str, case_id: str, owner: Owner | None = None) -> str:
    """A fresh ``.tmp-CASE@HOST.PID.UUID`` (kind "tmp") or ``.old-...`` (kind "old") name."""
    owner = owner or Owner.me()
    prefix = TMP_PREFIX if kind == "tmp" else OLD_PREFIX
    return f"{prefix}{case_id}@{owner.host}.{owner.pid}.{uuid.uuid4().hex[:12]}"


def parse_entry(name: str) -> TempEntry | None:
    """The `TempEntry` of a ``.tmp-``/``.old-`` name; None for any other name."""
    if name.startswith(TMP_PREFIX):
        kind, rest = "tmp", name[len(TMP_PREFIX) :]
    elif name.startswith(OLD_PREFIX):
        kind, rest = "old", name[len(OLD_PREFIX) :]
    else:
        return None
    case_id, at, tag = rest.rpartition("@")
    parts = tag.split(".")
    if at and len(parts) == 3 and parts[1].isdigit():
        return TempEntry(name, kind, case_id, Owner(parts[0], int(parts[1])))
    return TempEntry(name, kind, rest.rsplit("-", 1)[0], None)  # the older .tmp-CASE-UUID


# --------------------------------------------------------------------------- location


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: a local directory or an fsspec URL.

    Attributes:
        url: what the user gave (a path or URL).
        local: True for a local directory (``file://`` URLs included): atomic renames.
        root: the root path on the filesystem (`fs` path for remote stores).
    """

    url: str
    local: bool
    root: str

    @classmethod
    def parse(cls, path: str | os.PathLike) -> StoreLocation:
        text = os.fspath(path)
        if text.startswith("file://"):
            return cls(text, True, os.path.abspath(text[len("file://") :]))
        if "://" in text:
            import fsspec

            _, root = fsspec.core.url_to_fs(text)
            return cls(text, False, root.rstrip("/"))
        return cls(text, True, os.path.abspath(text))

    @property
    def fs(self):
        """The fsspec filesystem (remote stores only; local ones use `os`), with its listing
        cache emptied: other processes (ingest's workers on other nodes) write to the store, and
        s3fs would otherwise answer `ls`/`exists` from what it listed before."""
        import fsspec

        fs = fsspec.core.url_to_fs(self.url)[0]
        fs.invalidate_cache()
        return fs

    def path(self, key: str = "") -> str:
        """The full path (local) or URL (remote) of a key below the root, for messages."""
        if self.local:
            return os.path.join(self.root, *key.split("/")) if key else self.root
        return self.url.rstrip("/") + (f"/{key}" if key else "")

    def _fs_path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_target(self, name: str | None = None):
        """What to pass to ``zarr.open_group`` for the root or a child entry ``name``."""
        if self.local:
            from zarr.storage import LocalStore

            return LocalStore(os.path.join(self.root, name) if name else self.root)
        return self.url.rstrip("/") + (f"/{name}" if name else "")

    def entries(self) -> list[str]:
        """Names of the root's direct children (files and folders)."""
        if self.local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        fs = self.fs
        if not fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(self.root, detail=False))

    def exists(self, name: str) -> bool:
        if self.local:
            return os.path.exists(os.path.join(self.root, name))
        return self.fs.exists(self._fs_path(name))

    def is_link(self, key: str) -> bool:
        """Whether a local key is a symbolic link (never true on object stores)."""
        return self.local and os.path.islink(self.path(key))

    def rename(self, src: str, dst: str) -> None:
        """Renames a child entry: atomic on a local store; on object storage a copy of every
        object, the group's own ``zarr.json`` last, then the removal of the source.

        Object stores have no folders and no rename (s3fs's recursive ``mv`` fails on the
        folder keys it lists itself). A case group counts as a case only once its ``zarr.json``
        says ``complete`` (`data_store.index.scan_cases`), so copying that key last and removing
        it first (`remove`) means a copy cut short is never taken for a case.
        """
        if self.local:
            os.rename(os.path.join(self.root, src), os.path.join(self.root, dst))
            return
        fs = self.fs
        files, _ = self.list_files(src)
        if not files:
            raise FileNotFoundError(f"{self.path(src)} holds no objects")
        head = [k for k in files if k != "zarr.json"]  # the group's own metadata goes last
        if head:
            fs.copy([self._fs_path(f"{src}/{k}") for k in head],
                    [self._fs_path(f"{dst}/{k}") for k in head])  # fmt: skip
        if "zarr.json" in files:
            fs.copy(self._fs_path(f"{src}/zarr.json"), self._fs_path(f"{dst}/zarr.json"))
        self.remove(src)

    def remove(self, name: str) -> None:
        """Removes a child entry and everything under it; missing is fine. On object storage
        the entry's own ``zarr.json`` goes first, so a removal cut short leaves no case."""
        if self.local:
            import shutil

            path = os.path.join(self.root, name)
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
            return
        fs = self.fs
        files, _ = self.list_files(name)
        if "zarr.json" in files:
            fs.rm_file(self._fs_path(f"{name}/zarr.json"))
        rest = [self._fs_path(f"{name}/{k}") for k in files if k != "zarr.json"]
        if rest:
            fs.rm(rest)
        if fs.exists(self._fs_path(name)):  # a plain object of that name, or folder markers
            fs.rm(self._fs_path(name), recursive=True)

    def read_bytes(self, key: str) -> bytes:
        """The bytes of one file below the root (FileNotFoundError if there is none)."""
        if self.local:
            with open(self.path(key), "rb") as f:
                return f.read()
        return self.fs.cat_file(self._fs_path(key))

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """The bytes of several files (None for a missing or unreadable one), fetched together
        on object stores (one concurrent batch instead of a request per file)."""
        if self.local:
            out: dict[str, bytes | None] = {}
            for key in keys:
                try:
                    out[key] = self.read_bytes(key)
                except OSError:
                    out[key] = None
            return out
        if not keys:  # s3fs's cat([]) raises FileNotFoundError([])
            return {}
        paths = {self._fs_path(k): k for k in keys}
        got = self.fs.cat(list(paths), on_error="return")
        return {k: got[p] if isinstance(got.get(p), bytes) else None for p, k in paths.items()}

    def read_json(self, key: str) -> Any:
        """A JSON file below the root, parsed (FileNotFoundError, ValueError)."""
        return json.loads(self.read_bytes(key))

    def list_files(self, prefix: str) -> tuple[dict[str, int], list[str]]:
        """Every file below ``prefix``: (key relative to it -> size in bytes, symbolic links).

        Links are listed apart and never followed: a store's files are plain files, and a
        link could point anywhere on the machine.
        """
        if not self.local:
            fs = self.fs
            base = self._fs_path(prefix).rstrip("/")
            try:
                found = fs.find(base, detail=True)
            except FileNotFoundError:
                return {}, []
            return {
                p[len(base) + 1 :]: int(info.get("size") or 0)
                for p, info in found.items()
                if info.get("type") != "directory" and p.startswith(base + "/")
            }, []
        files: dict[str, int] = {}
        links: list[str] = []
        top = self.path(prefix)
        if os.path.islink(top):
            return {}, [""]
        for folder, dirs, names in os.walk(top):
            rel = os.path.relpath(folder, top).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            for d in list(dirs):
                if os.path.islink(os.path.join(folder, d)):
                    links.append(rel + d)
                    dirs.remove(d)
            for n in names:
                full = os.path.join(folder, n)
                st = os.lstat(full)
                if os.path.islink(full):
                    links.append(rel + n)
                else:
                    files[rel + n] = st.st_size
        return files, sorted(links)
