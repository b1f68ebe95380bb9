"""Batches of training patches, loaded in background processes while the accelerator steps.

Shape legend: B batch, T phases, z y x voxels of a patch.

Batch b of epoch e on a rank holds patches ``b*B ... (b+1)*B - 1`` of
`PatchSampler.patch(e, i)`, stacked: the same bits for any number of loader processes, since
each patch draws from its own generator seeded by (seed, epoch, rank, i).

``workers=0`` loads in the calling thread. ``workers=k`` starts k loader processes once (at the
first epoch) and keeps them until `PatchLoader.close`, so each keeps its sampler's case cache
(``cache_bytes`` per process) warm across epochs. Batch b goes to process ``b % k``; each has
``prefetch`` batches in flight. A process writes its batch into a slot of a shared-memory ring
allocated once (``k * prefetch`` slots, each sized for the shard's largest phase count), and a
feeder thread in the training process copies the slot out (into pinned memory with
``pin_memory`` on CUDA), frees it, and queues the batch for the consumer, whose ``next`` then
only takes it from the queue.

Why not PyTorch's DataLoader (the first version used it, measured side by side by
``tests/benchmarks/bench_loader.py --compare-dataloader``): its worker assembles every batch in
newly allocated shared memory, and a 21 MB batch of 6-phase 48x96x96 patches cost ~21 ms there
(page faults and zeroing of fresh pages), more than reading its two warm patches (~17 ms); a slot
reused from the ring costs a copy (~3 ms). It also hands shared memory over by file
descriptor through the sending process, so a frozen process blocks the receiver mid-batch, and
it notices a dead process by polling every 5 s.

The processes start from a fork server (``start_method="forkserver"``), never by forking the
training process, whose Ray, MLflow, zarr and CUDA threads a fork would copy mid-flight; the
fork server imports this module once. As with any fork server or spawn, the script that starts
the training process must guard its entry point (``if __name__ == "__main__":``; console
scripts, pytest and Ray's workers do).

Failures never hang the training loop; each ends the epoch with one `LoaderError` naming the
case. Each process writes, in shared memory, which patch it is about to read:

- a patch that raises (a corrupt chunk, a bad case) comes back as a failure; the processes stay
  for the next epoch;
- a process that dies (SIGKILL, the kernel's OOM killer) is seen at once (its pipe and its
  process sentinel) and reported with the case it was reading;
- with ``timeout_s``, a process that has begun no other patch for that long (a hung file system,
  a frozen process) is reported the same way.

After a dead or stalled process the loader kills its processes; the next `PatchLoader.epoch`
starts new ones. Loader processes exit within a second of the training process's death (a fork
server's children would otherwise outlive it) and ignore SIGINT (Ctrl-C is the training
process's to handle).
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_store.errors import LoaderError
from data_store.sampler import PatchSampler, SamplerConfig
from data_store.store import Store

__all__ = ["EpochBatches", "PatchLoader", "capped_workers", "patch_batches"]

_POLL_S = 0.2  # how often a wait for a batch looks at the stop flag and the progress slots


def capped_workers(requested: int, cpus: float) -> tuple[int, str | None]:
    """Loader processes that fit the CPUs a training worker reserved, and why fewer, if fewer.

    One CPU stays with the training process itself (its Python loop, the CUDA launches, the
    loss, the feeder thread's copies); each loader process keeps one more CPU busy.

    Args:
        requested: loader processes asked for (e.g. ``data.loader_workers``).
        cpus: CPUs reserved for this training worker (e.g. ``run.cpus_per_worker``).

    Returns:
        (processes to start, a one-line warning when that is fewer than requested, else None).

    Raises:
        ValueError: a negative request or a non-positive CPU count.
    """
    if requested < 0:
        raise ValueError(f"loader workers must be >= 0, got {requested}")
    if not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus}")
    cap = max(int(math.floor(cpus + 1e-9)) - 1, 0)
    if requested <= cap:
        return int(requested), None
    where = f"{cap} loader process{'es' if cap != 1 else ''}" if cap else "the training thread"
    return cap, (
        f"{requested} loader processes need {requested + 1} CPUs (1 for training + 1 each) but "
        f"{cpus:g} are reserved: loading in {where}; reserve {requested + 1} CPUs per worker "
        f"(run.cpus_per_worker) to get them all"
    )


# ------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class _Slot:
    """What loader process `worker` (pid `pid`) is doing: reading patch `patch` of `epoch` when
    `reading`, else the last one it read (-1: none yet)."""

    worker: int
    pid: int
    epoch: int
    patch: int
    reading: bool


class _Progress:
    """One `_Slot` per loader process in shared memory, written by that process only.

    No lock: the training process only compares a slot with itself over time, and reads what
    it says after its writer died or stalled.
    """

    _FIELDS = 4  # pid, epoch, patch, reading

    def __init__(self, ctx, workers: int):
        self._array = ctx.RawArray("q", workers * self._FIELDS)
        self._base: int | None = None  # set in the loader process that owns a slot

    def claim(self, worker: int) -> None:
        """Called in loader process `worker` when it starts."""
        self._base = worker * self._FIELDS
        self._array[self._base : self._base + self._FIELDS] = [os.getpid(), -1, -1, 0]

    def reading(self, epoch: int, patch: int) -> None:
        if self._base is not None:
            self._array[self._base + 1 : self._base + 4] = [epoch, patch, 1]

    def idle(self) -> None:
        if self._base is not None:
            self._array[self._base + 3] = 0

    def slot(self, worker: int) -> _Slot:
        """Process `worker`'s slot (pid 0: not started yet)."""
        a, base = self._array, worker * self._FIELDS
        return _Slot(worker, a[base], a[base + 1], a[base + 2], bool(a[base + 3]))

    def clear(self) -> None:
        self._array[:] = [0] * len(self._array)


@dataclass(frozen=True)
class _Failed:
    """A patch that raised, sent back instead of a batch."""

    case: str | None
    epoch: int
    patch: int
    problem: str
    pid: int

    def error(self) -> LoaderError:
        here = self.pid == os.getpid()
        return LoaderError(
            f"reading it failed in {'the calling thread' if here else f'loader process {self.pid}'}"
            f": {self.problem}",
            case=self.case,
            epoch=self.epoch,
            patch=self.patch,
            pid=None if here else self.pid,
        )


class _Layout:
    """Where a batch lies in a ring slot (flat float32): x (B, T, z, y, x) from the start,
    y (B, z, y, x) after room for the shard's largest T."""

    def __init__(self, batch_size: int, max_phases: int, patch: tuple[int, int, int]):
        self.batch, self.patch = batch_size, tuple(patch)
        self.voxels = math.prod(patch)
        self.y_at = batch_size * max_phases * self.voxels
        self.floats = self.y_at + batch_size * self.voxels

    def x(self, slot, phases: int):
        """x (B, T, z, y, x) as a view of a slot (numpy or torch)."""
        return slot[: self.batch * phases * self.voxels].reshape(self.batch, phases, *self.patch)

    def y(self, slot):
        """y (B, z, y, x) as a view of a slot."""
        return slot[self.y_at : self.floats].reshape(self.batch, *self.patch)


class _Batches:
    """Batch b of an epoch from a sampler, in the calling thread or into a ring slot."""

    def __init__(self, sampler: PatchSampler, layout: _Layout, progress: _Progress | None):
        self.sampler, self.layout, self.progress = sampler, layout, progress
        self.owner = os.getpid()  # the training process

    def read(self, epoch: int, b: int) -> list[tuple[np.ndarray, np.ndarray]] | _Failed:
        """The batch's (image (T, z, y, x), mask (z, y, x)) float32 pairs, or the failure."""
        pairs, first = [], b * self.layout.batch
        for i in range(first, first + self.layout.batch):
            if self.progress is not None:
                self.progress.reading(epoch, i)
            try:
                pairs.append(self.sampler.patch(epoch, i))
            except Exception as err:  # every cause is reported, naming the case
                return self._failed(epoch, i, err)
        if self.progress is not None:
            self.progress.idle()
        phases = sorted({image.shape[0] for image, _ in pairs})
        if len(phases) > 1:
            problem = ValueError(f"cases of {phases} phases in one batch: use batch_size 1")
            return self._failed(epoch, first, problem)
        return pairs

    def stack(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
        """The batch as new tensors x (B, T, z, y, x), y (B, z, y, x) (``workers=0``)."""
        pairs = self.read(epoch, b)
        if isinstance(pairs, _Failed):
            return pairs
        x = torch.from_numpy(np.stack([image for image, _ in pairs]))
        return x, torch.from_numpy(np.stack([mask for _, mask in pairs]))

    def fill(self, epoch: int, b: int, slot: np.ndarray) -> int | _Failed:
        """Writes the batch into a ring slot; returns its phase count T, or the failure."""
        pairs = self.read(epoch, b)
        if isinstance(pairs, _Failed):
            return pairs
        x, y = self.layout.x(slot, pairs[0][0].shape[0]), self.layout.y(slot)
        for j, (image, mask) in enumerate(pairs):
            x[j], y[j] = image, mask
        return int(x.shape[1])

    def case_of(self, epoch: int, i: int) -> str:
        """The case patch i of an epoch comes from (drawn without reading the case)."""
        return self.sampler.case_at(epoch, i)

    def _failed(self, epoch: int, i: int, err: BaseException) -> _Failed:
        problem = f"{type(err).__name__}: {' '.join(str(err).split())}"
        # a damaged case is refused before its patch is drawn: the error names it
        case = getattr(err, "case", None) or self.case_of(epoch, i)
        return _Failed(case, epoch, i, problem, os.getpid())


def _serve(conn, batches: _Batches, ring, worker: int) -> None:
    """A loader process: fill the slot of each task ``(epoch, b, slot)`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle
    torch.set_num_threads(1)
    batches.progress.claim(worker)
    threading.Thread(target=_exit_with, args=(batches.owner,), daemon=True).start()
    slots = np.frombuffer(ring, dtype=np.float32).reshape(-1, batches.layout.floats)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the training process closed the pipe or died
            return
        if task is None:
            return
        epoch, b, slot = task
        try:
            result = batches.fill(epoch, b, slots[slot])
        except Exception as err:  # writing the slot itself failed
            result = batches._failed(epoch, b * batches.layout.batch, err)
        try:
            conn.send((b, slot, result))
        except OSError:  # the training process is gone
            return


def _exit_with(pid: int, interval_s: float = 1.0) -> None:
    """Exit this process once process `pid` has died (polled every `interval_s`): a fork
    server's children never see their parent change, so they would outlive it."""
    while _alive(pid):
        time.sleep(interval_s)
    os._exit(1)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (dead, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------ main side


class _Stopped(Exception):
    """The epoch was abandoned (a later epoch or `close`): the feeder ends quietly."""


class _Pool:
    """The loader processes, one pipe each, filling the slots of one shared-memory ring."""

    def __init__(self, ctx, batches: _Batches, workers: int, prefetch: int):
        self.batches, self.k, self.prefetch = batches, workers, prefetch
        self.ring = ctx.RawArray("f", workers * prefetch * batches.layout.floats)
        self.slots = torch.frombuffer(self.ring, dtype=torch.float32)
        self.slots = self.slots.view(-1, batches.layout.floats)  # (slots, floats)
        self.free = list(range(workers * prefetch))
        self.outstanding = [collections.deque() for _ in range(workers)]  # (epoch, b, slot)
        self.broken = False
        batches.progress.clear()
        self.procs, self.conns = [], []
        for w in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(there, batches, self.ring, w), name=f"loader-{w}", daemon=True
            )
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)

    def has_room(self, b: int) -> bool:
        return len(self.outstanding[b % self.k]) < self.prefetch

    def dispatch(self, epoch: int, b: int) -> None:
        """Send batch b to process ``b % k`` with a free slot."""
        w, slot = b % self.k, self.free.pop()
        try:
            self.conns[w].send((epoch, b, slot))
        except OSError:  # BrokenPipeError: it died
            self.free.append(slot)
            raise self.lost(w, "died") from None
        self.outstanding[w].append((epoch, b, slot))

    def receive(self, w: int, timeout_s: float, stop: threading.Event | None):
        """Process w's next reply ``(b, slot, T or _Failed)``, its slot still taken.

        Raises:
            LoaderError: the process died, or began no other patch for `timeout_s` (> 0).
            _Stopped: `stop` was set.
        """
        conn, sentinel = self.conns[w], self.procs[w].sentinel
        seen, quiet_since = self.batches.progress.slot(w), time.monotonic()
        while True:
            ready = multiprocessing.connection.wait([conn, sentinel], timeout=_POLL_S)
            if conn in ready:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):  # died while sending
                    raise self.lost(w, "died") from None
                self.outstanding[w].popleft()
                return reply
            if sentinel in ready:
                raise self.lost(w, "died")
            if stop is not None and stop.is_set():
                raise _Stopped
            now = self.batches.progress.slot(w)
            if now != seen:
                seen, quiet_since = now, time.monotonic()
            elif timeout_s and time.monotonic() - quiet_since > timeout_s:
                raise self.lost(w, "stalled", f"no new patch for {timeout_s:g} s")

    def drain(self, timeout_s: float) -> None:
        """Receive and drop the replies of an abandoned epoch, freeing their slots."""
        for w in range(self.k):
            while self.outstanding[w]:
                self.free.append(self.receive(w, timeout_s, None)[1])

    def lost(self, w: int, state: str, why: str = "") -> LoaderError:
        """The `LoaderError` for process w, dead or stalled; kills every process first."""
        proc, s = self.procs[w], self.batches.progress.slot(w)
        if state == "died":
            proc.join(1.0)
            code = proc.exitcode
            why = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
        self.kill()
        pid = s.pid or proc.pid
        if s.patch < 0:
            return LoaderError(f"loader process {pid} {state} before reading a patch ({why})")
        doing = "while reading it" if s.reading else "after reading it, idle"
        return LoaderError(
            f"loader process {pid} {state} {doing} ({why})",
            case=self.batches.case_of(s.epoch, s.patch),
            epoch=s.epoch,
            patch=s.patch,
            pid=pid,
        )

    def kill(self) -> None:
        self.broken = True
        for proc in self.procs:  # a `Process` never signals a reaped (reused) pid
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5.0)

    def close(self) -> None:
        """Ask every process to stop after its batch in hand; kill what is left after 5 s."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # already dead
                conn.send(None)
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.0))
        self.kill()
        for conn in self.conns:
            conn.close()


class _Feeder(threading.Thread):
    """Feeds one epoch: keeps the processes' windows full, takes replies in order, copies each
    slot out (pinned with `pin`), frees it, and queues ``(x, y)`` or the error for the consumer."""

    def __init__(self, pool: _Pool, epoch: int, n: int, *, pin: bool, timeout_s: float):
        super().__init__(name=f"loader-feeder-epoch-{epoch}", daemon=True)
        self.pool, self.epoch, self.n, self.pin, self.timeout_s = pool, epoch, n, pin, timeout_s
        self.batches: queue.Queue = queue.Queue(maxsize=pool.prefetch)
        self.stop = threading.Event()

    def run(self) -> None:
        pool, sent = self.pool, 0
        try:
            for b in range(self.n):
                while sent < self.n and pool.has_room(sent):
                    pool.dispatch(self.epoch, sent)
                    sent += 1
                _, slot, result = pool.receive(b % pool.k, self.timeout_s, self.stop)
                item = result.error() if isinstance(result, _Failed) else self._copy(slot, result)
                pool.free.append(slot)
                self._put(item)
                if isinstance(item, LoaderError):
                    return
        except _Stopped:
            return
        except BaseException as err:  # every error reaches the consumer, none hangs it
            self._put(err)

    def _copy(self, slot: int, phases: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, z, y, x), y (B, z, y, x) copied out of a slot into tensors of their own."""
        layout, view = self.pool.batches.layout, self.pool.slots[slot]
        out = []
        for src in (layout.x(view, phases), layout.y(view)):
            dst = torch.empty(src.shape, dtype=torch.float32, pin_memory=self.pin)
            # numpy's copy: one thread, the GIL released; torch's `copy_` runs on the intra-op
            # threads, whose barriers were 2-4x slower here with every core busy
            np.copyto(dst.numpy(), src.numpy())
            out.append(dst)
        return out[0], out[1]

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.batches.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self):
        """The next item, waiting as long as the feeder lives."""
        while True:
            try:
                return self.batches.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.is_alive() and self.batches.empty():
                    return LoaderError("background loading stopped without a batch or an error")

    def halt(self) -> None:
        self.stop.set()
        self.join()


class EpochBatches:
    """One epoch's batches (an iterator); `wait_s` is the time spent waiting inside `next`.

    Attributes:
        epoch: the epoch.
        n_batches: batches it yields.
        wait_s: seconds the consumer has waited for batches so far (the data wait; starting
            the loader processes, at the first epoch, counts).
        delivered: batches yielded so far.
    """

    def __init__(self, loader: PatchLoader, epoch: int, n_batches: int, generation: int):
        self.epoch, self.n_batches = epoch, n_batches
        self.wait_s, self.delivered = 0.0, 0
        self._loader, self._generation = loader, generation
        self._next = None

    def __iter__(self) -> EpochBatches:
        return self

    def __len__(self) -> int:
        return self.n_batches

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: ``x (B, T, z, y, x)`` float32, ``y (B, z, y, x)`` float32.

        Raises:
            LoaderError: a patch could not be read, or a loader process died or stalled.
        """
        if self._generation != self._loader._generation:
            raise RuntimeError(f"epoch {self.epoch}'s batches were superseded by a later epoch")
        if self.delivered >= self.n_batches:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            if self._next is None:
                self._next = self._loader._start(self.epoch, self.n_batches)
            item = self._next(self.delivered)
        finally:
            self.wait_s += time.perf_counter() - t0
        if isinstance(item, _Failed):
            item = item.error()
        if isinstance(item, BaseException):
            raise item
        self.delivered += 1
        return item


class PatchLoader:
    """A rank's training batches for a whole run: loader processes start once, then serve epochs.

    Args:
        store: a `Store` or its path/URL.
        case_ids: the cases to draw from.
        config: the `SamplerConfig` (patch size, augmentation, ``cache_bytes`` per process).
        batch_size: patches per batch (B).
        seed, rank, world_size: as `PatchSampler`'s.
        workers: loader processes; 0 loads in the calling thread (see `capped_workers`).
        pin_memory: return pinned CPU tensors (CUDA only; ignored without CUDA).
        prefetch: batches in flight per loader process (and batches queued for the consumer).
        timeout_s: raise `LoaderError` when a process has begun no other patch for this long
            while a batch is awaited (0: never); a dead process is reported at once without it.
        start_method: "forkserver" (default) or "spawn"; "fork" starts faster but copies the
            training process's threads.

    Use ``with PatchLoader(...) as loader:`` or call `close`; see `epoch`.
    """

    def __init__(
        self,
        store: Store | str,
        case_ids: list[str],
        config: SamplerConfig | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        prefetch: int = 2,
        timeout_s: float = 0.0,
        start_method: str = "forkserver",
    ):
        for name, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if prefetch < 1 or timeout_s < 0:
            raise ValueError(f"need prefetch >= 1 and timeout_s >= 0, got {prefetch}, {timeout_s}")
        sampler = PatchSampler(store, case_ids, config, seed=seed, rank=rank, world_size=world_size)
        self.sampler, self.batch_size, self.workers = sampler, int(batch_size), int(workers)
        self.steps_per_epoch = math.ceil(sampler.patches_per_rank() / self.batch_size)
        self._pin = bool(pin_memory) and torch.cuda.is_available()
        self._prefetch, self._timeout_s = int(prefetch), float(timeout_s)
        self._ctx = multiprocessing.get_context(start_method) if self.workers else None
        if start_method == "forkserver" and self.workers:
            # The fork server imports this module (and torch) once; each process forks from it.
            self._ctx.set_forkserver_preload([__name__])
        phases = max(sampler.store.shape(c)[0] for c in sampler.shard)
        layout = _Layout(self.batch_size, phases, sampler.config.patch)
        progress = _Progress(self._ctx, self.workers) if self.workers else None
        self._batches = _Batches(sampler, layout, progress)
        self._pool: _Pool | None = None  # started at the first epoch, again after a failure
        self._feeder: _Feeder | None = None
        self._generation = 0
        self._closed = False

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, epoch: int, n_batches: int | None = None) -> EpochBatches:
        """The batches of one epoch (`EpochBatches`, also an iterator); starting the next epoch
        supersedes an unfinished one.

        Args:
            epoch: the epoch (draws patches ``0 .. n_batches * batch_size - 1`` of it).
            n_batches: batches to yield; default `steps_per_epoch`,
                ``ceil(ceil(patches_per_epoch / world_size) / batch_size)``.
        """
        if self._closed:
            raise RuntimeError("this PatchLoader is closed")
        n = self.steps_per_epoch if n_batches is None else int(n_batches)
        if n < 0:
            raise ValueError(f"n_batches must be >= 0, got {n_batches}")
        self._generation += 1
        return EpochBatches(self, int(epoch), n, self._generation)

    def worker_pids(self) -> list[int]:
        """PIDs of the running loader processes (empty with ``workers=0``)."""
        return [p.pid for p in self._pool.procs] if self._pool is not None else []

    def close(self) -> None:
        """Stop the loader processes (each finishes the batch in hand and exits)."""
        self._closed = True
        self._generation += 1
        self._halt()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -------------------------------------------------------------- internals

    def _halt(self) -> None:
        if self._feeder is not None:
            self._feeder.halt()
            self._feeder = None

    def _start(self, epoch: int, n: int):
        """The function ``b -> batch b of the epoch`` (or the failure), processes started."""
        self._halt()
        if not self.workers:
            return lambda b: self._inline(epoch, b)
        if self._pool is not None and self._pool.broken:
            self._pool.close()
            self._pool = None
        try:
            if self._pool is None:
                self._pool = _Pool(self._ctx, self._batches, self.workers, self._prefetch)
            else:
                self._pool.drain(self._timeout_s)  # replies of an epoch left unfinished
        except LoaderError:
            raise
        except Exception as err:
            problem = f"could not start loader processes: {type(err).__name__}: {err}"
            raise LoaderError(problem) from err
        feeder = _Feeder(self._pool, epoch, n, pin=self._pin, timeout_s=self._timeout_s)
        feeder.start()
        self._feeder = feeder
        return lambda b: feeder.get()

    def _inline(self, epoch: int, b: int):
        item = self._batches.stack(epoch, b)
        if self._pin and not isinstance(item, _Failed):
            item = tuple(t.pin_memory() for t in item)
        return item


def patch_batches(
    store: Store | str,
    case_ids: list[str],
    config: SamplerConfig | None,
    *,
    batch_size: int,
    n_batches: int,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches, loader processes included (a one-shot `PatchLoader`).

    Yields:
        x (B, T, z, y, x) float32 and y (B, z, y, x) float32: batch b holds patches
        ``b*B .. (b+1)*B - 1`` of `PatchSampler.patch(epoch, i)`, for any `workers`.

    Raises:
        InputError: an unknown case (at the call, not at the first batch).
        LoaderError: while iterating, see `EpochBatches`.
    """
    loader = PatchLoader(
        store,
        case_ids,
        config,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=workers,
        pin_memory=pin_memory,
    )
    return _closing(loader, loader.epoch(epoch, n_batches))


def _closing(loader: PatchLoader, batches: EpochBatches) -> Iterator:
    try:
        yield from batches
    finally:
        loader.close()
