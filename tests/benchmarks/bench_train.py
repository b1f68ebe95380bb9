"""Training throughput: one Ray Train worker vs the same loop in plain PyTorch.

Same model (the `tiny` preset at 16x32x32 unless --preset/--patch), same synthetic store,
same sampler, same `train_step`, same thread count. The Ray side is the real `tsesnet train`
path (TorchTrainer with one worker: `prepare_model` adds no DDP at world size 1; MLflow on
rank 0; a checkpoint every epoch). Its per-epoch patches/s is the MLflow metric the loop logs,
timed over the training steps of each epoch exactly as the plain loop times its own. Epoch 0
(warm-up: the case cache fills, allocators settle) is left out of both medians; the plain loop
runs before and after Ray so that a change in machine load shows rather than biases.

    .venv/bin/python tests/benchmarks/bench_train.py [--preset tiny] [--patch 16 32 32] [--epochs 4]
        [--patches-per-epoch 64] [--threads 2] [--repeats 3]

Prints a markdown table with the median ratio over the repeats (target >= 0.95). Epochs of 64
patches: at 16 the per-epoch work of a Ray run (report, checkpoint, MLflow) still runs beside
the next epoch's first steps on a 2-core machine and the ratio measured that instead (0.81
against 0.94 and 1.02 at 64, 2 threads). Two more rows say what Ray's runtime alone costs the
loop: the plain loop again beside an idle local Ray, then beside an idle Ray with as many idle
actor processes as Train ran beside its worker (controller, placement-group cleaner, ...).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_store(out: Path, shape: tuple[int, int, int], cases: int) -> Path:
    from data_store.ingest import ingest
    from data_store.phantom import SynthConfig
    from data_store.synth import write_cohort

    write_cohort(out / "raw", cases, seed=0, config=SynthConfig(shape=shape, phases=4))
    ingest(out / "raw", out / "bench.zarr", folds=2, workers=1, progress=False)
    return out / "bench.zarr"


def plain_pytorch(store: str, cfg, epochs: int, threads: int) -> list[float]:
    """The training epochs of `train_loop_per_worker` without Ray: patches/s per epoch."""
    import numpy as np
    import torch

    from data_store.sampler import PatchSampler
    from data_store.store import open_store
    from tsesnet.training.worker import train_step

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.schedule.seed)
    st = open_store(store)
    train_ids, _ = st.split(cfg.data.fold)
    net = cfg.model.build()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    sampler = PatchSampler(
        st,
        train_ids,
        cfg.data,
        seed=cfg.schedule.seed,
    )
    steps = math.ceil(cfg.data.patches_per_epoch / cfg.data.batch_size)
    rates = []
    net.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.schedule.seed * 1_000_003 + epoch * 1009)
        it = sampler.patches(epoch, steps * cfg.data.batch_size)
        n = 0
        for _ in range(steps):
            pairs = [next(it) for _ in range(cfg.data.batch_size)]
            x = torch.from_numpy(np.stack([p[0] for p in pairs]))  # (B, T, Z, Y, X)
            y = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (B, Z, Y, X)
            train_step(net, opt, x, y, cfg, gen, use_bf16=False)
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
        print(f"plain epoch {epoch}: {rates[-1]:.3f} patches/s", file=sys.stderr, flush=True)
    return rates


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (command, user + system CPU seconds)} of every process (Linux /proc)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (cmd, (int(stat[11]) + int(stat[12])) / tick)
    return out


# Ray's own processes, present with or without Train; every other `ray::` process seen during a
# Ray run (controller, placement-group cleaner, synchronisation actor, ...) is Train's.
RAY_CORE_ACTORS = ("RayTrainWorker", "DashboardAgent", "RuntimeEnvAgent", "IDLE")


def ray_train(
    store: str, cfg, epochs: int, threads: int, name: str
) -> tuple[list[float], str, int]:
    """The real `tsesnet.training.driver.train` with one worker; patches/s per epoch from MLflow.

    Also prints where the CPU went during the run: the training worker against every other
    process (Ray's GCS, raylet, dashboard and Train controller, anything else running). Returns
    the rates, the worker's torch threads and how many actor processes Train ran beside its
    worker.
    """
    import mlflow
    import ray

    from tsesnet.common.cluster import connect
    from tsesnet.training.driver import train

    connect()  # the local Ray `tsesnet train` starts
    # sampled every second: the training worker exits before train() returns
    before, seen, done = cpu_seconds(), {}, threading.Event()

    def sample():
        while not done.wait(1.0):
            seen.update(cpu_seconds())

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    try:
        res = train(store, cfg, name)
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
    wall = time.perf_counter() - t0
    after = {**seen, **cpu_seconds()}
    used = {pid: cpu - before.get(pid, ("", 0.0))[1] for pid, (_, cpu) in after.items()}
    worker = sum(v for pid, v in used.items() if "RayTrainWorker" in after[pid][0])
    print(
        f"CPU during the Ray run ({wall:.0f} s wall): training worker {worker / wall:.2f} cores, "
        f"all other processes {(sum(used.values()) - worker) / wall:.2f} cores",
        file=sys.stderr,
        flush=True,
    )
    others = sorted(
        ((v, after[pid][0]) for pid, v in used.items() if "RayTrainWorker" not in after[pid][0]),
        reverse=True,
    )
    for v, cmd in others[:8]:
        print(f"  {v / wall:.3f} cores  {cmd[:90]}", file=sys.stderr, flush=True)
    client = mlflow.MlflowClient()
    hist = sorted(client.get_metric_history(res.run_id, "patches_per_s"), key=lambda m: m.step)
    threads_used = client.get_run(res.run_id).data.tags.get("sys.torch_threads", "?")
    assert len(hist) == epochs, hist
    train_actors = {
        pid
        for pid, (cmd, _) in after.items()
        if pid not in before
        and cmd.startswith("ray::")
        and not any(cmd.startswith(f"ray::{a}") for a in RAY_CORE_ACTORS)
    }
    return [m.value for m in hist], threads_used, len(train_actors)


def plain_beside_idle_ray(store: str, cfg, epochs: int, threads: int, actors: int) -> list[float]:
    """The plain loop while a local Ray (started as `tsesnet train` starts it) idles beside it,
    with `actors` idle actor processes: what Ray's runtime alone costs the loop on this machine."""
    import ray

    from tsesnet.common.cluster import connect

    connect()

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            return os.getpid()

    handles = [Idle.remote() for _ in range(actors)]
    try:
        ray.get([h.pid.remote() for h in handles])
        return plain_pytorch(store, cfg, epochs, threads)
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--patches-per-epoch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="Ray runs, each between plain runs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    load = os.getloadavg()[0]

    from tsesnet.training.config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    store = str(make_store(work, tuple(args.patch), cases=4))
    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            f"data.patch=[{','.join(map(str, args.patch))}]",
            f"data.patches_per_epoch={args.patches_per_epoch}",
            f"schedule.epochs={args.epochs}",
            f"schedule.val_every={args.epochs}",
            "data.max_val_cases=1",
            "data.val_overlap=0.0",
            f"run.cpus_per_worker={args.threads}",
            f"run.storage_path={work / 'ray_results'}",
            "run.register=false",
        ],
    )
    # Plain before and after each Ray run, so a change in machine load shows up rather than
    # biasing; each Ray run is compared with the plain runs either side of it.
    plain = [plain_pytorch(store, cfg, args.epochs, args.threads)]
    on_ray, ratios = [], []
    for i in range(args.repeats):
        rates, ray_threads, train_actors = ray_train(
            store, cfg, args.epochs, args.threads, f"bench-{i}"
        )
        on_ray.append(rates)
        plain.append(plain_pytorch(store, cfg, args.epochs, args.threads))
        p = statistics.median(plain[i][1:] + plain[i + 1][1:])
        ratios.append(statistics.median(rates[1:]) / p)
    # Where the gap comes from: the same plain loop beside an idle Ray, then beside an idle Ray
    # with as many idle actor processes as Train ran beside its worker.
    floors = {
        n: plain_beside_idle_ray(store, cfg, args.epochs, args.threads, n)
        for n in (0, train_actors)
    }
    plain_all = statistics.median(r for rates in plain for r in rates[1:])
    print(
        f"preset {args.preset}, patch {tuple(args.patch)}, {args.patches_per_epoch} patches "
        f"x {args.epochs} epochs (epoch 0 = warm-up, excluded), batch 1, CPU, "
        f"torch threads: plain {args.threads}, Ray worker {ray_threads}; "
        f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
        f"{os.cpu_count()} cores\n"
    )
    print("| loop | patches/s (median) | per epoch | ratio Ray/plain (plain either side) |")
    print("|---|---:|---|---:|")
    for i, rates in enumerate(plain):
        print(
            f"| plain PyTorch {i} | {statistics.median(rates[1:]):.3f} "
            f"| {', '.join(f'{v:.2f}' for v in rates)} | |"
        )
        if i < len(on_ray):
            print(
                f"| Ray Train, 1 worker, run {i} | {statistics.median(on_ray[i][1:]):.3f} "
                f"| {', '.join(f'{v:.2f}' for v in on_ray[i])} | {ratios[i]:.3f} |"
            )
    for n, rates in floors.items():
        what = f"an idle Ray and {n} idle actors (as many as Train ran)" if n else "an idle Ray"
        print(
            f"| plain PyTorch beside {what} | {statistics.median(rates[1:]):.3f} "
            f"| {', '.join(f'{v:.2f}' for v in rates)} "
            f"| {statistics.median(rates[1:]) / plain_all:.3f} (vs all plain runs) |"
        )
    print(
        f"\n**ratio Ray/plain: {statistics.median(ratios):.3f}** (median of {len(ratios)}; "
        f"target >= 0.95)"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
