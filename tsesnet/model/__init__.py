"""The TSESNet model in pure PyTorch (imports torch, numpy and scipy only).

`build_model(preset, fusion, **overrides)` is the entry point; `PRESETS` and `FUSIONS` are the
explicit registries of sizes and fusion strategies.

Presets:
    tiny:  tests and CI, < 1 M parameters, a forward+backward well under a second on 2 cores.
    small: the CPU demo, trains a useful model on 2 cores in minutes at 32x64x64 patches.
    paper: sized to Table 2 of the paper (103.58 M parameters, 98.66 G multiply-accumulates
           for one 6-phase 48x96x96 input); `tsesnet model-summary` prints what we get.
"""

from __future__ import annotations

import dataclasses

from tsesnet.model.config import ModelConfig
from tsesnet.model.fusion import FUSIONS
from tsesnet.model.network import TSESNet

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(preset="tiny", channels=(8, 16, 32, 48)),
    "small": ModelConfig(preset="small", channels=(16, 32, 64, 128)),
    "paper": ModelConfig(preset="paper", channels=(8, 16, 32, 64, 768), ta_start=1),
}


def build_model(preset: str, fusion: str = "tsff", **overrides) -> TSESNet:
    """Build a TSESNet from a named preset.

    Args:
        preset: a key of PRESETS.
        fusion: a key of FUSIONS.
        **overrides: ModelConfig fields to change (e.g. tumor_aware=False).

    Raises:
        ValueError: unknown preset, fusion or config field.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(sorted(FUSIONS))}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(fields)}")
    config = dataclasses.replace(PRESETS[preset], fusion=fusion, **overrides)
    return TSESNet(config)


__all__ = ["FUSIONS", "PRESETS", "ModelConfig", "TSESNet", "build_model"]
