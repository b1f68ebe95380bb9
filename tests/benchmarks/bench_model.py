"""CPU forward+backward step time of the tiny and small presets (a markdown table).

One training-like step: forward with the TSC features returned, a scalar loss, backward.
Median of `--reps` timed steps after one warm-up, batch 1, on `--threads` threads (default: the
CPUs this process may use, at most 2, the demo machine). Both memory formats are timed, the
default and channels_last_3d (oneDNN's 3D convolution backward is faster in the latter).
On a shared, oversubscribed machine use `--threads 1`: OpenMP spin-waits make 2 threads slower.

    python tests/benchmarks/bench_model.py [--reps 3] [--phases 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from tsesnet.model import build_model
from tsesnet.programs.model_summary import count_flops

CASES = [
    ("tiny", "tsff", (16, 32, 32)),
    ("tiny", "tsff", (32, 64, 64)),
    ("small", "tsff", (32, 64, 64)),
    ("small", "meanpool", (32, 64, 64)),
]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_time(model, x, reps: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of forward + backward.

    CPU seconds barely move when other processes share the cores; wall seconds do.
    """
    wall, cpu = [], []
    for i in range(reps + 1):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        logits, feats = model(x, return_features=True)
        loss = logits.mean() + sum(f.pow(2).mean() for f in feats)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first is warm-up
            wall.append(time.perf_counter() - t0)
            cpu.append(_cpu_seconds() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"CPU step (forward + backward), batch 1, {args.phases} phases, {args.threads} threads, "
        f"median of {args.reps}; torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| preset | fusion | patch (Z, Y, X) | params | GMACs fwd | step wall (CPU s), default | "
        "step wall (CPU s), channels_last_3d |"
    )
    print("|---|---|---|---|---|---|---|")
    for preset, fusion, patch in CASES:
        torch.manual_seed(0)
        model = build_model(preset, fusion)
        x = torch.randn(1, args.phases, *patch)
        macs = count_flops(model, x) / 2e9
        t_default = step_time(model, x, args.reps)
        t_cl = step_time(model.to(memory_format=torch.channels_last_3d), x, args.reps)
        n = sum(q.numel() for q in model.parameters())
        print(
            f"| {preset} | {fusion} | {'x'.join(map(str, patch))} | {n / 1e6:.2f} M | "
            f"{macs:.2f} | {t_default[0]:.2f} s ({t_default[1]:.2f}) "
            f"| {t_cl[0]:.2f} s ({t_cl[1]:.2f}) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
