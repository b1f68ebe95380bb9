"""Full-volume validation: what training picks its best checkpoint and its filter by.

Shape legend: T phases, Z Y X voxels.

Each case is normalised like the store serves it, segmented and scored by `tsesnet.segment`
(the training patch as the window; the next case is read and normalised in a background thread
meanwhile, `data_store.prefetch`): DSC, HD95 in mm at the case's spacing, sensitivity, and the
DSC after each connected-component filter (`tsesnet.postprocess`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Montage:
    """What the validation overlay plot of a case needs."""

    volume: np.ndarray  # (T, Z, Y, X) float32 normalised
    gt: np.ndarray  # (Z, Y, X) bool
    pred: np.ndarray  # (Z, Y, X) bool
    case_id: str


def validate(module, store, case_ids, cfg, device, montage_of: str | None = None, pictures_of=()):
    """Score `case_ids` of `store` with `module` (eval mode is the caller's).

    Args:
        module: the unwrapped network.
        store: an open `data_store.store.Store`.
        case_ids: the labelled cases to score.
        cfg: the `TrainConfig` (patch, validation overlap and batch, bf16).
        device: torch device of the module.
        montage_of: a case ID whose inputs and prediction to return for the overlay plot.
        pictures_of: case IDs whose row also gets `picture`: the PNG bytes `predict` would
            draw of the case and this prediction (`tsesnet.common.pictures.overlay_png`).

    Returns:
        (one dict per case: case, soft_dice, dice, hd95, sensitivity, dice_by_fraction
        [, picture]; a `Montage` of `montage_of`, or None).
    """
    from data_store.normalize import normalize_intensity
    from data_store.prefetch import prefetch

    def load(cid: str):
        case = store.read_case(cid)
        return case, normalize_intensity(case.image, *case.percentiles)  # (T, Z, Y, X) float32

    rows, montage = [], None
    with contextlib.closing(prefetch(case_ids, load)) as cases:
        for cid, loaded in cases:
            if isinstance(loaded, BaseException):
                raise loaded  # a damaged case: one line naming it (`Store.check_case`)
            case, vol = loaded
            seg = _predict(module, vol, cfg, device)
            logits, pred, gt = seg.logits, seg.mask(), case.mask.astype(bool)  # (Z, Y, X)
            rows.append(_metrics(cid, logits, pred, gt, case.spacing))
            if cid in pictures_of:
                rows[-1]["picture"] = _picture(cid, case, pred, rows[-1]["dice"])
            if cid == montage_of:
                montage = Montage(vol, gt, pred, cid)
    return rows, montage


def _picture(cid: str, case, pred: np.ndarray, dice: float) -> bytes:
    """The case's overlay as `predict` draws it (scanned image, predicted mask), titled with
    its validation Dice."""
    from tsesnet.common.pictures import lesion_numbers, overlay_png

    numbers = lesion_numbers(case.image, pred, case.spacing)
    return overlay_png(
        case.image, pred, case.spacing, numbers, f"{cid} (validation DSC {dice:.3f})"
    )


def _predict(module, vol: np.ndarray, cfg, device):
    """The `tsesnet.segment.Segmentation` of one normalised (T, Z, Y, X) volume."""
    from tsesnet.segment import segment

    use_bf16 = device.type == "cuda" and cfg.optim.bf16
    return segment(
        module,
        vol,
        patch=cfg.data.patch,
        overlap=cfg.data.val_overlap,
        batch_size=cfg.data.val_batch_size,
        device=device,
        amp_dtype=torch.bfloat16 if use_bf16 else None,
    )


def _metrics(cid: str, logits: torch.Tensor, pred: np.ndarray, gt: np.ndarray, spacing) -> dict:
    from tsesnet.losses import dice_loss
    from tsesnet.postprocess import component_dices
    from tsesnet.segment import score

    scores = score(pred, gt, spacing)
    return {
        "case": cid,
        # 1 - soft Dice loss of the whole volume: moves with the probabilities from the first
        # epoch, while the thresholded Dice sits at 0 until the first tumour is found (what a
        # sweep's scheduler can rank trials on early)
        "soft_dice": 1.0 - float(dice_loss(logits, torch.from_numpy(gt).float())),
        "dice": scores.dice,
        "hd95": scores.hd95_mm,
        "sensitivity": scores.sensitivity,
        "dice_by_fraction": component_dices(pred, gt),
    }


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean DSC, HD95 and sensitivity over `validate`'s per-case rows (non-finite values left
    out; NaN when none is finite)."""
    out = {}
    for k in ("dice", "hd95", "sensitivity"):
        vals = [r[k] for r in rows if math.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
