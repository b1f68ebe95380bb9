"""One training step of the paper preset on one CUDA GPU in four precisions/layouts (issue 3, §8).

Modes, all from the same initial weights and the same 6-phase 48x96x96 case:
    fp32                     PyTorch defaults (cuDNN convolutions may use TF32)
    bf16                     torch.autocast(bfloat16), fp32 master weights
    bf16+channels_last_3d    the same with the model in channels_last_3d
    bf16+compile             the same (default layout) under torch.compile

For each: median step time (forward with TSC features + Dice/feature loss + backward + Adam),
achieved TFLOP/s (the step's FLOPs as torch's FlopCounterMode counts forward + backward, over the
step time), peak allocated memory, and the relative error against a strict fp32 step (TF32 off)
of the logits and of two weight gradients (the first full-resolution convolution and the
bottleneck TA's 5x5x5 convolution). cuDNN has had wrong-result and slow-path bugs for bf16 3D
convolutions, so no speed number goes without the error next to it.

Runs in about 2-3 minutes on one H100 (torch.compile is most of it). On a machine without CUDA
it prints a message and exits 0.

    python tests/benchmarks/gpu_step.py [--fusion tsff] [--steps 5] [--batch 1] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from tsesnet.model import build_model

PATCH = (48, 96, 96)
PHASES = 6


def loss_fn(logits: torch.Tensor, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice on the logits plus a small feature term standing in for the TSC loss."""
    p = torch.sigmoid(logits.float())
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    return dice + 1e-3 * sum(f.float().pow(2).mean() for f in feats)


def make_case(batch: int, device: str):
    """A synthetic case: noise plus an enhancing ball; (B, T, Z, Y, X) and (B, 1, Z, Y, X)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = 0.1 * torch.randn(batch, PHASES, *PATCH, generator=g) + 0.3
    z, y, xx = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in PATCH), indexing="ij")
    ball = ((z - 24) / 8) ** 2 + ((y - 48) / 14) ** 2 + ((xx - 40) / 12) ** 2 <= 1
    for t in range(PHASES):
        x[:, t][:, ball] += 0.5 * t / (PHASES - 1)
    mask = ball.float().expand(batch, 1, *PATCH).contiguous()
    return x.to(device), mask.to(device)


def probe_params(model) -> dict[str, torch.nn.Parameter]:
    """Two weights whose gradients are compared: full-resolution and bottleneck."""
    m = model._orig_mod if hasattr(model, "_orig_mod") else model
    return {
        "grad first conv": m.encoder.stages[0][0][0].weight,
        "grad bottleneck TA 5^3": m.encoder.stages[-1][1].convs[0][0].weight,
    }


def first_step(model, x, mask, bf16: bool):
    """Forward + backward from the initial weights; returns logits and probe gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits, feats = model(x, return_features=True)
        loss = loss_fn(logits, feats, mask)
    loss.backward()
    grads = {k: p.grad.detach().float().clone() for k, p in probe_params(model).items()}
    return logits.detach().float(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step_flops(fusion: str, batch: int) -> int:
    """FLOPs of forward + backward, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model("paper", fusion)
        x = torch.empty(batch, PHASES, *PATCH)
        mask = torch.empty(batch, 1, *PATCH)
    counter = FlopCounterMode(display=False)
    with counter:
        logits, feats = model(x, return_features=True)
        loss_fn(logits, feats, mask).backward()
    return int(counter.get_total_flops())


def time_steps(model, x, mask, bf16: bool, steps: int) -> tuple[float, int]:
    """Median seconds per training step after two warm-ups, and the peak allocated bytes."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, feats = model(x, return_features=True)
            loss = loss_fn(logits, feats, mask)
        loss.backward()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), int(torch.cuda.max_memory_allocated())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fusion", default="tsff")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; run this on a GPU machine (nothing measured).")
        return 0

    t_start = time.perf_counter()
    torch.manual_seed(0)
    base = build_model("paper", args.fusion).cuda()
    x, mask = make_case(args.batch, "cuda")
    flops = step_flops(args.fusion, args.batch)

    # strict fp32 reference (TF32 off) for the error columns
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_logits, ref_grads = first_step(copy.deepcopy(base), x, mask, bf16=False)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions

    modes = [
        ("fp32", False, False, False),
        ("bf16", True, False, False),
        ("bf16+channels_last_3d", True, True, False),
    ]
    if not args.no_compile:
        modes.append(("bf16+compile", True, False, True))

    rows = []
    for name, bf16, channels_last, compiled in modes:
        model = copy.deepcopy(base)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        t0 = time.perf_counter()
        if compiled:
            model = torch.compile(model)
        logits, grads = first_step(model, x, mask, bf16)  # also the compile warm-up
        warm = time.perf_counter() - t0
        errs = [rel(logits, ref_logits)] + [rel(grads[k], ref_grads[k]) for k in ref_grads]
        step, peak = time_steps(model, x, mask, bf16, args.steps)
        rows.append((name, step, flops / step / 1e12, peak / 2**30, errs, warm))
        print(f"  {name}: {step * 1e3:.1f} ms/step (first step {warm:.1f} s)", flush=True)
        del model
        torch.cuda.empty_cache()

    print(
        f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, paper preset, fusion "
        f"{args.fusion}, batch {args.batch}, {PHASES} phases, patch {PATCH} (Z, Y, X); "
        f"{flops / 1e12:.3f} TFLOP per step (forward + backward, FlopCounterMode); "
        f"errors relative to a strict fp32 step (TF32 off)\n"
    )
    print(
        "| mode | step | TFLOP/s | peak memory | rel. err. logits | rel. err. grad first conv "
        "| rel. err. grad bottleneck TA | first step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, step, tflops, peak, errs, warm in rows:
        print(
            f"| {name} | {step * 1e3:.1f} ms | {tflops:.1f} | {peak:.2f} GiB | "
            + " | ".join(f"{e:.2e}" for e in errs)
            + f" | {warm:.1f} s |"
        )
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
