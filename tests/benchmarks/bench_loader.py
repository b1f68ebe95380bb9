"""Loader benchmark: random 6-phase 48x96x96 patches per second from a 6x100x320x320 int16 case,
and how well background loading (`data_store.patch_loader.PatchLoader`) feeds an accelerator.

Run: ``python tests/benchmarks/bench_loader.py`` (or ``make bench``; about 10 minutes on 2 loaded
cores). Prints markdown tables. ``--feeding-only`` skips the first table, ``--rounds``,
``--batches`` and ``--multiples`` size the second part, ``--tflops`` the sizing table.

First table, one patch at a time in this process:
- in-memory numpy, slice + normalise: the limit. Slicing the patch out of the decoded array
  and the clip/normalise to float32 that every loader must do (the sampler does the same).
- in-memory numpy, slice only: for reference.
- store via `PatchSampler`, warm: the case is in the sampler's cache (decoded once), no
  augmentation (the same work as the limit row, plus the sampler's bookkeeping).
- store via `PatchSampler`, warm + augmentation: flips, rotation, intensity (informational).
- store via `PatchSampler`, cold: ``cache_bytes=0``, every patch read from Zarr (region only).
- nibabel slicing ``.nii.gz``: per patch, one ``nib.load(file).dataobj[region]`` per phase.
Targets (issue 2): warm >= 0.5x in-memory, cold >= 20x ``.nii.gz``.

Feeding (issue "Feeding GPUs at scale"): batches of 2 patches with the training defaults
(foreground fraction 1/3, augmentation), warm (the case in each process's cache) and cold
(``cache_bytes=0``), from persistent `PatchLoader`s with 0, 1 and 2 loader processes, warmed
up first, measured in interleaved rounds (the order rotates each round; medians):
- patches/s with no step between batches, from the first batch to the last, in total and per
  loader process (the sizing rule's input);
- the data-wait fraction, time spent waiting in ``next`` over the epoch's time, with a
  simulated accelerator step after every batch: a sleep of K x this round's foreground load
  time of one batch (a sleep, as a GPU step leaves the CPU free). "Steady" leaves the first
  batch out (an epoch starts with an empty pipeline); the whole epoch is in brackets.
Target: <= 10 % steady wait with 2 workers at K = 1.5. The sizing table turns the per-process
rate into loader processes per GPU: ceil(h x GPU patches/s / per-process patches/s), the GPU's
patches/s being its TFLOP/s over 0.6 TFLOP per paper-preset patch (forward + backward), and h
the smallest supply ratio (processes x K) at and above which every measured cell kept the
steady wait <= 10 %.

The case is a phantom: half air, smooth tissue, per-phase enhancement, Gaussian noise, so it
compresses like a scan (noise sets the ratio); written through the real ingest path
(`load_case` + `write_case`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

T, Z, Y, X = 6, 100, 320, 320
PATCH = (48, 96, 96)


def phantom(seed: int = 0) -> np.ndarray:
    """(T, Z, Y, X) int16 breast-MRI-like volume."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    base = zoom(rng.random((8, 20, 20)).astype(np.float32), (Z / 8, Y / 20, X / 20), order=1)
    tissue = (base > 0.5).astype(np.float32)
    _, yy, xx = np.ogrid[:Z, :Y, :X]
    body = ((yy - Y * 0.7) / (Y * 0.45)) ** 2 + ((xx - X / 2) / (X * 0.48)) ** 2 < 1
    body = np.broadcast_to(body, (Z, Y, X))
    image = np.empty((T, Z, Y, X), np.int16)
    for t in range(T):
        v = 300 + 600 * base + tissue * 150 * t / T
        v = v + rng.normal(0, 20, (Z, Y, X)).astype(np.float32)
        v = np.where(body, v, np.abs(rng.normal(0, 6, (Z, Y, X))))
        image[t] = np.clip(v, 0, 4000).astype(np.int16)
    return image


def rate(fn, n: int, repeats: int = 3) -> float:
    """Patches per second of fn(i): the best of `repeats` runs of n calls (after a warm-up call).

    Best-of-k because the machine is shared: the fastest run is the least disturbed one.
    """
    fn(-1)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(r * n + i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def build_store(tmp: Path):
    """The phantom as NIfTI (nnU-Net raw) and ingested into a store through the real path.

    Returns:
        (store, case ID, ingest seconds, the phase files).
    """
    from data_store.index import init_store, write_index
    from data_store.layouts import discover
    from data_store.location import StoreLocation
    from data_store.source_reader import load_case
    from data_store.store import open_store
    from data_store.store_writer import write_case

    image = phantom()  # (T, Z, Y, X), written in file order (i=X, j=Y, k=Z): RAS
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    files = []
    (tmp / "src" / "imagesTr").mkdir(parents=True)
    for t in range(T):
        f = tmp / "src" / "imagesTr" / f"bench_{t:04d}.nii.gz"
        nib.save(nib.Nifti1Image(image[t].transpose(2, 1, 0), affine), f)
        files.append(f)
    (tmp / "src" / "labelsTr").mkdir()
    zz, yy, xx = np.ogrid[:Z, :Y, :X]  # a 15 mm tumour: the sampler reads masks near it
    mask = ((zz - 50) * 1.5) ** 2 + ((yy - 220) * 0.7) ** 2 + ((xx - 160) * 0.7) ** 2 < 7.5**2
    mask = mask.astype(np.uint8)  # (Z, Y, X)
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), tmp / "src/labelsTr/bench.nii.gz")
    store_path = tmp / "store"
    location = StoreLocation.parse(store_path)
    store_path.mkdir()
    init_store(location)
    (source,) = discover(tmp / "src", "nnunet")
    t0 = time.perf_counter()
    write_case(location, load_case(source))
    write_index(location, 2)
    ingest_s = time.perf_counter() - t0
    store = open_store(store_path)
    (case_id,) = store.case_ids
    return store, case_id, ingest_s, files


def source_rows(store, case_id: str, files: list[Path]) -> list[tuple[str, float]]:
    """(source, patches/s) of each way to get a patch, foreground (the first table)."""
    from data_store.normalize import intensity_percentiles, normalize_intensity
    from data_store.sampler import PatchSampler, SamplerConfig

    canon = store.read_case(case_id).image  # (T, Z, Y, X), as the sampler sees it
    lo, hi = intensity_percentiles(canon)
    rng = np.random.default_rng(0)

    def start():
        return [int(rng.integers(0, s - p + 1)) for s, p in zip((Z, Y, X), PATCH, strict=True)]

    def memory_slice(_):
        z, y, x = start()
        return np.ascontiguousarray(canon[:, z : z + 48, y : y + 96, x : x + 96])

    def memory_norm(_):
        z, y, x = start()
        return normalize_intensity(canon[:, z : z + 48, y : y + 96, x : x + 96], lo, hi)

    def nifti(_):
        i, j, k = start()[::-1]  # any region of the same size: the cost is decompression
        return np.stack(
            [np.asarray(nib.load(f).dataobj[i : i + 96, j : j + 96, k : k + 48]) for f in files]
        )

    def sampler(cfg):
        s = PatchSampler(store, [case_id], cfg, seed=0)
        return lambda i: s.patch(0, i + 1)

    no_aug = dict(patch=PATCH, fg_fraction=0.0)
    return [
        ("in-memory numpy, slice + normalise (the limit)", rate(memory_norm, 100)),
        ("in-memory numpy, slice only", rate(memory_slice, 100)),
        (
            "store via PatchSampler, warm (cached), no augmentation",
            rate(sampler(SamplerConfig(augment=False, **no_aug)), 100),
        ),
        (
            "store via PatchSampler, warm (cached), augmentation",
            rate(sampler(SamplerConfig(augment=True, **no_aug)), 100),
        ),
        (
            "store via PatchSampler, cold (no cache: Zarr region reads)",
            rate(sampler(SamplerConfig(augment=False, cache_bytes=0, **no_aug)), 30),
        ),
        ("nibabel slicing .nii.gz, 6 files per patch", rate(nifti, 2, repeats=2)),
    ]


def print_sources(rows, ingest_s: float) -> None:
    limit, gz = rows[0][1], rows[-1][1]
    print(f"case {T}x{Z}x{Y}x{X} int16, patch {T}x{'x'.join(map(str, PATCH))}; ", end="")
    print(f"ingest (load + percentiles + write) {ingest_s:.1f} s; ", end="")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| source | patches/s | ms/patch | x in-memory | x .nii.gz |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:.1f} | {1e3 / r:.1f} | {r / limit:.2f} | {r / gz:.0f} |")
    warm, cold = rows[2][1], rows[4][1]
    ok_warm, ok_cold = warm >= 0.5 * limit, cold >= 20 * gz
    print(
        f"\nwarm / in-memory = {warm / limit:.2f} (target >= 0.5: "
        f"{'met' if ok_warm else 'NOT met'}); cold / .nii.gz = {cold / gz:.0f} "
        f"(target >= 20: {'met' if ok_cold else 'NOT met'})"
    )


# ------------------------------------------------------------------------------ feeding


BATCH = 2
WORKERS = (0, 1, 2)


def steady_rate(batches, n: int) -> float:
    """Patches/s of an epoch with no step between batches, from the first batch to the last
    (the pipeline's fill at the start left out)."""
    next(batches)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        next(batches)
    return (n - 1) * BATCH / (time.perf_counter() - t0)


def wait_fraction(batches, n: int, step_s: float) -> tuple[float, float]:
    """(whole epoch, after the first batch): time waiting for a batch / the epoch's time, with
    a simulated accelerator step (a sleep: the consumer holds no CPU) after every batch."""
    waits = []
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - a)
        time.sleep(step_s)
    total = time.perf_counter() - t0
    return sum(waits) / total, sum(waits[1:]) / (total - waits[0])


def feeding_modes():
    from data_store.sampler import SamplerConfig

    # The training defaults (foreground fraction 1/3, augmentation); warm: the sampler's cache
    # holds the case (a cohort that fits), cold: every patch is a Zarr region read.
    return {
        "warm": SamplerConfig(patch=PATCH),
        "cold": SamplerConfig(patch=PATCH, cache_bytes=0),
    }


class _KeyList:
    """DataLoader sampler: the keys (epoch, b) of the current epoch."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self):
        return len(self.keys)


class _SamplerBatches:
    """Map-style dataset over `PatchSampler`: key (epoch, b) -> batch b, stacked by
    ``default_collate`` (in a DataLoader worker: into newly allocated shared memory)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __getitem__(self, key):
        import torch
        from torch.utils.data import default_collate

        epoch, b = key
        pairs = [self.sampler.patch(epoch, i) for i in range(b * BATCH, (b + 1) * BATCH)]
        return default_collate([tuple(torch.from_numpy(a) for a in p) for p in pairs])


class DataLoaderBaseline:
    """What `PatchLoader` replaced, for ``--compare-dataloader``: PyTorch's DataLoader over the
    sampler, persistent workers from a fork server, 2 batches in flight per worker."""

    def __init__(self, store, case_id: str, cfg, workers: int):
        from torch.utils.data import DataLoader

        from data_store.sampler import PatchSampler

        self.workers, self.keys = workers, _KeyList()
        self.dl = DataLoader(
            _SamplerBatches(PatchSampler(store, [case_id], cfg)),
            batch_size=None,
            sampler=self.keys,
            num_workers=workers,
            persistent_workers=True,
            prefetch_factor=2,
            multiprocessing_context="forkserver",
        )

    def epoch(self, epoch: int, n: int):
        self.keys.keys = [(epoch, b) for b in range(n)]
        return iter(self.dl)

    def close(self) -> None:
        self.dl = None  # its iterator's __del__ stops the workers


def feeding_cells(args) -> list[tuple[str, int]]:
    """(implementation, loader processes) of every measured cell; ("loader", 0) first."""
    cells = [("loader", w) for w in WORKERS]
    return cells + ([("dataloader", w) for w in WORKERS if w] if args.compare_dataloader else [])


def make_loaders(store, case_id: str, args) -> dict:
    from data_store.patch_loader import PatchLoader

    loaders = {}
    for mode, cfg in feeding_modes().items():
        for impl, w in feeding_cells(args):
            loaders[mode, (impl, w)] = (
                PatchLoader(store, [case_id], cfg, batch_size=BATCH, workers=w)
                if impl == "loader"
                else DataLoaderBaseline(store, case_id, cfg, w)
            )
    for loader in loaders.values():  # processes started, caches filled
        for _ in loader.epoch(0, 2 * max(loader.workers, 1) + 2):
            pass
    return loaders


def measure_feeding(store, case_id: str, args) -> dict:
    """Rounds of every (mode, cell), interleaved (the order rotates each round), on persistent
    loaders warmed up first. Returns lists of measurements by key."""
    from collections import defaultdict

    loaders, cells = make_loaders(store, case_id, args), feeding_cells(args)
    out, epochs = defaultdict(list), {key: 1 for key in loaders}

    def epoch_of(key):
        epochs[key] += 1
        return loaders[key].epoch(epochs[key] - 1, args.batches)

    for r in range(args.rounds):
        order = cells[r % len(cells) :] + cells[: r % len(cells)]
        for mode in feeding_modes():
            rates = {cell: steady_rate(epoch_of((mode, cell)), args.batches) for cell in order}
            fg_s = BATCH / rates["loader", 0]  # foreground load time of one batch, this round
            for cell in cells:
                out[mode, cell, "rate"].append(rates[cell])
            for k in args.multiples:
                for cell in order:
                    whole, steady = wait_fraction(epoch_of((mode, cell)), args.batches, k * fg_s)
                    out[mode, cell, k, "whole"].append(whole)
                    out[mode, cell, k, "steady"].append(steady)
        print(f"  round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    for loader in loaders.values():
        loader.close()
    return out


def cell_name(cell: tuple[str, int]) -> str:
    impl, w = cell
    if w == 0:
        return "foreground (workers=0)"
    name = "PatchLoader" if impl == "loader" else "DataLoader (baseline)"
    return f"{name}, {w} process{'es' * (w > 1)}"


def feeding_report(store, case_id: str, args) -> None:
    """The feeding tables: loader rates, data-wait fractions, and the sizing table."""
    import statistics

    load0 = os.getloadavg()
    print(f"\n## Feeding an accelerator: batches of {BATCH} paper patches\n")
    print(
        f"load average before {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}; {args.rounds} "
        f"interleaved rounds, {args.batches} batches per epoch, medians\n",
        flush=True,
    )
    med = {k: statistics.median(v) for k, v in measure_feeding(store, case_id, args).items()}
    print_rates(med, args)
    print_waits(med, args)
    load1 = os.getloadavg()
    print(f"\nload average after {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    print_sizing(med, args)


def print_rates(med: dict, args) -> None:
    print(
        "\n| loading | warm patches/s | per process | x foreground | cold patches/s "
        "| per process | x foreground |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cell in feeding_cells(args):
        cells = []
        for mode in feeding_modes():
            total = med[mode, cell, "rate"]
            fg = med[mode, ("loader", 0), "rate"]
            cells += [f"{total:.1f}", f"{total / max(cell[1], 1):.1f}", f"{total / fg:.2f}"]
        print(f"| {cell_name(cell)} | " + " | ".join(cells) + " |")


def print_waits(med: dict, args) -> None:
    cells = feeding_cells(args)
    print(
        "\nData-wait fraction (time waiting for a batch / epoch time) after the first batch "
        "(steady state; the whole epoch in brackets), simulated step = K x the foreground "
        "load time of one batch:\n"
    )
    print("| mode | K | " + " | ".join(cell_name(c) for c in cells) + " |")
    print("|---|---:|" + "---:|" * len(cells))
    for mode in feeding_modes():
        for k in args.multiples:
            row = [
                f"{med[mode, c, k, 'steady']:.1%} ({med[mode, c, k, 'whole']:.1%})" for c in cells
            ]
            print(f"| {mode} | {k:g} | " + " | ".join(row) + " |")
    if 1.5 in args.multiples:
        for mode in feeding_modes():
            got = med[mode, ("loader", 2), 1.5, "steady"]
            verdict = "met" if got <= 0.10 else "NOT met"
            print(f"\n{mode}: PatchLoader, 2 processes, K = 1.5: {got:.1%} (<= 10 %: {verdict})")


def headroom(med: dict, args) -> float | None:
    """The smallest nominal supply ratio h = loader processes x K (the loader's capacity over
    the consumer's demand, were each process as fast as the foreground) such that every
    PatchLoader cell measured at h or above kept the steady wait <= 10 %, in both modes."""
    cells = [(w, k) for w in WORKERS if w for k in args.multiples]
    for h in sorted({w * k for w, k in cells}):
        if all(
            med[mode, ("loader", w), k, "steady"] <= 0.10
            for mode in feeding_modes()
            for w, k in cells
            if w * k >= h
        ):
            return h
    return None


def print_sizing(med: dict, args) -> None:
    """Loader processes per GPU: ceil(h x GPU patches/s / one process's patches/s)."""
    h = headroom(med, args)
    note = f"h = {h:g}, measured above" if h is not None else "h = 3: none measured was enough"
    h = 3.0 if h is None else h
    print(
        f"\nSizing (one GPU, paper patch): processes = ceil(h x GPU patches/s / one loader "
        f"process's patches/s), {note}; GPU patches/s = TFLOP/s / {args.step_tflop} TFLOP per "
        "patch; per-process rates as measured here with 1 PatchLoader process:\n"
    )
    print("| GPU TFLOP/s | GPU patches/s | warm: processes | cold: processes |")
    print("|---:|---:|---:|---:|")
    for tflops in args.tflops:
        demand = tflops / args.step_tflop
        rates = [med[mode, ("loader", 1), "rate"] for mode in feeding_modes()]
        need = [math.ceil(h * demand / r) for r in rates]
        print(f"| {tflops:g} | {demand:.0f} | {need[0]} | {need[1]} |")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the feeding part")
    p.add_argument("--batches", type=int, default=24, help="batches per measured epoch")
    p.add_argument(
        "--multiples",
        type=float,
        nargs="+",
        default=[1.5],
        metavar="K",
        help="simulated step = K x the foreground load time of one batch",
    )
    p.add_argument(
        "--tflops",
        type=float,
        nargs="+",
        default=[100.0, 300.0],
        help="GPU TFLOP/s for the sizing table",
    )
    p.add_argument(
        "--step-tflop",
        type=float,
        default=0.6,
        help="TFLOP of one paper-preset patch, forward + backward",
    )
    p.add_argument("--feeding-only", action="store_true", help="skip the first table")
    p.add_argument(
        "--compare-dataloader",
        action="store_true",
        help="also measure PyTorch's DataLoader over the sampler (what PatchLoader replaced)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        store, case_id, ingest_s, files = build_store(Path(tmp))
        if not args.feeding_only:
            print_sources(source_rows(store, case_id, files), ingest_s)
        feeding_report(store, case_id, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
