"""Per-epoch metrics to MLflow, and the epoch line, from the Ray Train controller once a
checkpoint holds them.

Rank 0 reports every epoch's metrics with `ray.train.report`; Ray Train's controller registers
a reported checkpoint (the state a restart or a rerun resumes from) and then calls the run's
callbacks. Logging the metrics here, and only for epochs that a registered checkpoint holds, makes
the MLflow history exactly the history a resume continues: a run that is killed and resumed (or
restarted after a worker failure) retrains only epochs MLflow has not seen, so every epoch has
one value, as in an uninterrupted run. Epochs reported without a checkpoint (`checkpoint_every` >
1) wait for the next one. `tsesnet.training.run_log.RunLog` logs, on resume, epochs a checkpoint
holds that this callback did not get to (a kill between the two).

The epoch line is printed here too, as the epoch is logged: the console and MLflow show the same
epochs (a sweep trial that ASHA stops never prints an epoch its run does not have), numbered
alike: epochs count from 1 everywhere, and MLflow's step is the epoch's number
(`STEP_TAG`; runs logged before it count their steps from 0 and keep doing so).
"""

from __future__ import annotations

import time

from ray.train import UserCallback

#: Run tag of runs whose MLflow step is the epoch's number (from 1, as printed and plotted).
STEP_TAG = "tsesnet.step"
STEP_IS_EPOCH = "epoch"


class EpochMetricsToMLflow(UserCallback):
    """Log rank 0's reported metrics of each checkpointed epoch to MLflow run `run_id`, and
    print its epoch line (`epoch_line`) with the time taken so far and the time left."""

    def __init__(self, tracking_uri: str, run_id: str, run_name: str = "", epochs: int = 0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.run_name = run_name
        self.epochs = epochs
        self.pending: dict[int, dict] = {}  # epoch -> metrics, until a checkpoint holds them
        self.started = time.monotonic()
        self.epoch_times: list[float] = []  # of the epochs trained since this start

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = metrics[0]
        if "epoch" not in first:
            return
        self.pending[int(first["epoch"])] = first  # a retrained epoch replaces its first try
        if checkpoint is None:
            return
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        for epoch in sorted(self.pending):
            m = self.pending[epoch]
            log_epoch(client, self.run_id, epoch, m)
            self.epoch_times.append(float(m.get("epoch_time_s", 0.0)))
            print(self.line(epoch, m), flush=True)
        self.pending.clear()

    def line(self, epoch: int, m: dict) -> str:
        """The epoch line with the time since this start and an estimate of the time left."""
        from tsesnet.common.console import hms

        elapsed = time.monotonic() - self.started
        per_epoch = sum(self.epoch_times) / max(len(self.epoch_times), 1)
        left = per_epoch * max(self.epochs - (epoch + 1), 0)
        name = f"{self.run_name} " if self.run_name else ""
        return (
            f"{name}{epoch_line(epoch, self.epochs, m)} | {per_epoch:.1f} s/epoch, "
            f"elapsed {hms(elapsed)}, ETA {hms(left)}"
        )


def epoch_line(epoch: int, epochs: int, m: dict) -> str:
    """One epoch's summary (`epoch` from 0, printed from 1): loss terms, throughput, data wait,
    the loss terms' encoder gradient norms, validation scores."""
    line = (
        f"[epoch {epoch + 1}/{epochs}] loss {m['train_total']:.4f} (dice {m['train_dice']:.4f}, "
        f"tsc {m['train_tsc']:.4f}, bce {m['train_bce']:.4f}) {m['patches_per_s']:.2f} patches/s, "
        f"data wait {100 * m['data_wait_fraction']:.0f}%"
    )
    if "grad_norm_dice" in m:
        line += (
            f", encoder grad norms dice {m['grad_norm_dice']:.2e} tsc {m['grad_norm_tsc']:.2e} "
            f"bce {m['grad_norm_bce']:.2e}"
        )
    if "val_dice" in m:
        line += (
            f" | val DSC {m['val_dice']:.4f} HD95 {m['val_hd95']:.2f} mm "
            f"sens {m['val_sensitivity']:.4f}, filtered DSC {m['val_dice_filtered']:.4f} "
            f"(components >= {m['val_min_component_fraction']:g} x largest)"
        )
    return line


def step_offset(client, run_id: str) -> int:
    """What to add to a 0-based epoch to get run `run_id`'s MLflow step: 1 (the epoch's number;
    a run without epochs logged yet is tagged so), 0 for a run logged before (kept consistent)."""
    tags = client.get_run(run_id).data.tags
    if tags.get(STEP_TAG) == STEP_IS_EPOCH:
        return 1
    if client.get_metric_history(run_id, "epoch_time_s"):
        return 0
    client.set_tag(run_id, STEP_TAG, STEP_IS_EPOCH)
    return 1


def log_epoch(client, run_id: str, epoch: int, metrics: dict) -> None:
    """One epoch's numeric metrics; `epoch` counts from 0, the step is its number from 1."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = epoch + step_offset(client, run_id)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    client.log_batch(run_id, metrics=batch)
