"""`ModelConfig`: the typed, keyword-only configuration of a TSESNet (presets live in `__init__`).

The training config's `model` section (`tsesnet.training.config.ModelSpec`) or
`build_model(preset, **overrides)` sets it. Stored configs (registered models, run folders) are
read through `upgrade_config`, which maps the field names of earlier releases to today's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a TSESNet.

    Attributes:
        preset: name of the preset this config came from ("custom" otherwise); informational.
        fusion: fusion strategy, a key of `tsesnet.model.FUSIONS`.
        channels: encoder channels per level, full resolution first; the last level is the
            bottleneck. There are len(channels) - 1 downsamplings by 2, so spatial sizes must be
            multiples of 2 ** (len(channels) - 1).
        tumor_aware: put a TA module (Eq. 1-5) in each encoder stage from `ta_start` on;
            False gives plain double-convolution stages (the paper's "backbone" ablation, Table 3).
        ta_start: first encoder level with a TA module (levels before it are plain).
        ta_dilations: atrous rates of TA's 5x5x5 and 3x3x3 convolutions.
        ta_reduction: scale-attention bottleneck, hidden = 4C // ta_reduction (Eq. 4).
        attn_tokens: (z, y, x) cap on the key/value grid of the linear-memory attention used by
            `tsff`, `tsff_bottleneck` and `stt`: levels with more voxels pool keys and values to
            this grid; levels within it attend exactly (Eq. 8 as written).
        stt_head_dim: channels per attention head in the `stt` fusion.
        stt_mlp_ratio: MLP expansion of the `stt` transformer block.
        max_phases: the longest series the network takes where it matters: `early` fusion
            zero-pads phases to this count (with a presence mask), `phase_embedding` learns
            this many vectors; a longer series raises ValueError.
        phases: indices of the acquired phases the network reads, in order (e.g. (2,) for
            a single post-contrast phase); () reads every phase. The selection is part of the
            model, so a registered model picks its phases from any full series it is given.
            Fusions other than `early` need at least two (phase 0 pre-contrast first).
        phase_embedding: add a learned vector per phase index and level to each phase's encoder
            features before fusion (zero at initialisation). Eq. 9's sum is blind to the order of
            the post-contrast phases, so without it `tsff` and `tsff_bottleneck` cannot tell
            wash-out from persistent enhancement by order (`meanpool`, a linear mean, stays
            blind either way); False is the paper's model.
    """

    preset: str = "custom"
    fusion: str = "tsff"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    tumor_aware: bool = True
    ta_start: int = 0
    ta_dilations: tuple[int, int] = (2, 2)
    ta_reduction: int = 4
    attn_tokens: tuple[int, int, int] = (4, 8, 8)
    stt_head_dim: int = 32
    stt_mlp_ratio: int = 4
    max_phases: int = 8
    phases: tuple[int, ...] = ()
    phase_embedding: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.ta_dilations = tuple(int(d) for d in self.ta_dilations)
        self.attn_tokens = tuple(int(t) for t in self.attn_tokens)
        self.phases = tuple(int(p) for p in self.phases)
        if any(p < 0 for p in self.phases) or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"phases must be distinct indices >= 0, got {self.phases}")
        if self.phases and self.fusion != "early" and len(self.phases) < 2:
            raise ValueError(
                f"fusion {self.fusion!r} needs >= 2 phases (pre- and post-contrast), got "
                f"{self.phases}; use fusion 'early' for a single phase"
            )
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs >= 2 positive levels, got {self.channels}")
        if len(self.attn_tokens) != 3 or min(self.attn_tokens) < 1:
            raise ValueError(f"attn_tokens must be three sizes >= 1, got {self.attn_tokens}")
        if not 0 <= self.ta_start <= len(self.channels):
            raise ValueError(f"ta_start must be in [0, {len(self.channels)}], got {self.ta_start}")
        if self.max_phases < 2:
            raise ValueError(f"max_phases must be >= 2, got {self.max_phases}")

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.channels) - 1)


# Fields renamed since the first release: old name -> new name.
RENAMED = {"input_phases": "phases"}
# Fields added since the first release, with the value that reproduces the earlier behaviour.
ADDED: dict[str, object] = {}


def upgrade_config(fields: dict) -> dict:
    """A stored `ModelConfig` dict with earlier field names and missing new fields filled in."""
    out = {RENAMED.get(k, k): v for k, v in fields.items()}
    for k, v in ADDED.items():
        out.setdefault(k, v)
    return out
