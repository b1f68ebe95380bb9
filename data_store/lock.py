"""One writer at a time: the store's lock file (``STORE/.lock``).

`StoreLock` is held by every command that writes a store (`tsesnet ingest`, `tsesnet store
verify --record`) for its whole run. The lock file names its holder as JSON: host, pid, the
process's start time (so a reused pid is not mistaken for the holder), since when, the command
line, and a random token.

Taking it: the file is created atomically, complete with its content (written under a private
name and hard-linked to ``.lock``, which fails if ``.lock`` exists; where hard links are not
supported, ``O_CREAT | O_EXCL``). Both are atomic on local file systems and on NFS.

A lock whose holder is gone (same host, and the pid no longer runs or is another process now)
is stale: it is taken over, and the caller is told whose it was. The check and the takeover run
under an ``flock`` of ``STORE/.lock.guard``, which the kernel releases when its holder dies, so
two processes that find the same stale lock cannot both take it. A lock held from another host
is never taken over (its pid cannot be checked from here): the message says how to remove it.

A writer that finds the store locked waits up to ``wait`` seconds (polling), then fails with one
line naming the holder.

Fail closed: a lock file this code did not write (empty, unparsable, foreign JSON, unreadable,
a symbolic link or not a regular file) is held by someone unknown, never treated as free: the
writer waits, then fails naming the file and ``--break-lock``. ``break_lock=True`` (the CLI's
``--break-lock``) removes such a lock, or one held from another host, once; the lock of a live
process of this host is never broken. Nothing in the store is opened through a symbolic link:
the lock file is read with ``O_NOFOLLOW`` and the guard is opened with ``O_NOFOLLOW``, so a
planted link can neither pose as a holder nor make the lock create a file outside the store.

Object stores (fsspec URLs): the lock is created with ``fs.open(path, "xb")``, which s3fs,
gcsfs and adlfs implement as a conditional (if-none-match) write, so it is atomic there; other
fsspec backends may implement it as check-then-write, which two writers starting within the same
instant can both pass. There is no ``flock`` on an object store: stale-lock takeover there is
not guarded against two processes of the same host racing to take over the same stale lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from data_store.errors import InputError
from data_store.location import Owner, StoreLocation, pid_running

#: The parameters a lock's errors name (placeholders, `data_store.errors.InputError`).
_LOCK_PARAMS = ("wait", "break_lock")

#: Seconds a writer waits for another writer's lock unless told otherwise (`--wait`).
DEFAULT_WAIT_S = 60.0

__all__ = [
    "DEFAULT_WAIT_S",
    "GUARD_NAME",
    "LOCK_NAME",
    "LockHolder",
    "StoreLock",
    "UnknownHolder",
    "read_holder",
]

LOCK_NAME = ".lock"
GUARD_NAME = ".lock.guard"
POLL_S = 0.25


@dataclass(frozen=True)
class LockHolder:
    """Who holds a store's lock (the lock file's content).

    Attributes:
        host: the holder's host (`Owner.host`).
        pid: its process ID.
        started: its start time in clock ticks since boot (Linux ``/proc``), or None.
        since: when it took the lock (seconds since the epoch).
        command: its command line (shortened).
        token: random, to tell this holder's file from a later one.
    """

    host: str
    pid: int
    started: int | None
    since: float
    command: str
    token: str

    @classmethod
    def me(cls, command: str | None = None) -> LockHolder:
        owner = Owner.me()
        return cls(
            host=owner.host,
            pid=owner.pid,
            started=process_start(owner.pid),
            since=time.time(),
            command=_one_line(command or " ".join(sys.argv)),
            token=uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        """The holder a lock file names, or None if it is not a lock file this code wrote."""
        try:
            d = json.loads(data)
            return cls(
                host=str(d["host"]),
                pid=int(d["pid"]),
                started=None if d.get("started") is None else int(d["started"]),
                since=float(d["since"]),
                command=_one_line(str(d.get("command", ""))),
                token=str(d["token"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def gone(self) -> bool:
        """True when the holder certainly no longer runs: same host, and its pid is gone or now
        belongs to a process that started at another time."""
        if not Owner(self.host, self.pid).here:
            return False
        if not pid_running(self.pid):
            return True
        now = process_start(self.pid)
        return self.started is not None and now is not None and now != self.started

    def describe(self) -> str:
        """E.g. "pid 4242 on node1 (since 2026-01-02 10:11:12, `tsesnet ingest src store`)"."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} (since {when}, `{self.command}`)"


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class UnknownHolder:
    """A lock file this code did not write: held by someone unknown.

    Attributes:
        path: the lock file (for messages).
        why: what it is, e.g. "empty", "a symbolic link".
    """

    path: str
    why: str


def read_holder(location: StoreLocation) -> tuple[bool, LockHolder | None]:
    """(a lock file exists, the holder it names or None when it is not a lock file we wrote)."""
    found = _read_lock(location)
    return found is not None, found if isinstance(found, LockHolder) else None


def _read_lock(location: StoreLocation) -> LockHolder | UnknownHolder | None:
    """The lock file's holder, an `UnknownHolder` when it is not one we wrote, None if absent.

    A local lock file is never read through a symbolic link (``O_NOFOLLOW``), nor opened when it
    is not a regular file (a FIFO would block).
    """
    path = location.path(LOCK_NAME)
    try:
        if location.local:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                return UnknownHolder(path, "a symbolic link")
            if not stat.S_ISREG(st.st_mode):
                return UnknownHolder(path, "not a regular file")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                data = f.read(1 << 20)
        else:
            data = location.read_bytes(LOCK_NAME)
    except FileNotFoundError:
        return None
    except OSError as err:
        return UnknownHolder(path, f"unreadable: {err.strerror or err}")
    if not data.strip():
        return UnknownHolder(path, "empty")
    return LockHolder.parse(data) or UnknownHolder(path, "not a lock file tsesnet wrote")


class StoreLock:
    """The exclusive writer lock of one store; a context manager.

    Args:
        location: the store (its root folder must exist for a local store).
        wait: seconds to wait for another holder to finish before failing.
        command: what to record as the holder's command (default: this process's argv).
        notify: called with one line when this lock starts waiting or takes over a stale lock.
        break_lock: remove, once, a lock held by someone unknown (see the module docstring) or
            from another host, and a guard that is not a regular file (the CLI's
            ``--break-lock``); a live holder of this host is never broken.

    Attributes:
        took_over: the stale holder whose lock was taken over, or None.
        waited_s: seconds spent waiting for the lock.
    """

    def __init__(
        self,
        location: StoreLocation,
        *,
        wait: float = DEFAULT_WAIT_S,
        command: str | None = None,
        notify: Callable[[str], None] | None = None,
        break_lock: bool = False,
    ):
        if wait < 0:
            raise InputError(f"must be >= 0 seconds, got {wait:g}", param="wait")
        self.location = location
        self.wait = float(wait)
        self.holder = LockHolder.me(command)
        self.notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
        self.break_lock = break_lock
        self.took_over: LockHolder | None = None
        self.waited_s = 0.0
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, waiting up to `wait` seconds (see the module docstring).

        Raises:
            InputError: still held by another process after `wait` seconds, naming it.
        """
        start = time.monotonic()
        announced = False
        while True:
            other = self._try()
            if other is None:
                self.held, self.waited_s = True, time.monotonic() - start
                return
            waited = time.monotonic() - start
            if waited >= self.wait:
                raise InputError(
                    self._busy(other, waited), path=self.location.url, params=_LOCK_PARAMS
                )
            if not announced:
                if isinstance(other, UnknownHolder):
                    who = f"an unknown writer ({other.path})"
                else:
                    who = other.describe()
                self.notify(f"{self.location.url}: waiting up to {self.wait:g} s for {who}")
                announced = True
            time.sleep(min(POLL_S, self.wait - waited))

    def release(self) -> None:
        """Removes the lock file if it is still this holder's."""
        if not self.held:
            return
        with self._guard():
            holder = _read_lock(self.location)
            if isinstance(holder, LockHolder) and holder.token == self.holder.token:
                self.location.remove(LOCK_NAME)
        self.held = False

    def _busy(self, other: LockHolder | UnknownHolder, waited: float) -> str:
        if isinstance(other, UnknownHolder):
            return (
                f"locked by an unknown writer ({other.path} is {other.why}); waited "
                f"{waited:.0f} s (pass {{wait=SECONDS}} to wait longer; if no writer runs on "
                "this store, pass {break_lock=True} to remove the lock)"
            )
        lock = self.location.path(LOCK_NAME)
        return (
            f"locked by another writer, {other.describe()}; waited {waited:.0f} s (pass "
            f"{{wait=SECONDS}} to wait longer; if no such writer runs any more, delete {lock})"
        )

    def _try(self) -> LockHolder | UnknownHolder | None:
        """One attempt: None when the lock is now ours, else who holds it."""
        with self._guard():
            holder = _read_lock(self.location)
            if isinstance(holder, LockHolder) and holder.gone():
                self.location.remove(LOCK_NAME)
                self.took_over = holder
                self.notify(
                    f"{self.location.url}: took over the lock of {holder.describe()}, which is "
                    "no longer running"
                )
                holder = None
            elif holder is not None and self.break_lock and self._breakable(holder):
                self.location.remove(LOCK_NAME)  # a symbolic link itself, never its target
                self.break_lock = False  # once: a lock taken after this one is respected
                self.notify(
                    f"{self.location.url}: broke the lock {self.location.path(LOCK_NAME)} "
                    "(--break-lock)"
                )
                holder = None
            if holder is None and self._create():
                return None
            return _read_lock(self.location) or UnknownHolder(
                self.location.path(LOCK_NAME), "gone and back (retrying)"
            )

    @staticmethod
    def _breakable(holder: LockHolder | UnknownHolder) -> bool:
        """Whether --break-lock may remove this lock: never a holder of this host (one that
        runs is waited for, one that is gone is taken over anyway)."""
        return isinstance(holder, UnknownHolder) or not Owner(holder.host, holder.pid).here

    def _create(self) -> bool:
        """Creates the lock file with our content, atomically; False if it exists."""
        data = self.holder.to_bytes()
        if not self.location.local:
            try:
                with self.location.fs.open(f"{self.location.root}/{LOCK_NAME}", "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        path = self.location.path(LOCK_NAME)
        private = f"{path}.{self.holder.token}"
        fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(private, path)  # atomic, and the lock file is complete when it appears
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and FAT file systems)
            return self._create_exclusive(path, data)
        finally:
            os.unlink(private)

    @staticmethod
    def _create_exclusive(path: str, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    @contextlib.contextmanager
    def _guard(self):
        """An flock of ``.lock.guard`` around a check-and-take (local stores with fcntl)."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        if not self.location.local or fcntl is None:
            yield
            return
        fd = self._open_guard()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _open_guard(self) -> int:
        path = self.location.path(GUARD_NAME)
        fd = _open_guard_at(path)
        if fd is None and self.break_lock:
            self.location.remove(GUARD_NAME)  # a link itself, never its target
            self.notify(f"{self.location.url}: removed {path} (--break-lock)")
            fd = _open_guard_at(path)
        if fd is None:
            raise InputError(
                f"{path} is not a regular file (a symbolic link?): refusing to lock through "
                "it; remove it if no writer runs (or pass {break_lock=True})",
                path=self.location.url,
                params=_LOCK_PARAMS,
            )
        return fd


def _open_guard_at(path: str) -> int | None:
    """The guard file's descriptor, never through a symbolic link; None if it is not a
    regular file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:  # ELOOP: a symbolic link; EISDIR, ENXIO: a folder, a socket
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _one_line(text: str, limit: int = 300) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
