"""What a `ModelConfig` does at a training patch, and whether it fits (checked before training).

Shape legend: Z Y X voxels of the patch; z y x voxels of encoder level l (2**l times fewer per
axis); N = z*y*x.

Two settings depend on the patch the network trains on:
- the TA modules' atrous rates: a tap whose reach passes the level's map reads only padding
  (`ta.fit_taps`). `fit_to_patch` fits them (`ModelConfig.ta_patch`); a config that is not
  fitted and would have dead taps is an error naming `model.ta_dilations`.
- which levels attend exactly (`ModelConfig.attn_exact_tokens`): exact attention costs N^2.
  Up to 8,192 voxels it is cheap on CPU (level 2 of the paper's patch: about 1 s of a 105 s
  one-thread step); the next level of that patch, 55,296 voxels, would be 489 GMACs per forward
  pass, more than four times the rest of the network. So on CPU a bound that makes a level above
  8,192 voxels exact is an error naming the key and the largest value that fits; on CUDA the
  fused kernels make it a question of time, not memory, and any bound is accepted.

The training driver calls `fit_to_patch` and `check_fits` while it plans the run, before Ray
starts, so a bad value is one line naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tsesnet.model.blocks import live_taps
from tsesnet.model.config import ModelConfig
from tsesnet.model.fusion import SHARED_SOFTMAX_TOKENS, attention_form
from tsesnet.model.ta import TA_KERNELS, fit_taps

# Fusions whose levels attend (TSFF's Eq. 8 or STT's spatial attention); `tsff_bottleneck`
# attends at its last level only.
ATTENDING = ("tsff", "stt")


@dataclass(frozen=True)
class LevelPlan:
    """One encoder level at a patch.

    Attributes:
        level: 0 is full resolution.
        size: (z, y, x) of the level's feature map.
        channels: C of the level.
        attention: "exact (shared softmax)", "exact (phases as heads)", "pooled to ZxYxX", or
            "-" where the fusion does not attend at this level.
        ta: per TA convolution (5x5x5, 3x3x3, 1x1x1), (kernel (z, y, x), rates (z, y, x)) as
            the network builds them; () for a level without TA.
        ta_dead_taps: taps of those kernels that only read padding at this patch.
    """

    level: int
    size: tuple[int, int, int]
    channels: int
    attention: str
    ta: tuple = ()
    ta_dead_taps: int = 0


def _check_patch(config: ModelConfig, patch) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch)
    d = config.divisor
    if len(patch) != 3 or min(patch) < 1 or any(p % d for p in patch):
        fix = tuple(max(d, -(-p // d) * d) for p in patch)
        raise ValueError(
            f"data.patch {patch} must be three sizes that are multiples of {d} "
            f"({len(config.channels) - 1} downsamplings by 2), e.g. {fix}"
        )
    return patch


def _attention(config: ModelConfig, level: int, size: tuple[int, int, int]) -> str:
    last = level == len(config.channels) - 1
    if config.fusion not in ATTENDING and not (config.fusion == "tsff_bottleneck" and last):
        return "-"
    n = size[0] * size[1] * size[2]
    form = attention_form(n, config.attn_tokens, config.attn_exact_tokens, size)
    if config.fusion == "stt" and form != "pooled":
        return "exact"  # STT's spatial attention is multi-head already: one layout
    grid = "x".join(str(min(s, g)) for s, g in zip(size, config.attn_tokens, strict=True))
    return {
        "shared": "exact (shared softmax)",
        "heads": "exact (phases as heads)",
        "pooled": f"pooled to {grid}",
    }[form]


def level_plan(config: ModelConfig, patch) -> list[LevelPlan]:
    """Every encoder level of `config` at `patch` (Z, Y, X): size, attention, TA geometry.

    Raises:
        ValueError: `data.patch` is not a multiple of the network's divisor.
    """
    patch = _check_patch(config, patch)
    rates = (*config.ta_dilations, 1)
    out = []
    for level, c in enumerate(config.channels):
        size = tuple(p // 2**level for p in patch)
        ta, dead = (), 0
        if config.tumor_aware and level >= config.ta_start:
            fitted = tuple(p // 2**level for p in config.ta_patch) or None
            for k, r in zip(TA_KERNELS, rates, strict=True):
                ks, rs = fit_taps(k, r, fitted) if fitted else ((k,) * 3, (r,) * 3)
                ta += ((ks, rs),)
                live = 1
                for kk, rr, s in zip(ks, rs, size, strict=True):
                    live *= live_taps(kk, s, dilation=rr)
                dead += ks[0] * ks[1] * ks[2] - live
        out.append(LevelPlan(level, size, c, _attention(config, level, size), ta, dead))
    return out


def fit_to_patch(config: ModelConfig, patch) -> ModelConfig:
    """`config` with its TA modules fitted to `patch` (`ModelConfig.ta_patch`; no dead taps).

    Raises:
        ValueError: `data.patch` is not a multiple of the network's divisor.
    """
    return dataclasses.replace(config, ta_patch=_check_patch(config, patch))


def _largest_fitting_rates(plans: list[LevelPlan]) -> list[int | None]:
    """Per dilated TA kernel (5x5x5, 3x3x3), the largest rate with no dead tap at any level."""
    out = []
    for k in TA_KERNELS[:2]:
        half = (k - 1) // 2
        cap = min((s - 1) // half for p in plans if p.ta for s in p.size)
        out.append(cap if cap >= 1 else None)
    return out


def check_fits(config: ModelConfig, patch, *, cuda: bool = False) -> None:
    """Raise ValueError, naming the key and the largest value that fits, when `config` does not
    fit a training `patch` (Z, Y, X).

    Args:
        config: the network's config (as `fit_to_patch` returns it for training).
        patch: the training patch, `data.patch`.
        cuda: the run trains on CUDA, where exact attention runs in fused kernels in memory
            linear in N, so any `attn_exact_tokens` fits (its cost grows as N^2).

    Raises:
        ValueError: the patch is not a multiple of the divisor (`data.patch`); the network was
            fitted to another patch (`model.ta_patch`); a TA kernel would have dead taps
            (`model.ta_dilations`); on CPU, a level above the shared-softmax size would attend
            exactly (`model.attn_exact_tokens`).
    """
    plans = level_plan(config, patch)
    patch = tuple(int(p) for p in patch)
    if config.ta_patch and config.ta_patch != patch:
        raise ValueError(
            f"model.ta_patch {config.ta_patch}: the TA modules were fitted to another patch than "
            f"data.patch {patch}; fit the model to the training patch (fit_to_patch)"
        )
    dead = [p for p in plans if p.ta_dead_taps]
    if dead:
        caps = _largest_fitting_rates(plans)
        fits = "none fits" if None in caps else f"the largest that fits is {tuple(caps)}"
        worst = dead[-1]
        raise ValueError(
            f"model.ta_dilations {config.ta_dilations}: at patch {patch} TA's kernels have "
            f"{sum(p.ta_dead_taps for p in dead)} taps that only read padding (level "
            f"{worst.level}, {'x'.join(map(str, worst.size))} voxels); {fits}. Fit the model to "
            f"the patch (fit_to_patch: rates capped and kernels cropped per level)"
        )
    too_big = [
        p for p in plans if p.attention.startswith("exact (phases") or _stt_too_big(config, p)
    ]
    if too_big and not cuda:
        n = min(p.size[0] * p.size[1] * p.size[2] for p in too_big)
        raise ValueError(
            f"model.attn_exact_tokens {config.attn_exact_tokens} makes a level of {n} voxels "
            f"attend exactly, above the {SHARED_SOFTMAX_TOKENS} a CPU step affords; the largest "
            f"value that fits at patch {patch} on CPU is {n - 1} (65536 is the recommendation "
            f"on CUDA)"
        )


def _stt_too_big(config: ModelConfig, plan: LevelPlan) -> bool:
    n = plan.size[0] * plan.size[1] * plan.size[2]
    return config.fusion == "stt" and plan.attention == "exact" and n > SHARED_SOFTMAX_TOKENS
