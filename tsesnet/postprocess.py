"""Connected-component filtering of predicted masks, with its strength chosen on validation.

A thresholded network output carries small false-positive islands far from the tumour; they
cost little Dice each but add up, and they set HD95. nnU-Net's answer is to decide on the
validation results whether removing components helps, and we do the same with one knob:
keep every connected component (26-connectivity) of at least ``min_fraction`` times the
largest one's size. 0 keeps everything; 1 keeps only the largest (multifocal tumours lose
their smaller foci, which is why it is a fraction and not "largest only").

Training scores each validation prediction at every fraction in ``CANDIDATES``, keeps the one
with the best mean Dice (the smallest on ties, so 0 when filtering does not help) next to the
best checkpoint, and registration stores it with the model; prediction applies it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CANDIDATES", "choose_fraction", "component_dices", "keep_components"]

CANDIDATES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def _labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label volume, voxel count per label with index 0 the background)."""
    labels, n = ndimage.label(mask, structure=_FULL)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _kept(sizes: np.ndarray, min_fraction: float) -> np.ndarray:
    """Which labels stay: components of at least `min_fraction` x the largest, never label 0."""
    sizes = sizes.copy()
    sizes[0] = 0
    keep = sizes >= min_fraction * sizes.max() if min_fraction > 0 else sizes > 0
    keep[0] = False
    return keep


def keep_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """`mask` (Z, Y, X) without the components smaller than `min_fraction` x the largest.

    Returns a new bool array; 0 (or an empty mask) returns the mask unchanged, as bool.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    mask = np.asarray(mask, bool)
    if min_fraction == 0.0 or not mask.any():
        return mask.copy()
    labels, sizes = _labels(mask)
    return _kept(sizes, min_fraction)[labels]


def component_dices(pred: np.ndarray, gt: np.ndarray) -> dict[float, float]:
    """Dice of `pred` against `gt` after `keep_components` at each of `CANDIDATES`."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    labels, sizes = _labels(pred)
    # voxels of each component inside the ground truth: Dice without relabelling per fraction
    hits = np.bincount(labels[gt], minlength=sizes.size)
    out = {}
    for f in CANDIDATES:
        keep = _kept(sizes, f)
        denom = sizes[keep].sum() + gt.sum()
        out[f] = float(2.0 * hits[keep].sum() / denom) if denom else 1.0
    return out


def choose_fraction(per_case: list[dict[float, float]]) -> tuple[float, float]:
    """(fraction, mean Dice) with the best mean Dice over cases; the smallest fraction on ties.

    `per_case` holds `component_dices` results; an empty list chooses 0 with a NaN Dice.
    """
    if not per_case:
        return 0.0, float("nan")
    means = {f: float(np.mean([d[f] for d in per_case])) for f in CANDIDATES}
    best = max(means.values())
    f = min(f for f, m in means.items() if m >= best - 1e-12)
    return f, means[f]
