"""`tsesnet model-summary`: parameters, MACs, FLOPs and training-step memory of a preset.

What is counted:
- `flops`: torch.utils.flop_counter.FlopCounterMode over one forward pass of one case
  (batch 1, `phases` phases, the preset's patch). It counts convolutions, matrix products and
  attention (2 FLOPs per multiply-accumulate) and ignores norms, activations and element-wise ops.
- `macs` = flops / 2. The paper's Table 2 "FLOPs" are most likely MACs (the convention of thop
  and ptflops), so `macs` is what we compare with Tables 2 and 4.
- `dead_params`: convolution weights of taps that only ever read zero padding at this patch
  (`tsesnet.model.blocks.live_taps`): they never get a gradient. The network is built as
  training builds it, its TA modules fitted to the patch (`tsesnet.model.fit_to_patch`), so
  the TA modules have none; plain 3x3x3 convolutions on a map one voxel thick may still have some.
- `levels`: per encoder level its size, how its fusion attends (exact, shared softmax or phases
  as heads; or pooled keys and values) and its TA kernels and rates (`tsesnet.model.level_plan`).
- `peak_memory_bytes`: the peak of live tensor bytes during one training step (forward with the
  TSC features returned, backward), plus the parameters and the input; optimizer state excluded
  (Adam adds 2 x params x 4 bytes). Live bytes are tracked by a dispatch mode that sees every
  tensor storage the step creates and frees. For `tiny` and `small` the step runs for real on the
  CPU; for `paper` it runs on the meta device (shapes only, no data, seconds on any machine), so
  it is an estimate that ignores allocator fragmentation and kernel workspaces; where CUDA is
  present the paper step runs on the GPU and `torch.cuda.max_memory_allocated` is reported.

Counting at paper size never allocates real tensors: the model and input live on the meta device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import weakref

import torch
from torch.utils.flop_counter import FlopCounterMode

from tsesnet.compat import torch_dispatch_mode, tree_leaves
from tsesnet.model import FUSIONS, PRESETS, build_model, level_plan
from tsesnet.model.blocks import live_taps

# Default patch (Z, Y, X) per preset; "paper" is the paper's 96x96x48 sub-volume (§4.1).
DEFAULT_PATCH = {"tiny": (16, 32, 32), "small": (32, 64, 64), "paper": (48, 96, 96)}

# Paper numbers for one 6-phase 96x96x48 input: (parameters, "FLOPs" read as MACs).
PAPER_TABLES = {
    "tsff": (103.58e6, 98.66e9),  # Table 2 / Table 4
    "meanpool": (98.31e6, 67.42e9),  # Table 4
    "cnn": (101.16e6, 72.32e9),
    "stt": (169.17e6, 124.58e9),
    "tsff_bottleneck": (98.93e6, 75.42e9),
}


class _LiveBytes(torch_dispatch_mode()):
    """Tracks the bytes of tensor storages created inside the mode that are still alive."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    n = storage.nbytes()
                    self._seen[key] = n
                    self.live += n
                    weakref.finalize(storage, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward with features (as training does), a loss touching logits and features, backward."""
    logits, feats = model(x, return_features=True)
    loss = logits.float().mean()
    for f in feats:
        loss = loss + f.float().pow(2).mean()
    loss.backward()


def step_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak live tensor bytes of one training step (params + input + tracked), any device."""
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    base += x.numel() * x.element_size()
    with _LiveBytes() as tracker:
        _train_step(model, x)
    model.zero_grad(set_to_none=True)
    return base + tracker.peak


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def dead_parameters(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Convolution weights whose taps only read zero padding on input `x` (any device, meta too).

    Every `nn.Conv3d` is hooked for the spatial size of its input during one forward pass; a
    tap is dead when `live_taps` says so along any axis (its weights, all input and output
    channels, never see a voxel).
    """
    sizes: dict[torch.nn.Conv3d, tuple[int, ...]] = {}

    def record(mod, args) -> None:  # a pre-hook returning None leaves the input as it is
        sizes[mod] = tuple(args[0].shape[2:])

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    dead = 0
    for m, size in sizes.items():
        axes = zip(m.kernel_size, size, m.dilation, m.stride, m.padding, strict=True)
        live = math.prod(live_taps(k, n, dilation=d, stride=s, padding=p) for k, n, d, s, p in axes)
        taps = math.prod(m.kernel_size)
        dead += m.weight.numel() // taps * (taps - live)
    return dead


def model_summary(
    preset: str,
    fusion: str = "tsff",
    phases: int = 6,
    patch: tuple[int, int, int] | None = None,
    *,
    memory: bool = True,
    **overrides,
) -> dict:
    """Size and cost of a preset with a fusion strategy, built as training builds it.

    Args:
        preset: a key of tsesnet.model.PRESETS.
        fusion: a key of tsesnet.model.FUSIONS.
        phases: T, phases per case.
        patch: (Z, Y, X); defaults to DEFAULT_PATCH[preset] (the paper's 48x96x96 for "paper").
            The TA modules are fitted to it (`ModelConfig.ta_patch`).
        memory: also measure the training step's peak memory (else peak_memory_bytes is None).
        **overrides: other `ModelConfig` fields, e.g. attn_exact_tokens=65536.

    Returns:
        dict with preset, fusion, phases, patch, params, dead_params, macs, flops,
        peak_memory_bytes, memory_method, attn_exact_tokens, levels, and paper_params /
        paper_macs where the paper reports them (paper preset).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(sorted(FUSIONS))}")
    patch = tuple(patch or DEFAULT_PATCH.get(preset, (48, 96, 96)))
    x = torch.empty(1, phases, *patch, device="meta")
    with torch.device("meta"):
        build_model(preset, fusion, **overrides).check_input(x)  # a bad patch says what to do
        overrides.setdefault("ta_patch", patch)
        model = build_model(preset, fusion, **overrides)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, x)

    if not memory:
        peak, method = None, "not measured"
    elif preset == "paper" and torch.cuda.is_available():
        torch.manual_seed(0)
        model = build_model(preset, fusion, **overrides).cuda()
        xg = torch.randn(1, phases, *patch, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        _train_step(model, xg)
        torch.cuda.synchronize()
        peak, method = int(torch.cuda.max_memory_allocated()), "measured on CUDA"
    elif preset == "paper":
        peak, method = step_peak_bytes(model, x), "estimated on the meta device"
    else:
        torch.manual_seed(0)
        peak = step_peak_bytes(
            build_model(preset, fusion, **overrides), torch.randn(1, phases, *patch)
        )
        method = "measured on CPU (live tensor bytes)"

    out = {
        "preset": preset,
        "fusion": fusion,
        "phases": phases,
        "patch": list(patch),
        "params": params,
        "dead_params": dead_parameters(model, x),
        "macs": flops // 2,
        "flops": flops,
        "peak_memory_bytes": peak,
        "memory_method": method,
        "attn_exact_tokens": model.config.attn_exact_tokens,
        "levels": [dataclasses.asdict(p) for p in level_plan(model.config, patch)],
    }
    if preset == "paper" and fusion in PAPER_TABLES and phases == 6 and patch == (48, 96, 96):
        out["paper_params"], out["paper_macs"] = (int(v) for v in PAPER_TABLES[fusion])
    return out


def _row(s: dict) -> str:
    peak = s["peak_memory_bytes"]
    mem = "-" if peak is None else f"{peak / 2**30:.2f} GiB"
    ref = " | - | -" if s["preset"] == "paper" else ""
    if "paper_params" in s:
        dp = 100 * (s["params"] / s["paper_params"] - 1)
        dm = 100 * (s["macs"] / s["paper_macs"] - 1)
        ref = (
            f" | {s['paper_params'] / 1e6:.2f} M ({dp:+.1f} %)"
            f" | {s['paper_macs'] / 1e9:.2f} G ({dm:+.1f} %)"
        )
    return (
        f"| {s['fusion']} | {s['params'] / 1e6:.2f} M | {s['dead_params'] / 1e6:.2f} M "
        f"| {s['macs'] / 1e9:.2f} G | {s['flops'] / 1e9:.2f} G | {mem}{ref} |"
    )


def _ta_text(ta: list) -> str:
    """`5x5x5 @ (1, 2, 2), 3x3x3 @ 2` for a level's TA convolutions (the 1x1x1 left out)."""
    parts = []
    for kernel, rates in ta[:2]:
        r = rates[0] if len(set(rates)) == 1 else tuple(rates)
        parts.append(f"{'x'.join(map(str, kernel))} @ {r}")
    return ", ".join(parts) or "-"


def _print_levels(rows: list[dict]) -> None:
    """Per level: size, voxels, channels, TA kernels, and how each attending fusion attends."""
    attending = [s for s in rows if any(lv["attention"] != "-" for lv in s["levels"])]
    print(
        f"\nlevels (exact attention at <= {rows[0]['attn_exact_tokens']} voxels, "
        f"model.attn_exact_tokens; TA kernel @ rates fitted to the patch):"
    )
    print(
        "| level | z x y x x | voxels | channels | TA | "
        + " | ".join(s["fusion"] for s in attending)
        + " |"
    )
    print("|---" * (5 + len(attending)) + "|")
    for i, lv in enumerate(rows[0]["levels"]):
        size = lv["size"]
        cells = [s["levels"][i]["attention"] for s in attending]
        print(
            f"| {i} | {'x'.join(map(str, size))} | {math.prod(size)} | {lv['channels']} "
            f"| {_ta_text(lv['ta'])} | " + " | ".join(cells) + " |"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet model-summary` (read by `cli`)."""
    parser.add_argument("--preset", default="paper", help="tiny, small or paper (paper)")
    parser.add_argument(
        "--fusion", default="tsff", help="a temporal fusion, or all to compare them (tsff)"
    )
    parser.add_argument("--phases", type=int, default=6, metavar="T", help="DCE phases T (6)")
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="the training patch (data.patch) to count at; the TA modules are fitted to it "
        "(default: the preset's: tiny 16 32 32, small 32 64 64, paper 48 96 96)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli(args) -> int:
    """`tsesnet model-summary [--preset P] [--fusion F|all] [--phases T] [--patch Z Y X]
    [--json]`."""
    fusions = sorted(FUSIONS) if args.fusion == "all" else [args.fusion]
    try:
        rows = [
            model_summary(args.preset, f, phases=args.phases, patch=args.patch) for f in fusions
        ]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    s0 = rows[0]
    print(
        f"preset {s0['preset']}, {s0['phases']} phases, patch {'x'.join(map(str, s0['patch']))}"
        f" (Z x Y x X); MACs = FLOPs / 2; memory {s0['memory_method']}; dead params: "
        "convolution taps that only read padding"
    )
    head = "| fusion | params | dead params | MACs | FLOPs | step peak memory |"
    sep = "|---|---|---|---|---|---|"
    if any("paper_params" in s for s in rows):
        head += " paper params | paper MACs |"
        sep += "---|---|"
    print(head)
    print(sep)
    for s in rows:
        print(_row(s))
    _print_levels(rows)
    return 0
