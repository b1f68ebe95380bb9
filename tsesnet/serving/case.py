"""One case's prediction, Ray-free: read, segment, post-process, write, score, warn.

Shape legend: T phases, Z Y X voxels in the store's canonical order (Z=S, Y=A, X=R).

What each `tsesnet predict` actor runs (`tsesnet.serving.predict` is the Ray Data pipeline
around it); it imports no Ray, so a case can be predicted in any process. Read top to bottom:

1. `PredictConfig` says how prediction runs (the CLI flags map onto it one to one).
2. One case in two steps. `prepare_case` checks the case ID (it names output files: see
   `tsesnet.serving.outputs`), reads the case and normalises it with the intensity percentiles
   ingest uses (a store keeps them; for raw input they are computed with the same function on
   the same array, so a store and its source cohort give identical masks). `finish_case` runs
   the sliding window (`tsesnet.segment`), thresholds, applies the connected-component filter
   chosen on validation (`tsesnet.postprocess`), writes `CASE.nii.gz` (uint8) and optionally
   `probabilities/CASE.nii.gz` (float32) on the original grid of the phase-0 file, scores DSC /
   HD95 (mm) / sensitivity where a ground-truth mask exists, notes how the case differs from
   the model's training data (`tsesnet.common.training_record`), and draws the case's picture
   `report/CASE.png` with its volume, diameter and kinetic curve (`tsesnet.serving.report`).
   Any error is caught and returned as the case's row (`ROW_COLUMNS`): one bad case never
   stops the others.
3. `predict_cases` runs a list of cases with `data_store.prefetch.prefetch`: the next case is
   read and normalised in a background thread while the current one is predicted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_store.errors import InputError
from tsesnet.serving.inputs import CaseReader, InputCase
from tsesnet.serving.outputs import (
    SUMMARY_COLUMNS,
    check_safe_id,
    output_paths,
    remove_stale,
    report_image_path,
    write_bytes,
    write_mask,
)

__all__ = [
    "OUTPUT_FORMATS",
    "ROW_COLUMNS",
    "PredictConfig",
    "PreparedCase",
    "finish_case",
    "nan_row",
    "one_line",
    "predict_case",
    "predict_cases",
    "prepare_case",
]

# What an actor returns per case: the summary columns, a note about the model (shown once) and
# why the case's picture could not be drawn ("" when it was, or when the case failed), and the
# files written for it (JSON: name relative to OUT -> [size, sha256]) for the manifest.
ROW_COLUMNS = (*SUMMARY_COLUMNS, "note", "picture_error", "files")


@dataclass(kw_only=True)
class PredictConfig:
    """How prediction runs; the CLI flags map onto it one to one.

    Attributes:
        workers: actors in the pool (default: one per GPU share, else one per CPU, at most one
            per case).
        gpus_per_worker: GPUs per actor (fractions allowed); 0 runs on CPU.
        cpus_per_worker: CPUs per actor, also its torch thread count (default: the cluster's CPUs
            divided among the workers on CPU, 1 with GPUs).
        probabilities: also write `probabilities/CASE.nii.gz` (float32 sigmoid of the logits).
        fold: with a store input, predict only the cases of this fold.
        split: with a store input, predict only the cases of this split ("test": the cases
            ingested from a declared test split, e.g. `imagesTs/`).
        threshold: probability above which a voxel is tumour.
        overlap: sliding-window overlap.
        batch_size: windows per forward pass.
        min_component_fraction: keep connected components of at least this fraction of the
            largest one's size (0 keeps all); None: the fraction chosen on validation and stored
            with the model. The probability map is never filtered.
        prefetch: cases each actor reads ahead while it predicts one (0: read, then predict).
        output_format: "nifti" (`CASE.nii.gz`) or "dicom-seg" (`CASE.dcm`, a DICOM SEG on the
            source DICOM grid: `tsesnet.serving.dicom_seg`; cases ingested from DICOM only).
        report: draw `report/CASE.png` per case and write `report.html`.
        overwrite: write into a folder holding other files, or an interrupted prediction
            (`tsesnet.serving.manifest.check_output_folder`).
    """

    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    probabilities: bool = False
    fold: int | None = None
    split: str | None = None
    threshold: float = 0.5
    overlap: float = 0.5
    batch_size: int = 4
    min_component_fraction: float | None = None
    prefetch: int = 1
    output_format: str = "nifti"
    report: bool = True
    overwrite: bool = False


OUTPUT_FORMATS = ("nifti", "dicom-seg")


# --------------------------------------------------------------------------------------------
# 2. One case: prepare (read + normalise), then finish (infer, write, score)
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedCase:
    """A case read and normalised, ready for the network."""

    case: InputCase
    volume: np.ndarray  # (T, Z, Y, X) float32 in [0, 1]
    seconds: float  # spent reading and normalising


def prepare_case(reader: CaseReader, case_id: str) -> PreparedCase:
    """Reads and normalises one case (safe to run in a background thread).

    Raises:
        InputError: an unsafe case ID (checked before anything is read: it could name a path
            outside the input) or a bad case (naming the file).
    """
    from data_store.normalize import normalize_intensity

    check_safe_id(case_id)
    start = time.perf_counter()
    case = reader.read(case_id)
    volume = normalize_intensity(case.image, *case.percentiles)  # (T, Z, Y, X) float32
    return PreparedCase(case, volume, time.perf_counter() - start)


def nan_row(case_id: str) -> dict:
    """A result row with every field present (Ray Data wants one schema for all batches)."""
    nan = float("nan")
    return {
        "case_id": case_id,
        "status": "ok",
        "dice": nan,
        "hd95_mm": nan,
        "sensitivity": nan,
        "pred_voxels": -1,
        "gt_voxels": -1,
        "seconds": nan,
        "error": "",
        "warnings": "",
        "model_version": "",  # the driver's to fill: it resolved the model
        "volume_ml": nan,
        "diameter_mm": nan,
        "curve_type": "",
        "enhancement_pct": "",
        "note": "",
        "picture_error": "",
        "files": "{}",
    }


def finish_case(
    loaded,
    case_id: str,
    prepared: PreparedCase | BaseException,
    out_dir,
    config: PredictConfig,
    device=None,
) -> dict:
    """Predict, write and score one prepared case; returns its row, never raises an Exception.

    Args:
        loaded: a `LoadedModel` (`.model` in eval mode, `.patch` the training patch size).
        case_id: the case.
        prepared: `prepare_case`'s result, or the exception it raised (an `Exception` becomes
            the case's error row; anything else, e.g. KeyboardInterrupt, is re-raised).
        out_dir: output folder (created if missing).
        config: thresholds and sliding-window settings.
        device: torch device for inference (None: CPU).

    Returns:
        A row with `ROW_COLUMNS`; `status` is "error" and `error` says why if it failed;
        `seconds` is the case's own work (read, normalise, predict, write, score).
    """
    from tsesnet.common.training_record import TrainingRecord

    row = nan_row(case_id)
    start = time.perf_counter()
    if isinstance(prepared, BaseException) and not isinstance(prepared, Exception):
        raise prepared
    record, row["note"] = TrainingRecord.from_model_config(loaded.config)
    try:
        mask_path, prob_path = output_paths(out_dir, case_id)
    except Exception as err:  # an unsafe ID or path: nothing may be written or removed
        return _failed(row, err, start)
    files = {}
    try:
        if isinstance(prepared, Exception):
            raise prepared
        pred, prob = _segment(loaded, prepared.volume, config, device)
        if config.output_format == "dicom-seg":
            seg = _seg_path(mask_path)
            files[seg] = _write_seg(seg, pred, prepared.case, loaded)
        else:
            files[mask_path] = write_mask(mask_path, pred, prepared.case.geometry, np.uint8)
        if config.probabilities:
            files[prob_path] = write_mask(prob_path, prob, prepared.case.geometry, np.float32)
        row.update(_scores(case_id, pred, prepared.case))
        row["warnings"] = "; ".join(_unlike(record, prepared.case))
    except Exception as err:  # isolate the case; its error goes to the summary
        # A stale mask from an earlier run must not be mistaken for this run's output.
        remove_stale(mask_path, prob_path)
        with contextlib.suppress(InputError):
            remove_stale(report_image_path(out_dir, case_id))
        if config.output_format == "dicom-seg":
            with contextlib.suppress(InputError):
                remove_stale(_seg_path(mask_path))
        return _failed(row, err, start, prepared)
    if config.report:
        row.update(_picture(out_dir, case_id, pred, prepared.case, files))
    row["files"] = _files_json(out_dir, files)
    row["seconds"] = prepared.seconds + time.perf_counter() - start
    return row


def _files_json(out_dir, files: dict) -> str:
    """`{name relative to OUT: [size, sha256]}` as JSON (one string column for Ray Data)."""
    from tsesnet.serving.manifest import relative_name

    return json.dumps(
        {relative_name(out_dir, p): [w.size, w.sha256] for p, w in files.items()}, sort_keys=True
    )


def _picture(out_dir, case_id: str, pred: np.ndarray, case: InputCase, files: dict) -> dict:
    """The case's numbers and `report/CASE.png` (added to `files`); a failure here loses
    neither the mask nor the case, and is said in `picture_error`."""
    from tsesnet.serving import report

    try:
        numbers = report.lesion_numbers(case.image, pred, case.geometry.spacing)
        png = report.overlay_png(case.image, pred, case.geometry.spacing, numbers, case_id)
        path = report_image_path(out_dir, case_id)
        files[path] = write_bytes(path, png)
    except Exception as err:
        text = _input_error_text(err) if isinstance(err, InputError) else one_line(err)
        return {"picture_error": text}
    return {
        "volume_ml": numbers.volume_ml,
        "diameter_mm": numbers.diameter_mm,
        "curve_type": numbers.curve_type,
        "enhancement_pct": report.enhancement_text(numbers.enhancement_pct),
    }


def _seg_path(mask_path: Path) -> Path:
    from tsesnet.serving.dicom_seg import seg_path

    return seg_path(mask_path)


def _write_seg(path: Path, pred: np.ndarray, case: InputCase, loaded):
    """The prediction as `path` (`OUT/CASE.dcm`), a DICOM SEG referencing the case's source
    images, written whole or not at all; returns its `Written`."""
    from tsesnet.serving.dicom_seg import write_seg
    from tsesnet.serving.outputs import ObjectPath, upload

    def write(path):
        return write_seg(
            path,
            pred,
            case.geometry,
            case.dicom,
            model_uri=getattr(loaded, "uri", None) or "tsesnet",
            source_paths=case.source_paths,
        )

    if isinstance(path, ObjectPath):  # written whole on local disk, then one PUT
        return upload(path, write, ".dcm")
    return write(path)


def _segment(loaded, volume: np.ndarray, config: PredictConfig, device):
    """(mask (Z, Y, X) uint8 after the component filter, probability (Z, Y, X) float32)."""
    from tsesnet.segment import segment

    seg = segment(
        loaded.model,
        volume,
        patch=loaded.patch,
        overlap=config.overlap,
        batch_size=config.batch_size,
        device=device,
    )
    fraction = config.min_component_fraction
    if fraction is None:
        fraction = float(loaded.config.get("min_component_fraction", 0.0))
    return seg.mask(config.threshold, fraction).astype(np.uint8), seg.probability()


def _scores(case_id: str, pred: np.ndarray, case: InputCase) -> dict:
    """The row's prediction size and, where the case has a ground-truth mask, its metrics."""
    from tsesnet.serving.evaluate import case_metrics

    out = {"pred_voxels": int(pred.sum())}
    if case.mask is not None:
        m = case_metrics(case_id, pred, case.mask, case.geometry.spacing)
        out.update(dice=m.dice, hd95_mm=m.hd95_mm, sensitivity=m.sensitivity, gt_voxels=m.gt_voxels)
    return out


def _unlike(record, case: InputCase) -> list[str]:
    """How the case differs from the model's training data ([] without a record)."""
    if record is None:
        return []
    return record.unlike(case.image.shape[0], case.geometry.spacing, case.geometry.obliquity_deg)


def _failed(row: dict, err: Exception, start: float, prepared=None) -> dict:
    row["status"] = "error"
    row["error"] = _input_error_text(err) if isinstance(err, InputError) else one_line(err)
    done = isinstance(prepared, PreparedCase)
    row["seconds"] = (prepared.seconds if done else 0.0) + time.perf_counter() - start
    return row


def _input_error_text(err: InputError) -> str:
    """`FILE: problem` (the case ID is its own column), on one line."""
    text = f"{err.path}: {err.problem}" if err.path else err.problem
    return " ".join(text.split())


def one_line(err: BaseException) -> str:
    """`Type: message (at FILE:LINE)` on one line: an unexpected error in a case's row."""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return " ".join(f"{type(err).__name__}: {err}".split()) + at


def predict_case(
    loaded, reader: CaseReader, case_id: str, out_dir, config: PredictConfig, device=None
) -> dict:
    """Read, predict, write and score one case in this thread; never raises an Exception."""
    try:
        prepared = prepare_case(reader, case_id)
    except Exception as err:
        prepared = err
    return finish_case(loaded, case_id, prepared, out_dir, config, device)


# --------------------------------------------------------------------------------------------
# 3. Several cases, the next one read while the current one is predicted
# --------------------------------------------------------------------------------------------


def predict_cases(
    loaded, reader: CaseReader, case_ids, out_dir, config: PredictConfig, device=None
) -> Iterator[dict]:
    """The rows of `case_ids`, in order, each yielded as soon as its case is done.

    With `config.prefetch` > 0, `data_store.prefetch.prefetch` reads and normalises up to that
    many cases ahead in a background thread while the current case is predicted; with 0, one
    case after another. Both give the same rows and the same files.
    """
    from data_store.prefetch import prefetch

    load = functools.partial(prepare_case, reader)
    if config.prefetch > 0:
        pairs = prefetch(case_ids, load, depth=config.prefetch)
    else:
        pairs = ((c, _attempt(load, c)) for c in case_ids)
    with contextlib.closing(pairs):  # stopped early: the background read is joined
        for case_id, prepared in pairs:
            yield finish_case(loaded, case_id, prepared, out_dir, config, device)


def _attempt(load, case_id: str):
    try:
        return load(case_id)
    except Exception as err:
        return err
