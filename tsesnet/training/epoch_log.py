"""Per-epoch metrics to MLflow from the Ray Train controller, once a checkpoint holds them.

Rank 0 reports every epoch's metrics with `ray.train.report`; Ray Train's controller registers
a reported checkpoint (the state a restart or a rerun resumes from) and then calls the run's
callbacks. Logging the metrics here, and only for epochs that a registered checkpoint holds, makes
the MLflow history exactly the history a resume continues: a run that is killed and resumed (or
restarted after a worker failure) retrains only epochs MLflow has not seen, so every epoch has
one value, as in an uninterrupted run. Epochs reported without a checkpoint (`checkpoint_every` >
1) wait for the next one. `tsesnet.training.worker.RunLog` logs, on resume, epochs a checkpoint
holds that this callback did not get to (a kill between the two).
"""

from __future__ import annotations

from ray.train import UserCallback


class EpochMetricsToMLflow(UserCallback):
    """Log rank 0's reported metrics of each checkpointed epoch to MLflow run `run_id`."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.pending: dict[int, dict] = {}  # epoch -> metrics, until a checkpoint holds them

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
            log_epoch(client, self.run_id, epoch, self.pending[epoch])
        self.pending.clear()


def log_epoch(client, run_id: str, epoch: int, metrics: dict) -> None:
    """One epoch's numeric metrics at step `epoch` (0-based, as every history here counts)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, epoch)
        for k, v in metrics.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    client.log_batch(run_id, metrics=batch)
