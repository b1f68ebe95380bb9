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


def validation_protocol(cfg: TrainConfig, fingerprint: str, val_ids):
    """How a run with `cfg` measures its validation Dice (`tsesnet.tracking.protocol`): the
    store and fold, the cases validation actually scores (`data.max_val_cases` cuts the fold's
    list, as the workers do), the sliding window and overlap, and the post-processing rule."""
    from tsesnet.postprocess import CANDIDATES
    from tsesnet.tracking.protocol import ValidationProtocol

    cases = list(val_ids)
    if cfg.data.max_val_cases > 0:
        cases = cases[: cfg.data.max_val_cases]
    return ValidationProtocol(
        store_fingerprint=str(fingerprint),
        fold=int(cfg.data.fold),
        val_cases=tuple(sorted(cases)),
        window=tuple(int(p) for p in cfg.data.patch),
        overlap=float(cfg.data.val_overlap),
        postprocess=(
            "logits > 0, scored raw; components >= F x the largest kept at prediction, F chosen "
            f"on validation from {', '.join(f'{c:g}' for c in CANDIDATES)}"
        ),
    )
