"""Our sliding-window inference vs MONAI's, same model, volume, window, overlap and batch size.

    .venv/bin/python tests/benchmarks/bench_inference.py [--reps 2] [--threads N]

Two rows: the tiny TSESNet preset (``build_model("tiny")``, or a small conv net if the model
package is not there yet), where the network dominates, and a 1x1x1 convolution on a larger
volume, where the time is the sliding-window machinery itself (slicing, batching, Gaussian
blending). Both sides use Gaussian blending with sigma_scale 0.125 and run under
``torch.inference_mode``. One warm-up call each, then ``--reps`` interleaved timed calls; the
best counts (the machine is shared). Prints a markdown table with the ratio MONAI / ours
(> 1: ours is faster) and the largest absolute difference between the two outputs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


class _Pointwise(nn.Module):
    divisor = 1

    def __init__(self, phases: int):
        super().__init__()
        self.conv = nn.Conv3d(phases, 1, 1)

    def forward(self, x):
        return self.conv(x)


class _SmallNet(nn.Module):
    divisor = 8

    def __init__(self, phases: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(phases, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 1, 3, padding=1)
        )

    def forward(self, x):
        return self.net(x)


def _tiny_model(phases: int) -> tuple[nn.Module, str]:
    try:
        from tsesnet.model import build_model
    except ImportError:
        return _SmallNet(phases), "small conv net (tsesnet.model missing)"
    return build_model("tiny"), 'TSESNet build_model("tiny")'


def _time(fn, reps: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from monai.inferers import sliding_window_inference as monai_swi

    from tsesnet.inference import sliding_window_inference, window_starts

    phases, overlap, batch = 4, 0.5, 4
    gen = torch.Generator().manual_seed(0)
    tiny, tiny_name = _tiny_model(phases)
    cases = [
        (tiny_name, tiny, (phases, 24, 56, 48), (16, 32, 32)),
        (
            "1x1x1 conv (blending overhead)",
            _Pointwise(phases),
            (phases, 64, 192, 192),
            (32, 64, 64),
        ),
    ]
    rows = []
    for name, model, shape, patch in cases:
        model.eval()
        torch.manual_seed(0)
        vol = torch.rand(shape, generator=gen)
        n_windows = 1
        for s, w in zip(shape[1:], patch, strict=True):
            n_windows *= len(window_starts(s, w, overlap))

        def ours(model=model, vol=vol, patch=patch):
            return sliding_window_inference(model, vol, patch, overlap, batch)

        def theirs(model=model, vol=vol, patch=patch):
            with torch.inference_mode():
                return monai_swi(
                    vol[None],
                    patch,
                    batch,
                    model,
                    overlap=overlap,
                    mode="gaussian",
                    sigma_scale=0.125,
                )

        ours(), theirs()  # warm-up
        t_ours, t_theirs = float("inf"), float("inf")
        for _ in range(args.reps):  # interleaved, best of reps
            t, a = _time(ours, 1)
            t_ours = min(t_ours, t)
            t, b = _time(theirs, 1)
            t_theirs = min(t_theirs, t)
        diff = (a - b.float()).abs().max().item()
        rows.append((name, shape, patch, n_windows, t_ours, t_theirs, diff))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, overlap {overlap}, "
        f"batch {batch}, Gaussian sigma 0.125, best of {args.reps}\n"
    )
    print(
        "| model | volume (T,Z,Y,X) | window | windows | ours (s) | MONAI (s) | MONAI/ours "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, patch, n, t_o, t_m, diff in rows:
        print(
            f"| {name} | {shape} | {patch} | {n} | {t_o:.3f} | {t_m:.3f} | {t_m / t_o:.2f} "
            f"| {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
