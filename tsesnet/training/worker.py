"""The per-worker training function Ray Train runs in each worker process.

Shape legend: B batch, T phases, Z Y X voxels.

Read `train_loop_per_worker` first: it is Ray's per-worker pattern. Every rank samples its own
patches (the sampler is sharded by rank), steps the DDP-wrapped network and reports once per
epoch; ranks split the validation cases and gather the per-case metrics, so every rank takes the
same early-stopping decision and reports the same number of times. Rank 0 alone writes
checkpoints and logs to MLflow (`tsesnet.training.run_log`). Checkpoints hold the unwrapped
module's `state_dict` (`tsesnet.training.checkpoint`), so a restarted or resumed run continues
where it stopped.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from tsesnet.training import checkpoint
from tsesnet.training.checkpoint import TrainState
from tsesnet.training.config import TrainConfig
from tsesnet.training.plan import RunPlan
from tsesnet.training.run_log import RunLog


@dataclass(frozen=True)
class Rank:
    """This worker's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def train_loop_per_worker(plan: RunPlan) -> None:
    """Ray Train's per-worker function (the driver binds the run's `plan` to it)."""
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = plan.config
    ctx = ray.train.get_context()
    me = Rank(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    torch.manual_seed(cfg.schedule.seed)
    model, optimizer, state, best, resumed = _build(cfg, me)
    module = model.module if hasattr(model, "module") else model
    data = EpochData(plan, me)  # starts this rank's loader processes, once for the run
    log = RunLog(plan, me, state, resumed)
    nodes = len(set(_gather(ray.get_runtime_context().get_node_id(), me.world)))
    model.train()
    try:
        for epoch in range(state.epoch + 1, cfg.schedule.epochs):
            if state.stopped_early:
                break
            t0 = time.perf_counter()
            metrics, n_seen = run_epoch(model, optimizer, data, cfg, epoch, me)
            state.phases = data.phases
            improved, montage, pictures = False, None, {}
            if cfg.schedule.validates(epoch):
                val, montage, pictures = validate_epoch(module, data, cfg, me)
                metrics.update(val, val_time_s=time.perf_counter() - t0 - metrics["train_time_s"])
                improved = _record_validation(state, epoch, val)
            if improved or best is None:
                best = _cpu_state(module)
            state.stopped_early = should_stop(state, epoch, cfg)
            metrics.update(_ddp_checks(module, n_seen, me), nodes=nodes, resumed_from_epoch=resumed)
            diverged = _diverged(metrics, module, me)
            _finish_epoch(state, epoch, metrics, t0)
            shown = improved and not diverged
            log.epoch(epoch, metrics, state, montage if shown else None, pictures if shown else {})
            if diverged:
                # Every rank agrees (gathered): rank 0 records why in the MLflow run, all report
                # once more without a checkpoint (the weights are not finite) and stop; the
                # driver then registers nothing.
                log.diverged(epoch, metrics, diverged)
                ray.train.report(metrics, checkpoint=None)
                break
            _report(epoch, metrics, cfg, me, module, optimizer, best, state)
    finally:
        data.close()
    log.close()


# Validation cases drawn as `predict` draws them, logged to MLflow at each better epoch (the
# run ends with the best epoch's): the first few of the validation fold.
PICTURE_CASES = 3
# Values that must stay finite; one that does not means the run diverged (e.g. optim.lr too high).
FINITE_METRICS = (
    "train_total",
    "train_dice",
    "train_tsc",
    "train_bce",
    "val_dice",
    "val_soft_dice",
)


def _diverged(metrics: dict, module, me: Rank) -> list[str]:
    """The loss terms, validation scores and "weights" that are not finite on any rank (the
    same list on every rank, so that all stop together); empty when all are."""
    checks = {k: metrics[k] for k in FINITE_METRICS if k in metrics}
    checks["weights"] = _weights_checksum(module)
    bad = [k for k, v in checks.items() if not math.isfinite(float(v))]
    return sorted({k for part in _gather(bad, me.world) for k in part})


def _finish_epoch(state: TrainState, epoch: int, metrics: dict, t0: float) -> None:
    """The running bests and the epoch time into `metrics`; the epoch into the state's history."""
    metrics["best_val_dice"] = state.best_val_dice
    soft = [h["val_soft_dice"] for h in state.history if "val_soft_dice" in h]
    soft += [metrics["val_soft_dice"]] if "val_soft_dice" in metrics else []
    metrics["best_val_soft_dice"] = max(soft, default=0.0)
    metrics["epoch_time_s"] = time.perf_counter() - t0
    state.epoch = epoch
    state.history.append({k: v for k, v in metrics.items() if isinstance(v, float | int)})


# ------------------------------------------------------------------------------ set-up


def _build(cfg: TrainConfig, me: Rank):
    """The DDP-wrapped network and its optimizer, restored from Ray's checkpoint if there is one.

    Returns:
        (model, optimizer, state, best weights or None, epoch resumed from or -1).
    """
    import ray.train
    import ray.train.torch

    net = cfg.model.build(patch=tuple(cfg.data.patch))  # as the driver checked it
    optimizer = torch.optim.Adam(
        net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    state, best, resumed = TrainState(), None, -1
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with checkpoint.local_directory(ckpt) as d:
            state, best = checkpoint.restore(d, net, optimizer)
        state.restarts += 1
        resumed = state.epoch
    net = _runtime_options(net, cfg, me)
    model = ray.train.torch.prepare_model(net)  # DDP over gloo (CPU) or NCCL (GPU)
    # Adam's state was loaded on CPU; move it next to the parameters.
    for s in optimizer.state.values():
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(me.device)
    return model, optimizer, state, best, resumed


def _runtime_options(net, cfg: TrainConfig, me: Rank):
    """`model.channels_last` and `run.compile` on CUDA; on CPU a note says they are ignored.

    The checkpoint keeps the uncompiled module's weights: `torch.compile` wraps the module in
    place (`net.compile()`), so `state_dict` keys are unchanged.
    """
    wanted = [
        k
        for k, on in (
            ("model.channels_last", cfg.model.channels_last),
            ("run.compile", cfg.run.compile),
        )
        if on
    ]
    if me.device.type != "cuda":
        if wanted and me.is_zero:
            print(f"note: {', '.join(wanted)} apply on CUDA only; ignored on CPU", flush=True)
        return net
    net = net.to(me.device)
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if cfg.run.compile:
        net.compile()
    return net


class EpochData:
    """This rank's training batches (loaded in background processes, `data.loader_workers`)
    and validation cases."""

    def __init__(self, plan: RunPlan, me: Rank):
        from data_store.patch_loader import PatchLoader
        from data_store.store import open_store

        cfg = plan.config
        self.store = open_store(plan.store)
        gpu = me.device.type == "cuda"
        workers, note = cfg.data.resolved_loader_workers(cfg.run.cpus_per_worker, gpu)
        if note and me.is_zero:
            print(f"note: data.loader_workers: {note}", flush=True)
        self.loader = PatchLoader(
            self.store,
            list(plan.train_ids),
            cfg.data,  # a DataConfig is the sampler's config
            batch_size=cfg.data.batch_size,
            seed=cfg.schedule.seed,
            rank=me.rank,
            world_size=me.world,
            workers=workers,
            pin_memory=gpu,
        )
        self.steps = self.loader.steps_per_epoch
        val_ids = list(plan.val_ids)
        if cfg.data.max_val_cases > 0:
            val_ids = val_ids[: cfg.data.max_val_cases]
        self.my_val_ids = val_ids[me.rank :: me.world]
        self.montage_case = val_ids[0] if me.is_zero else None
        self.picture_cases = tuple(val_ids[:PICTURE_CASES])  # each rank draws its own
        self.phases: int | None = None  # T of the last batch

    def batches(self, epoch: int, device: torch.device):
        """Yield `steps` batches `(x (B, T, Z, Y, X), y (B, Z, Y, X))` float32 on `device`
        (copied from pinned memory without blocking on CUDA).

        Raises:
            LoaderError: a loader process died or stalled, naming the case it was reading.
        """
        for x, y in self.loader.epoch(epoch, self.steps):
            self.phases = int(x.shape[1])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def close(self) -> None:
        self.loader.close()


# ------------------------------------------------------------------------------ one epoch


def train_step(model, optimizer, x, y, cfg: TrainConfig, generator, use_bf16: bool) -> dict:
    """One optimisation step on a batch; returns the loss terms (Eq. 10) as floats.

    Args:
        model: the (DDP-wrapped) network.
        x: (B, T, Z, Y, X) float32 patches; y: (B, Z, Y, X) float32 masks.
        cfg: the `TrainConfig` (loss weights, gradient clipping).
        generator: seeds the TSC loss's voxel sampling.
        use_bf16: autocast the forward pass to bf16 (GPU).
    """
    from tsesnet.losses import total_loss

    with torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
        logits, feats = model(x, return_features=True)
    # Eq. 10 in float32: the losses cast logits and features up themselves.
    loss, terms = total_loss(logits, feats, y, cfg.loss, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return terms


def run_epoch(model, optimizer, data: EpochData, cfg: TrainConfig, epoch: int, me: Rank):
    """One pass over this rank's patches of `epoch`.

    Returns:
        (metrics: mean loss terms, lr, patches/s over all ranks, training time; patches seen).
    """
    t0 = time.perf_counter()
    lr = cfg.optim.lr_at(epoch, cfg.schedule.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    gen = torch.Generator(device=me.device).manual_seed(
        cfg.schedule.seed * 1_000_003 + epoch * 1009 + me.rank
    )
    use_bf16 = me.device.type == "cuda" and cfg.optim.bf16
    sums = {"dice": 0.0, "tsc": 0.0, "bce": 0.0, "total": 0.0}
    n_seen, wait, norms = 0, 0.0, {}
    batches = iter(data.batches(epoch, me.device))
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)  # the time the step waits for its data
        wait += time.perf_counter() - t_wait
        if batch is None:
            break
        x, y = batch
        # What each loss term puts on the shared encoder, on the first batch holding tumour
        # (TSC contrasts tumour with background: it is 0 on a batch without).
        if me.is_zero and not norms and bool(y.any()):
            norms = _gradient_norms(model, x, y, cfg, epoch)
        terms = train_step(model, optimizer, x, y, cfg, gen, use_bf16)
        for k in sums:
            sums[k] += terms[k]
        n_seen += x.shape[0]
    if me.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    metrics = {f"train_{k}": v / data.steps for k, v in sums.items()}
    # Every rank did the same number of steps; global throughput counts all of them.
    metrics.update(patches_per_s=n_seen * me.world / train_s, lr=lr, epoch=epoch)
    metrics.update(train_time_s=train_s, data_wait_s=wait, data_wait_fraction=wait / train_s)
    metrics.update(norms)
    return metrics, n_seen


def _gradient_norms(model, x, y, cfg: TrainConfig, epoch: int) -> dict[str, float]:
    """`grad_norm_dice`, `grad_norm_tsc`, `grad_norm_bce` on one batch (rank 0; one forward and a
    backward per term, `.grad` untouched, outside DDP: no collective)."""
    from tsesnet.losses import term_gradient_norms

    gen = torch.Generator().manual_seed(cfg.schedule.seed * 7919 + epoch)
    return term_gradient_norms(model, x, y, cfg.loss, generator=gen)


def validate_epoch(module, data: EpochData, cfg: TrainConfig, me: Rank):
    """Validate this rank's cases, gather every rank's, and choose the component filter.

    Returns:
        (val_dice, val_hd95, val_sensitivity, val_dice_filtered, val_min_component_fraction;
        the overlay montage of rank 0's first case, or None; PNG bytes by case ID of the
        `EpochData.picture_cases`).
    """
    from tsesnet.postprocess import choose_fraction
    from tsesnet.training.validation import mean_metrics, validate

    rows, montage = validate(
        module,
        data.store,
        data.my_val_ids,
        cfg,
        me.device,
        montage_of=data.montage_case,
        pictures_of=data.picture_cases,
    )
    rows = [r for part in _gather(rows, me.world) for r in part]
    pictures = {r["case"]: r.pop("picture") for r in rows if "picture" in r}
    out = {f"val_{k}": v for k, v in mean_metrics(rows).items()}
    out["val_soft_dice"] = float(np.mean([r["soft_dice"] for r in rows]))
    fraction, out["val_dice_filtered"] = choose_fraction([r["dice_by_fraction"] for r in rows])
    out["val_min_component_fraction"] = fraction
    return out, montage, pictures


def _record_validation(state: TrainState, epoch: int, val: dict) -> bool:
    """Keep a better validation Dice (and its filter) in the state; True when it improved."""
    if not val["val_dice"] > state.best_val_dice:
        return False
    state.best_val_dice = val["val_dice"]
    state.best_epoch = epoch
    state.min_component_fraction = val["val_min_component_fraction"]
    state.val_dice_filtered = val["val_dice_filtered"]
    return True


def should_stop(state: TrainState, epoch: int, cfg: TrainConfig) -> bool:
    """Early stopping: no better validation Dice for `early_stop_patience` epochs."""
    patience = cfg.schedule.early_stop_patience
    return state.best_epoch >= 0 and epoch - state.best_epoch >= patience


def _report(epoch, metrics, cfg: TrainConfig, me: Rank, module, optimizer, best, state) -> None:
    """Report the epoch to Ray Train on every rank; rank 0 attaches a checkpoint when due."""
    import ray.train

    last = state.stopped_early or epoch == cfg.schedule.epochs - 1
    due = last or (epoch + 1) % cfg.schedule.checkpoint_every == 0
    if me.is_zero and due:
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(d, module, optimizer, best, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics, checkpoint=None)


# ------------------------------------------------------------------------------ DDP helpers


def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _weights_checksum(module) -> float:
    """A float64 fingerprint of all parameters: equal on every rank when DDP is in sync."""
    with torch.no_grad():
        return float(
            sum(
                p.detach().double().abs().sum() + p.detach().double().sum() * 1e-3
                for p in module.parameters()
            )
        )


def _ddp_checks(module, n_seen: int, me: Rank) -> dict:
    """DDP sanity: identical weights on every rank (max difference), and how many ranks stepped."""
    sums = _gather((_weights_checksum(module), n_seen), me.world)
    return {
        "weights_max_diff": max(c for c, _ in sums) - min(c for c, _ in sums),
        "ranks_trained": sum(1 for _, n in sums if n > 0),
    }


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _quiet_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO from each worker; the loop
    prints its own one-line epoch summary, so keep only Ray Train's warnings there."""
    import logging

    from tsesnet.compat import train_report_logger_name

    name = train_report_logger_name()  # an internal module: its logger is named after its file
    if name is not None:
        logging.getLogger(name).setLevel(logging.WARNING)
