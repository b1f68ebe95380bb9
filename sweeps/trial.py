"""One Tune trial: a training config from the sampled values, then `tsesnet train` with Tune
reporting.

The Train V2 + Tune pattern (Ray's "Hyperparameter Tuning with Ray Tune" guide): each trial is a
small function trainable that calls `tsesnet.training.driver.train`, the same driver `tsesnet
train` uses. A Train callback forwards every epoch's report from the workers to Tune. There is no
training code here. Each trial's training run is an MLflow child of the sweep's parent run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from data_store.errors import InputError
from tsesnet.common import names
from tsesnet.common.console import RAY_TRAIN_ENV
from tsesnet.training.config import TrainConfig

SWEEP_TAG, TRIAL_TAG, KIND_TAG = "tsesnet.sweep", "tsesnet.trial", "tsesnet.kind"
# The time axis of ASHA and of the benchmark: epochs trained, counted from 1.
EPOCHS = "epochs_done"


@dataclass(frozen=True)
class TrialSetup:
    """What the sweep driver hands every trial (crosses into Tune's trial actors)."""

    sweep: str
    ray_address: str
    store: str
    base: TrainConfig  # every trial starts from it
    train_storage: str  # run.storage_path of the trials' training runs
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def run_name(self, trial: str) -> str:
        """The training run name of a trial: `<sweep>-<trial>`."""
        return names.join(self.sweep, trial)


def trial_train_config(base: TrainConfig, values: dict[str, Any], storage_path: str):
    """The trial's `TrainConfig`: the base with the sampled `values` set (type-checked).

    Validation runs every epoch (ASHA compares trials at epoch rungs), the trial does not
    register its model (the sweep registers the best one) and checkpoints go under the sweep.
    """
    from tsesnet.common.yaml_config import with_values

    cfg = with_values(base, values, where="space.")
    return with_values(
        cfg,
        {"schedule.val_every": 1, "run.register": False, "run.storage_path": storage_path},
    )


def check_space(cfg, base: TrainConfig) -> None:
    """Fail before any trial starts on a path or value the training config rejects."""
    from tsesnet.model import FUSIONS, PRESETS

    trial_train_config(base, cfg.fixed(), "")
    for p in cfg.params():
        examples = p.args if p.kind == "choice" else p.args[:1]
        for v in examples:
            trial_train_config(base, {p.path: v}, "")
        known = {"model.fusion": FUSIONS, "model.preset": PRESETS}.get(p.path)
        bad = [v for v in p.args if known is not None and v not in known]
        if bad:
            raise InputError(f"space.{p.path}: unknown {bad}; known: {sorted(known)}")


def _report_callback():
    """Ray Train -> Tune: rank 0's metrics of every epoch, plus `epochs_done` (from 1).

    Defined lazily so that importing this module does not import Ray.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if "epoch" in first:
                first[EPOCHS] = int(first["epoch"]) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def run_trial(values: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: the child MLflow run, then `train` with Tune reporting.

    `train` runs in a task started from here with `RAY_ADDRESS` in its environment, so that
    the Ray Train controller and its placement-group cleaner inherit it. When ASHA stops a
    trial, Tune kills this actor and the controller with it; the cleaner must then reach the
    state API to free the run's placement group. Without the address it looks for "the" local
    Ray instance and, with two on one machine, gives up, the resources leak and later trials
    wait for CPUs forever.
    """
    import ray
    from ray import tune

    trial = tune.get_context().get_trial_name()
    name = setup.run_name(trial)
    cfg = trial_train_config(setup.base, values, setup.train_storage)
    _child_run(setup, name, trial)
    # Tune actors may run in another working directory: the training gets the tracking URI the
    # sweep driver resolved.
    env = {
        "RAY_ADDRESS": setup.ray_address,
        "MLFLOW_TRACKING_URI": setup.tracking_uri,
        **RAY_TRAIN_ENV,
    }
    fit = ray.remote(num_cpus=0, max_retries=0)(_train).options(runtime_env={"env_vars": env})
    # The callback holds this trial's Tune queue; it runs in the Train controller.
    ray.get(fit.remote(setup.store, cfg, name, _report_callback()))


def _train(store: str, cfg, name: str, callback) -> None:
    """`train`, leaving a run that does not complete to the sweep: ASHA stops a trial by having
    Tune kill it, and the dying driver ended the trial's run KILLED (or FAILED, as Ray shut down
    around it), under load after the sweep had ended it FINISHED. The sweep ends every trial's
    run as Tune ended the trial (`report.finish_child_runs`), and a Ctrl-C of the sweep ends the
    unfinished ones KILLED (`runner._interrupted`)."""
    from tsesnet.training.driver import train

    train(store, cfg, name, callbacks=[callback], ends_failed_runs=False)


def _child_run(setup: TrialSetup, name: str, trial: str) -> str:
    """The trial's MLflow run under the sweep's parent; found again by name on resume."""
    from tsesnet.tracking.runs import find_or_create_run

    tags = {"mlflow.parentRunId": setup.parent_run_id, SWEEP_TAG: setup.sweep, TRIAL_TAG: trial}
    run_id, _ = find_or_create_run(setup.experiment_id, name, tags, uri=setup.tracking_uri)
    return run_id


def trial_name(trial, offset: int = 0) -> str:
    """`t001`, `t002`, ... from Tune's trial counter (kept across `--resume`).

    Optuna's generator counts from 1, random search's from 0 (`offset=1`).
    """
    m = re.match(r"(\d+)", trial.experiment_tag or "")
    return f"t{int(m.group(1)) + offset:03d}" if m else f"t-{trial.trial_id}"
