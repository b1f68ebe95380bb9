"""`TrainConfig`: the training recipe as typed sections, each the one owner of its settings.

`tsesnet/configs/*.yaml` are its serialisation, read by the project's one strict YAML loader
(`tsesnet.common.yaml_config`): an unknown key, a value of the wrong type or out of range is a
one-line error naming the key, before Ray starts. The defaults are the paper's recipe.

A setting keeps one name from the YAML file to the code that reads it: `model.*` are
`tsesnet.model.ModelConfig` fields, `data.*` extend `data_store.sampler.SamplerConfig` (the
sampler reads the training config's `data` section as it is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin, get_type_hints

import pydantic
from pydantic import AfterValidator, Field

from data_store import schema
from data_store.errors import InputError
from data_store.sampler import SamplerConfig
from tsesnet.common import names, yaml_config
from tsesnet.losses import LossConfig

# Ranges of the settings, as field constraints (the one place they are written): `yaml_config`
# checks them when a config is read, `tsesnet config keys` shows them.
_Count = Annotated[int, Field(ge=0)]
_Positive = Annotated[int, Field(ge=1)]
_NonNegative = Annotated[float, Field(ge=0)]
_Above0 = Annotated[float, Field(gt=0)]


def _whole_above_one(gpus: float) -> float:
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"{gpus:g}: above 1 it must be whole")
    return gpus


# The shipped recipes (`tiny`, `small`, `paper`, `science`, the sweep configs): package data,
# so that an installed wheel has them too.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(kw_only=True)
class ModelSpec:
    """Which network to build: a preset and fusion, and `ModelConfig` fields by their names.

    Attributes:
        preset: a key of `tsesnet.model.PRESETS`.
        fusion: a key of `tsesnet.model.FUSIONS`.
        tumor_aware: TA modules in the encoder (False: the paper's plain backbone).
        phases: the acquired phases the network reads, in order; [] = all.
        phase_embedding: a learned vector per phase before fusion; False is the paper's model.
        attn_exact_tokens: levels with at most this many voxels attend exactly (Eq. 8); larger
            ones pool keys and values. 8192 suits CPU; 65536 is the recommendation on CUDA.
        channels_last: train in the channels_last_3d memory format on CUDA (not part of the
            architecture; ignored on CPU with a note).
    """

    preset: str = "paper"
    fusion: str = "tsff"
    tumor_aware: bool = True
    phases: tuple[_Count, ...] = ()
    phase_embedding: bool = False
    attn_exact_tokens: _Count = 8192
    channels_last: bool = False

    # How the network is run, not what it is: not `ModelConfig` fields.
    _RUNTIME = ("channels_last",)

    def config(self, patch: tuple[int, int, int] | None = None):
        """The `ModelConfig` this spec describes (ValueError on an unknown preset or fusion).

        Args:
            patch: the training patch (`data.patch`): the TA modules are fitted to it
                (`tsesnet.model.fit_to_patch`, no dead taps); None leaves them unfitted.
        """
        from tsesnet.model import fit_to_patch, model_config

        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self._RUNTIME
        }
        config = model_config(fields.pop("preset"), fields.pop("fusion"), **fields)
        return config if patch is None else fit_to_patch(config, patch)

    def build(self, patch: tuple[int, int, int] | None = None):
        """The `TSESNet` this spec describes (`patch` as in `config`)."""
        from tsesnet.model import TSESNet

        return TSESNet(self.config(patch))


@pydantic.dataclasses.dataclass(kw_only=True, config=schema.STRICT)
class DataConfig(SamplerConfig):
    """Patches for training (the sampler's settings, inherited), cases for validation.

    Attributes:
        fold: validation fold of the store's patient-level folds; the others train.
        batch_size: patches per step per worker (the paper: 1 per GPU).
        val_overlap: sliding-window overlap for validation, in [0, 1).
        val_batch_size: windows per forward pass during validation.
        max_val_cases: validate on at most this many cases (0 = the whole fold).
        loader_workers: background processes loading this worker's patches
            (`data_store.patch_loader.PatchLoader`; the batches are the same for any count); None
            derives it from `run.cpus_per_worker`: one CPU for training, the rest for loading,
            at least 1 on a GPU worker, 0 on a single-core CPU worker. More than the reserved
            CPUs allow is capped, with a note.
    """

    fold: _Count = 0
    batch_size: _Positive = 1
    val_overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    val_batch_size: _Positive = 2
    max_val_cases: _Count = 0
    loader_workers: _Count | None = None

    def resolved_loader_workers(self, cpus_per_worker: float, gpu: bool) -> tuple[int, str | None]:
        """(loader processes for one training worker, a note when the request was capped)."""
        from data_store.patch_loader import capped_workers

        if self.loader_workers is None:
            free = max(0, int(cpus_per_worker) - 1)
            return (max(1, free) if gpu else free), None
        return capped_workers(self.loader_workers, cpus_per_worker)


@dataclass(kw_only=True)
class OptimConfig:
    """Adam, as in the paper (lr 1e-4); bf16 autocast applies on GPU only.

    Attributes:
        lr: Adam's learning rate (the paper: 1e-4).
        lr_decay: "none" keeps lr constant (the paper names no schedule); "poly" sets epoch e's
            lr to ``lr * (1 - e / epochs) ** 0.9`` (nnU-Net's schedule), which settles the
            weights by the end of a short budget.
        weight_decay: Adam's L2 weight decay (0: none, the paper).
        grad_clip: clip the global gradient norm to this (0: no clipping).
        bf16: bfloat16 autocast on GPU (ignored on CPU).
    """

    lr: _Above0 = 1e-4
    lr_decay: Literal["none", "poly"] = "none"
    weight_decay: _NonNegative = 0.0
    grad_clip: _NonNegative = 0.0
    bf16: bool = True

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of an epoch (0-based) of a run of `epochs` epochs."""
        if self.lr_decay == "poly":
            return self.lr * (1.0 - epoch / epochs) ** 0.9
        return self.lr


@dataclass(kw_only=True)
class ScheduleConfig:
    """300 epochs, early stop after 30 epochs without a better validation Dice (the paper).

    Attributes:
        epochs: training epochs (each `data.patches_per_epoch` patches).
        early_stop_patience: stop after this many epochs without a better validation Dice.
        val_every: validate every this many epochs (and after the last).
        checkpoint_every: save a checkpoint every this many epochs.
        seed: seed of the weights' initialisation and of the patch sampling.
    """

    epochs: _Positive = 300
    early_stop_patience: _Positive = 30
    val_every: _Positive = 5
    checkpoint_every: _Positive = 1
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0

    def validates(self, epoch: int) -> bool:
        """Whether epoch (0-based) ends with a validation: every `val_every`, and the last."""
        return (epoch + 1) % self.val_every == 0 or epoch == self.epochs - 1


@dataclass(kw_only=True)
class RunSettings:
    """Where and how the run executes.

    Attributes:
        workers: Ray Train workers (one process each, DDP).
        gpus_per_worker: 0 trains on CPU over gloo; > 0 on GPU over NCCL.
        cpus_per_worker: CPUs reserved per worker (sets its torch threads).
        max_failures: worker failures to recover from (restart from the latest checkpoint).
            A worker lost with its node counts as one; the restart needs a node with room.
        resource_wait_s: how long the run waits for room for its workers (at the start and
            after a failure) before it fails: Ray Train would otherwise wait forever for a node
            that never comes. Rounded up to whole start-up attempts of Ray Train's
            ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default).
        storage_path: checkpoints and Ray results; "" means `<cwd>/ray_results`. On a cluster,
            shared storage (an NFS path or an object-store URL).
        checkpoints_to_keep: latest checkpoints kept on storage.
        experiment: MLflow experiment name.
        registered_model_name: MLflow registered model the best checkpoint goes to.
        register: log and register the best checkpoint at the end.
        compile: `torch.compile` the network on CUDA (ignored on CPU with a note).
    """

    workers: _Positive = 1
    gpus_per_worker: Annotated[_NonNegative, AfterValidator(_whole_above_one)] = 0.0
    cpus_per_worker: _Above0 = 1.0
    max_failures: Annotated[int, Field(ge=-1)] = 0
    resource_wait_s: _Above0 = 600.0
    storage_path: str = ""
    checkpoints_to_keep: _Positive = 2
    experiment: str = "tsesnet"
    registered_model_name: str = "tsesnet"
    register: bool = True
    compile: bool = False

    def resolved_storage_path(self) -> str:
        """The one storage-path rule: `storage_path` made absolute, `<cwd>/ray_results` when
        empty; a URL (`s3://...`) as it is."""
        sp = self.storage_path or str(Path.cwd() / "ray_results")
        return sp if "://" in sp else str(Path(sp).expanduser().resolve())


@dataclass(kw_only=True)
class LossSection(LossConfig):
    """`tsesnet.losses.LossConfig` (the pure-PyTorch core keeps its own plain dataclass) with the
    ranges of its settings, for the training config's `loss` section."""

    alpha: _NonNegative = LossConfig.alpha
    beta: _NonNegative = LossConfig.beta
    tau: _Above0 = LossConfig.tau
    samples_per_class: _Positive = LossConfig.samples_per_class
    bce: _NonNegative = LossConfig.bce


def recommended_loss() -> LossSection:
    """The recommended recipe's loss: Eq. 10 with the TSC term scaled by τ/τ_base (its gradient no
    longer grows as 1/τ: at the paper's τ = 1e-5 it was ~1e7 times the Dice term's at
    initialisation), τ = 0.1, β = 0.1 (TSC ~1.7× the BCE term's gradient at initialisation), plus
    BCE (soft Dice alone settled on all-foreground on short budgets) and majority labels at
    coarse levels. `tsesnet/configs/paper.yaml` is the paper's loss as written."""
    return LossSection(
        alpha=0.7, beta=0.1, tau=0.1, bce=1.0, tsc_scale="tau", tsc_labels="majority"
    )


@dataclass(kw_only=True)
class TrainConfig:
    """The root config: `tsesnet/configs/*.yaml` is its serialisation (unknown keys fail).

    The defaults are the recommended recipe (`tsesnet/configs/recommended.yaml`): the paper's
    network, patch, optimiser and schedule, with the loss of `recommended_loss` and a phase
    embedding before fusion (Eq. 9 cannot see the order of the post-contrast phases). The
    paper's recipe as written is `tsesnet/configs/paper.yaml`.
    """

    model: ModelSpec = field(default_factory=lambda: ModelSpec(phase_embedding=True))
    loss: LossSection = field(default_factory=recommended_loss)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunSettings = field(default_factory=RunSettings)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The recommended recipe, or a YAML file, with `key=value` overrides applied (validated)."""
    try:
        cfg = yaml_config.load_yaml(TrainConfig, path) if path else TrainConfig()
        if overrides:
            cfg = yaml_config.apply_overrides(cfg, list(overrides))
    except InputError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"bad config: {err}", path=str(path) if path else None) from err
    check_config(cfg)
    return cfg


def _sections() -> dict[str, type]:
    return {name: schema.unwrap(tp) for name, tp in schema.init_fields(TrainConfig).items()}


def _ranges() -> dict[str, str]:
    """Dotted key -> the interval its field constraints allow ("[" closed, "(" open; for a
    tuple, of each item), for every constrained setting."""
    out = {}
    for name, section in _sections().items():
        for key, tp in schema.init_fields(section).items():
            spec = schema.interval(tp)
            if spec:
                out[f"{name}.{key}"] = spec
    return out


# Read from the fields' constraints, not written again: `tests/test_train.py` walks every
# numeric key of `TrainConfig` and fails on one without a range.
RANGES = _ranges()


def _numeric(tp) -> bool:
    base = schema.unwrap(tp)
    if get_origin(base) is tuple:
        base = schema.unwrap(get_args(base)[0])
    return base in (int, float)


def numeric_settings(cfg: TrainConfig) -> dict[str, float | int | tuple | None]:
    """Every numeric setting (numbers, tuples of numbers, optional numbers: None when unset), by
    dotted key, from the fields' types."""
    out = {}
    for name, section in _sections().items():
        hints = get_type_hints(section)
        for key in schema.init_fields(section):
            if _numeric(hints[key]):
                out[f"{name}.{key}"] = getattr(getattr(cfg, name), key)
    return out


def check_config(cfg: TrainConfig) -> None:
    """Every setting of its type and in its range, named by its key, before Ray starts (a config
    built in Python is checked as a YAML file would be).

    Raises:
        InputError: one line naming the first key that is wrong, its value and its range.
    """
    try:
        yaml_config.validate(cfg)
    except InputError as err:
        raise InputError(f"bad config: {err}") from None
    check_model_name(cfg.run.registered_model_name)


def check_model_name(name: str) -> str:
    """`run.registered_model_name` as MLflow and `models:/NAME@ALIAS` URIs take it (a name:
    letters, digits, '-', '_', '.'), checked before Ray starts instead of after training."""
    try:
        return names.check(name, "run.registered_model_name", param=False)
    except InputError as err:
        raise InputError(f"bad config: {err}") from None


# Settings that change how a run goes but not the model it trains (the batches are the same for
# any number of loader processes): never part of the hash, so changing them keeps the run name.
_NOT_HASHED = (("model", "channels_last"), ("data", "loader_workers"))
# Keys added after the first release, with the value that gives the first release's training:
# hashed only when set to something else, so that a config training as a run started before they
# existed keeps that run's default name (and a config training differently gets a new one).
_FIRST_RELEASE = {
    ("data", "intensity_scale"): [0.9, 1.1],
    ("data", "intensity_shift"): [-0.1, 0.1],
    ("data", "admit_after"): 16,
    ("model", "attn_exact_tokens"): 0,
    ("loss", "tsc_scale"): "paper",
    ("loss", "tsc_labels"): "max",
}


def config_hash(cfg: TrainConfig) -> str:
    """A short stable hash of everything that changes the trained model (not `run`)."""
    d = yaml_config.to_dict(cfg)
    d.pop("run", None)
    for section, key in _NOT_HASHED:  # how the run goes, not what it learns
        del d[section][key]
    for (section, key), first in _FIRST_RELEASE.items():
        if d[section][key] == first:
            del d[section][key]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(store_path: str, cfg: TrainConfig) -> str:
    """Deterministic (never a timestamp): store name, preset, fusion, fold and config hash."""
    m = cfg.model
    return names.join(
        names.store_stem(store_path), m.preset, m.fusion, f"fold{cfg.data.fold}", config_hash(cfg)
    )
