"""Segment and score one case: from a normalised volume to a mask and its metrics.

Shape legend: T phases, Z Y X voxels.

The one path every consumer takes: validation (`tsesnet.training.validation`), prediction
(`tsesnet.serving.case`), evaluation of mask files (`tsesnet.serving.evaluate`) and the
science check (`tsesnet.programs.science`). Pure PyTorch, NumPy and SciPy: the callers read the
case and write the results.

1. `segment`: sliding-window logits of the whole volume (`tsesnet.inference`).
2. `Segmentation.mask`: the binary mask, optionally after the connected-component filter chosen
   on validation (`tsesnet.postprocess`). Two thresholds, both kept as they were: training
   (validation, science) takes ``logits > 0``; prediction takes ``sigmoid(logits) > threshold``
   (``--threshold``-style, 0.5 by default). They agree except on voxels whose probability
   rounds to exactly 0.5 in float32.
3. `score`: DSC, HD95 in mm at the case's spacing and sensitivity (`tsesnet.metrics`'s
   empty-mask rules), with the voxel counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Scores", "Segmentation", "score", "segment"]


@dataclass(frozen=True)
class Segmentation:
    """A case's network output.

    Attributes:
        logits: (Z, Y, X) float32 logits on the CPU.
    """

    logits: torch.Tensor

    def probability(self) -> np.ndarray:
        """(Z, Y, X) float32 sigmoid of the logits."""
        return torch.sigmoid(self.logits).numpy()

    def mask(self, threshold: float | None = None, min_component_fraction: float = 0.0):
        """(Z, Y, X) bool tumour mask.

        Args:
            threshold: None: ``logits > 0`` (training's rule); else ``probability > threshold``
                (prediction's rule).
            min_component_fraction: keep connected components of at least this fraction of the
                largest one's size (0 keeps all).
        """
        from tsesnet.postprocess import keep_components

        if threshold is None:
            pred = (self.logits > 0).numpy()
        else:
            pred = torch.sigmoid(self.logits).numpy() > threshold
        if min_component_fraction:
            pred = keep_components(pred, min_component_fraction)
        return pred


def segment(
    model: torch.nn.Module,
    volume: np.ndarray | torch.Tensor,
    *,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Segmentation:
    """Sliding-window logits of one normalised volume (the model's mode is the caller's).

    Args:
        model: the network.
        volume: (T, Z, Y, X) float32, normalised as the store serves it.
        patch: the window, (Z, Y, X): the training patch.
        overlap: window overlap.
        batch_size: windows per forward pass.
        device: where the windows run (None: the CPU).
        amp_dtype: autocast dtype (e.g. bfloat16 on CUDA), None: full precision.
    """
    from tsesnet.inference import sliding_window_inference

    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(np.ascontiguousarray(volume))
    with torch.no_grad():
        logits = sliding_window_inference(
            model,
            volume,
            patch=tuple(patch),
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
        )  # (1, 1, Z, Y, X)
    return Segmentation(logits[0, 0])


@dataclass(frozen=True)
class Scores:
    """One case's metrics (`tsesnet.metrics`: empty-mask rules there)."""

    dice: float
    hd95_mm: float
    sensitivity: float
    pred_voxels: int
    gt_voxels: int


def score(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> Scores:
    """DSC, HD95 (mm) and sensitivity of one binary prediction.

    Args:
        pred: (Z, Y, X) (or any 3D axis order) mask, non-zero = tumour.
        gt: same shape and axis order as `pred`.
        spacing: voxel size in mm, same axis order as the arrays.

    Raises:
        ValueError: the shapes differ.
    """
    from tsesnet import metrics

    pred = np.asarray(pred) > 0
    gt = np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return Scores(
        dice=float(metrics.dice(pred, gt)),
        hd95_mm=float(metrics.hd95(pred, gt, tuple(float(s) for s in spacing))),
        sensitivity=float(metrics.sensitivity(pred, gt)),
        pred_voxels=int(pred.sum()),
        gt_voxels=int(gt.sum()),
    )
