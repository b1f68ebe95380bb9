"""`RunPlan`: what the driver decides before the workers start, and hands every worker."""

from __future__ import annotations

from dataclasses import dataclass

from tsesnet.training.config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """One training run, checked and named (crosses the driver -> worker process boundary).

    Attributes:
        config: the resolved training config.
        name: the run name (the checkpoint folder and the MLflow run's `tsesnet.run_name`).
        store: the store's absolute path or URL; `fingerprint` its content fingerprint.
        train_ids, val_ids: the labelled cases of the training folds and the validation fold.
        model_config: the network's `ModelConfig` fields (what a resume must match).
        storage_path: where the run's checkpoints live (`storage_path/name`).
        experiment_id, run_id: the MLflow experiment and run; `resumed` when checkpoints exist
            to continue from.
        tracking_uri: the MLflow tracking URI the workers log to.
        git_commit: the commit of the code that runs.
    """

    config: TrainConfig
    name: str
    store: str
    fingerprint: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    model_config: dict
    storage_path: str
    experiment_id: str
    run_id: str
    resumed: bool
    tracking_uri: str
    git_commit: str
