"""Background loading (`data_store.patch_loader`): the same batches for any number of loader
processes, processes kept across epochs, and failures (killed, stalled, a corrupt chunk) that end
the epoch with a `LoaderError` naming the case instead of hanging. Real stores, real processes,
real signals; the tiny session store (4 cases, 3 phases, 16x32x32)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_store.errors import InputError, LoaderError
from data_store.patch_loader import PatchLoader, capped_workers, patch_batches
from data_store.sampler import PatchSampler, SamplerConfig
from data_store.store import open_store

PATCH = (8, 16, 16)
ROOT = Path(__file__).resolve().parents[1]


def expected(store, ids, cfg, epoch, batch, b, *, seed=0, rank=0, world=1):
    """Batch b as `PatchSampler.patch` gives it: x (B, T, z, y, x), y (B, z, y, x)."""
    sampler = PatchSampler(store, ids, cfg, seed=seed, rank=rank, world_size=world)
    pairs = [sampler.patch(epoch, i) for i in range(b * batch, (b + 1) * batch)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "Z"


def wait_until(condition, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_identical_for_any_worker_count(tiny_store, workers):
    store = open_store(tiny_store)
    ids, cfg = store.case_ids, SamplerConfig(patch=PATCH, cache_bytes=2**20)
    with PatchLoader(store, ids, cfg, batch_size=3, seed=5, workers=workers) as loader:
        pids = None
        for epoch in (0, 1):  # the second epoch reuses the processes of the first
            batches = loader.epoch(epoch, 3)
            for b, (x, y) in enumerate(batches):
                ex, ey = expected(store, ids, cfg, epoch, 3, b, seed=5)
                assert x.dtype == y.dtype == torch.float32
                assert tuple(x.shape) == (3, 3, *PATCH) and tuple(y.shape) == (3, *PATCH)
                assert torch.equal(x, torch.from_numpy(ex)) and torch.equal(y, torch.from_numpy(ey))
            assert batches.delivered == 3 and batches.wait_s > 0
            assert len(loader.worker_pids()) == workers
            assert pids is None or loader.worker_pids() == pids  # started once per run
            pids = loader.worker_pids()
    assert wait_until(lambda: all(gone(p) for p in pids), 15)  # close() stops them


def test_patch_batches_one_shot_on_rank_1(tiny_store):
    store = open_store(tiny_store)
    ids, cfg = store.case_ids, SamplerConfig(patch=PATCH)
    got = list(
        patch_batches(
            store, ids, cfg, batch_size=2, n_batches=3, epoch=4, rank=1, world_size=2, workers=2
        )
    )
    assert len(got) == 3
    for b, (x, y) in enumerate(got):
        ex, ey = expected(store, ids, cfg, 4, 2, b, rank=1, world=2)
        assert torch.equal(x, torch.from_numpy(ex)) and torch.equal(y, torch.from_numpy(ey))


def test_default_epoch_length_and_bad_arguments(tiny_store):
    store = open_store(tiny_store)
    cfg = SamplerConfig(patch=PATCH, patches_per_epoch=9)
    loader = PatchLoader(store, store.case_ids, cfg, batch_size=2, world_size=2, rank=0)
    assert loader.steps_per_epoch == 3 and len(loader.epoch(0)) == 3  # ceil(ceil(9/2)/2)
    loader.close()
    for bad in ({"workers": -1}, {"batch_size": 0}, {"prefetch": 0}, {"workers": 1.5}):
        with pytest.raises(ValueError):
            PatchLoader(store, store.case_ids, cfg, **{"batch_size": 1, **bad})
    with pytest.raises(InputError, match="NOPE"):  # at the call, not at the first batch
        patch_batches(store, ["NOPE"], cfg, batch_size=1, n_batches=1)


@pytest.mark.parametrize(
    "requested, cpus, workers, warns",
    [(0, 1, 0, False), (2, 3, 2, False), (2, 1, 0, True), (4, 2.5, 1, True), (3, 8, 3, False)],
)
def test_capped_workers(requested, cpus, workers, warns):
    got, warning = capped_workers(requested, cpus)
    assert got == workers and (warning is not None) == warns
    if warns:
        assert "\n" not in warning and f"reserve {requested + 1} CPUs" in warning


def test_capped_workers_rejects_nonsense():
    for requested, cpus in ((-1, 4), (2, 0)):
        with pytest.raises(ValueError):
            capped_workers(requested, cpus)


def _consume(batches, out: dict, start_killing: threading.Event) -> None:
    try:
        for n, _ in enumerate(batches):
            if n == 3:
                start_killing.set()
    except LoaderError as err:
        out["error"], out["at"] = err, time.monotonic()
    else:
        out["at"] = time.monotonic()


@pytest.mark.parametrize("in_thread", [True, False], ids=["training-thread", "main-thread"])
def test_killed_worker_ends_the_epoch_naming_its_case(tiny_store, in_thread):
    """SIGKILL one of two loader processes mid-epoch: a LoaderError naming the case it was
    reading, seen at once (its pipe and its process sentinel), never a hang. Ray Train
    runs the loop in a thread of its own; plain scripts in the main thread."""
    store = open_store(tiny_store)
    cfg = SamplerConfig(patch=PATCH, cache_bytes=0)  # every patch a Zarr read: workers stay busy
    loader = PatchLoader(store, store.case_ids, cfg, batch_size=2, workers=2)
    batches, out, started = loader.epoch(0, 5000), {}, threading.Event()
    consumer = threading.Thread(target=_consume, args=(batches, out, started), daemon=True)
    if in_thread:
        consumer.start()
        assert started.wait(60)
    else:
        next(batches)  # the processes start
    assert wait_until(lambda: len(loader.worker_pids()) == 2, 30)
    pids = loader.worker_pids()
    victim = pids[1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    if in_thread:
        consumer.join(30)
        assert not consumer.is_alive(), "the consumer hung"
    else:
        _consume(batches, out, threading.Event())
    err = out.get("error")
    assert err is not None, "the epoch ended without an error"
    assert out["at"] - killed_at < 10, f"took {out['at'] - killed_at:.1f} s"
    assert err.pid == victim and f"loader process {victim} died" in str(err)
    assert err.case in store.case_ids and str(err).startswith(f"case {err.case}: epoch 0, patch ")
    assert err.case == PatchSampler(store, store.case_ids, cfg).where(0, err.patch)[0]
    assert "\n" not in str(err)
    # the other process was stopped too, and the next epoch starts fresh ones
    assert wait_until(lambda: all(gone(p) for p in pids), 10)
    x, _ = next(loader.epoch(1, 2))
    ex, _ = expected(store, store.case_ids, cfg, 1, 2, 0)
    assert torch.equal(x, torch.from_numpy(ex)) and victim not in loader.worker_pids()
    loader.close()


def _hang_reads_of(root: Path, case: str) -> None:
    """Replace a case's image chunks by named pipes: opening one blocks until a writer comes,
    as a read from a hung network file system does."""
    for chunk in _chunks(root, case):
        chunk.unlink()
        os.mkfifo(chunk)


def _chunks(root: Path, case: str) -> list[Path]:
    found = [p for p in (root / case / "image").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert found
    return found


@pytest.mark.parametrize("how", ["frozen", "hung-read"])
def test_stalled_worker_times_out_naming_its_case(tiny_store, tmp_path, how):
    """A loader process that delivers nothing for timeout_s ends the epoch with a LoaderError
    naming the case it is stuck on, and is cleaned up: frozen (SIGSTOP: a batch it already
    handed over still arrives), or blocked in a read that never returns."""
    root = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, root)
    store = open_store(root)
    ids = store.case_ids if how == "frozen" else [store.case_ids[2]]
    cfg = SamplerConfig(patch=PATCH, cache_bytes=0)
    loader = PatchLoader(store, ids, cfg, batch_size=2, workers=1, timeout_s=2)
    # A first epoch lets the process check its cases; the file system hangs only after that
    # (the check looks at the files, and would refuse a named pipe in a chunk's place).
    assert len(list(loader.epoch(0, 1))) == 1
    if how == "hung-read":
        _hang_reads_of(root, ids[0])
    batches = loader.epoch(1, 5000)
    t0, pid = time.monotonic(), None
    try:
        with pytest.raises(LoaderError, match="stalled") as info:
            for _ in batches:
                if pid is None and loader.worker_pids():
                    (pid,) = loader.worker_pids()
                    os.kill(pid, signal.SIGSTOP)
                    t0 = time.monotonic()
        pid = pid or info.value.pid
        assert time.monotonic() - t0 < 20
        assert info.value.pid == pid and f"loader process {pid} stalled" in str(info.value)
        assert info.value.case in ids
        assert wait_until(lambda: gone(pid), 10)  # killed, though stopped or blocked
    finally:
        if pid and not gone(pid):
            os.kill(pid, signal.SIGKILL)
        loader.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_chunk_names_the_case(tiny_store, tmp_path, workers):
    root = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, root)
    store = open_store(root)
    case = store.case_ids[1]
    for chunk in _chunks(root, case):
        chunk.write_bytes(b"not a compressed chunk" * 10)
    cfg = SamplerConfig(patch=PATCH, cache_bytes=0)
    loader = PatchLoader(store, [case], cfg, batch_size=1, workers=workers)
    with pytest.raises(LoaderError) as info:
        list(loader.epoch(0, 3))
    err = info.value
    assert err.case == case and err.epoch == 0 and err.patch == 0
    assert "reading it failed" in str(err) and "\n" not in str(err)
    assert (err.pid is None) == (workers == 0)
    # one bad patch ends the epoch; the processes stay for the next one
    pids = loader.worker_pids()
    with pytest.raises(LoaderError):
        next(loader.epoch(1, 1))
    assert loader.worker_pids() == pids
    loader.close()


ORPHAN = """
import sys, time
from data_store.patch_loader import PatchLoader
from data_store.sampler import SamplerConfig
from data_store.store import open_store

if __name__ == "__main__":
    store = open_store(sys.argv[1])
    loader = PatchLoader(store, store.case_ids, SamplerConfig(patch=(8, 16, 16)), batch_size=1,
                         workers=2)
    next(loader.epoch(0, 1000))
    while len(loader.worker_pids()) < 2:
        time.sleep(0.05)
    print(*loader.worker_pids(), flush=True)
    time.sleep(600)
"""


def test_loader_processes_exit_when_the_training_process_is_killed(tiny_store, tmp_path):
    """A training process killed by Ray (or the OOM killer) leaves no loader processes behind."""
    script = tmp_path / "train.py"
    script.write_text(ORPHAN)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_store)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: all(gone(p) for p in pids), 20)
