"""`tsesnet predict`: batch prediction with Ray Data from a registered (MLflow) model.

The pipeline, read top to bottom (one case's work, Ray-free, is `tsesnet.serving.case`):

1. `tsesnet.serving.inputs.CaseReader` says where cases come from: a Zarr store (all cases or one
   fold) or a raw NIfTI cohort in any layout ingest understands, read directly (no store built).
   Only case IDs travel through Ray Data; each actor opens the input itself.
2. `CasePredictor` is the Ray Data callable class: it loads the model once per actor and runs
   `tsesnet.serving.case.predict_cases` on each batch of case IDs it is given (the next case
   read while the current one is predicted), yielding one row per case as it finishes (so the
   progress bar and the error lines stay per case).
3. `predict` resolves the model to the registered version it names now
   (`tsesnet.serving.lineage`) and announces it, plans the actor pool, builds the dataset,
   streams results with a progress bar, writes `summary.csv` (with the model version),
   `report.html` (every case's numbers and picture) and, last, `prediction.json` (model, input,
   settings, cases, software, time, and every file written with its size and sha256: the
   manifest of `tsesnet.serving.manifest`, written first marked incomplete) and returns a
   `PredictReport`; `cli` prints mean ± sd and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from data_store.errors import InputError, shown_as
from tsesnet.serving import manifest
from tsesnet.serving.case import (
    OUTPUT_FORMATS,
    ROW_COLUMNS,
    PredictConfig,
    nan_row,
    one_line,
    predict_cases,
)
from tsesnet.serving.inputs import CaseReader
from tsesnet.serving.lineage import ModelInfo, resolve_model, software_versions
from tsesnet.serving.outputs import (
    REPORT_DIR,
    REPORT_FILE,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    Written,
    write_bytes,
    write_summary_csv,
)

__all__ = [
    "CasePredictor",
    "PredictReport",
    "check_model_uri",
    "cases_per_call",
    "predict",
]

# Cases per Ray Data call: within a call the next case's read overlaps the current inference;
# between calls the pool rebalances. Each actor gets at least two calls, at most this many cases.
MAX_CASES_PER_CALL = 8
# Environment the actors need to reach the same MLflow store as the driver. Ray workers inherit
# the environment Ray was started with, not the driver's current one, so it is passed explicitly.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACTS_DESTINATION")


# --------------------------------------------------------------------------------------------
# 2. The Ray Data actor
# --------------------------------------------------------------------------------------------


class CasePredictor:
    """Ray Data callable class: loads the model once, then predicts the cases of each batch."""

    def __init__(
        self,
        model_uri: str,
        reader: CaseReader,
        out_dir: str,
        config: PredictConfig,
        threads: int,
    ):
        import torch

        torch.set_num_threads(max(1, threads))
        self.reader = reader
        self.out_dir = out_dir
        self.config = config
        self.device = None
        self.load_error = None
        try:
            if config.gpus_per_worker > 0:
                if not torch.cuda.is_available():  # e.g. a CPU-only torch on a GPU node
                    raise InputError("set, but torch sees no CUDA device", param="gpus_per_worker")
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
                else f"cannot load model {model_uri}: {one_line(err)}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
        """Yields one single-row batch per case of `batch`, as each finishes."""
        case_ids = [str(c) for c in batch["case_id"]]
        if self.loaded is None:
            rows = [
                {**nan_row(c), "status": "model_error", "error": self.load_error} for c in case_ids
            ]
            yield _columns(rows)
            return
        rows = predict_cases(
            self.loaded, self.reader, case_ids, self.out_dir, self.config, self.device
        )
        for row in rows:
            yield _columns([row])


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ROW_COLUMNS}


# --------------------------------------------------------------------------------------------
# 3. The driver
# --------------------------------------------------------------------------------------------


@dataclass
class PredictReport:
    """Rows sorted by case ID (NaN metrics as None), the summary, and where it was written.

    Attributes:
        rows: one per case, `SUMMARY_COLUMNS`.
        summary: `tsesnet.serving.evaluate.summarize` of the rows.
        csv_path: OUT/summary.csv (an `ObjectPath` when OUT is on object storage).
        seconds: wall clock of the Ray Data pipeline.
        notes: things said once about the model (e.g. it has no training-data record).
        model: the model the URI resolved to, with its lineage.
        html_path: OUT/report.html, None without the report.
    """

    rows: list[dict]
    summary: dict
    csv_path: Path
    seconds: float
    notes: list[str]
    model: ModelInfo | None = None
    html_path: Path | None = None

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]

    @property
    def warned(self) -> list[dict]:
        return [r for r in self.rows if r.get("warnings")]


def check_model_uri(uri: str) -> ModelInfo:
    """Fail fast, before any actor starts, on a model that cannot be the one meant.

    A local folder must hold exactly one model (one `model_config.json` beside one
    `weights.pt`); a registry URI (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) must resolve.
    Other URIs are checked by the actors.

    Returns:
        What the URI names now (version, run, lineage), as far as known before loading.
    """
    return resolve_model(uri)


def _plan_workers(config: PredictConfig, n_cases: int, resources: dict) -> tuple[int, float]:
    """(actors, CPUs per actor) for the pool, from the flags and the cluster's resources."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    g = config.gpus_per_worker
    if g > 0 and g > gpus:
        raise InputError(f"{g} but the Ray cluster has {gpus:g} GPUs", param="gpus_per_worker")
    if config.workers is not None:
        if config.workers < 1:
            raise InputError(f"must be at least 1, got {config.workers}", param="workers")
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


def cases_per_call(n_cases: int, workers: int, prefetch: int) -> int:
    """Case IDs per `CasePredictor` call: enough for the read-ahead to pay (it overlaps all but
    the first read of a call), few enough that each actor gets two calls or more and the pool
    can still rebalance; 1 without read-ahead."""
    if prefetch < 1:
        return 1
    return max(1, min(MAX_CASES_PER_CALL, math.ceil(n_cases / (2 * workers))))


def _clean(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, int) and v < 0:
        return None
    return v


def predict(
    model_uri: str,
    input_path: str,
    output: str,
    config: PredictConfig | None = None,
    *,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
) -> PredictReport:
    """Predict every case of `input_path` with the model at `model_uri` into `output`.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or any MLflow model URI.
        input_path: a Zarr store (path or fsspec URL) or a folder with a NIfTI cohort.
        output: folder for `CASE.nii.gz`, `probabilities/CASE.nii.gz` and `summary.csv`.
        config: workers, GPUs, fold, threshold...
        progress: show a progress bar over finished cases.
        announce: called with each line saying which model runs (name, version, alias, run,
            training store fingerprint, commit), once the model is resolved and before any
            case starts.

    Returns:
        The report; failed cases are in it, not raised.

    Raises:
        InputError: bad input, bad flags, an output that would lose data, or a model that no
            actor could load.
    """
    from tsesnet.common.cluster import connect
    from tsesnet.serving.evaluate import summarize

    config = config or PredictConfig()
    reader, case_ids = _cases_to_predict(input_path, config)
    model = check_model_uri(model_uri)
    out_dir = manifest.prepare_output_dir(output, reader, config.probabilities, config.overwrite)
    starting = f"predicting {len(case_ids)} case(s) of {input_path} into {output}"
    for line in [*model.lines(), starting] if announce else ():  # before Ray takes seconds
        announce(line)
    started = datetime.now(UTC)
    planned = manifest.planned_names(
        case_ids,
        output_format=config.output_format,
        probabilities=config.probabilities,
        report=config.report,
    )
    manifest.begin(out_dir, planned, _started_record(model, input_path, out_dir, config, started))
    with contextlib.closing(_bar(len(case_ids), progress)) as bar:  # from the first second
        ray = connect()
        workers, cpus_per_worker = _plan_workers(config, len(case_ids), ray.cluster_resources())
        predictor = {
            "model_uri": model_uri,
            "reader": reader,
            "out_dir": str(out_dir),
            "config": config,
            "threads": int(cpus_per_worker),
        }
        start = time.perf_counter()
        with _data_context():
            ds = _dataset(case_ids, predictor, config, workers, cpus_per_worker)
            rows, notes = _collect(ds, bar)
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: r["case_id"])
    if rows and all(r["status"] == "model_error" for r in rows):
        raise InputError(rows[0]["error"])  # no actor could load the model: one clear error
    files = {}
    for r in rows:
        r["model_version"] = model.version
        files.update({k: Written(*v) for k, v in json.loads(r.pop("files") or "{}").items()})
    csv_path = out_dir / SUMMARY_FILE  # a Path, or an ObjectPath on object storage
    files[SUMMARY_FILE] = write_summary_csv(csv_path, rows)
    summary = summarize(rows)
    report = PredictReport(rows, summary, csv_path, seconds, notes, model)
    record = _finite(prediction_record(report, input_path, out_dir, config, started))
    if config.report:
        report.html_path = out_dir / REPORT_FILE
        files[REPORT_FILE] = write_bytes(report.html_path, _report_html(report, record))
    manifest.finish(out_dir, record, files)  # last: the folder is complete from here on
    return report


def _cases_to_predict(input_path: str, config: PredictConfig) -> tuple[CaseReader, list[str]]:
    """The input's reader and the IDs of the cases to predict, after checking the settings.

    Raises:
        InputError: a bad setting, no cases, or DICOM output from a source that is not DICOM.
    """
    if config.prefetch < 0:
        raise InputError(f"prefetch must be 0 or more, got {config.prefetch}")
    if config.output_format not in OUTPUT_FORMATS:
        raise InputError(f"must be one of {', '.join(OUTPUT_FORMATS)}", param="output_format")
    reader = CaseReader.for_input(input_path)
    case_ids = reader.case_ids(config.fold, config.split)
    if not case_ids:
        raise InputError("no cases to predict", path=input_path)
    if config.output_format == "dicom-seg":
        _check_dicom_source(reader, case_ids, input_path)
    return reader, case_ids


def _started_record(model, input_path: str, out_dir, config: PredictConfig, started) -> dict:
    """What the manifest says while the run goes on (`tsesnet.serving.manifest.begin`)."""
    return {
        "format": manifest.MANIFEST_FORMAT,
        "model": model.to_json() if model else None,
        "input": str(input_path),
        "output": str(out_dir),
        "settings": asdict(config),
        "started_utc": started.isoformat(timespec="seconds"),
    }


def _report_html(report: PredictReport, record: dict) -> bytes:
    """`report.html`'s bytes: the rows, each with its picture where one was drawn."""
    from tsesnet.serving.report import write_report_html

    rows = []
    for r in report.rows:
        drawn = r["status"] == "ok" and not r.get("picture_error")
        rows.append({**r, "image": f"{REPORT_DIR}/{r['case_id']}.png" if drawn else ""})
    header = {
        "input": record["input"],
        "cases": f"{len(report.rows) - len(report.failed)} of {len(report.rows)} predicted",
        "finished (UTC)": record["finished_utc"],
        "software": ", ".join(f"{k} {v}" for k, v in record["software"].items()),
    }
    lines = report.model.lines() if report.model else []
    return write_report_html(rows, lines, header)


def prediction_record(
    report: PredictReport, input_path: str, out_dir, config: PredictConfig, started: datetime
) -> dict:
    """What `OUT/prediction.json` says: which model made these masks, from what, how, when."""
    return {
        "format": manifest.MANIFEST_FORMAT,
        "model": report.model.to_json() if report.model else None,
        "input": str(input_path),
        "output": str(out_dir),
        "settings": asdict(config),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(report.seconds, 3),
        "software": software_versions(),
        "notes": report.notes,
        "cases": [
            {k: r.get(k) for k in ("case_id", "status", "error", "warnings")} for r in report.rows
        ],
        "summary": report.summary,
    }


def _finite(v):
    """`v` with NaN and infinities as None (strict JSON has neither)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _check_dicom_source(reader: CaseReader, case_ids: list[str], input_path: str) -> None:
    """Refuses DICOM SEG output, before any work, for an input with no case from DICOM."""
    from data_store.layouts import detect_layout

    if reader.kind == "store":
        index = reader._open()
        from_dicom = any("dicom" in index.case_attrs(c) for c in case_ids)
    else:
        from_dicom = reader.layout == "dicom" or (
            reader.layout == "auto" and detect_layout(Path(reader.path)) == "dicom"
        )
    if not from_dicom:
        raise InputError(
            "{output_format=dicom-seg} needs a DICOM source (a store ingested with "
            "{layout=dicom}, or a DICOM folder): these cases come from NIfTI; use the default "
            "NIfTI output",
            path=input_path,
            params=["output_format", "layout"],
        )


def _actor_env() -> dict[str, str]:
    """The MLflow and object-store settings the actors need (their runtime env's variables)."""
    from data_store.local_ray import forwarded_env
    from tsesnet.tracking.runs import tracking_uri

    env = {k: os.environ[k] for k in _MLFLOW_ENV if os.environ.get(k)}
    env.update(forwarded_env())
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    return env


@contextlib.contextmanager
def _data_context():
    """Ray Data settings for prediction, set before the dataset copies the context.

    Our bar counts cases; Ray Data's own bars (or, off a terminal, its progress log lines)
    would count blocks and interleave with it. A 1-byte target block size makes every row an
    actor yields a block of its own, sent on at once: Ray Data otherwise gathers the rows of a
    call into one block and the driver sees a call's cases only when its last one is done.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    data_logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, ctx.target_max_block_size, data_logger.level
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = 1
    data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.target_max_block_size, level = saved
        data_logger.setLevel(level)


def _dataset(case_ids, predictor: dict, config: PredictConfig, workers: int, cpus: float):
    """The Ray Data pipeline: case IDs in, one `CasePredictor` row per case out.

    Calls carry `cases_per_call` IDs. With one case per call, up to 2 calls are queued per
    actor (no idle gap between cases, at most one case of backlog when the others finish); with
    several, 1 (the read-ahead already fills the gaps within a call, and a backlog of a whole
    call would hold cases that another actor could take). Only IDs travel.
    """
    import ray.data

    per_call = cases_per_call(len(case_ids), workers, config.prefetch)
    ds = ray.data.from_items(
        [{"case_id": c} for c in case_ids],
        override_num_blocks=math.ceil(len(case_ids) / per_call),
    )
    return ds.map_batches(
        CasePredictor,
        fn_constructor_kwargs=predictor,
        batch_size=per_call,
        compute=ray.data.ActorPoolStrategy(
            size=workers, max_tasks_in_flight_per_actor=2 if per_call == 1 else 1
        ),
        num_cpus=cpus,
        num_gpus=config.gpus_per_worker or None,
        # Ray workers do not inherit the driver's current environment: the actors get the
        # MLflow and object-store settings through their runtime env.
        runtime_env={"env_vars": _actor_env()},
    )


def _bar(n_cases: int, progress: bool):
    """The progress bar over cases (`tsesnet.common.console.progress`)."""
    from tsesnet.common.console import progress as progress_bar

    return progress_bar(n_cases, "predict", "case", enabled=progress)


def _collect(ds, bar) -> tuple[list[dict], list[str]]:
    """Stream the result rows, advancing `bar` (over cases), printing errors and warnings as
    they come and each note about the model once."""
    rows: dict[str, dict] = {}
    notes: list[str] = []
    for r in ds.iter_rows():
        # A call retried after its actor was lost (its node died) yields its cases again: one
        # row per case, the last (the files are the same: each is written whole, then renamed).
        if r["case_id"] not in rows:
            bar.update(1)
        rows[r["case_id"]] = {k: _clean(r[k]) for k in (*SUMMARY_COLUMNS, "picture_error", "files")}
        if r["picture_error"]:
            bar.write(
                f"warning: case {r['case_id']}: no picture: {r['picture_error']}", file=sys.stderr
            )
        if r["note"] and r["note"] not in notes:
            notes.append(r["note"])
            bar.write(f"note: {r['note']}", file=sys.stderr)
        if r["status"] == "error":
            bar.write(f"error: case {r['case_id']}: {r['error']}", file=sys.stderr)
        if r["warnings"]:
            bar.write(
                f"warning: case {r['case_id']}: unlike the training data: {r['warnings']}",
                file=sys.stderr,
            )
    bar.close()
    return list(rows.values()), notes


def cli(args: argparse.Namespace) -> int:
    """`tsesnet predict --model URI --input STORE_OR_DIR --output DIR [...]`; 1 if a case failed."""
    from tsesnet.serving.evaluate import format_summary

    config = PredictConfig(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker or 0.0,
        probabilities=args.probabilities,
        fold=args.fold,
        split=args.split,
        min_component_fraction=args.min_component_fraction,
        output_format=args.output_format,
        report=not args.no_report,
        overwrite=args.overwrite,
    )
    # The library's name for `--model`, and `tsesnet ingest`'s `--layout` (a hint on the input).
    with shown_as({"model_uri": "--model", "layout": "--layout"}):
        report = predict(args.model, args.input, args.output, config, announce=print)
    n = len(report.rows)
    print(
        f"{n - len(report.failed)}/{n} cases predicted in {report.seconds:.1f} s "
        f"({60 * n / max(report.seconds, 1e-9):.1f} cases/min) -> {report.csv_path.parent}"
    )
    if report.summary["dice"]["n"]:
        print(format_summary(report.summary))
    if report.warned:
        print(f"{len(report.warned)} case(s) unlike the training data: see warnings in the CSV")
    print(f"summary: {report.csv_path}")
    if report.html_path is not None:
        print(f"report: {report.html_path}")
    if report.failed:  # each error was printed as it happened; the CSV has them all
        ids = ", ".join(r["case_id"] for r in report.failed)
        print(f"error: {len(report.failed)} case(s) failed: {ids}", file=sys.stderr)
    return 1 if report.failed else 0
