"""The plots every training run logs to MLflow: learning curves and a validation overlay."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def learning_curves_png(history: list[dict], path: str | Path) -> None:
    """Training loss terms and validation metrics against epoch, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = [
        ("training loss", ["train_total", "train_dice", "train_tsc", "train_bce"]),
        ("validation DSC / sensitivity", ["val_dice", "val_sensitivity"]),
        ("validation HD95 (mm)", ["val_hd95"]),
    ]
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for key in keys:
            pts = [(h["epoch"] + 1, h[key]) for h in history if key in h]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker="o" if len(pts) < 30 else None, ms=3, label=key
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def overlay_montage_png(
    volume: np.ndarray, gt: np.ndarray, pred: np.ndarray, case_id: str, path: str | Path
) -> None:
    """Pre-contrast, a subtraction image, ground truth and prediction on the tumour's slice.

    Args:
        volume: (T, Z, Y, X) float32 normalised, phase 0 pre-contrast.
        gt, pred: (Z, Y, X) bool.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    area = gt.reshape(gt.shape[0], -1).sum(1)
    z = int(area.argmax()) if area.any() else gt.shape[0] // 2
    pre = volume[0, z]
    # Peak enhancement over the pre-contrast phase (phase 0) is where tumours light up.
    sub = (volume[1:, z] - pre).max(0) if volume.shape[0] > 1 else pre
    fig = Figure(figsize=(12, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = [
        ("pre-contrast", pre, None),
        ("subtraction (max post - pre)", sub, None),
        ("ground truth", pre, gt[z]),
        ("prediction", pre, pred[z]),
    ]
    for i, (title, img, mask) in enumerate(panels):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.imshow(img, cmap="gray")
        if mask is not None:
            ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.5)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case_id}, slice z={z}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def log_learning_curves(history: list[dict]) -> None:
    """Log `plots/learning_curves.png` to the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "learning_curves.png"
        learning_curves_png(history, p)
        mlflow.log_artifact(str(p), "plots")


def log_overlay_montage(volume, gt, pred, case_id: str) -> None:
    """Log `plots/val_overlay.png` (a validation case) to the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "val_overlay.png"
        overlay_montage_png(volume, gt, pred, case_id, p)
        mlflow.log_artifact(str(p), "plots")


def log_case_pictures(pictures: dict[str, bytes]) -> None:
    """Log `pictures/CASE.png` (PNG bytes by case ID) to the active MLflow run, replacing the
    pictures of an earlier epoch."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        for case_id, png in pictures.items():
            (Path(d) / f"{case_id}.png").write_bytes(png)
        mlflow.log_artifacts(d, "pictures")
