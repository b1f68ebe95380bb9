"""`tsesnet train`: plan the run, fit it on Ray Train, register the best checkpoint.

One Ray Train pattern (Ray's own examples): the per-worker function lives in
`tsesnet.training.worker`; this driver builds the `TorchTrainer` around it. `train` reads as its
three steps: `plan_run` checks everything that can be checked before Ray starts and finds (or
creates) the MLflow run, `fit` runs the workers, `register` logs and registers the best weights.

Running again with the same run name and storage path resumes from the latest checkpoint
(Ray Train V2 restores from `storage_path/name`), and continues the same MLflow run.
Sweeps (`sweeps.trial`) and the science check call `train` too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_store.errors import InputError
from tsesnet.common import names
from tsesnet.common.cli_options import add_set_option
from tsesnet.common.cluster import disconnect
from tsesnet.common.training_record import TrainingRecord
from tsesnet.training import checkpoint
from tsesnet.training.config import TrainConfig, check_config, default_run_name, load_config
from tsesnet.training.plan import RunPlan

# Run tags: which epoch's best weights a run registered, and as which version (never the alias:
# aliases move, and a run tag would go stale).
REGISTERED_AT_TAG = "tsesnet.registered_at_epoch"
VERSION_TAG = "tsesnet.model_version"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How long a failed run waits for Ray to declare a lost worker's node dead, to name it.
NODE_DEATH_WAIT_S = 45.0


class TrainingDiverged(RuntimeError):
    """A loss term, validation score or weight became non-finite: the run stopped, FAILED, and
    registered nothing. `str(err)` is one line."""


@dataclass
class TrainResult:
    """What a finished run produced (epochs counted from 1, as every printed line counts them)."""

    name: str
    experiment_id: str
    run_id: str
    best_val_dice: float
    best_epoch: int  # the epoch of the best validation Dice, from 1 (0: never validated)
    epochs_done: int
    min_component_fraction: float
    val_dice_filtered: float
    model_version: str | None
    alias: str | None
    checkpoint_path: str | None
    metrics: dict = field(default_factory=dict)


def train(
    store: str,
    config: TrainConfig | None = None,
    name: str | None = None,
    *,
    callbacks: list | None = None,
    ends_failed_runs: bool = True,
) -> TrainResult:
    """Train on Ray Train, track in MLflow, register the best checkpoint.

    Args:
        store: path or fsspec URL of a store written by `tsesnet ingest`.
        config: the training config (default: the paper's recipe).
        name: run name; the same name (and storage path) resumes from the latest checkpoint.
        callbacks: extra Ray Train `RunConfig` callbacks, e.g. the sweep's report to Tune.
        ends_failed_runs: end the MLflow run KILLED or FAILED when the training does not
            complete. A sweep passes False: it ends each trial's run as Tune ended the trial,
            and a trial's driver, killed when ASHA stops the trial, must not overwrite that.

    Returns:
        The run's MLflow id, best validation Dice, registered version and alias.
    """
    cfg = config or TrainConfig()
    _catch_signals()
    created: list[str] = []
    try:
        with contextlib.ExitStack() as claims:
            plan = plan_run(store, cfg, name, created=created, claims=claims)
            result, reg, state = _train_planned(plan, cfg, callbacks, ends_failed_runs)
    except KeyboardInterrupt:
        if created and ends_failed_runs:  # a signal between the run's creation and `ended_as`
            _end_killed(created[0])
        raise
    return TrainResult(
        name=plan.name,
        experiment_id=plan.experiment_id,
        run_id=plan.run_id,
        best_val_dice=float(state.best_val_dice),
        best_epoch=int(state.best_epoch) + 1,
        epochs_done=int(state.epoch) + 1,
        min_component_fraction=float(state.min_component_fraction),
        val_dice_filtered=float(state.filtered_dice),
        model_version=reg[0],
        alias=reg[1],
        checkpoint_path=result.checkpoint.path,
        metrics=dict(result.metrics or {}),
    )


def _train_planned(plan: RunPlan, cfg: TrainConfig, callbacks: list | None, ends_failed: bool):
    """Fit a planned run and register its best checkpoint; (Ray's result, registration, the
    checkpoint's state). The MLflow run ends FINISHED, KILLED or FAILED (`ended_as`)."""
    undo: list = []
    with ended_as(plan.run_id, undo=undo, ends_failed=ends_failed):
        check_stop()
        result = fit(plan, callbacks)
        check_stop()
        with checkpoint.local_directory(result.checkpoint) as ckpt_dir:
            state = checkpoint.read_state(ckpt_dir)
            with _signals_deferred():  # all of a registration or none of it
                check_stop()
                reg = register(
                    ckpt_dir,
                    cfg,
                    run_id=plan.run_id,
                    lineage=_lineage(plan, cfg),
                    train_ids=plan.train_ids,
                    val_ids=plan.val_ids,
                    check_stop=check_stop,
                    undo=undo,
                )
        check_stop()
    return result, reg, state


def plan_run(
    store: str,
    cfg: TrainConfig,
    name: str | None = None,
    *,
    created: list | None = None,
    claims: contextlib.ExitStack | None = None,
) -> RunPlan:
    """Check the config, store, fold and network, claim the run folder, find the MLflow run.

    `created`, if given, gets the MLflow run's id as soon as it exists (so that a signal before
    this returns can still end it KILLED). `claims`, if given, holds the run name's lock
    (`claim_name`) until it closes: a second training of the same name and storage refuses.

    Raises:
        InputError: anything that would fail once workers start, as one line.
    """
    from data_store.store import open_store
    from tsesnet.tracking import runs

    check_config(cfg)
    store = store if "://" in str(store) else str(Path(store).expanduser().resolve())
    name = default_run_name(store, cfg) if name is None else names.check(name)
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
    st.check_cases([*train_ids, *val_ids])  # a damaged case stops the run here, in one line
    model_config = _check_network(cfg)
    tracking_uri = runs.tracking_uri()  # resolved once; the workers get it in the plan
    runs.check_tracking(tracking_uri)  # before any Ray: bounded time, one line
    check_resources(cfg)
    storage_path = cfg.run.resolved_storage_path()
    if claims is not None:
        claims.enter_context(claim_name(storage_path, name))
    resumed = checkpoint.claim_run_folder(storage_path, name, model_config, st.fingerprint)
    experiment_id = runs.ensure_database(cfg.run.experiment, tracking_uri)
    run_id, _ = runs.find_or_create_run(experiment_id, name, uri=tracking_uri)
    if created is not None:
        created.append(run_id)
    print(
        f"run {name}: MLflow run {run_id}, checkpoints in {storage_path}/{name}"
        f"{' (resuming from the latest)' if resumed else ''}",
        flush=True,
    )
    return RunPlan(
        config=cfg,
        name=name,
        store=store,
        fingerprint=st.fingerprint,
        train_ids=tuple(train_ids),
        val_ids=tuple(val_ids),
        model_config=model_config,
        storage_path=storage_path,
        experiment_id=experiment_id,
        run_id=run_id,
        resumed=resumed,
        tracking_uri=tracking_uri,
        git_commit=runs.git_commit(),
    )


@contextlib.contextmanager
def claim_name(storage_path: str, name: str):
    """Hold run `name`'s lock (``storage_path/name/.lock``, `data_store.lock.StoreLock`: atomic,
    naming its holder, taken over when the holder is gone) for the block.

    Raises:
        InputError: another live training holds it, naming its host and pid.
    """
    from data_store.location import StoreLocation
    from data_store.lock import LOCK_NAME, StoreLock, read_holder

    folder = f"{storage_path}/{name}"
    location = StoreLocation.parse(folder)
    if location.local:
        os.makedirs(location.root, exist_ok=True)
    else:
        location.fs.makedirs(location.root, exist_ok=True)
    lock = StoreLock(location, wait=0, command=" ".join(sys.argv) or f"train {name}")
    try:
        lock.acquire()
    except InputError:
        _, holder = read_holder(location)
        who = holder.describe() if holder else "an unknown process (its lock is unreadable)"
        raise InputError(
            f"run {name} is already being trained by {who}; wait for it to end or choose "
            f"another {{name}} (its lock: {location.path(LOCK_NAME)})",
            params=["name"],
        ) from None
    try:
        yield
    except BaseException:
        # The run's own error is the one to report: a release that fails too (the object
        # store unreachable) must not replace it; a lock left behind by a process that is
        # gone is taken over by the next training of that name.
        with contextlib.suppress(Exception):
            lock.release()
        raise
    lock.release()


def check_resources(cfg: TrainConfig) -> None:
    """Refuse, in one line, workers that the Ray cluster could never place (Ray would wait for
    them forever): before Ray starts against this machine (`os.cpu_count`, CUDA devices) when a
    local instance is to start; against the cluster's nodes once connected to `$RAY_ADDRESS` or
    an existing session. Each worker needs its CPUs and GPUs on one node.

    Raises:
        InputError: fewer places than `run.workers`, naming the settings and what there is.
    """
    run = cfg.run
    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        from tsesnet.common.cluster import connect

        ray = connect()
        _catch_signals()  # ray.init replaced the SIGTERM handler
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        where = "the Ray cluster's nodes"
    else:
        gpus = 0
        if run.gpus_per_worker > 0:
            import torch

            gpus = torch.cuda.device_count()
        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}]
        where = "this machine (a local Ray starts here)"
    need = {"CPU": run.cpus_per_worker, "GPU": run.gpus_per_worker}
    places = sum(
        min(int(node.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0) for node in nodes
    )
    if places >= run.workers:
        return
    have = ", ".join(
        f"{k} {max((n.get(k, 0.0) for n in nodes), default=0):g}" for k, v in need.items() if v > 0
    )
    raise InputError(
        f"bad config: run.workers={run.workers} x (run.cpus_per_worker={run.cpus_per_worker:g}"
        + (f", run.gpus_per_worker={run.gpus_per_worker:g}" if run.gpus_per_worker else "")
        + f") cannot be placed: {where} have at most {have} on one node, room for {places} "
        "worker(s); Ray would wait forever. Lower them, or use a larger cluster (RAY_ADDRESS)"
    )


def _check_network(cfg: TrainConfig) -> dict:
    """The network's config as training builds it (TA fitted to the patch), checked against the
    patch before Ray starts: one line naming the key and the largest value that fits.

    Returns:
        The `ModelConfig` fields (what a resume must match and the registry stores).
    """
    from tsesnet.model import TSESNet, check_fits

    patch = tuple(cfg.data.patch)
    try:
        config = cfg.model.config(patch=patch)
        check_fits(config, patch, cuda=cfg.run.gpus_per_worker > 0)
        TSESNet(config)  # everything else the network checks when it is built
    except (ValueError, KeyError) as err:
        raise InputError(f"bad model config: {err}") from err
    return dataclasses.asdict(config)


def fit(plan: RunPlan, callbacks: list | None = None):
    """Run the workers on Ray Train (`TorchTrainer`); return Ray's `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tsesnet.common.cluster import connect
    from tsesnet.training.epoch_log import EpochMetricsToMLflow
    from tsesnet.training.worker import train_loop_per_worker

    cfg = plan.config
    use_gpu = cfg.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    connect()
    _catch_signals()  # ray.init replaced the SIGTERM handler
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, plan),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures,
                controller_failure_limit=start_attempts(cfg.run.resource_wait_s) - 1,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=[
                EpochMetricsToMLflow(
                    plan.tracking_uri, plan.run_id, plan.name, cfg.schedule.epochs
                ),
                *(callbacks or []),
            ],
        ),
    )
    import ray

    _forget_divergence(plan)
    alive = {node for node, _ in _alive_nodes(ray)}
    try:
        result = _interruptible(trainer.fit)
    except Exception as err:
        # The loss of a node is often seen first by the workers that are left (gloo's
        # "Connection closed by peer", a failed health check) before Ray declares the node
        # dead: wait a little for that, so that the error can name the node.
        err.tsesnet_lost_nodes = _nodes_lost(
            ray, alive, NODE_DEATH_WAIT_S if _peer_lost(err) else 0
        )
        raise
    _check_finite(plan)
    if result.checkpoint is None:
        raise RuntimeError(f"run {plan.name} finished without a checkpoint")
    return result


def _peer_lost(err: BaseException) -> bool:
    """Whether a failed run's errors look like a worker gone (not a bug in the loop)."""
    failures = getattr(err, "worker_failures", None) or {}
    return any(
        _is_lost_worker(e) or "Connection closed by peer" in str(e) for e in failures.values()
    )


def _nodes_lost(ray, alive: set[str], wait_s: float) -> list[tuple[str, str]]:
    """(ID, address) of the nodes in `alive` that are dead now, waiting up to `wait_s` seconds
    for Ray to declare one dead (its health checks take ~15-30 s)."""
    deadline = time.monotonic() + wait_s
    while True:
        lost = [n for n in _alive_nodes(ray, dead=True) if n[0] in alive]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(1.0)


def _alive_nodes(ray, dead: bool = False) -> list[tuple[str, str]]:
    """(node ID, address) of the cluster's live nodes (or its dead ones); [] if unknown."""
    with contextlib.suppress(Exception):  # the cluster itself may be gone
        return [
            (n["NodeID"], n.get("NodeManagerAddress", "?"))
            for n in ray.nodes()
            if bool(n.get("Alive")) != dead
        ]
    return []


def start_attempts(wait_s: float) -> int:
    """Ray Train's start-ups of the worker group that fit in `wait_s` seconds (at least one).

    Each start-up waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray's default 60 s) for its
    workers; a timed-out one counts as a controller failure, which Ray retries without end
    unless ``controller_failure_limit`` is set. The variable travels to the Train controller in
    the job's runtime env (`data_store.local_ray.FORWARDED_ENV`).
    """
    return max(1, math.ceil(wait_s / _start_timeout_s()))


def _start_timeout_s() -> float:
    return float(os.environ.get(START_TIMEOUT_ENV) or 60.0)


def _forget_divergence(plan: RunPlan) -> None:
    """Remove the divergence record of an earlier attempt of this run (a rerun resumes from
    its last finite checkpoint and is judged on its own)."""
    import mlflow

    from tsesnet.training.run_log import DIVERGED_TAG

    client = mlflow.MlflowClient()
    if DIVERGED_TAG in client.get_run(plan.run_id).data.tags:
        client.delete_tag(plan.run_id, DIVERGED_TAG)


def _check_finite(plan: RunPlan) -> None:
    """Raise `TrainingDiverged` when the workers stopped on a non-finite value (rank 0 set
    `run_log.DIVERGED_TAG`), naming the epoch, the values and the learning rate."""
    import json

    import mlflow

    from tsesnet.training.run_log import DIVERGED_TAG

    tag = mlflow.MlflowClient().get_run(plan.run_id).data.tags.get(DIVERGED_TAG)
    if tag is None:
        return
    record = json.loads(tag)
    bad = ", ".join(f"{k} {v}" for k, v in record["values"].items())
    raise TrainingDiverged(
        f"run {plan.name} diverged at epoch {int(record['epoch']) + 1} ({bad}); stopped, "
        f"nothing registered; lower optim.lr (now {plan.config.optim.lr:g}) or set "
        "optim.grad_clip"
    )


def _interruptible(fn):
    """Run `fn()` in a daemon thread and return what it returns (or raise what it raised),
    leaving Ctrl-C to this thread as a KeyboardInterrupt.

    `TorchTrainer.fit` in the main thread installs its own SIGINT handler, which aborts the run
    and exits the process (status 1) from inside the handler, so the caller could not end the
    MLflow run as KILLED or exit 130. Off the main thread it installs none. Leaving on Ctrl-C
    ends the run's workers with the driver (they are its actors); the last checkpoint stays
    and a rerun resumes from it.
    """
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as err:  # handed to the caller
            out["error"] = err

    thread = threading.Thread(target=target, name="tsesnet-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a short wait, so a signal is acted on at once
        check_stop()  # also when its KeyboardInterrupt was swallowed somewhere
    if "error" in out:
        raise out["error"]
    return out["result"]


def _lineage(plan: RunPlan, cfg: TrainConfig) -> dict:
    return {
        "store": plan.store,
        "store_fingerprint": plan.fingerprint,
        "fold": cfg.data.fold,
        "run_name": plan.name,
        "git_commit": plan.git_commit,
    }


def describe_training_cases(store: str, case_ids) -> TrainingRecord:
    """What the training cases look like, stored with the model so that prediction can warn
    about scans unlike them: phase counts, spacing (mm, Z Y X) per axis, original orientations,
    the largest obliquity (degrees)."""
    import numpy as np

    from data_store.geometry import Geometry
    from data_store.store import open_store

    st = open_store(store)
    phases, spacing, orientations, oblique = [], [], set(), 0.0
    for cid in case_ids:
        entry = st.index[cid]
        phases.append(int(entry["phases"]))
        spacing.append([float(v) for v in entry["spacing"]])
        geometry = Geometry.from_attrs(st.case_attrs(cid)["geometry"])
        orientations.add(geometry.orientation)
        oblique = max(oblique, geometry.obliquity_deg)
    sp = np.asarray(spacing)
    return TrainingRecord(
        phases=(min(phases), max(phases)),
        spacing_mm_min=tuple(sp.min(0).tolist()),
        spacing_mm_max=tuple(sp.max(0).tolist()),
        orientations=tuple(sorted(orientations)),
        obliquity_deg_max=round(oblique, 2),
    )


def register(
    ckpt_dir,
    cfg: TrainConfig,
    *,
    run_id: str,
    lineage: dict,
    train_ids=(),
    val_ids=None,
    promote: bool = True,
    check_stop=None,
    undo: list | None = None,
):
    """Log and register the best weights of a checkpoint, once per run and epoch.

    The one registration path, for `tsesnet train`, sweeps and the science check. A run that
    already registered this checkpoint's epoch (a rerun of a finished run, a resumed sweep)
    keeps its version and registers nothing new; `run.register: false` registers nothing.

    Args:
        ckpt_dir: a checkpoint directory (`tsesnet.training.checkpoint`).
        cfg: the run's config (model, patch, `run.register`, `run.registered_model_name`).
        run_id: the MLflow run the model belongs to.
        lineage: store, store_fingerprint, fold, run_name, git_commit (version tags).
        train_ids: the training cases, described with the model (`describe_training_cases`).
        val_ids: the validation fold's cases, for the validation protocol (None: unknown, and
            the version never takes @champion from a champion).
        promote: False registers as @challenger whatever the gate says (a sweep's best
            without `--promote`).
        check_stop: raises when the registration must not stand (a signal): it is withdrawn.
        undo: gets a function that withdraws it, for a signal before the run ends.

    Returns:
        (version, its alias now or None), or (None, None) when nothing is registered.
    """
    import mlflow

    from tsesnet.tracking.registry import log_and_register
    from tsesnet.training.plan import validation_protocol

    state = checkpoint.read_state(ckpt_dir)
    client = mlflow.MlflowClient()
    name = cfg.run.registered_model_name
    tags = client.get_run(run_id).data.tags
    if tags.get(REGISTERED_AT_TAG) == str(state.epoch):
        version = tags[VERSION_TAG]
        return version, _alias_of(client, name, version)
    if not cfg.run.register:
        return None, None
    best = next((h for h in state.history if h.get("epoch") == state.best_epoch), {})
    print(f"registering the best weights (epoch {int(state.best_epoch) + 1}, val Dice "
          f"{float(state.best_val_dice):.4f}) as a new version of {name}", flush=True)  # fmt: skip
    fp = lineage["store_fingerprint"]
    protocol = None if val_ids is None else validation_protocol(cfg, fp, val_ids)
    reg = log_and_register(
        run_id=run_id,
        weights=checkpoint.load_best(ckpt_dir),
        model_config=dataclasses.asdict(cfg.model.config(patch=tuple(cfg.data.patch))),
        patch=tuple(cfg.data.patch),
        phases=state.phases,
        val_dice=state.best_val_dice,
        val_hd95=best.get("val_hd95"),
        val_sensitivity=best.get("val_sensitivity"),
        min_component_fraction=state.min_component_fraction,
        lineage=lineage,
        name=name,
        training_record=describe_training_cases(lineage["store"], train_ids) if train_ids else None,
        validation=protocol,
        promote=promote,
        check_stop=check_stop,
    )
    client.set_tag(run_id, REGISTERED_AT_TAG, str(state.epoch))
    if undo is not None:
        undo.append(functools.partial(_unregister, reg, run_id))
    print(
        f"registered {reg.name} version {reg.version} as @{reg.alias} ({reg.reason}): "
        f"{reg.model_uri}",
        flush=True,
    )
    return reg.version, reg.alias


def _unregister(reg, run_id: str) -> None:
    """Withdraw a registration whose run was stopped before it ended, and the run's record of
    it (a rerun registers again)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tsesnet.tracking.registry import withdraw

    withdraw(reg, "the run was stopped before it ended")
    client = mlflow.MlflowClient()
    for tag in (REGISTERED_AT_TAG, VERSION_TAG):
        with contextlib.suppress(MlflowException):
            client.delete_tag(run_id, tag)


def _alias_of(client, name: str, version: str) -> str | None:
    """The alias (champion first) that points at `version` now, or None."""
    aliases = client.get_registered_model(name).aliases or {}
    held = sorted(
        (a for a, v in aliases.items() if str(v) == str(version)), key=lambda a: a != "champion"
    )
    return held[0] if held else None


def _first_error_line(err: BaseException, wait_s: float = 600.0) -> str:
    """What failed, on one line: the first worker's exception (a LoaderError names its case),
    else the last line of the error that names one."""
    failures = getattr(err, "worker_failures", None) or {}
    lost_nodes = getattr(err, "tsesnet_lost_nodes", None) or []
    if failures and lost_nodes:
        lost = {r: e for r, e in failures.items() if _is_lost_worker(e)}
        rank, first = min((lost or failures).items())
        what = type(first).__name__
        if not lost:  # a survivor's error: a few words of it say how the loss showed
            what += ": " + " ".join(str(first).split())[:120]
        nodes = ", ".join(f"{nid[:12]} ({addr})" for nid, addr in lost_nodes)
        return (
            f"node {nodes} died during the run (rank {rank}: {what}); "
            "run.max_failures > 0 restarts from the last checkpoint on a node with room"
        )
    if failures:
        # A worker whose process or node died is the cause; the others' errors (gloo's
        # "Connection closed by peer") are what its loss did to them.
        lost = {r: e for r, e in failures.items() if _is_lost_worker(e)}
        rank, first = min((lost or failures).items())
        text = " ".join(str(first).split())
        if lost:
            return f"rank {rank}: {_lost_worker_text(first, text)}"
        return f"rank {rank}: {type(first).__name__}: {text}"
    failure = getattr(err, "controller_failure", None)
    if type(failure).__name__ == "WorkerGroupStartupTimeoutError":
        n = getattr(failure, "num_workers", "the")
        return (
            f"no room on the cluster for {n} worker(s) within run.resource_wait_s={wait_s:g} s "
            f"({start_attempts(wait_s)} start-up(s) of {_start_timeout_s():g} s); free or add "
            "resources, or ask for fewer workers"
        )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else repr(err))


def _is_lost_worker(err: BaseException) -> bool:
    """Whether a worker failure is the worker's actor gone (its process or its node died):
    Ray's actor errors, or Train's failed health check of an actor it cannot reach."""
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError) or type(err).__name__ == "WorkerHealthCheckFailedError"


def _lost_worker_text(err: BaseException, text: str) -> str:
    """ "its node N (IP) died" when the error names a node the cluster now lists as dead, else
    the error's first words; with what `run.max_failures` would have done."""
    import re

    import ray

    hint = "run.max_failures > 0 restarts from the last checkpoint on a node with room"
    found = re.search(r"node_id='([0-9a-f]+)'|[Nn]ode [Ii][Dd]:? ([0-9a-f]{16,})", text)
    node = (found.group(1) or found.group(2)) if found else None
    dead = {}
    with contextlib.suppress(Exception):  # the cluster itself may be gone too
        dead = {n["NodeID"]: n for n in ray.nodes() if not n.get("Alive")}
    if node in dead:
        where = dead[node].get("NodeManagerAddress", "?")
        return f"the worker's node {node[:12]} ({where}) died; {hint}"
    return f"the worker was lost ({type(err).__name__}: {text[:300]}); {hint}"


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached `tsesnet train`. Attributes: signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# SIGINT/SIGTERM to a training driver: remembered here for good, so that a KeyboardInterrupt that
# some library swallows (Ray's SIGTERM handler raised SystemExit wherever the main thread was)
# still stops the run at the next check; raised at once unless deferred.
_STOP: list[int] = []
_DEFERRED = [0]


def _on_signal(signum, frame) -> None:
    first = not _STOP
    _STOP.append(signum)
    if first and not _DEFERRED[0]:
        raise Stopped(signum)


def _catch_signals() -> None:
    """SIGINT and SIGTERM stop the run (main thread only: Tune trials run in other threads)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)


def check_stop() -> None:
    """Raise `Stopped` if SIGINT or SIGTERM arrived."""
    if _STOP:
        raise Stopped(_STOP[0])


@contextlib.contextmanager
def _signals_deferred():
    """A signal in the block is acted on (by `check_stop`) after it."""
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1


def _end_killed(run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")


@contextlib.contextmanager
def ended_as(run_id: str, undo: list | None = None, ends_failed: bool = True):
    """End MLflow run `run_id` as FINISHED when the block completes, KILLED on Ctrl-C (or a
    SIGTERM turned into KeyboardInterrupt), FAILED on any other error; the error propagates.
    With `ends_failed` False only FINISHED is written: the caller ends a run that failed.

    `undo`, if given, holds what the block did that a KILLED run must not keep (a model
    version it registered): called, newest first, before the run is marked KILLED. A signal
    up to the FINISHED marking counts; the run is FINISHED only when none came."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        with _signals_deferred():
            check_stop()  # a signal before the block
        yield
        with _signals_deferred():  # the last look: from here on a signal comes after the run
            check_stop()
            client.set_terminated(run_id, "FINISHED")
    except KeyboardInterrupt:
        with _signals_deferred():  # a second signal must not stop the marking
            for step in reversed(undo or []):
                step()
            if ends_failed:
                client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        if ends_failed:
            client.set_terminated(run_id, "FAILED")
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet train` (read by `cli`)."""
    parser.add_argument("--store", required=True, help="the Zarr store to train on (path or URL)")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a training config YAML, e.g. tsesnet/configs/tiny.yaml (default: the "
        "recommended recipe); `tsesnet config keys` lists every key",
    )
    add_set_option(parser, "override one config key, e.g. --set schedule.epochs=50 (repeatable)")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="Ray Train workers (run.workers)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per worker, 0 for CPU (run.gpus_per_worker)",
    )
    parser.add_argument(
        "--name",
        default=None,
        metavar="RUN",
        help="run name; the same name resumes (default: store, preset, fusion, fold, config hash)",
    )


def cli(args) -> int:
    """`tsesnet train --store STORE [--config FILE] [--set k=v ...] [--workers N] ...`."""
    _catch_signals()
    overrides = list(args.overrides or [])
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"run.gpus_per_worker={args.gpus_per_worker}")
    cfg = load_config(args.config, overrides)
    from ray.train import TrainingFailedError

    from tsesnet.tracking import runs

    try:
        res = train(args.store, cfg, args.name)
    except TrainingDiverged as err:
        disconnect()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingFailedError as err:
        # The workers' traceback is in the command's log (`tsesnet.common.console`; on the
        # console with -v); the run's MLflow status says FAILED.
        from tsesnet.common.console import log_path

        line = _first_error_line(err, cfg.run.resource_wait_s)
        disconnect()
        where = f" (full log: {log_path()})" if log_path() else ""
        print(f"error: training failed: {line}{where}", file=sys.stderr)
        return 1
    print(
        f"run {res.name}: {res.epochs_done} epochs, best val Dice {res.best_val_dice:.4f} "
        f"(epoch {res.best_epoch}); MLflow run {res.run_id}"
    )
    print(
        f"prediction keeps connected components of >= {res.min_component_fraction:g} x the "
        f"largest (chosen on validation: Dice {res.val_dice_filtered:.4f} with it)"
    )
    print(runs.ui_hint())
    print(f"  the run:   {runs.run_link(res.experiment_id, res.run_id)}")
    if res.model_version:
        name = cfg.run.registered_model_name
        print(f"  the model: {runs.model_link(name, res.model_version)}")
    return 0
