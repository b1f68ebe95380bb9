"""The TSESNet model in pure PyTorch (imports torch, numpy and scipy only).

`build_model(preset, fusion, **overrides)` is the entry point; `PRESETS` and `FUSIONS` are the
explicit registries of sizes and fusion strategies.

Presets (explicit registry; every one has a plain full-resolution stage and one TA module per
coarser stage, `ta_start=1`, see encoder.py). Sizes as training builds them, TA fitted to the
patch (`fit_to_patch`; unfitted, as `build_model` alone builds them, in brackets):
    tiny:  tests and CI: 0.66 M parameters (0.78 M), 1.3 GMACs for a 4-phase 16x32x32 patch.
    small: the CPU demo: 3.6 M parameters (4.4 M), 9.4 GMACs for a 4-phase 32x64x64 patch;
           2.0 M at the demo's 16x32x32 patches, where 3.1 M of the unfitted 4.4 M are taps that
           only read padding.
    paper: sized to Table 2 (103.58 M parameters, 98.66 G multiply-accumulates for one 6-phase
           48x96x96 input): 99.9 M and 110.6 GMACs with TSFF (-3.6 %, +12.1 %; exact attention
           at levels 2-4 is 9.1 G of it). `tsesnet model-summary --preset paper --fusion all`
           prints every fusion against Tables 2 and 4.

Why the paper preset's widths are (8, 16, 32, 64, 768). Six phases share the encoder, so each
full-resolution weight of a 3x3x3 convolution is applied 6 x 442,368 times per input, and a
bottleneck weight (3x6x6 voxels) 6 x 108 times. Table 2's ratio, 98.66 G / 103.58 M = 952
MACs per parameter, leaves no other choice than thin high-resolution stages and a wide bottleneck
(the TA module's 5x5x5 + 3x3x3 + 1x1x1 convolutions at 768 channels hold 90 M of the parameters):
an exhaustive search over 5-level widths with TA from any level found no solution within 10 % of
Table 2 with a first stage of 16 channels or more. A conventional (32, 64, 128, 256, 512)
encoder would cost 600 GMACs here.

On CPU, `model.to(memory_format=torch.channels_last_3d)` speeds up oneDNN's 3D convolution
backward (3x for one 8-channel convolution here; 10-20 % less CPU time per whole training step,
see tests/benchmarks/bench_model.py); the model works in either layout.
"""

from __future__ import annotations

import dataclasses

from tsesnet.model.config import ModelConfig, upgrade_config
from tsesnet.model.fit import check_fits, fit_to_patch, level_plan
from tsesnet.model.fusion import FUSIONS
from tsesnet.model.network import TSESNet

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(preset="tiny", channels=(8, 16, 32, 48), ta_start=1),
    "small": ModelConfig(preset="small", channels=(8, 16, 32, 64, 128), ta_start=1),
    "paper": ModelConfig(preset="paper", channels=(8, 16, 32, 64, 768), ta_start=1),
}


def model_config(preset: str, fusion: str = "tsff", **overrides) -> ModelConfig:
    """The `ModelConfig` of a named preset with a fusion and field overrides (see `build_model`).

    Raises:
        ValueError: unknown preset, fusion or config field, or a bad value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(sorted(FUSIONS))}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(PRESETS[preset], fusion=fusion, **overrides)


def build_model(preset: str, fusion: str = "tsff", **overrides) -> TSESNet:
    """Build a TSESNet from a named preset.

    Args:
        preset: a key of PRESETS.
        fusion: a key of FUSIONS.
        **overrides: ModelConfig fields to change (e.g. tumor_aware=False).

    Raises:
        ValueError: unknown preset, fusion or config field.
    """
    return TSESNet(model_config(preset, fusion, **overrides))


__all__ = [
    "FUSIONS",
    "PRESETS",
    "ModelConfig",
    "TSESNet",
    "build_model",
    "check_fits",
    "fit_to_patch",
    "level_plan",
    "model_config",
    "upgrade_config",
]
