"""The sweep config: a search space over training-config keys plus the search settings.

`tsesnet/configs/sweep.yaml` is its serialisation, read by the same strict YAML loader as the
training configs (`tsesnet.common.yaml_config`: YAML 1.2 floats, so `1e-5` is a number). Each key
of `space` is a dotted path into `tsesnet.training.config.TrainConfig` (`loss.alpha`,
`model.fusion`, ...), the same paths `tsesnet train --set` takes. A value is either a
distribution, written as a one-key mapping, or a plain value that fixes the parameter for every
trial:

    space:
      loss.alpha: {uniform: [0.1, 1.0]}        # Eq. 10 weight of the Dice term
      loss.tau: {loguniform: [1.0e-5, 1.0]}    # Eq. 7 temperature
      model.fusion: {choice: [tsff, cnn]}
      data.patches_per_epoch: {int: [2, 8]}    # inclusive bounds
      loss.beta: 0.5                           # fixed

Parsing is strict: an unknown setting, an unknown distribution,
bounds in the wrong order, a non-positive log-uniform bound or a path the training config does
not have is an `InputError` naming the key. The same space gives Ray Tune domains (what
`OptunaSearch` and random search sample from) and Optuna distributions (used to rebuild a study
for Optuna's plots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field

from data_store.errors import InputError

KINDS = ("uniform", "loguniform", "int", "choice")
Searcher = Literal["tpe", "random"]
Scheduler = Literal["asha", "fifo"]
SEARCHERS = get_args(Searcher)
SCHEDULERS = get_args(Scheduler)


@dataclass(frozen=True)
class Param:
    """One searched parameter: `kind` in KINDS, `args` the bounds (lo, hi) or the choices."""

    path: str
    kind: str
    args: tuple

    @property
    def short(self) -> str:
        """The last component of the path (`loss.alpha` -> `alpha`), for tables."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(kw_only=True)
class SearchSettings:
    """How new trials are proposed.

    Attributes:
        algorithm: "tpe" (Optuna's TPE sampler) or "random".
        seed: sampler seed.
        n_startup_trials: random trials before TPE starts modelling.
    """

    algorithm: Searcher = "tpe"
    seed: int = 0
    n_startup_trials: int = 4


@dataclass(kw_only=True)
class SchedulerSettings:
    """How running trials are stopped early (ASHA on the metric, rungs in epochs).

    Attributes:
        algorithm: "asha" (asynchronous successive halving) or "fifo" (never stop early).
        grace_period: epochs every trial runs before it can be stopped.
        reduction_factor: ASHA keeps the top 1/reduction_factor at each rung.
    """

    algorithm: Scheduler = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 2
    reduction_factor: Annotated[int, Field(ge=2)] = 3


@dataclass(kw_only=True)
class SweepConfig:
    """The root sweep config.

    Attributes:
        train_config: the base training recipe (YAML, relative to the sweep file), or "" for
            the paper's defaults.
        set: fixed `key=value` overrides of the training config applied to every trial.
        name: the sweep's name (Ray Tune experiment, MLflow parent run); "" derives a
            deterministic one from the store and this file.
        trials: number of trials.
        metric: the per-epoch metric reported by training that trials are ranked on.
        mode: "max" or "min".
        search: the searcher.
        scheduler: the early-stopping scheduler.
        max_concurrent_trials: 0 means as many as the cluster's CPUs/GPUs fit.
        trial_driver_cpus: CPUs reserved for each trial's driver (it only watches its workers).
        space: dotted training-config path -> distribution or fixed value.
    """

    train_config: str = ""
    set: list[str] = field(default_factory=list)
    name: str = ""
    trials: Annotated[int, Field(ge=1)] = 16
    metric: str = "best_val_soft_dice"
    mode: Literal["max", "min"] = "max"
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    max_concurrent_trials: Annotated[int, Field(ge=0)] = 0
    trial_driver_cpus: Annotated[float, Field(ge=0)] = 0.25
    space: dict[str, Any] = field(default_factory=dict)
    # Where the file was read from, to resolve `train_config` (not part of the YAML).
    source: str = field(default="", init=False, repr=False)

    def params(self) -> list[Param]:
        """The searched parameters, in file order."""
        return [p for p in (parse_entry(k, v) for k, v in self.space.items()) if p is not None]

    def fixed(self) -> dict[str, Any]:
        """The parameters the space fixes, path -> value."""
        return {k: v for k, v in self.space.items() if parse_entry(k, v) is None}

    def train_config_path(self) -> Path | None:
        """The base training config file, resolved against the sweep file's folder."""
        if not self.train_config:
            return None
        p = Path(self.train_config).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p


def parse_entry(path: str, value: Any) -> Param | None:
    """One `space` entry: a `Param`, or None when `value` fixes the parameter.

    Raises:
        InputError: an unknown distribution or bad bounds, naming `space.<path>`.
    """
    where = f"space.{path}"
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise InputError(f"{where}: a list is not a distribution; write {{choice: [...]}}")
        return None
    if len(value) != 1:
        raise InputError(f"{where}: write one distribution ({', '.join(KINDS)}), got {value}")
    ((kind, args),) = value.items()
    if kind not in KINDS:
        raise InputError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise InputError(f"{where}: {kind} takes a list, e.g. {kind}: [lo, hi]")
    if kind == "choice":
        if len(set(map(repr, args))) != len(args):
            raise InputError(f"{where}: repeated choices in {args}")
        return Param(path, kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
        raise InputError(f"{where}: {kind} takes two numbers [lo, hi], got {args}")
    lo, hi = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise InputError(f"{where}: int bounds must be integers, got {args}")
    if not lo < hi:
        raise InputError(f"{where}: lower bound {lo} must be below upper bound {hi}")
    if kind == "loguniform" and lo <= 0:
        raise InputError(f"{where}: loguniform bounds must be > 0, got {lo}")
    return Param(path, kind, (lo, hi))


def load(path: str | Path) -> SweepConfig:
    """Read and check a sweep YAML file; errors name the file."""
    from tsesnet.common import yaml_config

    p = Path(path)
    cfg = yaml_config.load_yaml(SweepConfig, p)
    cfg.source = str(p.resolve())
    try:
        check(cfg)
    except InputError as err:
        raise err.moved(path=str(p)) from None
    return cfg


def check(cfg: SweepConfig) -> None:
    """The settings' types, choices and ranges (the fields' own, as when the file is read: the
    config may have been changed since), then the search space."""
    from tsesnet.common import yaml_config

    try:
        yaml_config.validate(cfg)
    except InputError as err:
        raise InputError(f"bad sweep config: {err}") from None
    for k, v in cfg.space.items():
        parse_entry(k, v)
    if not cfg.params():
        raise InputError("the space searches nothing: give at least one distribution")


def tune_space(cfg: SweepConfig) -> dict[str, Any]:
    """Ray Tune's `param_space`: a domain per searched path, fixed values as they are."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, value in cfg.space.items():
        p = parse_entry(path, value)
        if p is None:
            out[path] = value
        elif p.kind == "uniform":
            out[path] = tune.uniform(*p.args)
        elif p.kind == "loguniform":
            out[path] = tune.loguniform(*p.args)
        elif p.kind == "int":
            out[path] = tune.randint(p.args[0], p.args[1] + 1)  # upper bound inclusive
        else:
            out[path] = tune.choice(list(p.args))
    return out


def optuna_distributions(cfg: SweepConfig) -> dict[str, Any]:
    """Optuna distributions of the searched paths (the ones `OptunaSearch` derives)."""
    import optuna

    d = optuna.distributions
    out: dict[str, Any] = {}
    for p in cfg.params():
        if p.kind == "uniform":
            out[p.path] = d.FloatDistribution(*p.args)
        elif p.kind == "loguniform":
            out[p.path] = d.FloatDistribution(*p.args, log=True)
        elif p.kind == "int":
            out[p.path] = d.IntDistribution(*p.args)
        else:
            out[p.path] = d.CategoricalDistribution(list(p.args))
    return out
