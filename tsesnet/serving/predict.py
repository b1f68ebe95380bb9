"""`tsesnet predict`: batch prediction with Ray Data from a registered (MLflow) model.

Shape legend: T phases, Z Y X voxels in the store's canonical order (Z=S, Y=A, X=R).

The pipeline, read top to bottom:

1. `CaseReader` says where cases come from: a Zarr store (all cases or one fold) or a raw NIfTI
   cohort in any layout ingest understands, read directly (`discover` + `load_case`, no store
   built). Only case IDs travel through Ray Data; each actor opens the input itself.
2. `predict_case` runs one case: normalise with the intensity percentiles ingest uses (a store
   keeps them; for raw input they are computed with the same function on the same array, so a
   store and its source cohort give identical predictions), sliding-window inference, threshold,
   the connected-component filter chosen on validation (`tsesnet.postprocess`), write
   `CASE.nii.gz` (uint8) and optionally `CASE_prob.nii.gz` (float32) on the original grid of the
   phase-0 file, and DSC / HD95 (mm) / sensitivity where a ground-truth mask exists.
   Any error is caught and returned as the case's row: one bad case never stops the others.
3. `CasePredictor` is the Ray Data callable class: it loads the model once per actor
   (`tsesnet.tracking.registry.load_model`) and calls `predict_case` for each case it is given.
4. `predict` builds the dataset (one block per case, batch size 1 so the actor pool balances
   case by case), streams results with a progress bar, writes `summary.csv` and returns a
   `PredictReport`; `cli` prints mean ± sd and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_store.errors import InputError

if TYPE_CHECKING:
    from data_store.geometry import Geometry

SUMMARY_COLUMNS = (
    "case_id",
    "status",
    "dice",
    "hd95_mm",
    "sensitivity",
    "pred_voxels",
    "gt_voxels",
    "seconds",
    "error",
)
# Environment the actors need to reach the same MLflow store as the driver. Ray workers inherit
# the environment Ray was started with, not the driver's current one, so it is passed explicitly.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACTS_DESTINATION")


@dataclass(kw_only=True)
class PredictConfig:
    """How prediction runs; the CLI flags map onto it one to one.

    Attributes:
        workers: actors in the pool (default: one per GPU share, else one per CPU, at most one
            per case).
        gpus_per_worker: GPUs per actor (fractions allowed); 0 runs on CPU.
        cpus_per_worker: CPUs per actor, also its torch thread count (default: the cluster's CPUs
            divided among the workers on CPU, 1 with GPUs).
        probabilities: also write `CASE_prob.nii.gz` (float32 sigmoid of the logits).
        fold: with a store input, predict only the cases of this fold.
        threshold: probability above which a voxel is tumour.
        overlap: sliding-window overlap.
        batch_size: windows per forward pass.
        min_component_fraction: keep connected components of at least this fraction of the
            largest one's size (0 keeps all); None: the fraction chosen on validation and stored
            with the model. The probability map is never filtered.
    """

    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    probabilities: bool = False
    fold: int | None = None
    threshold: float = 0.5
    overlap: float = 0.5
    batch_size: int = 4
    min_component_fraction: float | None = None


# --------------------------------------------------------------------------------------------
# 1. Where cases come from
# --------------------------------------------------------------------------------------------


@dataclass
class InputCase:
    """One case ready for inference."""

    case_id: str
    image: np.ndarray  # (T, Z, Y, X) as stored / as scanned
    mask: np.ndarray | None  # (Z, Y, X) uint8, None when unlabelled
    geometry: Geometry  # the phase-0 file's grid, to write outputs back on
    percentiles: tuple[float, float]


@dataclass
class CaseReader:
    """A picklable reference to the input; opens it lazily, once per process.

    Attributes:
        kind: "store" or "nifti".
        path: the store path/URL or the cohort folder.
        layout: for "nifti", the layout passed to `discover` ("auto" detects it).
    """

    kind: str
    path: str
    layout: str = "auto"
    _index: object = field(default=None, repr=False, compare=False)

    @classmethod
    def for_input(cls, path: str, layout: str = "auto") -> CaseReader:
        """A store if `path` is a URL or holds a Zarr root (`zarr.json`), else a NIfTI cohort.

        Local paths are made absolute: actors do not share the driver's working directory.
        """
        from data_store.layouts import nifti_stem

        if "://" in str(path):
            return cls("store", str(path))
        p = Path(path).resolve()
        if (p / "zarr.json").is_file():
            return cls("store", str(p))
        if not p.exists():
            raise InputError("input not found (expected a store or a NIfTI folder)", path=path)
        if not p.is_dir() and nifti_stem(p) is None:  # a single 4D NIfTI file is a cohort too
            raise InputError("input must be a store, a NIfTI folder or a 4D NIfTI file", path=path)
        return cls("nifti", str(p), layout)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = None  # reopened where it is used
        return state

    def _open(self):
        if self._index is None:
            if self.kind == "store":
                from data_store.store import open_store

                self._index = open_store(self.path)
            else:
                from data_store.layouts import discover

                self._index = {s.case_id: s for s in discover(Path(self.path), self.layout)}
        return self._index

    def case_ids(self, fold: int | None = None) -> list[str]:
        """The input's case IDs, sorted; with `fold`, only that fold's (stores only)."""
        index = self._open()
        if self.kind == "store":
            ids = list(index.case_ids)
            if fold is not None:
                if not 0 <= fold < index.n_folds:
                    raise InputError(
                        f"--fold {fold} out of range: the store has {index.n_folds} folds "
                        f"(0..{index.n_folds - 1})",
                        path=self.path,
                    )
                ids = [c for c in ids if index.fold_of(c) == fold]
            return sorted(ids)
        if fold is not None:
            raise InputError(
                "--fold needs a store input (folds are assigned at ingest)", path=self.path
            )
        return sorted(index)

    def read(self, case_id: str) -> InputCase:
        """Reads one case; raises InputError (naming case and file) on a bad one."""
        index = self._open()
        if self.kind == "store":
            case = index.read_case(case_id)
            lo, hi = case.percentiles
            return InputCase(case_id, case.image, case.mask, case.geometry, (lo, hi))
        from data_store.loading import load_case
        from data_store.normalize import intensity_percentiles

        loaded = load_case(index[case_id])
        lo, hi = intensity_percentiles(loaded.image)  # as ingest computes them
        return InputCase(case_id, loaded.image, loaded.mask, loaded.geometry, (lo, hi))


# --------------------------------------------------------------------------------------------
# 2. One case
# --------------------------------------------------------------------------------------------


def _nan_row(case_id: str) -> dict:
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
    }


def _atomic_write(path: Path, vol_zyx: np.ndarray, geometry, dtype) -> None:
    """Write through a temporary name then rename, so a crash never leaves half a file."""
    from data_store.geometry import write_nifti

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write_nifti(tmp, vol_zyx, geometry, dtype=dtype)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def output_paths(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    """`(OUT/CASE.nii.gz, OUT/CASE_prob.nii.gz)`."""
    return out_dir / f"{case_id}.nii.gz", out_dir / f"{case_id}_prob.nii.gz"


def predict_case(
    loaded, reader: CaseReader, case_id: str, out_dir, config: PredictConfig, device=None
) -> dict:
    """Predict, write and score one case; never raises.

    Args:
        loaded: a `LoadedModel` (`.model` in eval mode, `.patch` the training patch size).
        reader: the input.
        case_id: the case to run.
        out_dir: output folder (exists).
        config: thresholds and sliding-window settings.
        device: torch device for inference (None: CPU).

    Returns:
        A row with `SUMMARY_COLUMNS`; `status` is "error" and `error` says why if it failed.
    """
    import torch

    from data_store.normalize import normalize_intensity
    from tsesnet.inference import sliding_window_inference
    from tsesnet.postprocess import keep_components
    from tsesnet.serving.evaluate import case_metrics

    row = _nan_row(case_id)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    mask_path, prob_path = output_paths(out_dir, case_id)
    try:
        case = reader.read(case_id)
        lo, hi = case.percentiles
        volume = torch.from_numpy(normalize_intensity(case.image, lo, hi))  # (T, Z, Y, X)
        with torch.inference_mode():
            logits = sliding_window_inference(
                loaded.model,
                volume,
                patch=tuple(loaded.patch),
                overlap=config.overlap,
                batch_size=config.batch_size,
                device=device,
            )  # (1, 1, Z, Y, X)
            prob = torch.sigmoid(logits[0, 0]).numpy()  # (Z, Y, X) float32
        fraction = config.min_component_fraction
        if fraction is None:
            fraction = float(loaded.config.get("min_component_fraction", 0.0))
        pred = keep_components(prob > config.threshold, fraction).astype(np.uint8)  # (Z, Y, X)
        _atomic_write(mask_path, pred, case.geometry, np.uint8)
        if config.probabilities:
            _atomic_write(prob_path, prob, case.geometry, np.float32)
        row["pred_voxels"] = int(pred.sum())
        if case.mask is not None:
            m = case_metrics(case_id, pred, case.mask, case.geometry.spacing)
            row.update(
                dice=m.dice, hd95_mm=m.hd95_mm, sensitivity=m.sensitivity, gt_voxels=m.gt_voxels
            )
    except Exception as err:  # isolate the case; its error goes to the summary
        row["status"] = "error"
        row["error"] = _input_error_text(err) if isinstance(err, InputError) else _one_line(err)
        # A stale mask from an earlier run must not be mistaken for this run's output.
        mask_path.unlink(missing_ok=True)
        prob_path.unlink(missing_ok=True)
    row["seconds"] = time.perf_counter() - start
    return row


def _input_error_text(err: InputError) -> str:
    """`FILE: problem` (the case ID is its own column)."""
    return f"{err.path}: {err.problem}" if err.path else err.problem


def _one_line(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return " ".join(f"{type(err).__name__}: {err}".split()) + at


# --------------------------------------------------------------------------------------------
# 3. The Ray Data actor
# --------------------------------------------------------------------------------------------


class CasePredictor:
    """Ray Data callable class: loads the model once, then predicts one case per call."""

    def __init__(
        self,
        model_uri: str,
        reader: CaseReader,
        out_dir: str,
        config: PredictConfig,
        env: dict[str, str],
        threads: int,
    ):
        import torch

        os.environ.update(env)
        torch.set_num_threads(max(1, threads))
        self.reader = reader
        self.out_dir = out_dir
        self.config = config
        self.device = None
        self.load_error = None
        try:
            if config.gpus_per_worker > 0:
                if not torch.cuda.is_available():  # e.g. a CPU-only torch on a GPU node
                    raise InputError("--gpus-per-worker set, but torch sees no CUDA device")
                self.device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES per actor
            from tsesnet.tracking.registry import load_model

            self.loaded = load_model(model_uri)
            if self.device is not None:
                self.loaded.model.to(self.device)
        except Exception as err:  # reported per case, then as one error by the driver
            self.loaded = None
            self.load_error = (
                str(err)
                if isinstance(err, InputError)
                else f"cannot load model {model_uri}: {_one_line(err)}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for case_id in batch["case_id"]:
            case_id = str(case_id)
            if self.loaded is None:
                row = _nan_row(case_id)
                row.update(status="model_error", error=self.load_error)
            else:
                row = predict_case(
                    self.loaded, self.reader, case_id, self.out_dir, self.config, self.device
                )
            rows.append(row)
        return {k: [r[k] for r in rows] for k in SUMMARY_COLUMNS}


# --------------------------------------------------------------------------------------------
# 4. The driver
# --------------------------------------------------------------------------------------------


@dataclass
class PredictReport:
    """Rows sorted by case ID (NaN metrics as None), the summary, and where it was written."""

    rows: list[dict]
    summary: dict
    csv_path: Path
    seconds: float

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


def check_model_uri(uri: str) -> None:
    """Fail fast, before any actor starts, on a registry URI (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`) that does not resolve; other URIs are checked by the actors."""
    if not uri.startswith("models:/"):
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    from tsesnet.tracking.runs import configure

    configure()
    client = mlflow.MlflowClient()
    name, sep, alias = uri[len("models:/") :].partition("@")
    try:
        if sep:
            client.get_model_version_by_alias(name, alias)
        elif "/" in name:
            name, version = name.split("/", 1)
            if version.isdigit():
                client.get_model_version(name, version)
    except MlflowException as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"cannot load model {uri}: {first}") from err


def _plan_workers(config: PredictConfig, n_cases: int, resources: dict) -> tuple[int, float]:
    """(actors, CPUs per actor) for the pool, from the flags and the cluster's resources."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    g = config.gpus_per_worker
    if g > 0 and g > gpus:
        raise InputError(f"--gpus-per-worker {g} but the Ray cluster has {gpus:g} GPUs")
    if config.workers is not None:
        if config.workers < 1:
            raise InputError(f"--workers must be at least 1, got {config.workers}")
        workers = config.workers
    elif g > 0:
        workers = max(1, int(gpus // g))
    else:
        workers = max(1, int(cpus))
    workers = max(1, min(workers, n_cases))
    if config.cpus_per_worker is not None:
        per = float(config.cpus_per_worker)
    elif g > 0:
        per = 1.0
    else:  # share the CPUs out: one case on a big machine still uses every core
        per = max(1.0, math.floor(cpus / workers))
    return workers, per


def _clean(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, int) and v < 0:
        return None
    return v


def write_summary_csv(path: Path, rows: list[dict]) -> None:
    """One row per case, `SUMMARY_COLUMNS`; empty cells where a metric does not apply."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in SUMMARY_COLUMNS})


def predict(
    model_uri: str,
    input_path: str,
    output: str,
    config: PredictConfig | None = None,
    *,
    progress: bool = True,
) -> PredictReport:
    """Predict every case of `input_path` with the model at `model_uri` into `output`.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or any MLflow model URI.
        input_path: a Zarr store (path or fsspec URL) or a folder with a NIfTI cohort.
        output: folder for `CASE.nii.gz`, `CASE_prob.nii.gz` and `summary.csv`.
        config: workers, GPUs, fold, threshold...
        progress: show a progress bar over finished cases.

    Returns:
        The report; failed cases are in it, not raised.

    Raises:
        InputError: bad input, bad flags, or a model that no actor could load.
    """
    from tsesnet.common.cluster import connect
    from tsesnet.serving.evaluate import summarize

    config = config or PredictConfig()
    reader = CaseReader.for_input(input_path)
    case_ids = reader.case_ids(config.fold)
    if not case_ids:
        raise InputError("no cases to predict", path=input_path)
    out_dir = Path(output).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    check_model_uri(model_uri)
    ray = connect()
    workers, cpus_per_worker = _plan_workers(config, len(case_ids), ray.cluster_resources())
    predictor = {
        "model_uri": model_uri,
        "reader": reader,
        "out_dir": str(out_dir),
        "config": config,
        "env": _actor_env(),
        "threads": int(cpus_per_worker),
    }
    start = time.perf_counter()
    with _quiet_ray_data():
        ds = _dataset(case_ids, predictor, config, workers, cpus_per_worker)
        rows = _collect(ds, len(case_ids), progress)
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: r["case_id"])
    if rows and all(r["status"] == "model_error" for r in rows):
        raise InputError(rows[0]["error"])  # no actor could load the model: one clear error
    csv_path = out_dir / "summary.csv"
    write_summary_csv(csv_path, rows)
    return PredictReport(rows=rows, summary=summarize(rows), csv_path=csv_path, seconds=seconds)


def _actor_env() -> dict[str, str]:
    """The MLflow settings the actors need (Ray workers do not inherit the driver's current
    environment, only the one Ray started with)."""
    from tsesnet.tracking.runs import tracking_uri

    env = {k: os.environ[k] for k in _MLFLOW_ENV if os.environ.get(k)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    return env


@contextlib.contextmanager
def _quiet_ray_data():
    """Our bar counts cases; Ray Data's own bars (or, off a terminal, its progress log lines)
    would count blocks and interleave with it. Set before the dataset copies the context."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    data_logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, data_logger.level
    ctx.enable_progress_bars = False
    data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, level = saved
        data_logger.setLevel(level)


def _dataset(case_ids, predictor: dict, config: PredictConfig, workers: int, cpus: float):
    """The Ray Data pipeline: case IDs in, one `CasePredictor` row per case out.

    One block per case and batch_size=1: the pool hands out cases one by one, so a slow case
    holds up only its own actor. Only IDs travel; actors read and write the volumes.
    """
    import ray.data

    ds = ray.data.from_items([{"case_id": c} for c in case_ids], override_num_blocks=len(case_ids))
    return ds.map_batches(
        CasePredictor,
        fn_constructor_kwargs=predictor,
        batch_size=1,
        # At most 2 cases queued per actor (Ray's default, pinned because it matters here):
        # no idle gap between cases, and at most one case of backlog when the others finish.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
        num_cpus=cpus,
        num_gpus=config.gpus_per_worker or None,
    )


def _collect(ds, n_cases: int, progress: bool) -> list[dict]:
    """Stream the result rows with a progress bar over cases, printing errors as they come."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=n_cases, desc="predict", unit="case", disable=not progress, file=sys.stderr)
    for r in ds.iter_rows():
        rows.append({k: _clean(r[k]) for k in SUMMARY_COLUMNS})
        bar.update(1)
        if r["status"] == "error":
            bar.write(f"error: case {r['case_id']}: {r['error']}", file=sys.stderr)
    bar.close()
    return rows


def cli(args: argparse.Namespace) -> int:
    """`tsesnet predict --model URI --input STORE_OR_DIR --output DIR [...]`; 1 if a case failed."""
    from tsesnet.serving.evaluate import format_summary

    config = PredictConfig(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        probabilities=args.probabilities,
        fold=args.fold,
        min_component_fraction=args.min_component_fraction,
    )
    report = predict(args.model, args.input, args.output, config)
    n = len(report.rows)
    print(
        f"{n - len(report.failed)}/{n} cases predicted in {report.seconds:.1f} s "
        f"({60 * n / max(report.seconds, 1e-9):.1f} cases/min) -> {report.csv_path.parent}"
    )
    if report.summary["dice"]["n"]:
        print(format_summary(report.summary))
    print(f"summary: {report.csv_path}")
    if report.failed:  # each error was printed as it happened; the CSV has them all
        ids = ", ".join(r["case_id"] for r in report.failed)
        print(f"error: {len(report.failed)} case(s) failed: {ids}", file=sys.stderr)
    return 1 if report.failed else 0
