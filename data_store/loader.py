"""Batches of training patches, loaded in background processes while the accelerator steps.

Shape legend: B batch, T phases, z y x voxels of a patch.

Batch b of epoch e on a rank holds patches ``b*B ... (b+1)*B - 1`` of
`PatchSampler.patch(e, i)`, stacked: the same bits for any number of loader processes, since
each patch draws from its own generator seeded by (seed, epoch, rank, i).

``workers=0`` loads in the calling thread. ``workers=k`` runs a PyTorch ``DataLoader`` over a
map-style dataset of whole batches keyed (epoch, b): each process assembles a batch straight
into shared memory (``default_collate``), ``prefetch`` batches per process are in flight, and
with ``pin_memory`` (CUDA only) the DataLoader's pin thread copies batches to pinned memory
off the training thread. The processes are persistent: started at the first epoch and kept
until `PatchLoader.close`, so each keeps its sampler's case cache (``cache_bytes`` per process)
warm across epochs. They start from a fork server (``start_method="forkserver"``), never by
forking the training process, whose Ray, MLflow, zarr and CUDA threads a fork would copy
mid-flight; the fork server imports this module once. As with any fork server or spawn, the
script that starts the training process must guard its entry point
(``if __name__ == "__main__":``; console scripts, pytest and Ray's workers do).

Failures never hang the training loop; each ends the epoch with one `LoaderError` naming the
case. Each loader process writes, in shared memory, which patch it is about to read:

- a patch that raises (a corrupt chunk, a bad case) comes back as a failure, raised in the
  consumer; the processes stay for the next epoch;
- a process that dies (SIGKILL, the kernel's OOM killer) is found by the DataLoader's liveness
  check, within its 5 s polling interval, and reported with the case it was reading;
- with ``timeout_s``, a process that has moved on to no other patch for that long (a hung file
  system, a frozen process) is reported the same way. Batches are handed over by shared-memory
  file name (``file_system`` sharing, set in the loader processes only): a file descriptor is
  handed over by the sending process itself, so a frozen one would block the receiver.

After a dead or stalled process the loader kills its processes; the next `PatchLoader.epoch`
starts new ones. Loader processes exit within a second of the training process's death (a fork
server's children would otherwise outlive it). In the main thread the DataLoader would install
a SIGCHLD handler that raises wherever the main thread is; the loader puts the previous handler
back, so that errors come from ``next`` only, as in Ray Train's training thread.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from data_store.errors import LoaderError
from data_store.sampler import PatchSampler, SamplerConfig
from data_store.store import Store

__all__ = ["EpochBatches", "PatchLoader", "capped_workers", "patch_batches"]


def capped_workers(requested: int, cpus: float) -> tuple[int, str | None]:
    """Loader processes that fit the CPUs a training worker reserved, and why fewer, if fewer.

    One CPU stays with the training process itself (its Python loop, the CUDA launches, the
    loss); each loader process keeps one more CPU busy.

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

    No lock: the main process reads a slot only after its writer died or stalled.
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

    def slots(self) -> list[_Slot]:
        """Every process's slot (pid 0: not started yet)."""
        a, n = self._array, self._FIELDS
        return [
            _Slot(w, a[w * n], a[w * n + 1], a[w * n + 2], bool(a[w * n + 3]))
            for w in range(len(a) // n)
        ]

    def clear(self) -> None:
        self._array[:] = [0] * len(self._array)


@dataclass(frozen=True)
class _Failed:
    """A patch that raised in a loader process, sent back instead of a batch."""

    case: str | None
    epoch: int
    patch: int
    problem: str
    pid: int

    def error(self) -> LoaderError:
        where = f"loader process {self.pid}" if self.pid != os.getpid() else "the calling thread"
        return LoaderError(
            f"reading it failed in {where}: {self.problem}",
            case=self.case,
            epoch=self.epoch,
            patch=self.patch,
            pid=self.pid if self.pid != os.getpid() else None,
        )


class _Batches(Dataset):
    """Map-style dataset: key (epoch, b) -> batch b, ``x (B, T, z, y, x)``, ``y (B, z, y, x)``."""

    def __init__(self, sampler: PatchSampler, batch_size: int, progress: _Progress | None):
        self.sampler, self.batch_size, self.progress = sampler, batch_size, progress
        self.owner = os.getpid()  # the training process

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
        epoch, b = key
        first = b * self.batch_size
        pairs = []
        for i in range(first, first + self.batch_size):
            if self.progress is not None:
                self.progress.reading(epoch, i)
            try:
                image, mask = self.sampler.patch(epoch, i)  # (T, z, y, x), (z, y, x) float32
            except Exception as err:  # every cause is reported, naming the case
                return self._failed(epoch, i, err)
            pairs.append((torch.from_numpy(image), torch.from_numpy(mask)))
        if self.progress is not None:
            self.progress.idle()
        try:  # in a loader process, default_collate stacks straight into shared memory
            x, y = default_collate(pairs)
        except RuntimeError as err:  # cases of different phase counts in one batch
            return self._failed(epoch, first, err)
        return x, y

    def case_of(self, epoch: int, i: int) -> str | None:
        """The case patch i of an epoch comes from (None when even that cannot be read)."""
        try:
            return self.sampler.where(epoch, i)[0]
        except Exception:  # only naming: the caller reports the real error
            return None

    def _failed(self, epoch: int, i: int, err: BaseException) -> _Failed:
        problem = f"{type(err).__name__}: {' '.join(str(err).split())}"
        return _Failed(self.case_of(epoch, i), epoch, i, problem, os.getpid())


def _start_worker(worker: int) -> None:
    """DataLoader ``worker_init_fn``: take the progress slot, and exit when the training process
    is gone (a fork server's children never see their parent change: they would linger)."""
    batches = get_worker_info().dataset
    batches.progress.claim(worker)
    # Hand batches over by shared-memory file name, not file descriptor: a descriptor is passed
    # by this process itself on request (multiprocessing's resource sharer), so a stopped or
    # busy process would stall the training process in the middle of receiving a batch.
    torch.multiprocessing.set_sharing_strategy("file_system")
    threading.Thread(target=_exit_with, args=(batches.owner,), daemon=True).start()


def _exit_with(pid: int, interval_s: float = 1.0) -> None:
    """Exit this process once process `pid` has died (polled every `interval_s`)."""
    while _alive(pid):
        time.sleep(interval_s)
    os._exit(1)


def _as_is(item):
    """DataLoader ``collate_fn``: the dataset already returns whole batches (or a failure)."""
    return item


class _Keys(Sampler):
    """The keys (epoch, b) of the current epoch's batches; set before each ``iter(loader)``."""

    def __init__(self):
        self.epoch, self.n = 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, n = self.epoch, self.n
        return ((epoch, b) for b in range(n))

    def __len__(self) -> int:
        return self.n


# ------------------------------------------------------------------------------ main side


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
        self._it: Iterator | None = None

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
        t0 = time.perf_counter()
        try:
            if self._it is None:
                self._it = self._loader._start(self.epoch, self.n_batches)
            item = self._loader._next(self._it)
        except (StopIteration, LoaderError):
            raise
        except Exception as err:  # the DataLoader's own errors: a dead or stalled process
            raise self._loader._diagnose(err) from err
        finally:
            self.wait_s += time.perf_counter() - t0
        if isinstance(item, _Failed):  # the processes are fine: the next epoch reuses them
            raise item.error()
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
        prefetch: batches in flight per loader process.
        timeout_s: raise `LoaderError` when no batch has come for this long (0: never); a dead
            process is reported without it.
        start_method: how loader processes start: "forkserver" (default) or "spawn"; "fork"
            is faster to start but copies the training process's threads.

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
            raise ValueError(
                f"prefetch must be >= 1 and timeout_s >= 0, got {prefetch}, {timeout_s}"
            )
        self.sampler = PatchSampler(
            store, case_ids, config, seed=seed, rank=rank, world_size=world_size
        )
        self.batch_size, self.workers = int(batch_size), int(workers)
        self.steps_per_epoch = math.ceil(self.sampler.patches_per_rank() / self.batch_size)
        self._pin = bool(pin_memory) and torch.cuda.is_available()
        self._prefetch, self._timeout_s = int(prefetch), float(timeout_s)
        self._ctx = multiprocessing.get_context(start_method) if self.workers else None
        if start_method == "forkserver" and self.workers:
            # The fork server imports this module (and torch) once; each process forks from it.
            self._ctx.set_forkserver_preload([__name__])
        progress = _Progress(self._ctx, self.workers) if self.workers else None
        self._batches = _Batches(self.sampler, self.batch_size, progress)
        self._keys = _Keys()
        self._dl: DataLoader | None = None  # built at the first epoch, again after a failure
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
        """PIDs of the loader processes that have started (empty with ``workers=0``)."""
        progress = self._batches.progress
        return [s.pid for s in progress.slots() if s.pid] if progress is not None else []

    def close(self) -> None:
        """Stop the loader processes (they finish the batch in hand and exit)."""
        self._closed = True
        self._stop(kill=False)

    # -------------------------------------------------------------- internals

    def _start(self, epoch: int, n: int) -> Iterator:
        """An iterator over the epoch's batches (items may be `_Failed`)."""
        if not self.workers:
            return self._inline(epoch, n)
        if self._dl is None:
            self._batches.progress.clear()
            self._dl = DataLoader(
                self._batches,
                batch_size=None,  # the dataset's items are whole batches
                sampler=self._keys,
                collate_fn=_as_is,
                num_workers=self.workers,
                persistent_workers=True,
                prefetch_factor=self._prefetch,
                pin_memory=self._pin,
                worker_init_fn=_start_worker,
                multiprocessing_context=self._ctx,
                timeout=self._timeout_s,
                generator=torch.Generator().manual_seed(0),  # leave the caller's RNG alone
            )
        self._keys.epoch, self._keys.n = epoch, n
        return _iter_keeping_sigchld(self._dl)  # persistent: the same processes, new keys

    def _next(self, it: Iterator):
        """``next(it)``; a DataLoader timeout counts only when no loader process has moved on
        (started, or begun another patch) for the whole of it: starting is not stalling."""
        progress = self._batches.progress
        before = progress.slots() if progress is not None else None
        while True:
            try:
                return next(it)
            except RuntimeError as err:
                if before is None or "timed out" not in str(err):  # DataLoader's wording
                    raise
                now = progress.slots()
                if now == before:
                    raise
                before = now

    def _inline(self, epoch: int, n: int) -> Iterator:
        for b in range(n):
            item = self._batches[(epoch, b)]
            if self._pin and not isinstance(item, _Failed):
                item = tuple(t.pin_memory() for t in item)
            yield item

    def _diagnose(self, err: BaseException) -> LoaderError:
        """The `LoaderError` for a DataLoader failure: which process died or stalled, reading
        which case. Stops the loader processes."""
        slots = self._batches.progress.slots() if self._batches.progress is not None else []
        dead = _dead(slots, grace_s=2.0)
        cause = " ".join(str(err).split()) or type(err).__name__
        self._stop(kill=True)
        if dead:
            s, state = dead[0], "died"
        elif started := [s for s in slots if s.pid]:  # the one furthest behind held us up
            s = min([s for s in started if s.reading] or started, key=lambda s: (s.epoch, s.patch))
            state = "stalled"
        else:
            return LoaderError(f"background loading failed: {cause}")
        if s.patch < 0:
            return LoaderError(f"loader process {s.pid} {state} before reading a patch ({cause})")
        doing = "while reading it" if s.reading else "after reading it, idle"
        return LoaderError(
            f"loader process {s.pid} {state} {doing} ({cause})",
            case=self._batches.case_of(s.epoch, s.patch),
            epoch=s.epoch,
            patch=s.patch,
            pid=s.pid,
        )

    def _stop(self, *, kill: bool) -> None:
        """Shut the DataLoader's processes down (killed first after a failure, so that none
        waits on a queue a dead process left locked); the next epoch starts new ones."""
        dl, self._dl = self._dl, None
        self._generation += 1
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is None:
            return
        if kill:  # a `multiprocessing.Process` never signals a reaped (reused) pid
            for process in getattr(it, "_workers", []):
                if process.is_alive():
                    process.kill()
        shutdown = getattr(it, "_shutdown_workers", None)  # what its __del__ calls
        if shutdown is not None:
            shutdown()


def _iter_keeping_sigchld(dl: DataLoader) -> Iterator:
    """``iter(dl)``, with the process's SIGCHLD handler as it was before.

    In the main thread, PyTorch's DataLoader installs a SIGCHLD handler that raises
    ``RuntimeError`` wherever the main thread happens to be when a loader process dies: inside
    the training step too, where no one expects it. Putting the old handler back leaves the
    DataLoader's liveness poll, which raises inside ``next`` only (within 5 s): what it does in
    any other thread anyway, such as Ray Train's training thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return iter(dl)
    previous = signal.getsignal(signal.SIGCHLD)
    it = iter(dl)
    if previous is not None and signal.getsignal(signal.SIGCHLD) is not previous:
        signal.signal(signal.SIGCHLD, previous)
    return it


def _dead(slots: list[_Slot], grace_s: float) -> list[_Slot]:
    """The slots whose process has died, waiting up to `grace_s` for one to show as dead: the
    pipe of a killed process closes (an ``EOFError`` in the main process) while the kernel is
    still tearing the process down."""
    end = time.monotonic() + grace_s
    while True:
        dead = [s for s in slots if s.pid and not _alive(s.pid)]
        if dead or time.monotonic() > end:
            return dead
        time.sleep(0.02)


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
