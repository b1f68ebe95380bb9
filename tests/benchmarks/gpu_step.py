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
it prints a message and exits 0. `tests/benchmarks/gpu_check.py` runs it as its first part;
`measure` also runs on the CPU (a tiny preset in `tests/test_gpu_check.py`).

    python tests/benchmarks/gpu_step.py [--fusion tsff] [--steps 5] [--batch 1] [--no-compile]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tsesnet.model import build_model  # noqa: E402

PATCH = (48, 96, 96)
PHASES = 6
MODES = ("fp32", "bf16", "bf16+channels_last_3d", "bf16+compile")
ERRORS = ("rel_err_logits", "rel_err_grad_first_conv", "rel_err_grad_bottleneck_ta")


def loss_fn(logits: torch.Tensor, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice on the logits plus a small feature term standing in for the TSC loss."""
    p = torch.sigmoid(logits.float())
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    return dice + 1e-3 * sum(f.float().pow(2).mean() for f in feats)


def make_case(batch: int, device: str, patch=PATCH, phases: int = PHASES):
    """A synthetic case: noise plus an enhancing ball; (B, T, Z, Y, X) and (B, 1, Z, Y, X)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = 0.1 * torch.randn(batch, phases, *patch, generator=g) + 0.3
    z, y, xx = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in patch), indexing="ij")
    cz, cy, cx = patch[0] / 2, patch[1] / 2, patch[2] * 0.42
    ball = ((z - cz) / (patch[0] / 6)) ** 2 + ((y - cy) / (patch[1] / 7)) ** 2
    ball = ball + ((xx - cx) / (patch[2] / 8)) ** 2 <= 1
    for t in range(phases):
        x[:, t][:, ball] += 0.5 * t / max(phases - 1, 1)
    mask = ball.float().expand(batch, 1, *patch).contiguous()
    return x.to(device), mask.to(device)


def probe_params(model) -> dict[str, torch.nn.Parameter]:
    """Two weights whose gradients are compared: full-resolution and bottleneck."""
    m = model._orig_mod if hasattr(model, "_orig_mod") else model
    return {
        "rel_err_grad_first_conv": m.encoder.stages[0][0][0].weight,
        "rel_err_grad_bottleneck_ta": m.encoder.stages[-1][1].convs[0][0].weight,
    }


def first_step(model, x, mask, bf16: bool):
    """Forward + backward from the initial weights; returns logits and probe gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, feats = model(x, return_features=True)
        loss = loss_fn(logits, feats, mask)
    loss.backward()
    grads = {k: p.grad.detach().float().clone() for k, p in probe_params(model).items()}
    return logits.detach().float(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step_flops(fusion: str, batch: int, preset: str = "paper", patch=PATCH, phases=PHASES) -> int:
    """FLOPs of forward + backward, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(preset, fusion)
        x = torch.empty(batch, phases, *patch)
        mask = torch.empty(batch, 1, *patch)
    counter = FlopCounterMode(display=False)
    with counter:
        logits, feats = model(x, return_features=True)
        loss_fn(logits, feats, mask).backward()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, x, mask, bf16: bool, steps: int) -> tuple[float, int | None]:
    """Median seconds per training step after two warm-ups, and the peak allocated bytes
    (CUDA; None on the CPU)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    cuda = x.device.type == "cuda"
    _sync(x.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, feats = model(x, return_features=True)
            loss = loss_fn(logits, feats, mask)
        loss.backward()
        opt.step()
        _sync(x.device)  # the wall time of a synchronised step: what the GPU takes
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), int(torch.cuda.max_memory_allocated()) if cuda else None


def reference(base, x, mask):
    """Logits and probe gradients of a strict fp32 step (TF32 off), then TF32 as PyTorch's
    defaults have it (on for cuDNN convolutions, off for matmuls)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        return first_step(copy.deepcopy(base), x, mask, bf16=False)
    finally:
        if cuda:
            torch.backends.cudnn.allow_tf32 = True


def measure_mode(base, x, mask, ref, mode: str, steps: int, flops: int) -> dict:
    """One row: step time, TFLOP/s, peak memory, errors against `ref`, first-step seconds."""
    bf16, channels_last, compiled = (
        mode.startswith("bf16"),
        "channels_last" in mode,
        "compile" in mode,
    )
    model = copy.deepcopy(base)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    t0 = time.perf_counter()
    if compiled:
        model = torch.compile(model)
    logits, grads = first_step(model, x, mask, bf16)  # also the compile warm-up
    warm = time.perf_counter() - t0
    ref_logits, ref_grads = ref
    errors = {ERRORS[0]: rel(logits, ref_logits)}
    errors.update({k: rel(grads[k], ref_grads[k]) for k in ref_grads})
    step, peak = time_steps(model, x, mask, bf16, steps)
    del model
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "step_ms": step * 1e3,
        "tflops": flops / step / 1e12,
        "peak_gib": None if peak is None else peak / 2**30,
        **errors,
        "first_step_s": warm,
    }


def measure(
    *,
    fusion: str = "tsff",
    steps: int = 5,
    batch: int = 1,
    modes=MODES,
    preset: str = "paper",
    device: str = "cuda",
    patch=PATCH,
    phases: int = PHASES,
    on_row=None,
) -> dict:
    """Every mode's row, from one set of initial weights and one case.

    Args:
        on_row: called with the result so far after each mode (e.g. to save it: a later mode
            may not finish in the time a remote runner allows).

    Returns:
        {"setup": {...}, "rows": [row, ...]}; a mode that raised has its row's "error".
    """
    torch.manual_seed(0)
    base = build_model(preset, fusion).to(device)
    x, mask = make_case(batch, device, patch, phases)
    flops = step_flops(fusion, batch, preset, patch, phases)
    result = {"setup": _setup(device, preset, fusion, batch, phases, patch, flops), "rows": []}
    ref = reference(base, x, mask)
    for mode in modes:
        try:
            row = measure_mode(base, x, mask, ref, mode, steps, flops)
        except Exception as err:  # one failing mode (a compile error) leaves the others
            row = {"mode": mode, "error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
        result["rows"].append(row)
        if on_row is not None:
            on_row(result)
    return result


def _setup(device, preset, fusion, batch, phases, patch, flops) -> dict:
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "preset": preset,
        "fusion": fusion,
        "batch": batch,
        "phases": phases,
        "patch": list(patch),
        "tflop_per_step": flops / 1e12,
    }


def format_rows(result: dict) -> list[str]:
    """The markdown table of `measure`'s result."""
    lines = [
        "| mode | step | TFLOP/s | peak memory | rel. err. logits | rel. err. grad first conv "
        "| rel. err. grad bottleneck TA | first step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:200]} |||||||")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        errs = " | ".join(f"{r[k]:.2e}" for k in ERRORS)
        lines.append(
            f"| {r['mode']} | {r['step_ms']:.1f} ms | {r['tflops']:.1f} | {peak} | {errs} "
            f"| {r['first_step_s']:.1f} s |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fusion", default="tsff")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; run this on a GPU machine (nothing measured).")
        return 0
    t_start = time.perf_counter()
    modes = [m for m in MODES if not (args.no_compile and "compile" in m)]

    def save(result):
        print(f"  {result['rows'][-1]['mode']} done ({time.perf_counter() - t_start:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    result = measure(
        fusion=args.fusion, steps=args.steps, batch=args.batch, modes=modes, on_row=save
    )
    s = result["setup"]
    print(
        f"\n{s['device']}, torch {s['torch']}, paper preset, fusion {s['fusion']}, batch "
        f"{s['batch']}, {PHASES} phases, patch {PATCH} (Z, Y, X); {s['tflop_per_step']:.3f} TFLOP "
        "per step (forward + backward, FlopCounterMode); errors relative to a strict fp32 step "
        "(TF32 off)\n"
    )
    print("\n".join(format_rows(result)))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
