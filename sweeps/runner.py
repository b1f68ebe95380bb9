"""`tsesnet sweep`: Ray Tune + Optuna over the training config, every trial tracked in MLflow.

The Train V2 + Tune pattern (Ray's "Hyperparameter Tuning with Ray Tune" guide): each Tune
trial is a small function trainable that builds a training config from the sampled values and
calls `tsesnet.train.train`, the same driver `tsesnet train` uses, which fits a `TorchTrainer`
over `tsesnet.train_loop.train_loop_per_worker`. A Train callback forwards every epoch's report
from the workers to Tune, where Optuna's TPE proposes the next trials and ASHA stops the weak
ones early on the validation Dice. There is no training code here.

MLflow: one parent run per sweep; each trial's training run is its child (the trial creates it
with the parent's id, and `train` finds it by its run name and logs the config and per-epoch
metrics into it). At the end the parent gets the search space, the results table (CSV) and
Optuna's plots, and the best trial's weights are registered as a new version of the model with
the same champion gating as `tsesnet train`.

Names are deterministic (never timestamps): the sweep is `sweep-<store>-<config stem>` unless
named, trial k is `t00k`, its training run `<sweep>-t00k`. `--resume` restores the Tune
experiment (trials, Optuna's study, ASHA's rungs); unfinished trials restart their training run,
which resumes from its latest checkpoint into the same MLflow child run.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_store.errors import InputError
from sweeps import space as spacemod

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "platform" / "configs" / "sweep.yaml"
SWEEP_TAG, TRIAL_TAG, KIND_TAG = "tsesnet.sweep", "tsesnet.trial", "tsesnet.kind"
# The time axis of ASHA and of the benchmark: epochs trained, counted from 1.
EPOCHS = "epochs_done"


@dataclass
class TrialRow:
    """One line of the results table."""

    trial: str
    status: str
    params: dict[str, Any]
    epochs: int
    best_val_dice: float
    hd95: float
    run_id: str | None
    checkpoint_path: str | None = None
    history: list[float] = field(default_factory=list)  # metric per epoch


@dataclass
class SweepResult:
    """What a finished sweep produced."""

    name: str
    parent_run_id: str
    rows: list[TrialRow]  # sorted best first
    best: TrialRow | None
    model_version: str | None
    alias: str | None
    experiment_path: str
    grid: Any = field(default=None, repr=False)  # Tune's ResultGrid


# ---------------------------------------------------------------------------------------------
# configs


def default_name(store: str, cfg: spacemod.SweepConfig) -> str:
    """`sweep-<store stem>-<config stem>`: the same command gives the same name (resumable)."""
    stem = Path(str(store).rstrip("/")).name.removesuffix(".zarr") or "store"
    src = Path(cfg.source).stem if cfg.source else "sweep"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"sweep-{stem}-{src}")


def base_train_config(cfg: spacemod.SweepConfig):
    """The base `TrainConfig` (its YAML with the sweep's `set` overrides), checked."""
    from tsesnet.train import load_config

    return load_config(cfg.train_config_path(), list(cfg.set))


def trial_train_config(base: dict, values: dict[str, Any], storage_path: str):
    """The trial's `TrainConfig`: the base (as a dict) with the sampled `values` set.

    Validation runs every epoch (ASHA compares trials at epoch rungs), the trial does not
    register its model (the sweep registers the best one) and checkpoints go under the sweep.
    """
    from tsesnet import config as cfgmod
    from tsesnet.train import TrainConfig

    d = copy.deepcopy(base)
    for path, value in values.items():
        _set_path(d, path, value)
    d["schedule"]["val_every"] = 1
    d["run"]["register"] = False
    d["run"]["storage_path"] = storage_path
    try:
        return cfgmod.from_dict(TrainConfig, d)
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"bad training config for values {values}: {err}") from err


def _set_path(d: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = d
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
            raise InputError(
                f"space.{path}: the training config has no {'.'.join(keys[: i + 1])!r} "
                f"(known here: {known})"
            )
        if i == len(keys) - 1:
            node[k] = list(value) if isinstance(value, tuple) else value
        else:
            node = node[k]


def check_space(cfg: spacemod.SweepConfig, base: dict) -> None:
    """Fail before any trial starts on a path or value the training config rejects."""
    from tsesnet.model import FUSIONS, PRESETS

    for path, value in cfg.fixed().items():
        trial_train_config(base, {path: value}, "")
    for p in cfg.params():
        examples = p.args if p.kind == "choice" else p.args[:1]
        for v in examples:
            trial_train_config(base, {p.path: v}, "")
        if p.path == "model.fusion":
            bad = [v for v in p.args if v not in FUSIONS]
            if bad:
                raise InputError(f"space.model.fusion: unknown {bad}; known: {sorted(FUSIONS)}")
        if p.path == "model.preset":
            bad = [v for v in p.args if v not in PRESETS]
            if bad:
                raise InputError(f"space.model.preset: unknown {bad}; known: {sorted(PRESETS)}")


def trial_resources(train_cfg, driver_cpus: float) -> dict[str, float]:
    """Logical resources one trial holds: its driver plus all its Ray Train workers."""
    run = train_cfg.run
    return {
        "CPU": driver_cpus + run.workers * run.cpus_per_worker,
        "GPU": run.workers * run.gpus_per_worker,
    }


def concurrency(per_trial: dict[str, float], cluster: dict[str, float], limit: int = 0) -> int:
    """How many trials fit in the cluster at once (a Train run starts only with all workers).

    Raises:
        InputError: when not even one trial fits.
    """
    fits = []
    for res in ("CPU", "GPU"):
        need = per_trial.get(res, 0.0)
        if need > 0:
            fits.append(math.floor(cluster.get(res, 0.0) / need + 1e-9))
    n = min(fits) if fits else 1
    if n < 1:
        raise InputError(
            f"one trial needs {per_trial['CPU']:g} CPUs and {per_trial['GPU']:g} GPUs but the "
            f"cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; "
            "lower run.workers, run.cpus_per_worker or run.gpus_per_worker"
        )
    return min(n, limit) if limit > 0 else n


# ---------------------------------------------------------------------------------------------
# the trial (runs in a Tune actor)


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


def run_trial(values: dict[str, Any], setup: dict) -> None:
    """One Tune trial: the child MLflow run, then `tsesnet.train.train` with Tune reporting.

    `train` runs in a task started from here with `RAY_ADDRESS` in its environment, so that
    the Ray Train controller and its placement-group cleaner inherit it. When ASHA stops a
    trial, Tune kills this actor and the controller with it; the cleaner must then reach the
    state API to free the run's placement group. Without the address it looks for "the" local
    Ray instance and, with two on one machine, gives up, the resources leak and later trials
    wait for CPUs forever.
    """
    import mlflow
    import ray
    from ray import tune

    # Tune actors may run in another working directory: use what the sweep driver resolved.
    os.environ["MLFLOW_TRACKING_URI"] = setup["tracking_uri"]
    mlflow.set_tracking_uri(setup["tracking_uri"])
    trial = tune.get_context().get_trial_name()
    name = f"{setup['sweep']}-{trial}"
    cfg = trial_train_config(setup["base"], values, setup["train_storage"])
    _child_run(setup, name, trial)
    env = {"RAY_ADDRESS": setup["ray_address"], "MLFLOW_TRACKING_URI": setup["tracking_uri"]}
    fit = ray.remote(num_cpus=0, max_retries=0)(_train).options(runtime_env={"env_vars": env})
    # The callback holds this trial's Tune queue; it runs in the Train controller.
    ray.get(fit.remote(setup["store"], cfg, name, _report_callback()))


def _train(store: str, cfg, name: str, callback) -> None:
    from tsesnet.train import train

    train(store, cfg, name, callbacks=[callback])


def _child_run(setup: dict, name: str, trial: str) -> str:
    """The trial's MLflow run under the sweep's parent; found again by name on resume."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [setup["experiment_id"]],
        filter_string=(
            f"tags.`tsesnet.run_name` = '{name}' and "
            f"tags.`mlflow.parentRunId` = '{setup['parent_run_id']}'"
        ),
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        setup["experiment_id"],
        run_name=name,
        tags={
            "tsesnet.run_name": name,
            "mlflow.parentRunId": setup["parent_run_id"],
            SWEEP_TAG: setup["sweep"],
            TRIAL_TAG: trial,
        },
    )
    return run.info.run_id


def _trial_name(trial, offset: int = 0) -> str:
    """`t001`, `t002`, ... from Tune's trial counter (kept across `--resume`).

    Optuna's generator counts from 1, random search's from 0 (`offset=1`).
    """
    m = re.match(r"(\d+)", trial.experiment_tag or "")
    return f"t{int(m.group(1)) + offset:03d}" if m else f"t-{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# the sweep driver


def _storage_root(train_cfg) -> str:
    sp = train_cfg.run.storage_path or str(Path.cwd() / "ray_results")
    return sp if "://" in sp else str(Path(sp).expanduser().resolve())


def _parent_run(client, experiment_id: str, name: str, resume: bool) -> str:
    """The sweep's MLflow parent run: found again on `--resume`, else a new one."""
    if resume:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{KIND_TAG}` = 'sweep'",
            max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        print(f"note: no MLflow parent run for sweep {name}; creating one", flush=True)
    run = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name, KIND_TAG: "sweep"})
    return run.info.run_id


def build_tuner(
    cfg: spacemod.SweepConfig,
    trainable,
    *,
    name: str,
    storage: str,
    max_concurrent: int,
    max_epochs: int,
    stop=None,
):
    """The `Tuner`: Optuna TPE (or random search) and ASHA (or FIFO) on `cfg.metric`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search.algorithm == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(
            seed=cfg.search.seed, n_startup_trials=cfg.search.n_startup_trials
        )
        search_alg = OptunaSearch(sampler=sampler)
    else:
        # Tune ignores max_concurrent_trials for a generator instance: give it the limit.
        search_alg = BasicVariantGenerator(
            random_state=cfg.search.seed, max_concurrent=max_concurrent
        )
    if cfg.scheduler.algorithm == "asha":
        scheduler = ASHAScheduler(
            time_attr=EPOCHS,
            max_t=max_epochs,
            grace_period=min(cfg.scheduler.grace_period, max_epochs),
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    namer = functools.partial(_trial_name, offset=0 if cfg.search.algorithm == "tpe" else 1)
    return tune.Tuner(
        trainable,
        param_space=spacemod.tune_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=cfg.trials,
            max_concurrent_trials=max_concurrent if cfg.search.algorithm == "tpe" else None,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, stop=stop, verbose=1),
    )


def run_sweep(
    store: str,
    cfg: spacemod.SweepConfig,
    *,
    name: str | None = None,
    resume: bool = False,
    register: bool = True,
    stop=None,
) -> SweepResult:
    """Run (or resume) a sweep and return its trials sorted by the metric.

    Args:
        store: path or URL of a store written by `tsesnet ingest`.
        cfg: the sweep config (space, searcher, scheduler, base training config).
        name: sweep name; default `default_name(store, cfg)`.
        resume: continue the sweep of that name (error if there is none).
        register: register the best trial's model (`run.register` of the base config too).
        stop: an optional Tune stopper (the benchmark's epoch budget).
    """
    import mlflow
    from ray import tune

    from data_store.store import open_store
    from tsesnet import config as cfgmod
    from tsesnet import tracking

    spacemod.check(cfg)
    store = store if "://" in store else str(Path(store).expanduser().resolve())
    st = open_store(store)
    base_cfg = base_train_config(cfg)
    base = cfgmod.to_dict(base_cfg)
    check_space(cfg, base)
    name = name or cfg.name or default_name(store, cfg)
    storage = _storage_root(base_cfg)
    exp_path = f"{storage.rstrip('/')}/{name}"
    exists = tune.Tuner.can_restore(exp_path)
    if exists and not resume:
        raise InputError(
            f"sweep {name!r} already exists at {exp_path}: pass --resume to continue it, "
            "or --name for a new sweep"
        )
    if resume and not exists:
        raise InputError(f"no sweep {name!r} to resume at {exp_path}")

    from tsesnet.cluster import connect

    ray = connect()
    per_trial = trial_resources(base_cfg, cfg.trial_driver_cpus)
    n_parallel = concurrency(per_trial, ray.cluster_resources(), cfg.max_concurrent_trials)
    n_parallel = min(n_parallel, cfg.trials)
    experiment_id = tracking.ensure_database(base_cfg.run.experiment)
    client = mlflow.MlflowClient()
    parent = _parent_run(client, experiment_id, name, resume)
    if not resume:
        _log_parent_start(client, parent, cfg, base_cfg, store, st, n_parallel)
    print(
        f"sweep {name}: {cfg.trials} trials, {n_parallel} at a time "
        f"({per_trial['CPU']:g} CPU, {per_trial['GPU']:g} GPU each), "
        f"{cfg.search.algorithm} + {cfg.scheduler.algorithm} on {cfg.metric} ({cfg.mode}); "
        f"MLflow parent run {parent}; Tune experiment {exp_path}",
        flush=True,
    )

    setup = {
        "sweep": name,
        "ray_address": ray.get_runtime_context().gcs_address,
        "store": store,
        "base": base,
        "train_storage": f"{exp_path}/train_runs",
        "tracking_uri": tracking.tracking_uri(),
        "experiment_id": experiment_id,
        "parent_run_id": parent,
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup),
        {"cpu": cfg.trial_driver_cpus, "gpu": 0},
    )
    if resume:
        tuner = tune.Tuner.restore(
            exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = build_tuner(
            cfg,
            trainable,
            name=name,
            storage=storage,
            max_concurrent=n_parallel,
            max_epochs=base_cfg.schedule.epochs,
            stop=stop,
        )
    grid = tuner.fit()

    rows = collect_rows(grid, cfg, client, experiment_id, name)
    _finish_child_runs(client, rows, base_cfg.schedule.epochs)
    best = rows[0] if rows and math.isfinite(rows[0].best_val_dice) else None
    version = alias = None
    if best is not None and register and base_cfg.run.register:
        version, alias = register_best(best, base_cfg, st, name, setup["base"])
    _log_parent_end(client, parent, cfg, rows, best, version, alias)
    client.set_terminated(parent, "FINISHED")
    return SweepResult(name, parent, rows, best, version, alias, exp_path, grid)


def collect_rows(grid, cfg: spacemod.SweepConfig, client, experiment_id: str, name: str):
    """One `TrialRow` per trial that started, best first (NaN metrics last)."""
    runs = {
        r.data.tags.get(TRIAL_TAG): r.info.run_id
        for r in client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'")
        if r.data.tags.get(TRIAL_TAG)
    }
    rows = []
    for res in grid:
        if res.config is None:
            # created by the searcher but stopped (e.g. by a `stop` budget) before it started:
            # it trained nothing and has no MLflow run
            continue
        trial = Path(str(res.path)).name
        m = res.metrics or {}
        df = res.metrics_dataframe
        history: list[float] = []
        best_dice, hd95 = float("nan"), float("nan")
        if df is not None and "val_dice" in df:
            history = [float(v) for v in df[cfg.metric]] if cfg.metric in df else []
            vals = df["val_dice"].astype(float)
            if vals.notna().any():
                i = vals.idxmax()
                best_dice = float(vals[i])
                hd95 = float(df["val_hd95"][i]) if "val_hd95" in df else float("nan")
        rows.append(
            TrialRow(
                trial=trial,
                status="ERROR" if res.error else "TERMINATED",
                params={p.path: res.config.get(p.path) for p in cfg.params()},
                epochs=int(m.get(EPOCHS, 0) or 0),
                best_val_dice=best_dice,
                hd95=hd95,
                run_id=runs.get(trial),
                checkpoint_path=m.get("checkpoint_path"),
                history=history,
            )
        )
    sign = -1.0 if cfg.mode == "max" else 1.0
    rows.sort(key=lambda r: (not math.isfinite(r.best_val_dice), sign * _nan0(r.best_val_dice)))
    return rows


def _nan0(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _finish_child_runs(client, rows: list[TrialRow], max_epochs: int) -> None:
    """Trials stopped by ASHA never return from `train`: close their runs here.

    A stopped trial may have trained (and logged) an epoch more than Tune saw before it was
    stopped; `epochs` becomes what was trained, as the run's metric history shows.
    """
    for r in rows:
        if not r.run_id:
            continue
        logged = len(client.get_metric_history(r.run_id, "val_dice"))
        r.epochs = max(r.epochs, logged)
        client.set_tag(r.run_id, "tsesnet.epochs_run", str(r.epochs))
        if r.status == "TERMINATED" and r.epochs < max_epochs:
            client.set_tag(r.run_id, "tsesnet.stopped_early", "true")
        run = client.get_run(r.run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(r.run_id, "FAILED" if r.status == "ERROR" else "FINISHED")


def register_best(best: TrialRow, base_cfg, st, sweep: str, base: dict):
    """Register the best trial's best weights as a new model version (champion gating)."""
    import dataclasses

    from ray.train import Checkpoint

    from tsesnet.registry import log_and_register
    from tsesnet.train_loop import read_checkpoint_state

    ckpt = best.checkpoint_path
    if ckpt and "://" not in ckpt and not Path(ckpt).is_dir():
        # Stopped by ASHA after more epochs than Tune saw: the checkpoint it saw may be rotated
        # out; the run's latest one holds the best weights so far as well.
        latest = sorted(Path(ckpt).parent.glob("checkpoint_*"))
        ckpt = str(latest[-1]) if latest else None
    if not ckpt or not best.run_id:
        print(f"note: best trial {best.trial} has no checkpoint; nothing registered", flush=True)
        return None, None
    cfg = trial_train_config(base, best.params, "")
    net = cfg.model.build()
    model_config = dataclasses.asdict(net.config)
    del net
    with Checkpoint(ckpt).as_directory() as d:
        state = read_checkpoint_state(d)
        reg = log_and_register(
            run_id=best.run_id,
            weights_path=Path(d) / "best.pt",
            model_config=model_config,
            patch=tuple(cfg.data.patch),
            phases=state.get("phases"),
            val_dice=float(state["best_val_dice"]),
            min_component_fraction=state.get("min_component_fraction", 0.0),
            lineage={
                "store_fingerprint": st.fingerprint,
                "fold": cfg.data.fold,
                "run_name": f"{sweep}-{best.trial}",
                "sweep": sweep,
            },
            name=base_cfg.run.registered_model_name,
        )
    print(f"registered {reg.name} version {reg.version} as @{reg.alias}: {reg.reason}", flush=True)
    return reg.version, reg.alias


# ---------------------------------------------------------------------------------------------
# MLflow parent run: settings at the start, table and plots at the end


def _log_parent_start(client, run_id, cfg, base_cfg, store, st, n_parallel) -> None:
    from tsesnet.config import dump_yaml

    params = {
        "sweep.trials": cfg.trials,
        "sweep.metric": cfg.metric,
        "sweep.mode": cfg.mode,
        "sweep.search": cfg.search.algorithm,
        "sweep.seed": cfg.search.seed,
        "sweep.n_startup_trials": cfg.search.n_startup_trials,
        "sweep.scheduler": cfg.scheduler.algorithm,
        "sweep.grace_period": cfg.scheduler.grace_period,
        "sweep.reduction_factor": cfg.scheduler.reduction_factor,
        "sweep.max_concurrent_trials": n_parallel,
        "sweep.train_config": cfg.train_config,
        "sweep.set": ";".join(cfg.set),
    }
    for p in cfg.params():
        params[f"space.{p.path}"] = f"{p.kind}{list(p.args)}"
    for k, v in cfg.fixed().items():
        params[f"space.{k}"] = f"fixed {v}"
    for k, v in params.items():
        client.log_param(run_id, k, str(v)[:500])
    client.set_tag(run_id, "data.store", store)
    client.set_tag(run_id, "data.store_fingerprint", st.fingerprint)
    client.log_text(run_id, space_yaml(cfg), "sweep/search_space.yaml")
    client.log_text(run_id, dump_yaml(base_cfg), "sweep/base_train_config.yaml")


def space_yaml(cfg: spacemod.SweepConfig) -> str:
    """The sweep config as YAML (what was searched, how)."""
    import dataclasses

    import yaml

    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return yaml.safe_dump(d, sort_keys=False)


COLUMNS = ("trial", "alpha", "beta", "tau", "fusion", "lr", "epochs", "best val DSC", "HD95 mm")


def _row_values(r: TrialRow) -> dict[str, Any]:
    out: dict[str, Any] = {"trial": r.trial}
    for path, v in r.params.items():
        out[path.rsplit(".", 1)[-1]] = v
    out.update({"epochs": r.epochs, "best val DSC": r.best_val_dice, "HD95 mm": r.hd95})
    out["status"] = r.status
    return out


def results_csv(rows: list[TrialRow]) -> str:
    """The results table as CSV: trial, every searched path, epochs, DSC, HD95, run id."""
    buf = io.StringIO()
    paths = list(rows[0].params) if rows else []
    w = csv.writer(buf)
    w.writerow(["trial", *paths, "epochs", "best_val_dice", "val_hd95", "status", "run_id"])
    for r in rows:
        w.writerow(
            [r.trial, *(r.params[p] for p in paths), r.epochs, r.best_val_dice, r.hd95]
            + [r.status, r.run_id or ""]
        )
    return buf.getvalue()


def results_table(rows: list[TrialRow]) -> str:
    """The terminal table, in the order given (best first)."""
    if not rows:
        return "(no trials)"
    cols = list(dict.fromkeys(["trial", *(_row_values(rows[0]).keys())]))
    ordered = [c for c in COLUMNS if c in cols] + [c for c in cols if c not in COLUMNS]

    def fmt(v):
        if isinstance(v, float):
            if not math.isfinite(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.4f}"
        return str(v)

    cells = [[fmt(_row_values(r).get(c, "")) for c in ordered] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(ordered)]
    line = "  ".join(c.ljust(w) for c, w in zip(ordered, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, sep, *body])


def optuna_study(cfg: spacemod.SweepConfig, rows: list[TrialRow]):
    """An Optuna study rebuilt from the trials (in trial order), for Optuna's plots."""
    import optuna

    dists = spacemod.optuna_distributions(cfg)
    direction = "maximize" if cfg.mode == "max" else "minimize"
    study = optuna.create_study(direction=direction)
    for r in sorted(rows, key=lambda r: r.trial):
        value = r.history[-1] if r.history else float("nan")
        if not math.isfinite(value):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params={p: r.params[p] for p in dists},
                distributions=dists,
                value=value,
                intermediate_values=dict(enumerate(r.history, start=1)),
            )
        )
    return study


def optuna_plots(cfg: spacemod.SweepConfig, rows: list[TrialRow], out_dir: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(cfg, rows)
    made = []
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    for fname, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is "experimental"
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            path = out_dir / f"{fname}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            made.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            # e.g. importances need two finished trials with different values
            print(f"note: no {fname} plot: {err}", flush=True)
    return made


def _log_parent_end(client, run_id, cfg, rows, best, version, alias) -> None:
    import tempfile

    client.log_text(run_id, results_csv(rows), "sweep/results.csv")
    with tempfile.TemporaryDirectory() as d:
        for path in optuna_plots(cfg, rows, Path(d)):
            client.log_artifact(run_id, str(path), "sweep/plots")
    client.log_metric(run_id, "trials", len(rows))
    client.log_metric(run_id, "trials_failed", sum(r.status == "ERROR" for r in rows))
    client.log_metric(run_id, "epochs_total", sum(r.epochs for r in rows))
    if best is not None:
        client.log_metric(run_id, "best_val_dice", best.best_val_dice)
        client.set_tag(run_id, "tsesnet.best_trial", best.trial)
        if best.run_id:
            client.set_tag(run_id, "tsesnet.best_run_id", best.run_id)
    if version:
        client.set_tag(run_id, "tsesnet.model_version", str(version))
        client.set_tag(run_id, "tsesnet.model_alias", str(alias))


# ---------------------------------------------------------------------------------------------
# CLI


def cli(args) -> int:
    """`tsesnet sweep --store STORE [--config FILE] [--trials N] [--name NAME] [--resume]`."""
    from tsesnet import tracking

    cfg = spacemod.load(args.config or DEFAULT_CONFIG)
    if args.trials is not None:
        if args.trials < 1:
            raise InputError(f"--trials must be >= 1, got {args.trials}")
        if args.resume and args.trials != cfg.trials:
            print("note: --trials is ignored with --resume (the sweep keeps its own)")
        cfg.trials = args.trials
    res = run_sweep(args.store, cfg, name=args.name, resume=args.resume)
    print()
    print(f"sweep {res.name}: {len(res.rows)} trials, sorted by {cfg.metric} ({cfg.mode})")
    print(results_table(res.rows))
    if res.best is not None:
        print(f"\nbest: {res.best.trial} (MLflow run {res.best.run_id})")
    if res.model_version:
        reg = base_train_config(cfg).run.registered_model_name
        print(f"registered {reg} version {res.model_version} as @{res.alias}")
    uri = tracking.tracking_uri()
    print(f"\nbrowse it: mlflow ui --backend-store-uri {uri}  (parent run {res.parent_run_id})")
    return 0
