"""`tsesnet model-summary`: parameters, MACs, FLOPs and training-step memory of a preset.

What is counted:
- `flops`: torch.utils.flop_counter.FlopCounterMode over one forward pass of one case
  (batch 1, `phases` phases, the preset's patch). It counts convolutions, matrix products and
  attention (2 FLOPs per multiply-accumulate) and ignores norms, activations and element-wise ops.
- `macs` = flops / 2. The paper's Table 2 "FLOPs" are most likely MACs (the convention of thop
  and ptflops), so `macs` is what we compare with Tables 2 and 4.
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

import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from tsesnet.model import FUSIONS, PRESETS, build_model

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


class _LiveBytes(TorchDispatchMode):
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


def model_summary(
    preset: str,
    fusion: str = "tsff",
    phases: int = 6,
    patch: tuple[int, int, int] | None = None,
    *,
    memory: bool = True,
) -> dict:
    """Size and cost of a preset with a fusion strategy.

    Args:
        preset: a key of tsesnet.model.PRESETS.
        fusion: a key of tsesnet.model.FUSIONS.
        phases: T, phases per case.
        patch: (Z, Y, X); defaults to DEFAULT_PATCH[preset] (the paper's 48x96x96 for "paper").
        memory: also measure the training step's peak memory (else peak_memory_bytes is None).

    Returns:
        dict with preset, fusion, phases, patch, params, macs, flops, peak_memory_bytes,
        memory_method, and paper_params / paper_macs where the paper reports them (paper preset).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(sorted(FUSIONS))}")
    patch = tuple(patch or DEFAULT_PATCH.get(preset, (48, 96, 96)))
    with torch.device("meta"):
        model = build_model(preset, fusion)
        x = torch.empty(1, phases, *patch)
    model.check_input(x)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, x)

    if not memory:
        peak, method = None, "not measured"
    elif preset == "paper" and torch.cuda.is_available():
        torch.manual_seed(0)
        model = build_model(preset, fusion).cuda()
        xg = torch.randn(1, phases, *patch, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        _train_step(model, xg)
        torch.cuda.synchronize()
        peak, method = int(torch.cuda.max_memory_allocated()), "measured on CUDA"
    elif preset == "paper":
        peak, method = step_peak_bytes(model, x), "estimated on the meta device"
    else:
        torch.manual_seed(0)
        peak = step_peak_bytes(build_model(preset, fusion), torch.randn(1, phases, *patch))
        method = "measured on CPU (live tensor bytes)"

    out = {
        "preset": preset,
        "fusion": fusion,
        "phases": phases,
        "patch": list(patch),
        "params": params,
        "macs": flops // 2,
        "flops": flops,
        "peak_memory_bytes": peak,
        "memory_method": method,
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
        f"| {s['fusion']} | {s['params'] / 1e6:.2f} M | {s['macs'] / 1e9:.2f} G "
        f"| {s['flops'] / 1e9:.2f} G | {mem}{ref} |"
    )


def cli(args) -> int:
    """`tsesnet model-summary [--preset P] [--fusion F|all] [--phases T] [--json]`."""
    fusions = sorted(FUSIONS) if args.fusion == "all" else [args.fusion]
    try:
        rows = [model_summary(args.preset, f, phases=args.phases) for f in fusions]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    s0 = rows[0]
    print(
        f"preset {s0['preset']}, {s0['phases']} phases, patch {'x'.join(map(str, s0['patch']))}"
        f" (Z x Y x X); MACs = FLOPs / 2; memory {s0['memory_method']}"
    )
    head = "| fusion | params | MACs | FLOPs | step peak memory |"
    sep = "|---|---|---|---|---|"
    if any("paper_params" in s for s in rows):
        head += " paper params | paper MACs |"
        sep += "---|---|"
    print(head)
    print(sep)
    for s in rows:
        print(_row(s))
    return 0
