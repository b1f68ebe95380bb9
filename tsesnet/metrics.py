"""Segmentation metrics on binary volumes: Dice (DSC), HD95 in mm, sensitivity.

All functions take boolean (Z, Y, X) arrays (numpy, or torch tensors which are moved to the
CPU); integer arrays in {0, 1} are accepted, float arrays are refused (threshold them first).
Spacing is in mm, in the same (Z, Y, X) order as the arrays, and is never optional for HD95.

Empty-mask rules (what a user sees for a case without tumour, or a missed tumour):

- ``dice``: both empty -> 1.0 (nothing to find, nothing falsely found); one empty -> 0.0.
- ``sensitivity``: empty ground truth -> 1.0 (nothing to miss).
- ``hd95``: both empty -> 0.0; exactly one empty -> the diagonal of the image in mm,
  ``sqrt(Σ (n_i·s_i)²)``, the largest distance the image can hold (the BraTS convention).
  It is finite, so means and JSON stay well defined, and it is the worst score possible for
  that image; aggregates should still report how many cases hit this rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["dice", "hd95", "sensitivity", "surface_distances"]

# 6-connectivity (face neighbours): a voxel is on the surface when one of its 6 face neighbours
# is background, or it touches the image border.
_SURFACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def _as_bool(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(
            f"{name}: expected a boolean mask, got dtype {a.dtype}; threshold it first"
        )
    return a != 0


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    return p, g


def dice(pred, gt) -> float:
    """Dice similarity coefficient ``2|P∩G| / (|P| + |G|)``; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def sensitivity(pred, gt) -> float:
    """Recall ``|P∩G| / |G|``; 1.0 when the ground truth is empty."""
    p, g = _pair(pred, gt)
    n = int(g.sum())
    if n == 0:
        return 1.0
    return int(np.logical_and(p, g).sum()) / n


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)
    return mask & ~eroded


def surface_distances(pred, gt, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm, (pred surface -> gt surface, gt surface -> pred surface).

    Both masks must be non-empty. Computed on the bounding box of both masks plus one voxel,
    which gives the same surfaces and distances as the whole image, faster.
    """
    p, g = _pair(pred, gt)
    spacing = _check_spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        raise ValueError("surface_distances needs two non-empty masks")
    both = np.argwhere(p | g)
    lo = np.maximum(both.min(0) - 1, 0)
    hi = np.minimum(both.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sp, sg = _surface(p[box]), _surface(g[box])
    # EDT of the complement: distance in mm from every voxel to the nearest surface voxel
    to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return to_g[sp], to_p[sg]


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be {ndim} positive sizes in mm, got {tuple(spacing)}")
    return sp


def hd95(pred, gt, spacing: Sequence[float], *, percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in mm.

    The 95th percentile of the pred->gt surface distances and of the gt->pred distances, the
    larger of the two (as MONAI's ``compute_hausdorff_distance(percentile=95)``; medpy pools
    both sets instead). Surfaces are the mask voxels with a background face neighbour
    (6-connectivity erosion); distances come from ``scipy.ndimage.distance_transform_edt``
    with ``sampling=spacing``, so anisotropic voxels are measured in mm.

    Args:
        pred: (Z, Y, X) boolean prediction.
        gt: (Z, Y, X) boolean ground truth.
        spacing: voxel size in mm, (Z, Y, X) order.
        percentile: 95 by default; 100 gives the classic Hausdorff distance.

    Returns:
        Distance in mm. Both empty -> 0.0; one empty -> the image diagonal in mm (see module).
    """
    p, g = _pair(pred, gt)
    sp = _check_spacing(spacing, p.ndim)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, sp, strict=True))))
    d_pg, d_gp = surface_distances(p, g, sp)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))
