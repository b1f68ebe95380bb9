"""CPU cost of the model: step times, exact vs pooled attention, loss-term gradient ratios.

Sections (`--sections`, default `steps attention loss`; `paper` is slow, a minute or more):

- steps: one training-like step of the tiny and small presets (forward with the TSC features
  returned, a scalar loss, backward), median of `--reps` after one warm-up, batch 1, in both
  memory formats (oneDNN's 3D convolution backward is faster in channels_last_3d).
- attention: one TSFF level at the paper preset's level sizes (T = 6, batch 1), forward +
  backward, pooled keys/values vs exact Eq. 8 in the shared-softmax and phases-as-heads
  layouts, interleaved, median CPU seconds and peak live bytes; ratios exact / pooled.
- paper: the whole paper-preset step at 48x96x96, the first release's attention
  (`attn_exact_tokens=0`) and today's default, interleaved; the ratio is what exact levels 2-3
  cost a CPU training step.
- loss: at initialisation, the L2 norm of the gradient each weighted loss term puts on the
  shared encoder (`tsesnet.losses.term_gradient_norms`), the small preset on 16x32x32 patches
  of a synthetic case, per τ and TSC scale rule, as ratios TSC / Dice and BCE / Dice.

CPU seconds (this process's user + system time) barely move when other processes share the
cores; wall seconds do. On a shared, oversubscribed machine use `--threads 1`: OpenMP
spin-waits make 2 threads slower.

    python tests/benchmarks/bench_model.py [--reps 3] [--phases 4] [--threads 2] [--sections ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np
import torch

from tsesnet.model import build_model
from tsesnet.programs.model_summary import _LiveBytes, count_flops

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


def steps_table(args) -> None:
    """Step time of the tiny and small presets in both memory formats."""
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
        model = build_model(preset, fusion, ta_patch=patch)  # as training builds it
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


# The paper preset's levels at 48x96x96 that `attn_exact_tokens = 8192` makes exact:
# (level, (z, y, x), channels). Exact attention at level 1 (55,296 voxels) is 489 G
# multiply-accumulates per forward pass in the heads layout, minutes on a CPU; at level 0, 31 T.
PAPER_LEVELS = [(2, (12, 24, 24), 32), (3, (6, 12, 12), 64)]


def _level_step(level, f) -> tuple[float, int]:
    """CPU seconds and peak live bytes of one TSFF level's forward + backward."""
    f = f.clone().requires_grad_()
    c0 = _cpu_seconds()
    with _LiveBytes() as tracker:
        level(f).sum().backward()
    return _cpu_seconds() - c0, tracker.peak


def attention_table(args) -> None:
    """One TSFF level, pooled vs exact (both layouts), interleaved; ratios exact / pooled."""
    from tsesnet.model import fusion as fz

    print(
        f"\nTSFF at the paper preset's levels 2-3 (T = 6, batch 1), forward + backward, median "
        f"CPU s of {args.reps} interleaved, {args.threads} threads, peak live MiB\n"
    )
    print(
        "| level | voxels | C | pooled (4x8x8) | exact, shared softmax | exact, phases as heads |"
    )
    print("|---|---:|---:|---|---|---|")
    default = fz.SHARED_SOFTMAX_TOKENS
    for lv, size, c in PAPER_LEVELS:
        torch.manual_seed(0)
        n = size[0] * size[1] * size[2]
        f = torch.randn(1, 6, c, *size)
        pooled = fz.TSFFLevel(c, (4, 8, 8), exact_tokens=0)
        exact = fz.TSFFLevel(c, (4, 8, 8), exact_tokens=n)
        exact.load_state_dict(pooled.state_dict())
        # (module, SHARED_SOFTMAX_TOKENS): N itself takes the shared layout, N - 1 the heads
        layouts = {"pooled": (pooled, default), "shared": (exact, n), "heads": (exact, n - 1)}
        times, peaks = {k: [] for k in layouts}, {}
        try:
            for _ in range(args.reps):
                for k, (mod, shared) in layouts.items():
                    fz.SHARED_SOFTMAX_TOKENS = shared
                    t, peaks[k] = _level_step(mod, f)
                    times[k].append(t)
        finally:
            fz.SHARED_SOFTMAX_TOKENS = default
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [
            f"{med[k]:.3f} s, {peaks[k] / 2**20:.0f} MiB"
            + ("" if k == "pooled" else f" ({med[k] / med['pooled']:.1f}x)")
            for k in layouts
        ]
        print(f"| {lv} | {n} | {c} | " + " | ".join(cells) + " |", flush=True)


def paper_table(args) -> None:
    """The whole paper-preset step: the first release's attention vs today's, interleaved."""
    print(
        f"\nPaper preset, tsff, one step at 48x96x96, 6 phases, batch 1, {args.threads} threads, "
        f"median CPU s of {args.reps} interleaved (TA fitted to the patch in both)\n"
    )
    print("| attn_exact_tokens | exact levels | step CPU s | step wall s | × first release |")
    print("|---:|---|---:|---:|---:|")
    x = torch.randn(1, 6, 48, 96, 96)
    models = {}
    for bound in (0, 8192):
        torch.manual_seed(0)
        models[bound] = build_model("paper", "tsff", attn_exact_tokens=bound, ta_patch=(48, 96, 96))
    times = {b: [] for b in models}
    for _ in range(args.reps):
        for b, m in models.items():
            times[b].append(step_time(m, x, 1))
    exact = {0: "4", 8192: "2, 3, 4"}
    base = statistics.median(t[1] for t in times[0])
    for b, ts in times.items():
        cpu, wall = statistics.median(t[1] for t in ts), statistics.median(t[0] for t in ts)
        print(f"| {b} | {exact[b]} | {cpu:.2f} | {wall:.2f} | {cpu / base:.3f} |", flush=True)


def _synthetic_batches(n: int, patch=(16, 32, 32)):
    """`n` batches of 2 patches (one on tumour, one anywhere) of a synthetic case, normalised."""
    from data_store.normalize import intensity_percentiles, normalize_intensity
    from data_store.phantom import synthesize

    case = synthesize(0)
    vol = normalize_intensity(case.image, *intensity_percentiles(case.image))
    rng = np.random.default_rng(0)
    fg = np.argwhere(case.mask > 0)
    out = []
    for _ in range(n):
        xs, ys = [], []
        for centre in (fg[rng.integers(len(fg))], None):
            hi = np.array(case.mask.shape) - patch
            lo = (
                rng.integers(0, hi + 1)
                if centre is None
                else np.clip(centre - np.array(patch) // 2, 0, hi)
            )
            sl = tuple(slice(a, a + p) for a, p in zip(lo, patch, strict=True))
            xs.append(vol[(slice(None), *sl)])
            ys.append(case.mask[sl])
        out.append((torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).float()))
    return out


def loss_table(args) -> None:
    """Gradient-norm ratios of the weighted loss terms on the shared encoder at initialisation."""
    from tsesnet.losses import LossConfig, term_gradient_norms

    print(
        "\nLoss terms at initialisation: gradient L2 norm on the shared encoder, weights included "
        "(α = 0.7, β = 0.5, γ = 1, 64 samples per class), small preset, tsff, 16x32x32, batch 2, "
        f"median of {args.reps} synthetic batches\n"
    )
    print("| τ | tsc_scale | TSC / Dice | BCE / Dice | TSC / BCE |")
    print("|---:|---|---:|---:|---:|")
    batches = _synthetic_batches(args.reps)
    torch.manual_seed(0)
    model = build_model("small", "tsff", ta_patch=(16, 32, 32))
    for tau in (1e-5, 1e-3, 0.1, 1.0):
        for scale in ("paper", "tau") if tau != 1.0 else ("paper",):
            cfg = LossConfig(
                alpha=0.7, beta=0.5, tau=tau, bce=1.0, samples_per_class=64, tsc_scale=scale
            )
            norms = [
                term_gradient_norms(model, x, y, cfg, generator=torch.Generator().manual_seed(i))
                for i, (x, y) in enumerate(batches)
            ]
            med = {k: statistics.median(n[k] for n in norms) for k in norms[0]}
            d, t, b = med["grad_norm_dice"], med["grad_norm_tsc"], med["grad_norm_bce"]
            label = "either" if tau == 1.0 else scale
            print(f"| {tau:g} | {label} | {t / d:.3g} | {b / d:.3g} | {t / b:.3g} |", flush=True)


SECTIONS = {
    "steps": steps_table,
    "attention": attention_table,
    "paper": paper_table,
    "loss": loss_table,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    p.add_argument(
        "--sections", nargs="+", choices=sorted(SECTIONS), default=["steps", "attention", "loss"]
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.sections:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
