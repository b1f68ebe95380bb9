"""`tsesnet science` (`make science`): does modelling the DCE time series beat one phase?

On synthetic cohorts (one per seed; `data_store.synth`, where tumours and benign foci differ in
their kinetic curves, not in any single phase), every row below is trained with the same config
and the same budget (`platform/configs/science.yaml`: patches, epochs, validation schedule) on
the cohort's training folds through the real `tsesnet train` path (Ray Train, MLflow), and its
best checkpoint (by validation Dice) is scored on a separate labelled test cohort of the same
seed by full-volume sliding window: DSC, HD95 (mm) and sensitivity per case, averaged per seed,
then mean ± sd across seeds.

Rows: the `early` single-phase baseline (the peak post-contrast phase alone, the phase where the
training tumours are brightest on average), `early` with every phase as input channels, TSESNet
with each fusion strategy (TA and TSC on), and Table 3's ablation (backbone = plain encoder
stages and no TSC, +TA, +TSC, both = the `tsff` row), and `tsff` with a learned phase embedding
(`model.phase_embedding`): Eq. 9 sums over the post-contrast phases, so the paper's TSFF gives
the same output for any order of them.

Re-running continues: a finished run is reused (same run name), a cohort or store already
written is kept. `--readme README.md` writes the table between the README's science markers.
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
ROWS = (
    Row("early_peak", "`early`, peak phase only", ("model.fusion=early", "model.phases=[{peak}]")),
    Row("early_all", "`early`, all phases as channels", ("model.fusion=early",)),
    Row("tsff", "TSESNet `tsff` (TA + TSC) = Table 3 both", ("model.fusion=tsff",)),
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
    Row(
        "tsff_ordered",
        "TSESNet `tsff` + phase embedding (ours: Eq. 9 cannot see phase order)",
        ("model.fusion=tsff", "model.phase_embedding=true"),
    ),
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
    from data_store.store import open_store
    from data_store.synth import SynthConfig, write_cohort

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


def score(result, cfg, test_store: Path, test_ids: list[str]) -> dict[str, float]:
    """Mean DSC, HD95 and sensitivity of a run's best weights on the test cohort."""
    import torch

    from data_store.store import open_store
    from tsesnet.training import checkpoint
    from tsesnet.training.validation import mean_metrics, validate

    net = cfg.model.build()
    net.load_state_dict(checkpoint.load_best(result.checkpoint_path))
    net.eval()
    rows, _ = validate(net, open_store(test_store), test_ids, cfg, torch.device("cpu"))
    return mean_metrics(rows)


def _mean_sd(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(results: list[dict], seeds: list[int], keys: list[str]) -> str:
    """Markdown: one line per row, mean ± sd across seeds of each metric."""
    lines = [
        "| configuration | DSC | HD95 (mm) | sensitivity | seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        if row.key not in keys:
            continue
        got = [r for r in results if r["row"] == row.key]
        cells = [
            _mean_sd([r[m] for r in got], 1 if m == "hd95" else 3)
            for m in ("dice", "hd95", "sensitivity")
        ]
        lines.append(f"| {row.label} | {' | '.join(cells)} | {len(got)}/{len(seeds)} |")
    return "\n".join(lines)


def write_readme(readme: Path, block: str) -> None:
    """Replace the text between the science markers of `readme` (atomically)."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    tmp.replace(readme)


def run(args: argparse.Namespace) -> int:
    from tsesnet.training import config as train_config
    from tsesnet.training.driver import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = list(args.rows or ROW_KEYS)
    unknown = sorted(set(keys) - set(ROW_KEYS))
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from {', '.join(ROW_KEYS)}")
    args.config = args.config or str(CONFIG)
    base = train_config.load_config(args.config, list(args.overrides))
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        _stage(f"seed {seed}: cohort of {args.cases} training/validation + {args.test_cases} test")
        seed_dir = out / f"seed{seed}"
        store, test_ids, test_store = make_cohort(
            seed_dir, seed, args.cases, args.test_cases, args.shape
        )
        peak = peak_phase(store, base.data.fold)
        print(f"   peak post-contrast phase of the training tumours: {peak}", flush=True)
        for row in ROWS:
            if row.key not in keys:
                continue
            overrides = [o.format(peak=peak) for o in row.overrides]
            overrides += [
                "run.register=false",
                f"run.experiment={args.experiment}",
                f"run.storage_path={seed_dir / 'ray_results'}",
                f"schedule.seed={seed}",
            ]
            cfg = train_config.load_config(args.config, [*args.overrides, *overrides])
            _stage(f"seed {seed}, {row.label}")
            t0 = time.perf_counter()
            res = train(str(store), cfg, names.join("science", f"s{seed}", row.key))
            m = score(res, cfg, test_store, test_ids)
            results.append({"seed": seed, "row": row.key, "epochs": res.epochs_done, **m})
            print(
                f"   test DSC {m['dice']:.3f}, HD95 {m['hd95']:.2f} mm, sensitivity "
                f"{m['sensitivity']:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            _write_csv(out / "science.csv", results)
    block = (
        f"{table(results, args.seeds, keys)}\n\n"
        f"Seeds {', '.join(map(str, args.seeds))}; per seed {args.cases} training/validation and "
        f"{args.test_cases} test cases; config `{Path(args.config).name}`"
        f"{' with ' + ', '.join(args.overrides) if args.overrides else ''}."
    )
    (out / "science.md").write_text(block + "\n")
    print(f"\n{block}\n({time.perf_counter() - started:.0f} s; finished runs reused)", flush=True)
    if args.readme:
        write_readme(Path(args.readme), block)
        print(f"table written into {args.readme}", flush=True)
    return 0


def _write_csv(path: Path, results: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    tmp.replace(path)


def cli(args: argparse.Namespace) -> int:
    """`tsesnet science [--out DIR] [--seeds S ...] [--rows KEY ...] [--readme FILE]`."""
    return run(args)
