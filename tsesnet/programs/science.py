"""`tsesnet science` (`make science`): does modelling the DCE time series beat one phase?

On synthetic cohorts (one per seed; `data_store.phantom`, where tumours and benign foci differ in
their kinetic curves, not in any single phase), every row below is trained with the same config
and the same budget (`tsesnet/configs/science.yaml`) on the cohort's training folds through the
real `tsesnet train` path (Ray Train, MLflow), and its best checkpoint (by validation Dice) is
scored on a separate labelled test cohort of the same seed by full-volume sliding window: DSC,
HD95 (mm) and sensitivity per case, raw and after the connected-component filter the run chose on
validation, averaged per seed.

Rows are paired: every row of a seed trains on the same cohort and is scored on the same test
cases, so the table reports each row's mean paired difference in DSC against the single-phase
baseline (the `early` network on the peak post-contrast phase alone) with a 95 % confidence
interval across seeds (Student's t, n - 1 degrees of freedom: a seed is one cohort and one
training, the unit that varies). Rows: the single-phase baseline, `early` on all phases, TSESNet
with the paper's loss taken literally, TSESNet with the recommended recipe (`science.yaml`), and
the other fusions of Table 4 with the same recipe; Table 3's ablations on request (`--rows`).

Resumable and runnable in parts: every scored (seed, row) is appended to `science.csv` with the
hash of its training config and skipped when it is there already; `--seeds` and `--rows` pick a
part, and the table is built from every scored part that matches the current config.
`--docs PAGE` (also spelled `--readme`, its first name) writes the table between the science
markers of a documentation page: `make science` fills `docs/pages/explanation/science.md`.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tsesnet.common import names
from tsesnet.common.cli_options import add_set_option
from tsesnet.training.config import CONFIG_DIR

CONFIG = CONFIG_DIR / "science.yaml"
BEGIN, END = "<!-- science:begin -->", "<!-- science:end -->"


@dataclass(frozen=True)
class Row:
    """One configuration of the comparison: a key, a label and its training overrides."""

    key: str
    label: str
    overrides: tuple[str, ...]


# "{peak}" is replaced by the cohort's peak phase index.
PAPER_LOSS = (
    "loss.alpha=0.7",
    "loss.beta=0.5",
    "loss.tau=1e-5",
    "loss.bce=0",
    "loss.tsc_scale=paper",
    "loss.tsc_labels=max",
)
ROWS = (
    Row(
        "early_peak",
        "`early`, peak phase only (baseline)",
        ("model.fusion=early", "model.phases=[{peak}]"),
    ),
    Row("early_all", "`early`, all phases as channels", ("model.fusion=early",)),
    Row(
        "paper",
        "TSESNet `tsff`, the paper's loss as written (τ = 1e-5, β = 0.5)",
        ("model.fusion=tsff", "model.phase_embedding=false", *PAPER_LOSS),
    ),
    Row("tsff", "TSESNet `tsff`, recommended recipe", ("model.fusion=tsff",)),
    Row("tsff_bottleneck", "TSESNet `tsff_bottleneck`", ("model.fusion=tsff_bottleneck",)),
    Row("cnn", "TSESNet `cnn`", ("model.fusion=cnn",)),
    Row("stt", "TSESNet `stt`", ("model.fusion=stt",)),
    Row("meanpool", "TSESNet `meanpool`", ("model.fusion=meanpool",)),
    Row(
        "backbone",
        "Table 3 backbone (no TA, no TSC)",
        ("model.fusion=tsff", "model.tumor_aware=false", "loss.beta=0"),
    ),
    Row("ta", "Table 3 +TA (no TSC)", ("model.fusion=tsff", "loss.beta=0")),
    Row("tsc", "Table 3 +TSC (no TA)", ("model.fusion=tsff", "model.tumor_aware=false")),
)
BASELINE = "early_peak"
# What `make science` runs (Table 3's ablations only with --rows).
DEFAULT_ROWS = (
    "early_peak",
    "early_all",
    "paper",
    "tsff",
    "tsff_bottleneck",
    "cnn",
    "stt",
    "meanpool",
)
ROW_KEYS = tuple(r.key for r in ROWS)


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_cohort(
    out: Path, seed: int, cases: int, test_cases: int, shape: tuple[int, int, int] | None = None
) -> tuple[Path, list[str], Path]:
    """Synthesise and ingest the training and test cohorts of a seed (kept when present).

    Returns:
        (training store, test case IDs, test store).
    """
    from data_store.ingest import ingest
    from data_store.phantom import SynthConfig
    from data_store.store import open_store
    from data_store.synth import write_cohort

    synth = SynthConfig(shape=tuple(shape)) if shape else SynthConfig()

    stores = []
    for part, n, s in (("train", cases, seed), ("test", test_cases, 10_000 + seed)):
        raw, store = out / f"{part}_raw", out / f"{part}.zarr"
        if not store.exists() or len(open_store(store).case_ids) != n:
            # a run stopped during ingest is completed (ingest skips the cases already stored)
            write_cohort(raw, n, seed=s, config=synth)
            report = ingest(raw, store, folds=4, progress=False)
            if report.rejected:
                raise RuntimeError(f"science: ingest of {raw} rejected {report.rejected}")
        stores.append(store)
    test = open_store(stores[1])
    return stores[0], sorted(test.case_ids), stores[1]


def peak_phase(store: Path, fold: int) -> int:
    """The post-contrast phase where the training tumours are brightest on average."""
    import numpy as np

    from data_store.normalize import normalize_intensity
    from data_store.store import open_store

    st = open_store(store)
    train_ids, _ = st.split(fold)
    curves = []
    for cid in train_ids:
        case = st.read_case(cid)
        vol = normalize_intensity(case.image, *case.percentiles)  # (T, Z, Y, X)
        m = case.mask.astype(bool)
        if m.any():
            curves.append(vol[:, m].mean(axis=1))
    mean = np.mean(curves, axis=0)  # (T,)
    return 1 + int(np.argmax(mean[1:]))


METRICS = ("dice", "hd95", "sensitivity", "dice_filtered", "hd95_filtered")


def score(result, cfg, test_store: Path, test_ids: list[str]) -> dict[str, float]:
    """Mean test metrics of a run's best weights, raw and with the run's component filter.

    Returns:
        {"dice", "hd95", "sensitivity", "dice_filtered", "hd95_filtered"}: means over the test
        cases (non-finite HD95 left out, as in validation).
    """
    from data_store.normalize import normalize_intensity
    from data_store.store import open_store
    from tsesnet.segment import score, segment
    from tsesnet.training import checkpoint

    net = cfg.model.build(patch=tuple(cfg.data.patch))
    net.load_state_dict(checkpoint.load_best(result.checkpoint_path))
    net.eval()
    st = open_store(test_store)
    per_case = {m: [] for m in METRICS}
    for cid in test_ids:
        case = st.read_case(cid)
        vol = normalize_intensity(case.image, *case.percentiles)  # (T, Z, Y, X)
        seg = segment(net, vol, patch=cfg.data.patch, overlap=cfg.data.val_overlap)
        gt = case.mask.astype(bool)
        raw = score(seg.mask(), gt, case.spacing)
        kept = score(seg.mask(None, result.min_component_fraction), gt, case.spacing)
        for key, value in (
            ("dice", raw.dice),
            ("hd95", raw.hd95_mm),
            ("sensitivity", raw.sensitivity),
            ("dice_filtered", kept.dice),
            ("hd95_filtered", kept.hd95_mm),
        ):
            per_case[key].append(float(value))
    return {k: _finite_mean(v) for k, v in per_case.items()}


def _finite_mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _mean_sd(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def paired_difference(
    row: dict[int, float], base: dict[int, float]
) -> tuple[float, float, float, int]:
    """Mean of `row - base` over the seeds both have, with its 95 % t-interval.

    Args:
        row, base: seed -> the per-seed mean of a metric.

    Returns:
        (mean difference, CI low, CI high, number of paired seeds); NaN bounds below 2 seeds.
    """
    from scipy import stats

    diffs = [row[s] - base[s] for s in sorted(set(row) & set(base))]
    diffs = [d for d in diffs if math.isfinite(d)]
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def table(results: list[dict], seeds: list[int], keys: list[str]) -> str:
    """Markdown: one line per row: DSC (mean ± sd across seeds), its paired difference against
    the single-phase baseline with the 95 % CI, HD95 raw and filtered, sensitivity, seeds."""
    lines = [
        "| configuration | DSC | Δ DSC vs single phase [95 % CI] | DSC, filtered | HD95 (mm) "
        "| HD95, filtered | sensitivity | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_row: dict[str, dict[int, dict]] = {}
    for r in results:
        if int(r["seed"]) in seeds:
            by_row.setdefault(r["row"], {})[int(r["seed"])] = r
    base = {s: float(r["dice"]) for s, r in by_row.get(BASELINE, {}).items()}
    for row in ROWS:
        got = by_row.get(row.key)
        if row.key not in keys or not got:
            continue

        def col(metric, digits=3, got=got):
            return _mean_sd([float(r[metric]) for r in got.values()], digits)

        if row.key == BASELINE:
            delta = "(reference)"
        else:
            mean, lo, hi, n = paired_difference({s: float(r["dice"]) for s, r in got.items()}, base)
            delta = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if n >= 2 else f"{mean:+.3f} (n={n})"
        cells = [col("dice"), delta, col("dice_filtered"), col("hd95", 1), col("hd95_filtered", 1)]
        cells += [col("sensitivity"), f"{len(got)}/{len(seeds)}"]
        lines.append(f"| {row.label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def check_page(page: Path) -> str:
    """The text of `page`, which must hold the science markers (checked before anything trains)."""
    if not page.is_file():
        raise SystemExit(f"error: --docs {page}: no such file (the page the table goes into)")
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: --docs {page}: the page has no {BEGIN} ... {END} block to fill")
    return text


def write_into_page(page: Path, block: str) -> None:
    """Replace the text between the science markers of `page` (atomically)."""
    head, rest = check_page(page).split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    tmp.replace(page)


def run(args: argparse.Namespace) -> int:
    from tsesnet.training import config as train_config

    if args.docs:
        check_page(Path(args.docs))  # a wrong page stops here, not after hours of training
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = list(args.rows or DEFAULT_ROWS)
    unknown = sorted(set(keys) - set(ROW_KEYS))
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from {', '.join(ROW_KEYS)}")
    args.config = args.config or str(CONFIG)
    base = train_config.load_config(args.config, list(args.overrides))
    started = time.perf_counter()
    results = _read_csv(out / "science.csv")
    for seed in args.seeds:
        if args.no_train:
            continue  # the table below reads science.csv only
        _stage(f"seed {seed}: cohort of {args.cases} training/validation + {args.test_cases} test")
        seed_dir = out / f"seed{seed}"
        store, test_ids, test_store = make_cohort(
            seed_dir, seed, args.cases, args.test_cases, args.shape
        )
        peak = peak_phase(store, base.data.fold)
        print(f"   peak post-contrast phase of the training tumours: {peak}", flush=True)
        for row in (r for r in ROWS if r.key in keys):
            cfg = _row_config(args, row, seed, seed_dir, peak)
            done = _find(results, seed, row.key, train_config.config_hash(cfg))
            if done is not None:
                print(f"   {row.key}: scored before (science.csv), DSC {float(done['dice']):.3f}")
                continue
            results.append(_train_and_score(row, cfg, seed, peak, store, test_store, test_ids))
            _write_csv(out / "science.csv", results)
    current = [r for r in results if r["config_hash"] == _hash_of(args, r, out)]
    block = (
        f"{table(current, list(args.seeds), keys)}\n\n"
        f"Seeds {', '.join(map(str, args.seeds))}; per seed {args.cases} training/validation and "
        f"{args.test_cases} test cases; config `{Path(args.config).name}`"
        f"{' with ' + ', '.join(args.overrides) if args.overrides else ''}."
    )
    (out / "science.md").write_text(block + "\n")
    print(f"\n{block}\n({time.perf_counter() - started:.0f} s; scored parts reused)", flush=True)
    if args.docs:
        write_into_page(Path(args.docs), block)
        print(f"table written into {args.docs}", flush=True)
    return 0


def _row_config(args, row: Row, seed: int, seed_dir: Path, peak: int):
    from tsesnet.training import config as train_config

    overrides = [o.format(peak=peak) for o in row.overrides]
    overrides += [
        "run.register=false",
        f"run.experiment={args.experiment}",
        f"run.storage_path={seed_dir / 'ray_results'}",
        f"schedule.seed={seed}",
    ]
    return train_config.load_config(args.config, [*args.overrides, *overrides])


def _hash_of(args, result: dict, out: Path) -> str:
    """The config hash the current arguments give for a scored result's row and seed."""
    from tsesnet.training import config as train_config

    row = next(r for r in ROWS if r.key == result["row"])
    seed = int(result["seed"])
    peak = int(result["peak"])
    return train_config.config_hash(_row_config(args, row, seed, out / f"seed{seed}", peak))


def _train_and_score(row: Row, cfg, seed: int, peak: int, store, test_store, test_ids) -> dict:
    """Train (or reuse) the row's run of a seed and score it: one line of `science.csv`."""
    from tsesnet.training import config as train_config
    from tsesnet.training.driver import train

    _stage(f"seed {seed}, {row.label}")
    t0 = time.perf_counter()
    res = train(str(store), cfg, names.join("science", f"s{seed}", row.key))
    m = score(res, cfg, test_store, test_ids)
    print(
        f"   test DSC {m['dice']:.3f} ({m['dice_filtered']:.3f} filtered), HD95 {m['hd95']:.1f} "
        f"mm ({m['hd95_filtered']:.1f}), sensitivity {m['sensitivity']:.3f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return {
        "seed": seed,
        "row": row.key,
        "config_hash": train_config.config_hash(cfg),
        "peak": peak,
        "epochs": res.epochs_done,
        **m,
    }


def _find(results: list[dict], seed: int, row: str, config_hash: str) -> dict | None:
    return next(
        (
            r
            for r in results
            if int(r["seed"]) == seed and r["row"] == row and r["config_hash"] == config_hash
        ),
        None,
    )


def _write_csv(path: Path, results: list[dict]) -> None:
    """All scored parts, written atomically (a run stopped mid-way keeps what it scored)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    tmp.replace(path)


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet science` (read by `cli` and `run`)."""
    parser.add_argument(
        "--out", default="science_output", metavar="DIR", help="work folder (science_output)"
    )
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="tsesnet/configs/science.yaml"
    )
    add_set_option(parser, "override one training-config key (repeatable)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        metavar="S",
        help="seeds, one training per row and seed (0 1 2 3 4)",
    )
    parser.add_argument("--rows", nargs="+", default=None, metavar="KEY", help="a subset of rows")
    parser.add_argument(
        "--cases", type=int, default=16, metavar="N", help="synthetic training cases (16)"
    )
    parser.add_argument(
        "--test-cases", type=int, default=8, metavar="K", help="synthetic test cases (8)"
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="synthetic volume size (default: the config's)",
    )
    parser.add_argument(
        "--experiment", default="tsesnet-science", metavar="NAME", help="MLflow experiment"
    )
    parser.add_argument(
        "--docs",
        "--readme",
        dest="docs",
        default=None,
        metavar="PAGE",
        help="write the table between the science markers of PAGE "
        "(make science: docs/pages/explanation/science.md)",
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="tabulate what science.csv holds for these seeds and rows; train nothing",
    )


def cli(args: argparse.Namespace) -> int:
    """`tsesnet science [--out DIR] [--seeds S ...] [--rows KEY ...] [--docs PAGE]`."""
    return run(args)
