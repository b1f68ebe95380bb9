"""`tsesnet sweep`: Ray Tune + Optuna over the training config, every trial tracked in MLflow.

Read `run_sweep` first: plan the sweep (config, store, names, resources, the MLflow parent run),
fit the Tune experiment, then report and register. Each trial (`sweeps.trial`) runs `tsesnet
train`'s driver; Optuna's TPE proposes the next trials and ASHA stops the weak ones early.
`sweeps.report` builds the results table and logs the parent run.

MLflow: one parent run per sweep; each trial's training run is its child. At the end the parent
gets the search space, the results table (CSV) and Optuna's plots, and the best trial's weights
are registered as a new version of the model through the same path as `tsesnet train`
(`tsesnet.training.driver.register`): as @challenger, or with `--promote` through the same
champion gate (a strictly better score under the same validation protocol).

Names are deterministic (never timestamps): the sweep is `sweep-<store>-<config stem>` unless
named, trial k is `t00k`, its training run `<sweep>-t00k`. `--resume` restores the Tune
experiment (trials, Optuna's study, ASHA's rungs); unfinished trials restart their training run,
which resumes from its latest checkpoint into the same MLflow child run.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_store.errors import InputError
from sweeps import report
from sweeps import space as spacemod
from sweeps.report import TrialRow
from sweeps.trial import EPOCHS, KIND_TAG, SWEEP_TAG, TrialSetup, check_space, run_trial, trial_name
from tsesnet.common import names
from tsesnet.common.cli_options import add_set_option
from tsesnet.training.config import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "sweep.yaml"


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
    experiment_id: str
    grid: Any = field(default=None, repr=False)  # Tune's ResultGrid


@dataclass(frozen=True)
class SweepPlan:
    """Everything decided before Tune starts."""

    name: str
    store: Any  # the open `data_store.store.Store`
    base: Any  # the base `TrainConfig`
    storage: str  # where Tune experiments live (the base's `run.storage_path`)
    n_parallel: int
    setup: TrialSetup
    trials: int  # how many trials the sweep runs in all

    @property
    def experiment_path(self) -> str:
        """The Tune experiment folder."""
        return f"{self.storage.rstrip('/')}/{self.name}"


def default_name(store: str, cfg: spacemod.SweepConfig) -> str:
    """`sweep-<store stem>-<config stem>`: the same command gives the same name (resumable)."""
    return names.join(
        "sweep", names.store_stem(store), Path(cfg.source).stem if cfg.source else "sweep"
    )


def base_train_config(cfg: spacemod.SweepConfig):
    """The base `TrainConfig` (its YAML with the sweep's `set` overrides), checked."""
    from tsesnet.training.config import load_config

    return load_config(cfg.train_config_path(), list(cfg.set))


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
    namer = functools.partial(trial_name, offset=0 if cfg.search.algorithm == "tpe" else 1)
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
        # Tune's own lines ("Trial ... completed after N iterations") count the reports Tune
        # saw, which can be an epoch short of what a stopped trial trained; the sweep prints
        # its own (`_TrialLines`) and the table from the runs' histories.
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop=stop,
            verbose=0,
            callbacks=[_trial_lines(cfg.trials)],
        ),
    )


def _trial_lines(trials: int = 0):
    """A Tune callback printing one line when a trial starts (its values) and when it ends (with
    the trials done, the time so far and an estimate of the time left), under a progress bar
    over the sweep's trials on a terminal."""
    import sys
    import time

    from ray.tune import Callback

    from tsesnet.common import console

    class TrialLines(Callback):
        def __init__(self):
            self.bar = None
            self.started = time.monotonic()
            self.done = 0

        def __getstate__(self):  # Tune saves its callbacks with the experiment: not the bar
            return {"bar": None, "started": self.started, "done": self.done}

        def _done(self, trial, what: str) -> None:
            self.done += 1
            elapsed = time.monotonic() - self.started
            left = elapsed / self.done * max(total - self.done, 0)
            where = f" ({self.done}/{total}, elapsed {console.hms(elapsed)}, " if total else " ("
            console.say(f"trial {trial.custom_dirname} {what}{where}ETA {console.hms(left)})")
            if self.bar is not None:
                self.bar.update(1)

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.bar is None and total:
                self.bar = console.progress(
                    total, "sweep", "trial", enabled=sys.stderr.isatty(), initial=self.done
                )
            values = ", ".join(
                f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.config.items()
            )
            console.say(f"trial {trial.custom_dirname} started: {values}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._done(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trial, f"failed: see {trial.path}")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    total = trials
    return TrialLines()


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_sweep(
    store: str,
    cfg: spacemod.SweepConfig,
    *,
    name: str | None = None,
    resume: bool = False,
    register: bool = True,
    promote: bool = False,
    stop=None,
    trials_given: bool = False,
) -> SweepResult:
    """Run (or resume) a sweep and return its trials sorted by best validation DSC.

    Args:
        store: path or URL of a store written by `tsesnet ingest`.
        cfg: the sweep config (space, searcher, scheduler, base training config).
        name: sweep name; default `default_name(store, cfg)`.
        resume: continue the sweep of that name (error if there is none).
        register: register the best trial's model (`run.register` of the base config too).
        promote: let it take @champion through the gate; without, it registers as
            @challenger (a sweep's trials are often short or validated on fewer cases).
        stop: an optional Tune stopper (the benchmark's epoch budget).
        trials_given: with `resume`, `cfg.trials` is what the user asked for (more trials
            than the sweep has are proposed; fewer is an error), else the sweep keeps its own.

    Raises:
        KeyboardInterrupt: Ctrl-C stopped the sweep (its state saved, nothing registered).
    """
    import mlflow

    plan = plan_sweep(store, cfg, name, resume, trials_given)
    grid = _tuner(plan, cfg, resume, stop).fit()
    client = mlflow.MlflowClient()
    rows = report.collect_rows(grid, cfg, client, plan.setup.experiment_id, plan.name)
    open_trials = _unfinished(plan.experiment_path, plan.trials, stop)
    if open_trials is not None:
        _interrupted(client, plan, rows, open_trials, store)
    report.finish_child_runs(client, rows, plan.base.schedule.epochs)
    best = rows[0] if rows and math.isfinite(rows[0].best_val_dice) else None
    version = alias = None
    if best is not None and register:
        version, alias = register_best(best, plan, promote=promote)
    parent = plan.setup.parent_run_id
    report.log_parent_end(client, parent, cfg, rows, best, version, alias)
    client.set_terminated(parent, "FINISHED")
    return SweepResult(
        plan.name,
        parent,
        rows,
        best,
        version,
        alias,
        plan.experiment_path,
        plan.setup.experiment_id,
        grid,
    )


def _unfinished(exp_path: str, trials: int, stop) -> set[str] | None:
    """The trials Tune left unfinished, if it returned before every trial finished: a Ctrl-C
    (Tune catches the first one, writes its state and returns; it then stops the running trials,
    so only the state on disk still shows them unfinished). None when the sweep is complete, or
    under a `stop` budget, where ending early is the plan."""
    from ray.tune.analysis import ExperimentAnalysis

    if stop is not None:
        return None
    saved = ExperimentAnalysis(exp_path).trials
    open_trials = {t.custom_dirname for t in saved if t.status not in ("TERMINATED", "ERROR")}
    return open_trials if open_trials or len(saved) < trials else None


def _interrupted(client, plan: SweepPlan, rows: list[TrialRow], open_trials: set[str], store):
    """End the unfinished trials' runs and the parent as KILLED (finished ones as Tune ended
    them), register nothing, say how to continue, and raise KeyboardInterrupt (exit 130)."""
    done = [r for r in rows if r.trial not in open_trials]
    report.finish_child_runs(client, done, plan.base.schedule.epochs)
    for r in rows:
        if r.trial in open_trials and r.run_id:
            client.set_terminated(r.run_id, "KILLED")
    client.set_terminated(plan.setup.parent_run_id, "KILLED")
    print(
        f"sweep {plan.name} interrupted: {len(done)} of {plan.trials} trials finished, nothing "
        f"registered; Tune saved its state. Continue with: tsesnet sweep --store {store} "
        f"--name {plan.name} --resume",
        flush=True,
    )
    raise KeyboardInterrupt


def plan_sweep(
    store: str,
    cfg: spacemod.SweepConfig,
    name: str | None,
    resume: bool,
    trials_given: bool = False,
) -> SweepPlan:
    """Check the sweep and its base config, find the Tune experiment and the MLflow parent run.

    Raises:
        InputError: a bad space, store or name; a sweep that exists without `resume`, or
            `resume` without one.
    """
    from data_store.store import open_store
    from tsesnet.common.cluster import connect
    from tsesnet.tracking import runs

    spacemod.check(cfg)
    store = store if "://" in store else str(Path(store).expanduser().resolve())
    st = open_store(store)
    base = base_train_config(cfg)
    check_space(cfg, base)
    if name is None:
        name = cfg.name or default_name(store, cfg)
    names.check(name, "name", param=name != cfg.name)  # else the config's own key
    storage = base.run.resolved_storage_path()
    exp_path = _experiment(storage, name, resume)
    trials = (
        _resumed_trials(exp_path, cfg.trials if trials_given else None) if resume else cfg.trials
    )
    ray = connect()
    per_trial = trial_resources(base, cfg.trial_driver_cpus)
    n_parallel = concurrency(per_trial, ray.cluster_resources(), cfg.max_concurrent_trials)
    n_parallel = min(n_parallel, trials)
    tracking_uri = runs.tracking_uri()  # resolved once; the trials get it in their setup
    experiment_id = runs.ensure_database(base.run.experiment, tracking_uri)
    parent = _parent_run(experiment_id, name, resume)
    if not resume:
        import mlflow

        report.log_parent_start(mlflow.MlflowClient(), parent, cfg, base, store, st, n_parallel)
    print(
        f"sweep {name}: {trials} trials, {n_parallel} at a time "
        f"({per_trial['CPU']:g} CPU, {per_trial['GPU']:g} GPU each), "
        f"{cfg.search.algorithm} + {cfg.scheduler.algorithm} on {cfg.metric} ({cfg.mode}); "
        f"MLflow parent run {parent}; Tune experiment {exp_path}",
        flush=True,
    )
    setup = TrialSetup(
        sweep=name,
        ray_address=ray.get_runtime_context().gcs_address,
        store=store,
        base=base,
        train_storage=f"{exp_path}/train_runs",
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
    )
    return SweepPlan(name, st, base, storage, n_parallel, setup, trials)


def _experiment(storage: str, name: str, resume: bool) -> str:
    """The Tune experiment folder of sweep `name`: it must exist to resume, and not otherwise."""
    from ray import tune

    exp_path = f"{storage.rstrip('/')}/{name}"
    exists = tune.Tuner.can_restore(exp_path)
    if exists and not resume:
        raise InputError(
            f"sweep {name!r} already exists at {exp_path}: pass {{resume=True}} to continue "
            "it, or {name} for a new sweep",
            params=["resume", "name"],
        )
    if resume and not exists:
        raise InputError(f"no sweep {name!r} to resume at {exp_path}")
    return exp_path


def _resumed_trials(exp_path: str, wanted: int | None) -> int:
    """The trial count of a resumed sweep: its own, or `wanted` when that is more (the extra
    trials are proposed); fewer than it has is an error."""
    from sweeps import tune_state

    planned = tune_state.planned_trials(exp_path)
    if wanted is None or planned is None or wanted == planned:
        return planned or wanted or 0
    if wanted < planned:
        raise InputError(
            f"{{param}} {wanted} is fewer than the {planned} trials the sweep at {exp_path} "
            "already has; give a larger number, or leave {param} out to finish it",
            param="trials",
        )
    tune_state.extend_trials(exp_path, wanted)
    print(f"note: the sweep grows from {planned} to {wanted} trials", flush=True)
    return wanted


def _parent_run(experiment_id: str, name: str, resume: bool) -> str:
    """The sweep's MLflow parent run: found again on `--resume`, else a new one."""
    import mlflow

    from tsesnet.tracking.runs import find_or_create_run

    run_id, found = find_or_create_run(experiment_id, name, {SWEEP_TAG: name, KIND_TAG: "sweep"})
    if found and resume:
        mlflow.MlflowClient().update_run(run_id, status="RUNNING")
    elif resume:
        print(f"note: no MLflow parent run for sweep {name}; created one", flush=True)
    return run_id


def _tuner(plan: SweepPlan, cfg: spacemod.SweepConfig, resume: bool, stop):
    """A new Tune experiment, or the one at `plan.experiment_path` restored."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=plan.setup),
        {"cpu": cfg.trial_driver_cpus, "gpu": 0},
    )
    if resume:
        return tune.Tuner.restore(
            plan.experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return build_tuner(
        cfg,
        trainable,
        name=plan.name,
        storage=plan.storage,
        max_concurrent=plan.n_parallel,
        max_epochs=plan.base.schedule.epochs,
        stop=stop,
    )


def register_best(best: TrialRow, plan: SweepPlan, promote: bool = False):
    """Register the best trial's best weights as a new model version: @challenger, or with
    `promote` through the champion gate (a better score under the same validation protocol).

    Returns:
        (version, alias), or (None, None) when nothing is registered.
    """
    from ray.train import Checkpoint

    from tsesnet.common.yaml_config import with_values
    from tsesnet.tracking.runs import git_commit
    from tsesnet.training.checkpoint import local_directory
    from tsesnet.training.driver import register

    ckpt = best.checkpoint_path
    if ckpt and "://" not in ckpt and not Path(ckpt).is_dir():
        # Stopped by ASHA after more epochs than Tune saw: the checkpoint it saw may be rotated
        # out; the run's latest one holds the best weights so far as well.
        latest = sorted(Path(ckpt).parent.glob("checkpoint_*"))
        ckpt = str(latest[-1]) if latest else None
    if not ckpt or not best.run_id:
        print(f"note: best trial {best.trial} has no checkpoint; nothing registered", flush=True)
        return None, None
    # The base with the trial's values: the trial's own config never registers.
    cfg = with_values(plan.base, best.params, where="space.")
    lineage = {
        "store": plan.setup.store,
        "store_fingerprint": plan.store.fingerprint,
        "fold": cfg.data.fold,
        "run_name": plan.setup.run_name(best.trial),
        "git_commit": git_commit(),
        "sweep": plan.name,
    }
    train_ids, val_ids = plan.store.split(cfg.data.fold)
    with local_directory(Checkpoint(ckpt)) as d:
        return register(
            d,
            cfg,
            run_id=best.run_id,
            lineage=lineage,
            train_ids=train_ids,
            val_ids=val_ids,
            promote=promote,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet sweep` (read by `cli`)."""
    parser.add_argument("--store", required=True, help="the Zarr store to train on (path or URL)")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a sweep config YAML, e.g. tsesnet/configs/sweep_tiny.yaml",
    )
    parser.add_argument(
        "--trials", type=int, default=None, metavar="N", help="trials (default: the config's)"
    )
    parser.add_argument(
        "--name", default=None, help="sweep name; the same name with --resume resumes"
    )
    parser.add_argument("--resume", action="store_true", help="continue the sweep of that name")
    parser.add_argument(
        "--promote",
        action="store_true",
        help="let the best trial take @champion when it beats the champion under the same "
        "validation protocol (default: it registers as @challenger)",
    )
    add_set_option(
        parser,
        "a training setting for every trial, after the sweep config's own `set` "
        "(e.g. run.storage_path=s3://bucket/ray_results)",
    )


def cli(args) -> int:
    """`tsesnet sweep --store STORE [--config FILE] [--trials N] [--name NAME] [--resume]
    [--set KEY=VALUE ...]`."""
    from tsesnet.tracking import runs

    cfg = spacemod.load(args.config or DEFAULT_CONFIG)
    if args.overrides:
        cfg.set = [*cfg.set, *args.overrides]
    if args.trials is not None:
        if args.trials < 1:
            raise InputError(f"--trials must be >= 1, got {args.trials}")
        cfg.trials = args.trials
    res = run_sweep(
        args.store,
        cfg,
        name=args.name,
        resume=args.resume,
        promote=args.promote,
        trials_given=args.trials is not None,
    )
    print()
    print(report.table_title(res.name, res.rows, cfg.metric, cfg.mode))
    print(report.results_table(res.rows, cfg.metric))
    if res.best is not None:
        print(f"\nbest: {res.best.trial} (MLflow run {res.best.run_id})")
    print(f"\n{runs.ui_hint()}")
    print(f"  the sweep and its trials: {runs.run_link(res.experiment_id, res.parent_run_id)}")
    if res.model_version:
        model = base_train_config(cfg).run.registered_model_name
        print(f"  the registered model:     {runs.model_link(model, res.model_version)}")
    return 0
