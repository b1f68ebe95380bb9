"""`tsesnet train`: the training config and the driver that runs it on Ray Train.

One Ray Train pattern (STYLE.md §7): the per-worker function lives in `tsesnet.train_loop`;
this file holds the typed config (the paper's recipe as defaults), the driver that builds the
`TorchTrainer` and registers the best checkpoint in MLflow at the end, and the CLI handler.

Running again with the same run name and storage path resumes from the latest checkpoint
(Ray Train V2 restores from `storage_path/name`), and continues the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_store.errors import InputError
from tsesnet.losses import LossConfig


@dataclass(kw_only=True)
class ModelSpec:
    """Which network to build (`build`).

    Attributes:
        preset: a key of `tsesnet.model.PRESETS`.
        fusion: a key of `tsesnet.model.FUSIONS`.
        tumor_aware: TA modules in the encoder (False: the paper's plain backbone).
        phases: the acquired phases the network reads (`ModelConfig.input_phases`); [] = all.
        phase_embedding: a learned vector per phase before fusion (`ModelConfig`); False is
            the paper's model.
    """

    preset: str = "paper"
    fusion: str = "tsff"
    tumor_aware: bool = True
    phases: tuple[int, ...] = ()
    phase_embedding: bool = False

    def build(self):
        """The `TSESNet` this spec describes (ValueError on an unknown preset or fusion)."""
        from tsesnet.model import build_model

        return build_model(
            self.preset,
            self.fusion,
            tumor_aware=self.tumor_aware,
            input_phases=self.phases,
            phase_embedding=self.phase_embedding,
        )


@dataclass(kw_only=True)
class DataConfig:
    """Patches for training, cases for validation.

    Attributes:
        fold: validation fold of the store's patient-level folds; the others train.
        patch: training patch and sliding-window size (Z, Y, X) in voxels.
        fg_fraction: share of patches centred on tumour.
        augment: random flips/intensity augmentation in the sampler.
        patches_per_epoch: patches per epoch summed over all workers.
        batch_size: patches per step per worker (the paper: 1 per GPU).
        cache_bytes: the sampler's in-memory case cache per worker.
        val_overlap: sliding-window overlap for validation.
        val_batch_size: windows per forward pass during validation.
        max_val_cases: validate on at most this many cases (0 = the whole fold).
    """

    fold: int = 0
    patch: tuple[int, int, int] = (48, 96, 96)
    fg_fraction: float = 1 / 3
    augment: bool = True
    patches_per_epoch: int = 250
    batch_size: int = 1
    cache_bytes: int = 2 * 1024**3
    val_overlap: float = 0.5
    val_batch_size: int = 2
    max_val_cases: int = 0


@dataclass(kw_only=True)
class OptimConfig:
    """Adam, as in the paper (lr 1e-4); bf16 autocast applies on GPU only.

    Attributes:
        lr_decay: "none" keeps lr constant (the paper names no schedule); "poly" sets epoch e's
            lr to ``lr * (1 - e / epochs) ** 0.9`` (nnU-Net's schedule), which settles the
            weights by the end of a short budget.
    """

    lr: float = 1e-4
    lr_decay: Literal["none", "poly"] = "none"
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    bf16: bool = True

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of an epoch (0-based) of a run of `epochs` epochs."""
        if self.lr_decay == "poly":
            return self.lr * (1.0 - epoch / epochs) ** 0.9
        return self.lr


@dataclass(kw_only=True)
class ScheduleConfig:
    """300 epochs, early stop after 30 epochs without a better validation Dice (the paper)."""

    epochs: int = 300
    early_stop_patience: int = 30
    val_every: int = 5
    checkpoint_every: int = 1
    seed: int = 0


@dataclass(kw_only=True)
class RunSettings:
    """Where and how the run executes.

    Attributes:
        workers: Ray Train workers (one process each, DDP).
        gpus_per_worker: 0 trains on CPU over gloo; > 0 on GPU over NCCL.
        cpus_per_worker: CPUs reserved per worker (sets its torch threads).
        max_failures: worker failures to recover from (restart from the latest checkpoint).
        storage_path: checkpoints and Ray results; "" means `<cwd>/ray_results`. On a cluster,
            shared storage (an NFS path or an object-store URL).
        checkpoints_to_keep: latest checkpoints kept on storage.
        experiment: MLflow experiment name.
        registered_model_name: MLflow registered model the best checkpoint goes to.
        register: log and register the best checkpoint at the end.
    """

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    storage_path: str = ""
    checkpoints_to_keep: int = 2
    experiment: str = "tsesnet"
    registered_model_name: str = "tsesnet"
    register: bool = True


@dataclass(kw_only=True)
class TrainConfig:
    """The root config: `platform/configs/*.yaml` is its serialisation (unknown keys fail)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunSettings = field(default_factory=RunSettings)


@dataclass
class TrainResult:
    """What a finished run produced."""

    name: str
    run_id: str
    best_val_dice: float
    best_epoch: int
    epochs_done: int
    min_component_fraction: float
    val_dice_filtered: float
    model_version: str | None
    alias: str | None
    checkpoint_path: str | None
    metrics: dict = field(default_factory=dict)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The paper's recipe, or a YAML file, with `key=value` overrides applied (type-checked)."""
    from tsesnet import config as cfgmod

    try:
        cfg = cfgmod.load_yaml(TrainConfig, path) if path else TrainConfig()
        if overrides:
            cfg = cfgmod.apply_overrides(cfg, list(overrides))
    except InputError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"bad config: {err}", path=str(path) if path else None) from err
    _check_config(cfg)
    return cfg


def _check_config(cfg: TrainConfig) -> None:
    problems = []
    if cfg.run.workers < 1:
        problems.append("run.workers must be >= 1")
    if cfg.data.batch_size < 1 or cfg.data.patches_per_epoch < 1:
        problems.append("data.batch_size and data.patches_per_epoch must be >= 1")
    if cfg.schedule.epochs < 1 or cfg.schedule.val_every < 1 or cfg.schedule.checkpoint_every < 1:
        problems.append("schedule.epochs, val_every and checkpoint_every must be >= 1")
    if len(cfg.data.patch) != 3 or min(cfg.data.patch) < 1:
        problems.append("data.patch must be three positive sizes (Z, Y, X)")
    if problems:
        raise InputError("bad config: " + "; ".join(problems))


def config_hash(cfg: TrainConfig) -> str:
    """A short stable hash of everything that changes the trained model (not `run`)."""
    from tsesnet import config as cfgmod

    d = cfgmod.to_dict(cfg)
    d.pop("run", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(store_path: str, cfg: TrainConfig) -> str:
    """Deterministic (never a timestamp): store name, preset, fusion, fold and config hash."""
    stem = Path(str(store_path).rstrip("/")).name.removesuffix(".zarr") or "store"
    m = cfg.model
    return f"{stem}-{m.preset}-{m.fusion}-fold{cfg.data.fold}-{config_hash(cfg)}"


def _storage_path(cfg: TrainConfig) -> str:
    sp = cfg.run.storage_path or str(Path.cwd() / "ray_results")
    if "://" in sp:
        return sp
    return str(Path(sp).expanduser().resolve())


def _abs_store(store: str) -> str:
    return store if "://" in store else str(Path(store).expanduser().resolve())


RUN_FILE = "tsesnet_run.json"


def check_resume(storage_path: str, name: str, model_config: dict, fingerprint: str) -> None:
    """Refuse to resume run `name` from checkpoints of another model or store.

    The first run of a name writes `RUN_FILE` (the model config and the store fingerprint) next
    to its checkpoints; a later run of the same name must match it. Everything else (epochs,
    learning rate, workers) may change on resume.

    Raises:
        InputError: naming the run, the folder and what differs.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{storage_path}/{name}")
    path = f"{root}/{RUN_FILE}"
    mine = json.loads(json.dumps({"model": model_config, "store_fingerprint": fingerprint}))
    if not fs.exists(path):
        fs.makedirs(root, exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(mine, f, indent=1)
        return
    with fs.open(path) as f:
        theirs = json.load(f)
    old_model = theirs.get("model", {})
    differ = [
        f"model.{k} {old_model.get(k)!r} -> {model_config.get(k)!r}"
        for k in sorted(set(mine["model"]) | set(old_model))
        if mine["model"].get(k) != old_model.get(k)
    ]
    if theirs.get("store_fingerprint") != fingerprint:
        differ.append(f"store fingerprint {theirs.get('store_fingerprint')} -> {fingerprint}")
    if differ:
        raise InputError(
            f"run {name} cannot resume: its checkpoints are for another model or store "
            f"({'; '.join(differ)}); choose another --name or delete this folder",
            path=f"{storage_path}/{name}",
        )


def _find_or_create_run(experiment_id: str, name: str) -> tuple[str, bool]:
    """The MLflow run tagged with this run name (resume), or a new one. Returns (id, resumed)."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`tsesnet.run_name` = '{name}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id, True
    run = client.create_run(experiment_id, run_name=name, tags={"tsesnet.run_name": name})
    return run.info.run_id, False


def train(
    store: str,
    config: TrainConfig | None = None,
    name: str | None = None,
    *,
    callbacks: list | None = None,
) -> TrainResult:
    """Train on Ray Train, track in MLflow, register the best checkpoint.

    Args:
        store: path or fsspec URL of a store written by `tsesnet ingest`.
        config: the training config (default: the paper's recipe).
        name: run name; the same name (and storage path) resumes from the latest checkpoint.
        callbacks: extra Ray Train `RunConfig` callbacks, e.g. the sweep's report to Tune.

    Returns:
        The run's MLflow id, best validation Dice, registered version and alias.
    """
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data_store.store import open_store
    from tsesnet import config as cfgmod
    from tsesnet import tracking
    from tsesnet.train_loop import read_checkpoint_state, train_loop_per_worker

    cfg = config or TrainConfig()
    _check_config(cfg)
    store = _abs_store(store)
    st = open_store(store)
    if not 0 <= cfg.data.fold < st.n_folds:
        raise InputError(f"data.fold={cfg.data.fold} but the store has {st.n_folds} folds")
    train_ids, val_ids = st.split(cfg.data.fold)
    if not train_ids or not val_ids:
        raise InputError(
            f"fold {cfg.data.fold} gives {len(train_ids)} training and {len(val_ids)} validation "
            "labelled cases; both must be non-empty",
            path=store,
        )
    # Fail fast, before any worker starts, on a preset/fusion/patch the network can't take.
    try:
        net = cfg.model.build()
    except (ValueError, KeyError) as err:
        raise InputError(f"bad model config: {err}") from err
    div = getattr(net, "divisor", 1)
    if any(p % div for p in cfg.data.patch):
        fixed = tuple(-(-p // div) * div for p in cfg.data.patch)
        raise InputError(
            f"data.patch={tuple(cfg.data.patch)} must be multiples of {div} for preset "
            f"{cfg.model.preset!r}; pick e.g. {fixed}"
        )
    model_config = dataclasses.asdict(net.config)
    del net

    name = name or default_run_name(store, cfg)
    storage_path = _storage_path(cfg)
    check_resume(storage_path, name, model_config, st.fingerprint)
    experiment_id = tracking.ensure_database(cfg.run.experiment)
    run_id, resumed = _find_or_create_run(experiment_id, name)
    print(
        f"run {name}: MLflow run {run_id}{' (resuming)' if resumed else ''}, "
        f"checkpoints in {storage_path}/{name}",
        flush=True,
    )

    loop_config = {
        "config": cfgmod.to_dict(cfg),
        "store": store,
        "store_fingerprint": st.fingerprint,
        "train_ids": list(train_ids),
        "val_ids": list(val_ids),
        "tracking_uri": tracking.tracking_uri(),
        "run_id": run_id,
        "run_name": name,
        "git_commit": tracking.git_commit(),
    }
    use_gpu = cfg.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    from tsesnet.cluster import connect

    connect()
    # Ray Train turns a worker's print into a log record and, when stdout is wrapped, prints it
    # too: every epoch line arrived twice. Keep print a print (Train passes this to workers).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=list(callbacks or []),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        state = read_checkpoint_state(ckpt_dir)
        version = alias = None
        client = mlflow.MlflowClient()
        tags = client.get_run(run_id).data.tags
        if tags.get("tsesnet.registered_at_epoch") == str(state["epoch"]):
            # Rerunning a finished run: nothing new trained, keep its registered version.
            version, alias = tags["tsesnet.model_version"], tags.get("tsesnet.model_alias")
        elif cfg.run.register:
            from tsesnet.registry import log_and_register

            reg = log_and_register(
                run_id=run_id,
                weights_path=Path(ckpt_dir) / "best.pt",
                model_config=model_config,
                patch=tuple(cfg.data.patch),
                phases=state.get("phases"),
                val_dice=state["best_val_dice"],
                min_component_fraction=state.get("min_component_fraction", 0.0),
                lineage={
                    "store_fingerprint": st.fingerprint,
                    "fold": cfg.data.fold,
                    "run_name": name,
                },
                name=cfg.run.registered_model_name,
            )
            version, alias = reg.version, reg.alias
            client.set_tag(run_id, "tsesnet.registered_at_epoch", str(state["epoch"]))
            print(f"registered {reg.name} v{reg.version} as @{reg.alias}: {reg.reason}", flush=True)
    client.set_terminated(run_id, "FINISHED")
    out = TrainResult(
        name=name,
        run_id=run_id,
        best_val_dice=float(state["best_val_dice"]),
        best_epoch=int(state["best_epoch"]),
        epochs_done=int(state["epoch"]) + 1,
        min_component_fraction=float(state.get("min_component_fraction", 0.0)),
        val_dice_filtered=float(state.get("val_dice_filtered", state["best_val_dice"])),
        model_version=version,
        alias=alias,
        checkpoint_path=result.checkpoint.path,
        metrics=dict(result.metrics or {}),
    )
    return out


def cli(args) -> int:
    """`tsesnet train --store STORE [--config FILE] [--set k=v ...] [--workers N] ...`."""
    overrides = list(args.overrides or [])
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"run.gpus_per_worker={args.gpus_per_worker}")
    cfg = load_config(args.config, overrides)
    res = train(args.store, cfg, args.name)
    print(
        f"run {res.name}: {res.epochs_done} epochs, best val Dice {res.best_val_dice:.4f} "
        f"(epoch {res.best_epoch}); MLflow run {res.run_id}"
    )
    print(
        f"prediction keeps connected components of >= {res.min_component_fraction:g} x the "
        f"largest (chosen on validation: Dice {res.val_dice_filtered:.4f} with it)"
    )
    if res.model_version:
        print(
            f"registered {cfg.run.registered_model_name} version {res.model_version} "
            f"as @{res.alias}: models:/{cfg.run.registered_model_name}@{res.alias}"
        )
    return 0
