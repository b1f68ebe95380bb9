"""Intensity normalisation shared by the sampler, training validation and prediction.

The paper clips the 0.1 % and 99.9 % intensity tails, then normalises. DCE-MRI carries its
information in the enhancement of post-contrast phases relative to pre-contrast, so the
percentiles are computed over all phases together and the same (lo, hi) maps every phase:
per-phase z-scoring (nnU-Net's default) would erase that relative enhancement.

Shape legend: T phases, Z Y X voxels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PERCENTILES", "intensity_percentiles", "normalize_intensity"]

PERCENTILES = (0.1, 99.9)  # tails clipped by the paper's preprocessing, in percent


def intensity_percentiles(image: np.ndarray) -> tuple[float, float]:
    """The 0.1 % and 99.9 % intensity percentiles over all phases of a case together.

    Args:
        image: (T, Z, Y, X) any real dtype (the scanner's values).

    Returns:
        (lo, hi) as Python floats (linear interpolation, numpy's default).
    """
    flat = np.asarray(image).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot take percentiles of an empty image")
    lo, hi = np.percentile(flat, PERCENTILES)
    return float(lo), float(hi)


def normalize_intensity(
    image: np.ndarray,
    lo: float,
    hi: float,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Clips to [lo, hi] and maps linearly to [0, 1], the same map on every phase.

    With ``scale``/``shift`` (intensity augmentation) the result is ``[0, 1] * scale + shift``,
    computed in the same passes: clipping then an increasing affine map equals the affine map
    then clipping to the mapped bounds.

    Args:
        image: (T, Z, Y, X) or any shape, any real dtype.
        lo: the low percentile (maps to 0).
        hi: the high percentile (maps to 1). When hi <= lo (a constant image) everything
            maps to 0.
        scale: multiplies the normalised values (> 0).
        shift: is added to the normalised values.
        out: optional float32 array of the same shape to write into.

    Returns:
        float32 array of image's shape with values in [shift, scale + shift] ([0, 1] by
        default).
    """
    image = np.asarray(image)
    if out is None:
        out = np.empty(image.shape, dtype=np.float32)
    np.copyto(out, image, casting="unsafe")  # one pass: cast to float32
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if hi <= lo:
        out.fill(np.float32(shift))
        return out
    # Scale and offset in place, then clip: three passes over float32, no temporaries.
    out *= np.float32(scale / (hi - lo))
    out += np.float32(shift - lo * scale / (hi - lo))
    np.clip(out, np.float32(shift), np.float32(scale + shift), out=out)
    return out
