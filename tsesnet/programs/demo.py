"""`tsesnet demo` (`make demo`): the whole platform end to end on embedded defaults.

Stages, each with its own progress: a synthetic cohort (training + validation cases, and a
separate labelled test cohort) → `ingest` into a local Zarr store → training of the `small`
preset on a local Ray instance with 2 Ray Train workers, tracked in the embedded SQLite MLflow
(`mlflow.db` and `mlartifacts/` in the working directory) → registration as `tsesnet@champion`
(or `@challenger` if a better champion already exists) → Ray Data batch prediction of the test
cohort straight from its NIfTI files → evaluation against its labels, and a summary.

Everything the demo writes except MLflow's files lands under `--out` (default `demo_output/`).
Run it again and it reuses what is there: ingest skips stored cases and training of the same
config on the same cohort (the run name carries both) resumes, or, when finished, just reuses
its registered version.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tsesnet.common import names
from tsesnet.training.config import CONFIG_DIR

# The demo's sizes: 2 cores, well under 15 minutes including set-up.
TRAIN_CASES = 16
TEST_CASES = 6
SEED = 2024
TEST_SEED = 7
CONFIG = CONFIG_DIR / "small.yaml"
RUN_NAME = "demo-small"


def _stage(n: int, title: str) -> float:
    print(f"\n== [{n}/6] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"   done in {time.perf_counter() - t0:.0f} s", flush=True)


def run_demo(out: str | Path) -> int:
    """Run the six stages into `out`; return the exit status."""
    from data_store import ingest as ingest_mod
    from data_store.cli import info_table
    from data_store.store import open_store
    from data_store.synth import write_cohort
    from tsesnet.serving import evaluate, predict
    from tsesnet.tracking import runs
    from tsesnet.training import config as train_config
    from tsesnet.training import driver

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort, test_cohort = out / "cohort", out / "test_cohort"
    store, preds = out / "store.zarr", out / "predictions"
    started = time.perf_counter()

    t0 = _stage(1, f"synthesise {TRAIN_CASES} training/validation and {TEST_CASES} test cases")
    write_cohort(cohort, TRAIN_CASES, seed=SEED)
    write_cohort(test_cohort, TEST_CASES, seed=TEST_SEED)
    _done(t0)

    t0 = _stage(2, f"ingest {cohort.name} into {store}")
    report = ingest_mod.ingest(cohort, store)
    if report.rejected:
        return 1
    print(info_table(open_store(store)))
    _done(t0)

    t0 = _stage(3, "train the small preset with 2 Ray Train workers (MLflow: embedded SQLite)")
    cfg = train_config.load_config(CONFIG)  # 2 workers of 1 CPU each
    # the same cohort and config resume (or reuse) their run; a new one trains afresh
    fingerprint = open_store(store).fingerprint
    run_name = names.join(RUN_NAME, train_config.config_hash(cfg), fingerprint[:8])
    result = driver.train(str(store), cfg, run_name)
    _done(t0)

    t0 = _stage(4, "model registry")
    name = cfg.run.registered_model_name
    if result.model_version is None:
        print("error: training registered no model", flush=True)
        return 1
    model_uri = f"models:/{name}/{result.model_version}"
    print(
        f"   {name} version {result.model_version} is @{result.alias} "
        f"(best validation Dice {result.best_val_dice:.3f} at epoch {result.best_epoch})\n"
        f"   prediction keeps connected components of >= {result.min_component_fraction:g} x "
        f"the largest, chosen on validation (Dice {result.val_dice_filtered:.3f} with it)",
        flush=True,
    )
    _done(t0)

    t0 = _stage(5, f"batch prediction of the test cohort with Ray Data ({model_uri})")
    pred = predict.predict(model_uri, str(test_cohort), str(preds))
    _done(t0)

    t0 = _stage(6, "evaluate the predicted masks against the test labels")
    ev = evaluate.evaluate_dirs(preds, test_cohort / "labelsTr")
    print(evaluate.format_table(ev.cases))
    print(evaluate.format_summary(ev.summary))
    _done(t0)

    uri = runs.tracking_uri()
    print(
        f"\nDemo finished in {time.perf_counter() - started:.0f} s.\n"
        f"  masks and summary.csv : {preds}\n"
        f"  Zarr store            : {store}\n"
        f"  MLflow database       : {uri}\n"
        f"  registered model      : {model_uri} (@{result.alias})\n"
        f"Browse runs and the registry (start the UI first):\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
        f"  the training run : {runs.run_link(result.experiment_id, result.run_id)}\n"
        f"  the model        : {runs.model_link(name, result.model_version)}\n",
        flush=True,
    )
    return 1 if pred.failed or ev.summary.get("n_failed") else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet demo` (read by `cli`)."""
    parser.add_argument(
        "--out", default="demo_output", metavar="DIR", help="work folder (demo_output)"
    )


def cli(args: argparse.Namespace) -> int:
    """`tsesnet demo [--out DIR]`."""
    return run_demo(args.out)
