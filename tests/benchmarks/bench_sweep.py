"""TPE + ASHA against random search without early stopping, at the same total epoch budget.

On a synthetic cohort with the tiny preset (`tsesnet/configs/sweep_tiny.yaml`'s space), for
each seed: random search runs `--random-trials` trials of `--epochs` epochs each (FIFO, no early
stopping), which fixes the budget B = trials x epochs; TPE + ASHA then runs until it too has
trained B epochs (a Tune stopper counts the epochs of every trial). Both are replayed in the
order their epochs finished: after e epochs spent, what is the best validation Dice seen so
far? The table gives the epochs each needed to reach 95 % of random search's best, and the ratio
random / (TPE + ASHA): above 1 means TPE + ASHA got there on fewer epochs. Every trial's
parameters and best validation Dice go to `trials.csv` in the working folder, and the summary
says how many trials learned at all on either side of tau = 0.01 and of lr = 1e-3.

Defaults: 8 random trials of 6 epochs of 64 patches (a budget of 48 epochs), ASHA with a grace
period of 2 epochs and a reduction factor of 3 (a trial stopped at its first rung has seen 128
patches, when the tiny preset's Dice starts to mean something), the demo's training settings
(Dice + BCE, half the patches on tumour, the phase embedding) and 4 validation cases.

    .venv/bin/python tests/benchmarks/bench_sweep.py [--seeds 0 1 2] [--store STORE]
        [--random-trials 8] [--epochs 6] [--grace 2] [--reduction-factor 3] [--work DIR]

Long (every trial is a Ray Train run): run it in the background.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def epoch_budget(budget: int):
    """A Tune stopper: stop everything once all trials together trained `budget` epochs."""
    from ray.tune.stopper import Stopper

    class EpochBudget(Stopper):
        def __init__(self):
            self.done: dict[str, int] = {}

        def __call__(self, trial_id: str, result: dict) -> bool:
            epochs = int(result.get("epochs_done", 0))
            self.done[trial_id] = max(self.done.get(trial_id, 0), epochs)
            return False

        def stop_all(self) -> bool:
            return sum(self.done.values()) >= budget

    return EpochBudget()


def curve(rows) -> list[tuple[int, float]]:
    """(epochs spent, best val Dice so far) after each epoch, epochs ordered by finish time."""
    events = []
    for r in rows:
        for t, dice in r["events"]:
            events.append((t, dice))
    events.sort()
    best, out = -math.inf, []
    for i, (_, dice) in enumerate(events, start=1):
        if math.isfinite(dice):
            best = max(best, dice)
        out.append((i, best))
    return out


def epochs_to_reach(c: list[tuple[int, float]], target: float) -> int | None:
    for spent, best in c:
        if best >= target:
            return spent
    return None


def run_one(store, seed, algorithm, scheduler, trials, epochs, budget, storage, name, extra, asha):
    from sweeps import runner
    from sweeps import space as spacemod

    cfg = spacemod.load(ROOT / "tsesnet" / "configs" / "sweep_tiny.yaml")
    cfg.trials = trials
    cfg.search.algorithm = algorithm
    cfg.search.seed = seed
    cfg.scheduler.algorithm = scheduler
    cfg.scheduler.grace_period, cfg.scheduler.reduction_factor = asha
    cfg.set = [s for s in cfg.set if not s.startswith("schedule.epochs=")] + [
        f"schedule.epochs={epochs}",
        f"schedule.early_stop_patience={epochs}",
        f"run.storage_path={storage}",
        *extra,
    ]
    res = runner.run_sweep(store, cfg, name=name, register=False, stop=epoch_budget(budget))
    rows = []
    for r in res.grid:
        df = r.metrics_dataframe
        if df is None or "val_dice" not in df:
            continue
        dice = df["val_dice"].astype(float)
        rows.append({"events": list(zip(df["timestamp"], dice, strict=True))})
    return rows, res.rows


def write_trials(path: Path, seed: int, arm: str, trials) -> None:
    """Every trial's parameters and result (`sweeps.report.results_csv`), appended to one CSV
    with the seed and the arm in front, to see which regions of the space learn."""
    from sweeps.report import results_csv

    header, *rows = results_csv(trials).splitlines()
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(f"seed,arm,{header}\n")
        f.writelines(f"{seed},{arm},{r}\n" for r in rows)


def split(trials, path: str, at: float) -> str:
    """How many trials learned (best val DSC >= 0.2) below and above `at` of one parameter."""
    out = []
    for label, below in ((f"{path} < {at:g}", True), (f"{path} >= {at:g}", False)):
        group = [x for x in trials if (float(x.params.get(path, at)) < at) == below]
        learned = sum(1 for x in group if x.best_val_dice >= 0.2)
        out.append(f"{label}: {learned} of {len(group)}")
    return "; ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="a store (default: a 12-case synthetic one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--random-trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--grace", type=int, default=2, help="ASHA: epochs before a trial can stop")
    ap.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep 1 in this many")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[
            "data.patches_per_epoch=64",
            "loss.bce=1",
            "data.fg_fraction=0.5",
            "model.phase_embedding=true",
            "data.max_val_cases=4",
        ],
        help="training overrides for every trial (default: 64 patches per epoch, Dice + BCE, "
        "half the patches on tumour and the phase embedding, as the demo, so that a few epochs "
        "of the tiny preset can learn; 4 validation cases, so that one lucky case does not "
        "decide)",
    )
    args = ap.parse_args()

    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(work / "mlartifacts"))
    if not ray.is_initialized():
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    store = args.store
    if store is None:
        from data_store.ingest import ingest
        from data_store.phantom import SynthConfig
        from data_store.synth import write_cohort

        store = str(work / "bench.zarr")
        if not Path(store).exists():
            write_cohort(work / "raw", 12, seed=0, config=SynthConfig(shape=(16, 32, 32), phases=3))
            ingest(work / "raw", store, folds=3, progress=False)

    budget = args.random_trials * args.epochs
    lines = [
        "| seed | best DSC, random | best DSC, TPE+ASHA | target (95 % of random's) "
        "| epochs, random | epochs, TPE+ASHA "
        "| trials random / TPE+ASHA | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios, all_rows, reached = [], [], 0
    asha = (args.grace, args.reduction_factor)
    t0 = time.perf_counter()
    for seed in args.seeds:
        rnd, rnd_rows = run_one(
            store,
            seed,
            "random",
            "fifo",
            args.random_trials,
            args.epochs,
            budget,
            work / "ray",
            f"bench-random-s{seed}",
            args.set,
            asha,
        )
        tpe, tpe_rows = run_one(
            store,
            seed,
            "tpe",
            "asha",
            4 * args.random_trials,
            args.epochs,
            budget,
            work / "ray",
            f"bench-tpe-asha-s{seed}",
            args.set,
            asha,
        )
        write_trials(work / "trials.csv", seed, "random", rnd_rows)
        write_trials(work / "trials.csv", seed, "tpe+asha", tpe_rows)
        all_rows += rnd_rows + tpe_rows
        rnd_epochs, rnd_n = sum(x.epochs for x in rnd_rows), len(rnd_rows)
        tpe_epochs, tpe_n = sum(x.epochs for x in tpe_rows), len(tpe_rows)
        c_rnd, c_tpe = curve(rnd), curve(tpe)
        best = c_rnd[-1][1] if c_rnd else float("nan")
        best_tpe = c_tpe[-1][1] if c_tpe else float("nan")
        target = 0.95 * best
        e_rnd, e_tpe = epochs_to_reach(c_rnd, target), epochs_to_reach(c_tpe, target)
        if e_rnd and e_tpe:
            ratio = f"{e_rnd / e_tpe:.2f}"
            reached += 1
        elif e_rnd:  # TPE + ASHA would need more than the budget: the ratio is below this
            ratio = f"< {e_rnd / max(tpe_epochs, 1):.2f}"
        else:
            ratio = "n/a"
        ratios.append(ratio)
        lines.append(
            f"| {seed} | {best:.4f} | {best_tpe:.4f} | {target:.4f} | {e_rnd} of {rnd_epochs} "
            f"| {e_tpe if e_tpe else 'not reached'} of {tpe_epochs} | {rnd_n} / {tpe_n} "
            f"| {ratio} |"
        )
        print(lines[-1], flush=True)
    print()
    print(
        f"TPE + ASHA vs random search (tiny preset, budget {budget} epochs = "
        f"{args.random_trials} trials x {args.epochs} epochs; ASHA grace {args.grace}, "
        f"reduction factor {args.reduction_factor}; {' '.join(args.set)}; "
        f"{time.perf_counter() - t0:.0f} s):"
    )
    print()
    print("\n".join(lines))
    print(
        f"\nTPE + ASHA reached 95 % of random search's best in {reached} of {len(args.seeds)} "
        f"seeds; ratios (epochs random / epochs TPE+ASHA, above 1 = TPE + ASHA faster): "
        f"{', '.join(ratios)}"
    )
    print(
        f"Trials of both arms (each in {work / 'trials.csv'}), how many reached DSC 0.2:\n"
        f"  {split(all_rows, 'loss.tau', 0.01)}\n  {split(all_rows, 'optim.lr', 1e-3)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
