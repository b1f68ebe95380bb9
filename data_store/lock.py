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
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from data_store.errors import InputError
from data_store.location import Owner, StoreLocation, pid_running

__all__ = ["GUARD_NAME", "LOCK_NAME", "LockHolder", "StoreLock", "read_holder"]

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


def read_holder(location: StoreLocation) -> tuple[bool, LockHolder | None]:
    """(a lock file exists, the holder it names or None when it is unreadable)."""
    try:
        data = location.read_bytes(LOCK_NAME)
    except FileNotFoundError:
        return False, None
    except OSError:
        return True, None
    return True, LockHolder.parse(data)


class StoreLock:
    """The exclusive writer lock of one store; a context manager.

    Args:
        location: the store (its root folder must exist for a local store).
        wait: seconds to wait for another holder to finish before failing.
        command: what to record as the holder's command (default: this process's argv).
        notify: called with one line when this lock starts waiting or takes over a stale lock.

    Attributes:
        took_over: the stale holder whose lock was taken over, or None.
        waited_s: seconds spent waiting for the lock.
    """

    def __init__(
        self,
        location: StoreLocation,
        *,
        wait: float = 60.0,
        command: str | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        if wait < 0:
            raise InputError(f"--wait must be >= 0 seconds, got {wait:g}")
        self.location = location
        self.wait = float(wait)
        self.holder = LockHolder.me(command)
        self.notify = notify or (lambda line: print(line, file=sys.stderr, flush=True))
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
                raise InputError(self._busy(other, waited), path=self.location.url)
            if not announced:
                who = other.describe() if other else "an unreadable lock file"
                self.notify(f"{self.location.url}: waiting up to {self.wait:g} s for {who}")
                announced = True
            time.sleep(min(POLL_S, self.wait - waited))

    def release(self) -> None:
        """Removes the lock file if it is still this holder's."""
        if not self.held:
            return
        with self._guard():
            _, holder = read_holder(self.location)
            if holder is not None and holder.token == self.holder.token:
                self.location.remove(LOCK_NAME)
        self.held = False

    def _busy(self, other: LockHolder | None, waited: float) -> str:
        lock = self.location.path(LOCK_NAME)
        who = f"locked by another writer, {other.describe()}" if other else "locked"
        return (
            f"{who}; waited {waited:.0f} s (pass --wait SECONDS to wait longer; if no such "
            f"writer runs any more, delete {lock})"
        )

    def _try(self) -> LockHolder | None:
        """One attempt: None when the lock is now ours, else its current holder (None inside
        means an unreadable lock file)."""
        with self._guard():
            exists, holder = read_holder(self.location)
            if exists and holder is not None and holder.gone():
                self.location.remove(LOCK_NAME)
                self.took_over = holder
                self.notify(
                    f"{self.location.url}: took over the lock of {holder.describe()}, which is "
                    "no longer running"
                )
                exists = False
            if not exists and self._create():
                return None
            return read_holder(self.location)[1]

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
        with open(private, "wb") as f:
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
        fd = os.open(self.location.path(GUARD_NAME), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _one_line(text: str, limit: int = 300) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
