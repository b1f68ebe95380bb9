"""`tsesnet evaluate`: DSC, HD95 (mm) and sensitivity of predicted masks against ground truth.

Predictions and labels are the NIfTI files directly in their folders, matched by case ID (the
file name without `.nii.gz` or `.nii`, suffixes in any letter case); sub-folders are not read, so
`tsesnet predict`'s `probabilities/` maps never count as masks. Both are read on their own grid,
in file axis order, and the voxel spacing in mm comes from the label's header
(`header.get_zooms()`), so HD95 is in mm whatever the orientation. A case fails (one line naming
the file and the problem) rather than being scored when its prediction and label grids differ
(shape or affine), when either holds values other than 0 and 1 (a probability map saved as a
mask would otherwise score as if thresholded at 0), or when two files give one ID.

The summary (:func:`summarize`) is shared with `tsesnet predict`. Empty masks follow the rules
of `tsesnet.metrics`: HD95 of a case where exactly one of prediction and ground truth is empty
(a missed tumour, or a tumour "found" in a tumour-free case) is the image diagonal in mm, the
worst distance the image can hold. It is finite and stays in the HD95 mean, and the summary
counts such cases as `n_one_empty` so that a few missed tumours are visible rather than hidden
in an average. An infinite HD95 (from any other source) is left out of the mean and sd and
counted as `n_infinite`; in JSON it is written as null. DSC is 1.0 when both masks are empty,
sensitivity 1.0 when the ground truth is empty (nothing to miss).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_store.errors import InputError, shown_as
from data_store.nifti import ReadOptions, read_nifti

METRICS = ("dice", "hd95_mm", "sensitivity")
# Affines are stored as float32 in NIfTI headers: compare grids to a tolerance well under a voxel.
_AFFINE_ATOL_MM = 1e-3


@dataclass
class CaseMetrics:
    """One case's metrics; `status` is "ok" or "error" (then `error` says why)."""

    case_id: str
    status: str = "ok"
    dice: float | None = None
    hd95_mm: float | None = None
    sensitivity: float | None = None
    pred_voxels: int | None = None
    gt_voxels: int | None = None
    error: str = ""

    def to_json(self) -> dict:
        """JSON-safe dict: a non-finite metric becomes null."""
        d = asdict(self)
        for k in METRICS:
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d


@dataclass
class EvaluationReport:
    """Per-case metrics plus the IDs found on one side only."""

    cases: list[CaseMetrics]
    missing: list[str] = field(default_factory=list)  # labelled, but no prediction
    extra: list[str] = field(default_factory=list)  # predicted, but no label

    @property
    def failed(self) -> list[str]:
        return [c.case_id for c in self.cases if c.status != "ok"]

    @property
    def summary(self) -> dict:
        return summarize(self.cases)


def case_metrics(case_id: str, pred: np.ndarray, gt: np.ndarray, spacing) -> CaseMetrics:
    """DSC, HD95 (mm) and sensitivity of one binary prediction.

    Args:
        case_id: the case's ID, carried into the result.
        pred: (Z, Y, X) (or any 3D axis order) mask, non-zero = tumour.
        gt: same shape and axis order as `pred`.
        spacing: voxel size in mm, same axis order as the arrays.

    Returns:
        The case's metrics (`tsesnet.segment.score`: empty-mask rules of `tsesnet.metrics`).
    """
    from tsesnet.segment import score

    return CaseMetrics(case_id=case_id, **asdict(score(pred, gt, spacing)))


def _stats(values: list[float]) -> dict:
    """Mean and sample sd (n - 1; None below two values) of the finite values, and counts."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n_inf = sum(1 for v in values if v is not None and math.isinf(v))
    arr = np.asarray(finite, dtype=np.float64)
    return {
        "mean": float(arr.mean()) if arr.size else None,
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "n": int(arr.size),
        "n_infinite": int(n_inf),
    }


def summarize(cases) -> dict:
    """Summary over the cases whose status is "ok": mean, sd, n and n_infinite per metric.

    Args:
        cases: `CaseMetrics` or dicts with the same keys.

    Returns:
        `{"n_cases", "n_ok", "n_failed", "dice": {...}, "hd95_mm": {...}, "sensitivity": {...}}`.
    """
    rows = [c if isinstance(c, dict) else asdict(c) for c in cases]
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out = {"n_cases": len(rows), "n_ok": len(ok), "n_failed": len(rows) - len(ok)}
    for k in METRICS:
        out[k] = _stats([r.get(k) for r in ok])
    # HD95 took the image-diagonal rule: exactly one of prediction and ground truth was empty.
    out["hd95_mm"]["n_one_empty"] = sum(
        1
        for r in ok
        if r.get("pred_voxels") is not None
        and r.get("gt_voxels") is not None
        and (r["pred_voxels"] == 0) != (r["gt_voxels"] == 0)
    )
    return out


def format_summary(summary: dict) -> str:
    """Lines like `DSC 0.812 ± 0.071 (n=20)`; HD95 notes how many cases were infinite."""
    names = {"dice": "DSC", "hd95_mm": "HD95 (mm)", "sensitivity": "Sensitivity"}
    lines = []
    for k, name in names.items():
        s = summary[k]
        if s["mean"] is None:
            text = "n/a"
        else:
            sd = f" ± {s['sd']:.3f}" if s["sd"] is not None else ""
            text = f"{s['mean']:.3f}{sd}"
        extra = ""
        if s.get("n_one_empty"):
            extra += f", {s['n_one_empty']} with an empty prediction or label: image diagonal"
        if s["n_infinite"]:
            extra += f", {s['n_infinite']} infinite, left out"
        lines.append(f"{name:<12} {text} (n={s['n']}{extra})")
    return "\n".join(lines)


def find_masks(folder: Path) -> dict[str, list[Path]]:
    """Case ID -> the NIfTI files for it directly in `folder` (`.nii`, `.nii.gz`, any letter case;
    hidden files and sub-folders such as `probabilities/` are not read). Two files for one ID
    (`A.nii` and `A.nii.gz`) fail that case, not the run."""
    from data_store.layouts import nifti_stem

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a directory", path=str(folder))
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        case_id = nifti_stem(path)
        if case_id is not None and path.is_file():
            found.setdefault(case_id, []).append(path)
    return found


def _one_file(files: list[Path], what: str) -> Path:
    if len(files) > 1:
        names = " and ".join(p.name for p in files)
        raise _CaseError(files[0], f"two {what} files for one case: {names}")
    return files[0]


class _CaseError(Exception):
    """A problem of one case's file: `FILE: problem`."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")


def _binary(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    """`arr` as bool, or _CaseError naming the values found when there are others than 0, 1."""
    values = np.unique(arr)  # sorted; NaN last
    if np.isin(values, (0, 1)).all():
        return arr == 1
    if values.size <= 6:
        shown = ", ".join(f"{v:.4g}" for v in values)
    else:
        head = ", ".join(f"{v:.4g}" for v in values[:3])
        shown = f"{head}, ..., {values[-1]:.4g} ({values.size} distinct values)"
    hint = " (a probability map?)" if what == "prediction" and values.size > 2 else ""
    raise _CaseError(path, f"{what} is not a binary mask: values {shown}{hint}")


# Masks from other tools may lack a spacing (no sform, a zero pixdim): scored, as nibabel reads
# them, with 1 mm voxels rather than refused as ingest refuses such scans.
_MASK_READ = ReadOptions(assume_spacing=(1.0, 1.0, 1.0))


def _load(path: Path):
    """A NIfTI image and its voxels (trailing length-1 axes beyond the third dropped), read by
    the one NIfTI reader (`data_store.nifti.read_nifti`)."""
    try:
        volume = read_nifti(path, options=_MASK_READ)
    except InputError as err:
        raise _CaseError(path, f"unreadable ({err.problem})") from err
    except Exception as err:
        raise _CaseError(path, f"unreadable ({type(err).__name__}: {err})") from err
    img, data = volume.image, volume.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise _CaseError(path, f"a mask must be 3D, this is {data.ndim}D {data.shape}")
    return img, data


def evaluate_files(case_id: str, pred_path, label_path) -> CaseMetrics:
    """Metrics of one prediction file against one label file; errors become a failed row.

    Args:
        case_id: the case.
        pred_path: the prediction file (or the list `find_masks` gives for the ID).
        label_path: the label file (or the list `find_masks` gives for the ID).
    """
    try:
        pred_path = _one_file(pred_path, "prediction") if isinstance(pred_path, list) else pred_path
        label_path = _one_file(label_path, "label") if isinstance(label_path, list) else label_path
        pred_img, pred = _load(Path(pred_path))
        gt_img, gt = _load(Path(label_path))
        if pred.shape != gt.shape:
            raise _CaseError(
                pred_path, f"prediction shape {pred.shape} does not match label shape {gt.shape}"
            )
        if not np.allclose(pred_img.affine, gt_img.affine, atol=_AFFINE_ATOL_MM):
            raise _CaseError(pred_path, "prediction and label affines differ: not on the same grid")
        spacing = gt_img.header.get_zooms()[:3]  # mm, file (i, j, k) order, as the arrays
        pred = _binary(pred, Path(pred_path), "prediction")
        gt = _binary(gt, Path(label_path), "label")
        return case_metrics(case_id, pred, gt, spacing)
    except Exception as err:  # one bad file must not stop the others
        text = str(err) if isinstance(err, _CaseError) else f"{type(err).__name__}: {err}"
        return CaseMetrics(case_id=case_id, status="error", error=" ".join(text.split()))


@contextlib.contextmanager
def local_copies(folder: str):
    """`folder` itself, or for an object-store URL (``s3://...``) a temporary local copy of the
    NIfTI files directly below it (what `find_masks` reads), removed afterwards."""
    from tsesnet.serving.outputs import is_url, object_fs

    if not is_url(folder):
        yield folder
        return
    fs, root = object_fs(str(folder))
    try:
        names = [p for p in fs.ls(root.rstrip("/"), detail=False) if fs.isfile(p)]
    except FileNotFoundError:
        raise InputError("no such prefix (nothing stored below it)", path=str(folder)) from None
    wanted = [p for p in names if _nifti_name(p.rsplit("/", 1)[-1])]
    with tempfile.TemporaryDirectory(prefix="tsesnet-eval-") as tmp:
        if wanted:
            fs.get(wanted, [os.path.join(tmp, p.rsplit("/", 1)[-1]) for p in wanted])
        yield tmp


def _nifti_name(name: str) -> bool:
    from data_store.layouts import nifti_stem

    return not name.startswith(".") and nifti_stem(Path(name)) is not None


def evaluate_dirs(pred_dir, labels_dir) -> EvaluationReport:
    """Evaluate every prediction in `pred_dir` against the label with the same case ID."""
    if Path(pred_dir).resolve() == Path(labels_dir).resolve():
        raise InputError(
            "{pred_dir} and {labels_dir} are the same folder",
            path=str(pred_dir),
            params=["pred_dir", "labels_dir"],
        )
    preds = find_masks(Path(pred_dir))
    labels = find_masks(Path(labels_dir))
    if not labels:
        raise InputError("no NIfTI label files (CASE.nii.gz) found", path=str(labels_dir))
    matched = sorted(set(preds) & set(labels))
    if not matched:
        raise InputError(
            f"no prediction matches a label by case ID ({len(preds)} predictions, "
            f"{len(labels)} labels)",
            path=str(pred_dir),
        )
    cases = [evaluate_files(cid, preds[cid], labels[cid]) for cid in matched]
    return EvaluationReport(
        cases=cases,
        missing=sorted(set(labels) - set(preds)),
        extra=sorted(set(preds) - set(labels)),
    )


def _fmt(v) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.3f}"


def format_table(cases: list[CaseMetrics]) -> str:
    """A fixed-width text table, one row per case."""
    width = max([len("case")] + [len(c.case_id) for c in cases])
    head = f"{'case':<{width}}  {'DSC':>6}  {'HD95mm':>8}  {'sens':>6}  status"
    lines = [head]
    for c in cases:
        status = c.status if c.status == "ok" else f"{c.status}: {c.error}"
        lines.append(
            f"{c.case_id:<{width}}  {_fmt(c.dice):>6}  {_fmt(c.hd95_mm):>8}  "
            f"{_fmt(c.sensitivity):>6}  {status}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet evaluate` (read by `cli`)."""
    parser.add_argument(
        "--pred", required=True, metavar="DIR", help="a tsesnet predict folder (CASE.nii.gz)"
    )
    parser.add_argument("--labels", required=True, metavar="DIR", help="binary masks, CASE.nii.gz")
    parser.add_argument(
        "--pred-unchecked",
        action="store_true",
        help="score --pred's masks as found, even where its prediction.json (written by tsesnet "
        "predict) says the run is incomplete or its files changed",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cli(args: argparse.Namespace) -> int:
    """`tsesnet evaluate --pred DIR --labels DIR [--json] [--pred-unchecked]`.

    A `--pred` folder written by `tsesnet predict` must be one whole run (`tsesnet.serving.
    manifest.check_prediction_folder`: complete, every listed file unchanged, no other mask beside
    them) unless `--pred-unchecked`; a folder without `prediction.json` (masks made elsewhere) is
    scored as found, with a line saying so.

    Returns:
        0 when every label has a prediction and every case was evaluated; 1 when predictions are
        missing or a case failed. Extra predictions (no label) are reported but do not fail.
    """
    if str(args.pred).rstrip("/") == str(args.labels).rstrip("/"):
        raise InputError("--pred and --labels are the same folder", path=str(args.pred))
    from tsesnet.serving.lineage import model_line, read_prediction_record
    from tsesnet.serving.manifest import check_prediction_folder

    # The library's names for this command's flags, and `tsesnet predict`'s `--overwrite`.
    shown = {"pred_dir": "--pred", "labels_dir": "--labels", "overwrite": "--overwrite"}
    with shown_as(shown):
        if not args.pred_unchecked and check_prediction_folder(args.pred) is None:
            print(
                f"{args.pred}: no prediction.json (not written by tsesnet predict): its masks "
                "are scored as found",
                file=sys.stderr,
            )
        with local_copies(args.pred) as pred, local_copies(args.labels) as labels:
            report = evaluate_dirs(pred, labels)
    # The model that made the masks, where `tsesnet predict` recorded it beside them.
    record = read_prediction_record(args.pred)
    model = record.get("model") if record else None
    if args.json:
        out = {
            "model": model if isinstance(model, dict) else None,
            "cases": [c.to_json() for c in report.cases],
            "summary": report.summary,
            "missing": report.missing,
            "extra": report.extra,
            "failed": report.failed,
        }
        print(json.dumps(out, indent=2))
    else:
        line = model_line(record) if record else None
        if line:
            print(line)
        print(format_table(report.cases))
        print()
        print(format_summary(report.summary))
        if report.missing:
            print(f"missing predictions ({len(report.missing)}): {', '.join(report.missing)}")
        if report.extra:
            print(f"predictions without a label ({len(report.extra)}): {', '.join(report.extra)}")
    for c in report.cases:
        if c.status != "ok":
            print(f"error: case {c.case_id}: {c.error}", file=sys.stderr)
    return 1 if report.missing or report.failed else 0
