"""Where MLflow writes, and the small helpers every tracked run shares.

`MLFLOW_TRACKING_URI` picks the tracking server; without it an embedded SQLite database
(`mlflow.db`) and an artifact folder (`mlartifacts/`) in the working directory are used, so
nothing needs a server. Nothing is configured at import: call `tracking_uri()` when needed.

The database is created once by the driver, `ensure_database()`, before Ray workers or Tune
trials start: several processes opening a new SQLite database at once race on its schema
migration and most of them die (FIELD_NOTES.md).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_EXPERIMENT = "tsesnet"


def tracking_uri() -> str:
    """The tracking URI: `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_location() -> str | None:
    """Where new experiments keep artifacts when the tracking store is a local database.

    `$MLFLOW_ARTIFACTS_DESTINATION` if set, else `<cwd>/mlartifacts` for the default SQLite
    database; None (the server decides) for any other tracking URI.
    """
    dest = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    if dest:
        return Path(dest).resolve().as_uri() if "://" not in dest else dest
    if "MLFLOW_TRACKING_URI" not in os.environ:
        return (Path.cwd() / "mlartifacts").as_uri()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def configure() -> str:
    """Point this process's MLflow client at `tracking_uri()` and return the URI.

    Exported to the environment as well, so Ray workers started afterwards inherit it.
    """
    import mlflow

    uri = tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_database(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the tracking database (schema migrated) and the experiment; return its id.

    Call it once in the driver before any worker or trial logs.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    configure()
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location())
    except MlflowException:
        # Another driver created it between the lookup and the create.
        return client.get_experiment_by_name(experiment).experiment_id


def git_commit(path: str | Path | None = None) -> str:
    """The git commit of the code being run (with `-dirty` if modified), or "unknown"."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_info() -> dict[str, str]:
    """Devices and library versions, as MLflow tags."""
    import mlflow
    import numpy
    import ray
    import torch

    info = {
        "sys.python": sys.version.split()[0],
        "sys.platform": platform.platform(),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.torch": torch.__version__,
        "sys.ray": ray.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.numpy": numpy.__version__,
        "sys.cuda": str(torch.cuda.is_available()),
        "sys.torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["sys.gpu"] = torch.cuda.get_device_name(0)
        info["sys.gpu_count"] = str(torch.cuda.device_count())
    return info


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
