"""The chunk-shape/codec measurement behind `data_store.store_writer`'s choice (not run by run_all).

Run: ``python tests/benchmarks/measure_chunks.py [N]``. Writes the bench_loader phantom
(6x100x320x320 int16) once per layout under a temporary folder, then reads N random 6-phase
48x96x96 patches, every layout reading the same patch in turn (interleaved, so that load on a
shared machine hits all layouts alike), and the whole case 3 times. Prints a markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import phantom  # noqa: E402


def blosc(cname: str, level: int, shuffle=BloscShuffle.shuffle):
    return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle)]


def layouts(t: int) -> dict:
    return {
        "T,24,64,64 blosc-lz4-5 shuffle": ((t, 24, 64, 64), blosc("lz4", 5)),
        "T,24,48,48 blosc-lz4-5 shuffle": ((t, 24, 48, 48), blosc("lz4", 5)),
        "T,16,64,64 blosc-lz4-5 shuffle": ((t, 16, 64, 64), blosc("lz4", 5)),
        "T,32,96,96 blosc-lz4-5 shuffle": ((t, 32, 96, 96), blosc("lz4", 5)),
        "T,48,96,96 blosc-lz4-5 shuffle": ((t, 48, 96, 96), blosc("lz4", 5)),
        "T,48,96,96 zstd-3": ((t, 48, 96, 96), [ZstdCodec(level=3)]),
        "T,24,64,64 zstd-3": ((t, 24, 64, 64), [ZstdCodec(level=3)]),
        "T,24,64,64 blosc-zstd-1 shuffle": ((t, 24, 64, 64), blosc("zstd", 1)),
        "T,24,64,64 blosc-lz4-5 bitshuffle": (
            (t, 24, 64, 64),
            blosc("lz4", 5, BloscShuffle.bitshuffle),
        ),
        "1,48,96,96 blosc-lz4-5 (per phase)": ((1, 48, 96, 96), blosc("lz4", 5)),
        "T,24,64,64 uncompressed": ((t, 24, 64, 64), None),
    }


def main(n: int = 60) -> int:
    image = phantom()  # (T, Z, Y, X)
    t, z_, y_, x_ = image.shape
    configs = layouts(t)
    arrays, sizes = {}, {}
    with tempfile.TemporaryDirectory(prefix="measure_chunks_") as tmp:
        for i, (name, (chunks, codecs)) in enumerate(configs.items()):
            path = f"{tmp}/{i}"
            a = zarr.create_array(
                path, shape=image.shape, dtype=image.dtype, chunks=chunks, compressors=codecs
            )
            a[...] = image
            sizes[name] = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
            )
            arrays[name] = zarr.open_array(path, mode="r")
        rng = np.random.default_rng(1)
        times = {k: [] for k in configs}
        for _ in range(n):
            sizes_ = zip((z_, y_, x_), (48, 96, 96), strict=True)
            z, y, x = (int(rng.integers(0, s - p + 1)) for s, p in sizes_)
            for name, a in arrays.items():
                t0 = time.perf_counter()
                a[:, z : z + 48, y : y + 96, x : x + 96]
                times[name].append(time.perf_counter() - t0)
        whole = {k: [] for k in configs}
        for _ in range(3):
            for name, a in arrays.items():
                t0 = time.perf_counter()
                a[...]
                whole[name].append(time.perf_counter() - t0)
    raw = image.nbytes
    print(f"load average {os.getloadavg()[0]:.1f}; {n} patches per layout; raw {raw / 1e6:.0f} MB")
    print("| chunk (T,Z,Y,X), codec | MB | ratio | median ms/patch | p10 ms | whole case s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in configs:
        ms = np.array(times[name]) * 1e3
        print(
            f"| {name} | {sizes[name] / 1e6:.0f} | {raw / sizes[name]:.2f} | "
            f"{np.median(ms):.1f} | {np.percentile(ms, 10):.1f} | {np.median(whole[name]):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60))
