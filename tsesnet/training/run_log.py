"""Rank 0's MLflow run for a training worker: what the loop in `tsesnet.training.worker` logs.

`RunLog` is made on every rank and does nothing on the others (rank 0 alone writes checkpoints
and logs to MLflow). On a first start it logs the resolved config, system info and data lineage
(`_log_run_start`); on a resume, the config it resumed with and the epochs a checkpoint holds but
MLflow missed. Each epoch it refreshes the plots (learning curves, the overlay montage, the case
pictures), and it records a diverged run (`DIVERGED_TAG`, read by the driver). Per-epoch metrics
go to MLflow from the Train controller once a checkpoint holds them
(`tsesnet.training.epoch_log`). MLflow is imported where it is used: ranks other than 0 never
import it.
"""

from __future__ import annotations

from tsesnet.training.checkpoint import TrainState
from tsesnet.training.plan import RunPlan

# The MLflow run tag a diverged run gets (set by rank 0, read by the driver).
DIVERGED_TAG = "tsesnet.diverged"


class RunLog:
    """Rank 0's MLflow run (config, tags, plots) and epoch lines; on other ranks every method
    does nothing. Per-epoch metrics go to MLflow from the Train controller once a checkpoint
    holds them (`tsesnet.training.epoch_log`); on resume, epochs the restored checkpoint holds
    but MLflow missed (a kill between the two) are logged here.

    `me` here and below is the worker's `tsesnet.training.worker.Rank` (`is_zero`, `world`,
    `device`), not annotated: the worker imports this module, not the other way round.
    """

    def __init__(self, plan: RunPlan, me, state: TrainState, resumed: int):
        self.on = me.is_zero
        self.run_id = plan.run_id
        if not self.on:
            return
        import mlflow

        mlflow.set_tracking_uri(plan.tracking_uri)
        mlflow.start_run(run_id=plan.run_id)
        started_before = bool(mlflow.MlflowClient().get_run(plan.run_id).data.params)
        if resumed < 0 and not started_before:
            _log_run_start(plan, me)
            return
        from tsesnet.common.yaml_config import dump_yaml

        mlflow.set_tag("tsesnet.restarts", str(state.restarts))
        # The config may differ from the first start's (e.g. more epochs): keep each one.
        mlflow.log_text(dump_yaml(plan.config), f"config/resumed_{state.restarts}.yaml")
        from tsesnet.training.epoch_log import log_epoch, step_offset

        client = mlflow.MlflowClient()
        logged = {m.step for m in client.get_metric_history(plan.run_id, "epoch_time_s")}
        offset = step_offset(client, plan.run_id)
        for h in state.history:
            if int(h["epoch"]) + offset not in logged:
                log_epoch(client, plan.run_id, int(h["epoch"]), h)
        if resumed >= 0:
            print(f"resumed from the checkpoint after epoch {state.epoch + 1}", flush=True)

    def epoch(self, epoch: int, metrics: dict, state: TrainState, montage, pictures) -> None:
        """Refresh the plots (the epoch line is printed once the epoch is logged:
        `tsesnet.training.epoch_log`)."""
        if not self.on:
            return
        from tsesnet.tracking import plots

        if "val_dice" in metrics:
            plots.log_learning_curves(state.history)
        if montage is not None:
            plots.log_overlay_montage(montage.volume, montage.gt, montage.pred, montage.case_id)
        if pictures:
            plots.log_case_pictures(pictures)
        if state.stopped_early:
            print(
                f"early stop after epoch {epoch + 1}: best val Dice at epoch "
                f"{state.best_epoch + 1}",
                flush=True,
            )

    def diverged(self, epoch: int, metrics: dict, bad: list[str]) -> None:
        """Record on the run that it diverged (`DIVERGED_TAG`: the epoch and what is not finite,
        as JSON), with that epoch's metrics."""
        if not self.on:
            return
        import json

        import mlflow

        from tsesnet.training.epoch_log import log_epoch

        what = {k: (str(metrics[k]) if k in metrics else "not finite") for k in bad}
        mlflow.set_tag(DIVERGED_TAG, json.dumps({"epoch": epoch, "values": what}))
        log_epoch(mlflow.MlflowClient(), self.run_id, epoch, metrics)

    def close(self) -> None:
        if self.on:
            import mlflow

            mlflow.end_run()


def _log_run_start(plan: RunPlan, me) -> None:
    """Rank 0, first start only: resolved config, system info, data lineage."""
    import mlflow

    from tsesnet.common.yaml_config import dump_yaml, flatten
    from tsesnet.tracking import runs

    cfg = plan.config
    mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg).items()})
    mlflow.log_text(dump_yaml(cfg), "config/resolved.yaml")
    tags = runs.system_info()
    tags.update(
        {
            "sys.workers": str(me.world),
            "sys.device": str(me.device),
            "data.store": plan.store,
            "data.store_fingerprint": plan.fingerprint,
            "data.fold": str(cfg.data.fold),
            "data.n_train": str(len(plan.train_ids)),
            "data.n_val": str(len(plan.val_ids)),
            "code.git_commit": plan.git_commit,
            runs.RUN_NAME_TAG: plan.name,
        }
    )
    mlflow.set_tags(tags)
    runs.log_store_input(plan.store, plan.fingerprint, cfg.data.fold)
