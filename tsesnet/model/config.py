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
        ta_dilations: atrous rates of TA's 5x5x5 and 3x3x3 convolutions (capped per level to
            what fits the feature map when `ta_patch` is set).
        ta_reduction: scale-attention bottleneck, hidden = 4C // ta_reduction (Eq. 4).
        ta_patch: the training patch (Z, Y, X) the TA modules are fitted to: at each level the
            atrous rates (and, where even rate 1 reaches past the map, the kernel) are cut per
            axis so that every tap lands on the feature map (`ta.fit_taps`; no dead weights).
            () applies `ta_dilations` everywhere, as the first release did. Set from the
            training config's `data.patch` (`fit_to_patch`), not by hand.
        attn_tokens: (z, y, x) grid that `tsff`, `tsff_bottleneck` and `stt` pool keys and
            values to at levels with more than `attn_exact_tokens` voxels (linear memory).
        attn_exact_tokens: levels with at most this many voxels attend exactly (Eq. 8 as
            written, every voxel a key); larger levels pool keys and values to `attn_tokens`.
            The default, 8192, is chosen on CPU: at the paper's 48x96x96 patch levels 2-4 are
            exact (+9.1 GMACs, Table 2 +12 %; level 2 adds about 1 CPU second to a one-thread
            step, `tests/benchmarks/bench_model.py`), while level 1 (55,296 voxels, 489 GMACs
            exact) would cost more than the rest of the network. On CUDA 65536 is recommended
            (level 1 exact too, in fused kernels; from the arithmetic, see the README). 0 is
            the first release's rule: exact only where a level fits `attn_tokens`.
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
    ta_patch: tuple[int, ...] = ()
    attn_tokens: tuple[int, int, int] = (4, 8, 8)
    attn_exact_tokens: int = 8192
    stt_head_dim: int = 32
    stt_mlp_ratio: int = 4
    max_phases: int = 8
    phases: tuple[int, ...] = ()
    phase_embedding: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.ta_dilations = tuple(int(d) for d in self.ta_dilations)
        self.attn_tokens = tuple(int(t) for t in self.attn_tokens)
        self.ta_patch = tuple(int(p) for p in self.ta_patch)
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
        if self.attn_exact_tokens < 0:
            raise ValueError(
                f"model.attn_exact_tokens must be >= 0 (0: exact only where a level fits "
                f"attn_tokens), got {self.attn_exact_tokens}"
            )
        if self.ta_patch and (
            len(self.ta_patch) != 3 or any(p < 1 or p % self.divisor for p in self.ta_patch)
        ):
            raise ValueError(
                f"model.ta_patch must be () or a patch (Z, Y, X) of multiples of "
                f"{self.divisor}, got {self.ta_patch}"
            )

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.channels) - 1)


# Fields renamed since the first release: old name -> new name.
RENAMED = {"input_phases": "phases"}
# Fields added since the first release, with the value that reproduces the earlier behaviour.
# JSON values (a list, not a tuple), as stored configs hold them after a JSON round trip.
ADDED: dict[str, object] = {"ta_patch": [], "attn_exact_tokens": 0}


def upgrade_config(fields: dict) -> dict:
    """A stored `ModelConfig` dict with earlier field names and missing new fields filled in."""
    out = {RENAMED.get(k, k): v for k, v in fields.items()}
    for k, v in ADDED.items():
        out.setdefault(k, v)
    return out
