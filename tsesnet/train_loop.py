"""The per-worker training function Ray Train runs in each worker process.

Shape legend: B batch, T phases, Z Y X voxels.

Every rank samples its own patches (the sampler is sharded by rank), steps the DDP-wrapped
network and reports once per epoch; ranks split the validation cases, and the per-case metrics
are gathered so every rank takes the same early-stopping decision. Rank 0 alone writes
checkpoints and logs to MLflow (STYLE.md §7). Checkpoints hold the unwrapped module's
`state_dict`, the optimizer, the best weights so far and a JSON state, so a restarted or resumed
run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.json"


def read_checkpoint_state(ckpt_dir: str | Path) -> dict:
    """The JSON state of a checkpoint directory written by this loop."""
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def _load_checkpoint(ckpt_dir: Path, model, optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer in place; return (state, best weights)."""
    model.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(
        torch.load(ckpt_dir / "optim.pt", map_location="cpu", weights_only=True)
    )
    best = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)
    return read_checkpoint_state(ckpt_dir), best


def _save_checkpoint(ckpt_dir: Path, model, optimizer, best: dict, state: dict) -> None:
    torch.save(model.state_dict(), ckpt_dir / "model.pt")
    torch.save(optimizer.state_dict(), ckpt_dir / "optim.pt")
    torch.save(best, ckpt_dir / "best.pt")
    (ckpt_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


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


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean DSC, HD95 and sensitivity over `validate`'s per-case rows (non-finite values left
    out; NaN when none is finite)."""
    out = {}
    for k in ("dice", "hd95", "sensitivity"):
        vals = [r[k] for r in rows if math.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def validate(module, store, case_ids, cfg, device, want_montage_of: str | None = None):
    """Full-volume sliding-window validation of `case_ids`: per-case DSC, HD95 (mm), sensitivity,
    and the Dice after each connected-component filter (`tsesnet.postprocess`).

    Returns:
        (list of per-case metric dicts, montage inputs for `want_montage_of` or None).
    """
    from data_store.normalize import normalize_intensity
    from tsesnet.inference import sliding_window_inference
    from tsesnet.metrics import dice, hd95, sensitivity
    from tsesnet.postprocess import component_dices

    rows, montage = [], None
    use_bf16 = device.type == "cuda" and cfg["optim"]["bf16"]
    for cid in case_ids:
        case = store.read_case(cid)
        vol = normalize_intensity(case.image, *case.percentiles)  # (T, Z, Y, X) float32
        with torch.no_grad():
            logits = sliding_window_inference(
                module,
                torch.from_numpy(np.ascontiguousarray(vol)),
                patch=tuple(cfg["data"]["patch"]),
                overlap=cfg["data"]["val_overlap"],
                batch_size=cfg["data"]["val_batch_size"],
                device=device,
                amp_dtype=torch.bfloat16 if use_bf16 else None,
            )  # (1, 1, Z, Y, X)
        pred = (logits[0, 0] > 0).numpy()
        gt = case.mask.astype(bool)
        rows.append(
            {
                "case": cid,
                "dice": float(dice(pred, gt)),
                "hd95": float(hd95(pred, gt, case.spacing)),
                "sensitivity": float(sensitivity(pred, gt)),
                "dice_by_fraction": component_dices(pred, gt),
            }
        )
        if cid == want_montage_of:
            montage = (vol, gt, pred, cid)
    return rows, montage


def _quiet_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO from each worker; the loop
    prints its own one-line epoch summary, so keep only Ray Train's warnings there."""
    import logging

    try:  # an internal module: its logger is named after its file
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def sampler_config(data):
    """The sampler settings of a training config's `data` section."""
    from data_store.sampler import SamplerConfig

    return SamplerConfig(
        patch=tuple(data.patch),
        fg_fraction=data.fg_fraction,
        augment=data.augment,
        cache_bytes=data.cache_bytes,
    )


def train_step(model, optimizer, x, y, cfg, generator, use_bf16: bool) -> dict[str, float]:
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


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function; `loop_config` is built by `tsesnet.train.train`."""
    import mlflow
    import ray.train
    import ray.train.torch

    from data_store.sampler import PatchSampler
    from data_store.store import open_store
    from tsesnet import tracking
    from tsesnet.config import flatten, from_dict
    from tsesnet.postprocess import choose_fraction
    from tsesnet.train import TrainConfig

    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg_d = loop_config["config"]
    cfg = from_dict(TrainConfig, cfg_d)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.schedule.seed)

    net = cfg.model.build()
    optimizer = torch.optim.Adam(
        net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    state = {
        "epoch": -1,
        "best_val_dice": -1.0,
        "best_epoch": -1,
        "history": [],
        "stopped_early": False,
        "phases": None,
        "restarts": 0,
    }
    best_weights = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, best_weights = _load_checkpoint(Path(d), net, optimizer)
        state["restarts"] = state.get("restarts", 0) + 1
    start_epoch = state["epoch"] + 1
    resumed_from = state["epoch"] if ckpt is not None else -1

    model = ray.train.torch.prepare_model(net)  # DDP over gloo (CPU) or NCCL (GPU)
    module = model.module if hasattr(model, "module") else model
    # Adam's state was loaded on CPU; move it next to the parameters.
    for s in optimizer.state.values():
        for k, v in s.items():
            if torch.is_tensor(v) and k != "step":
                s[k] = v.to(device)

    store = open_store(loop_config["store"])
    sampler = PatchSampler(
        store,
        loop_config["train_ids"],
        sampler_config(cfg.data),
        seed=cfg.schedule.seed,
        rank=rank,
        world_size=world,
    )
    val_ids = loop_config["val_ids"]
    if cfg.data.max_val_cases > 0:
        val_ids = val_ids[: cfg.data.max_val_cases]
    my_val_ids = val_ids[rank::world]
    montage_case = val_ids[0] if rank == 0 else None
    per_rank = math.ceil(cfg.data.patches_per_epoch / world)
    steps = math.ceil(per_rank / cfg.data.batch_size)
    use_bf16 = device.type == "cuda" and cfg.optim.bf16

    if rank == 0:
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        mlflow.start_run(run_id=loop_config["run_id"])
        if ckpt is None:
            _log_run_start(cfg, cfg_d, loop_config, world, device, flatten, tracking)
        else:
            from tsesnet.config import dump_yaml

            mlflow.set_tag("tsesnet.restarts", str(state["restarts"]))
            # The config may differ from the first start's (e.g. more epochs): keep each one.
            mlflow.log_text(dump_yaml(cfg), f"config/resumed_{state['restarts']}.yaml")
            print(f"[rank 0] resumed from the checkpoint of epoch {state['epoch']}", flush=True)

    node_ids = _gather(ray.get_runtime_context().get_node_id(), world)
    model.train()
    for epoch in range(start_epoch, cfg.schedule.epochs):
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr_at(epoch, cfg.schedule.epochs)
        sums = {"dice": 0.0, "tsc": 0.0, "bce": 0.0, "total": 0.0}
        gen = torch.Generator(device=device).manual_seed(
            cfg.schedule.seed * 1_000_003 + epoch * 1009 + rank
        )
        it = sampler.patches(epoch, steps * cfg.data.batch_size)
        n_seen = 0
        for _ in range(steps):
            imgs, masks = [], []
            for _ in range(cfg.data.batch_size):
                img, msk = next(it)
                imgs.append(img)
                masks.append(msk)
            x = torch.from_numpy(np.stack(imgs)).to(device, non_blocking=True)  # (B, T, Z, Y, X)
            y = torch.from_numpy(np.stack(masks)).to(device, non_blocking=True)  # (B, Z, Y, X)
            state["phases"] = int(x.shape[1])
            terms = train_step(model, optimizer, x, y, cfg, gen, use_bf16)
            for k in sums:
                sums[k] += terms[k]
            n_seen += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        metrics = {f"train_{k}": v / steps for k, v in sums.items()}
        # Every rank did the same number of steps; global throughput counts all of them.
        metrics["patches_per_s"] = n_seen * world / train_s
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch"] = epoch

        validated = epoch % cfg.schedule.val_every == cfg.schedule.val_every - 1 or (
            epoch == cfg.schedule.epochs - 1
        )
        improved = False
        montage = None
        if validated:
            rows, montage = validate(
                module, store, my_val_ids, cfg_d, device, want_montage_of=montage_case
            )
            rows = [r for part in _gather(rows, world) for r in part]
            metrics.update({f"val_{k}": v for k, v in mean_metrics(rows).items()})
            fraction, metrics["val_dice_filtered"] = choose_fraction(
                [r["dice_by_fraction"] for r in rows]
            )
            metrics["val_min_component_fraction"] = fraction
            if metrics["val_dice"] > state["best_val_dice"]:
                improved = True
                state.update(
                    best_val_dice=metrics["val_dice"],
                    best_epoch=epoch,
                    min_component_fraction=fraction,
                    val_dice_filtered=metrics["val_dice_filtered"],
                )
                best_weights = _cpu_state(module)
            metrics["val_time_s"] = time.perf_counter() - t0 - train_s
        if best_weights is None:
            best_weights = _cpu_state(module)
        if (
            state["best_epoch"] >= 0
            and epoch - state["best_epoch"] >= cfg.schedule.early_stop_patience
        ):
            state["stopped_early"] = True  # no better val Dice for `patience` epochs
            if rank == 0:
                print(
                    f"early stop after epoch {epoch + 1}: best val Dice at epoch "
                    f"{state['best_epoch'] + 1}",
                    flush=True,
                )
        last = state["stopped_early"] or epoch == cfg.schedule.epochs - 1
        # DDP sanity: identical weights on every rank, every rank stepped.
        sums_all = _gather((_weights_checksum(module), n_seen), world)
        metrics["weights_max_diff"] = max(c for c, _ in sums_all) - min(c for c, _ in sums_all)
        metrics["ranks_trained"] = sum(1 for _, n in sums_all if n > 0)
        metrics["nodes"] = len(set(node_ids))
        metrics["best_val_dice"] = state["best_val_dice"]
        metrics["resumed_from_epoch"] = resumed_from
        metrics["epoch_time_s"] = time.perf_counter() - t0
        state["epoch"] = epoch
        state["history"].append({k: v for k, v in metrics.items() if isinstance(v, float | int)})

        if rank == 0:
            mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch
            )
            if validated:
                tracking.log_learning_curves(state["history"])
            if improved and montage is not None:
                tracking.log_overlay_montage(*montage)
            print(_epoch_line(epoch, cfg.schedule.epochs, metrics), flush=True)

        save = last or (epoch + 1) % cfg.schedule.checkpoint_every == 0
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(Path(d), module, optimizer, best_weights, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)

    if rank == 0:
        mlflow.end_run()


def _epoch_line(epoch: int, epochs: int, m: dict) -> str:
    line = (
        f"[epoch {epoch + 1}/{epochs}] loss {m['train_total']:.4f} (dice {m['train_dice']:.4f}, "
        f"tsc {m['train_tsc']:.4f}, bce {m['train_bce']:.4f}) {m['patches_per_s']:.2f} patches/s"
    )
    if "val_dice" in m:
        line += (
            f" | val DSC {m['val_dice']:.4f} HD95 {m['val_hd95']:.2f} mm "
            f"sens {m['val_sensitivity']:.4f}, filtered DSC {m['val_dice_filtered']:.4f} "
            f"(components >= {m['val_min_component_fraction']:g} x largest)"
        )
    return line


def _log_run_start(cfg, cfg_d, loop_config, world, device, flatten, tracking) -> None:
    """Rank 0, first start only: resolved config, system info, data lineage."""
    import mlflow

    from tsesnet.config import dump_yaml

    params = {k: str(v)[:500] for k, v in flatten(cfg_d).items()}
    mlflow.log_params(params)
    mlflow.log_text(dump_yaml(cfg), "config/resolved.yaml")
    tags = tracking.system_info()
    tags.update(
        {
            "sys.workers": str(world),
            "sys.device": str(device),
            "data.store": loop_config["store"],
            "data.store_fingerprint": loop_config["store_fingerprint"],
            "data.fold": str(cfg.data.fold),
            "data.n_train": str(len(loop_config["train_ids"])),
            "data.n_val": str(len(loop_config["val_ids"])),
            "code.git_commit": loop_config["git_commit"],
            "tsesnet.run_name": loop_config["run_name"],
        }
    )
    mlflow.set_tags(tags)
