"""Sliding-window inference over whole DCE-MRI volumes with Gaussian blending (paper §4.1).

Shape legend: B batch, T phases, C output channels, Z Y X voxels, W windows.

The paper tests "with a sliding window of the training patch size". Windows are laid out as
MONAI's ``sliding_window_inference`` lays them out (the peer our tests compare against): a
step of ``int(patch·(1 - overlap))`` per axis, the last window shifted back to end at the
border, and volumes smaller than the window zero-padded symmetrically to it and cropped back.
Overlapping window outputs are blended with a Gaussian importance map (σ = sigma_scale·patch,
floored at 1e-3 so window corners still count), ``out = Σ w·f(x) / Σ w``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gaussian_importance_map", "predict_mask", "sliding_window_inference", "window_starts"]


def gaussian_importance_map(
    patch: Sequence[int], sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> Tensor:
    """(z, y, x) separable Gaussian weights peaking at the window centre, floored at 1e-3."""
    w = None
    for size in patch:
        x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        g = torch.exp(-(x**2) / (2.0 * (sigma_scale * size) ** 2))  # (size,)
        w = g if w is None else w[..., None] * g
    return w.clamp_min(max(float(w.min()), 1e-3))


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one axis of ``size`` voxels (size >= window)."""
    if window >= size:
        return [0]
    step = max(int(window * (1.0 - overlap)), 1)
    n = -(-(size - window) // step) + 1  # ceil((size - window) / step) + 1
    return [min(i * step, size - window) for i in range(n)]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sliding_window_inference(
    model: nn.Module,
    volume: Tensor | np.ndarray,
    patch: Sequence[int] | None = (48, 96, 96),
    overlap: float = 0.5,
    batch_size: int = 4,
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """Predict logits for a whole volume by blending overlapping windows.

    Args:
        model: maps (W, T, z, y, x) to (W, C, z, y, x) logits (a tuple/list output: its first
            element). Run in eval mode for the call, its previous mode restored after. If it
            has a ``divisor`` attribute, every window size must be a multiple of it.
        volume: (T, Z, Y, X) or (B, T, Z, Y, X) float32 normalised intensities, any size.
        patch: window size (z, y, x), the training patch. None: one window covering the whole
            volume, zero-padded up to a multiple of ``model.divisor``.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per forward pass (windows of all batch items are batched together).
        sigma_scale: Gaussian σ as a fraction of the window size per axis.
        device: where windows run and outputs accumulate; default the model's device. The
            volume stays where it is and only window batches are copied.
        amp_dtype: e.g. torch.bfloat16 to run the model under autocast; blending is float32.

    Returns:
        (B, C, Z, Y, X) float32 logits on the CPU (C = 1 for TSESNet), an ordinary tensor
        (computed under ``torch.inference_mode``, then cloned so callers may edit it in place).
    """
    with torch.inference_mode():
        out = _sliding_window(
            model, volume, patch, overlap, batch_size, sigma_scale, device, amp_dtype
        )
    return out.clone()


def _sliding_window(model, volume, patch, overlap, batch_size, sigma_scale, device, amp_dtype):
    x = torch.as_tensor(volume)
    if x.dim() == 4:
        x = x[None]  # (1, T, Z, Y, X)
    if x.dim() != 5:
        raise ValueError(f"volume must be (T, Z, Y, X) or (B, T, Z, Y, X), got {tuple(x.shape)}")
    x = x.float()
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    divisor = int(getattr(model, "divisor", 1) or 1)
    size = tuple(x.shape[2:])
    if patch is None:
        window = tuple(-(-s // divisor) * divisor for s in size)
    else:
        window = tuple(int(p) for p in patch)
        if len(window) != 3 or min(window) < 1:
            raise ValueError(f"patch must be three positive sizes (z, y, x), got {patch}")
        if any(w % divisor for w in window):
            raise ValueError(
                f"patch {window} is not a multiple of the model's divisor {divisor} on every "
                f"axis; use the training patch or round it up to a multiple of {divisor}"
            )

    # Zero-pad axes smaller than the window, half before and half after (as MONAI).
    pads = [max(w - s, 0) for w, s in zip(window, size, strict=True)]
    before = [p // 2 for p in pads]
    if any(pads):
        spec = []
        for p, b in zip(reversed(pads), reversed(before), strict=True):
            spec += [b, p - b]  # F.pad wants the last axis first
        x = F.pad(x, spec)
    padded = tuple(x.shape[2:])

    dev = torch.device(device) if device is not None else _model_device(model)
    weight = gaussian_importance_map(window, sigma_scale, dev)  # (z, y, x)
    starts = [window_starts(s, w, overlap) for s, w in zip(padded, window, strict=True)]
    windows = [
        tuple(slice(a, a + w) for a, w in zip(corner, window, strict=True))
        for corner in itertools.product(*starts)
    ]
    norm = torch.zeros(padded, device=dev)  # (Z, Y, X) Σ w
    for sl in windows:
        norm[sl] += weight
    jobs = [(b, sl) for b in range(x.shape[0]) for sl in windows]

    out = None  # (B, C, Z, Y, X), allocated once C is known
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            batch = torch.stack([x[(b, slice(None), *sl)] for b, sl in chunk])  # (W, T, z, y, x)
            batch = batch.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = model(batch)
            if isinstance(pred, (tuple, list)):
                pred = pred[0]
            if tuple(pred.shape[2:]) != window:
                raise ValueError(
                    f"model output {tuple(pred.shape)} does not match the window {window}"
                )
            pred = pred.float() * weight  # (W, C, z, y, x)
            if out is None:
                out = torch.zeros((x.shape[0], pred.shape[1], *padded), device=dev)
            for k, (b, sl) in enumerate(chunk):
                out[(b, slice(None), *sl)] += pred[k]
    finally:
        model.train(was_training)

    out /= norm
    crop = tuple(slice(b, b + s) for b, s in zip(before, size, strict=True))
    return out[(slice(None), slice(None), *crop)].to("cpu", torch.float32)


def predict_mask(model: nn.Module, volume: Tensor | np.ndarray, threshold: float = 0.5, **kw):
    """Binary mask: ``sigmoid(logits) > threshold`` from ``sliding_window_inference``.

    Args:
        model: as for ``sliding_window_inference``.
        volume: (T, Z, Y, X) -> returns (Z, Y, X); (B, T, Z, Y, X) -> returns (B, Z, Y, X).
        threshold: probability threshold.
        **kw: passed to ``sliding_window_inference`` (patch, overlap, batch_size, ...).

    Returns:
        numpy bool array.
    """
    logits = sliding_window_inference(model, volume, **kw)  # (B, 1, Z, Y, X)
    mask = (torch.sigmoid(logits[:, 0]) > threshold).numpy()  # (B, Z, Y, X)
    return mask[0] if volume.ndim == 4 else mask
