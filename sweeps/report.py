"""What a sweep reports: one row per trial, the terminal table, the CSV, Optuna's plots, and the
MLflow parent run's settings (at the start) and results (at the end).

One source for every number: each trial's MLflow run (its per-epoch metric history), for the
table, the CSV, the plots and the parent run alike. Two scores, both shown and labelled: the
best validation DSC, which orders the table and picks the trial that is registered (the score
the registry compares), and the sweep's search metric (`metric` in the sweep config, e.g.
`best_val_soft_dice`), its last value per trial, which Tune's ASHA and Optuna ranked trials on.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps import space as spacemod
from sweeps.trial import EPOCHS, SWEEP_TAG, TRIAL_TAG
from tsesnet.tracking.runs import quote


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
    history: list[float] = field(default_factory=list)  # the search metric per epoch

    @property
    def metric_value(self) -> float:
        """The search metric's last value: what Optuna was told (NaN when never reported)."""
        return self.history[-1] if self.history else float("nan")


def collect_rows(grid, cfg: spacemod.SweepConfig, client, experiment_id: str, name: str):
    """One `TrialRow` per trial that started, by best validation DSC, highest first (NaN last).

    Parameters, status and checkpoint come from Tune; every metric comes from the trial's MLflow
    child run, whose history is whole: Tune's results of a trial resumed from its last checkpoint
    start after it, so the best epoch before an interruption would be lost there.
    """
    runs = {
        r.data.tags.get(TRIAL_TAG): r.info.run_id
        for r in client.search_runs(
            [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = {quote(name)}"
        )
        if r.data.tags.get(TRIAL_TAG)
    }
    rows = []
    for res in grid:
        if res.config is None:
            # created by the searcher but stopped (e.g. by a `stop` budget) before it started:
            # it trained nothing and has no MLflow run
            continue
        trial = Path(str(res.path)).name
        run_id = runs.get(trial)
        row = TrialRow(
            trial=trial,
            status="ERROR" if res.error else "TERMINATED",
            params={p.path: res.config.get(p.path) for p in cfg.params()},
            epochs=int((res.metrics or {}).get(EPOCHS, 0) or 0),
            best_val_dice=float("nan"),
            hd95=float("nan"),
            run_id=run_id,
            checkpoint_path=(res.metrics or {}).get("checkpoint_path"),
        )
        if run_id:
            _fill_from_history(row, client, cfg.metric)
        rows.append(row)
    # DSC is better higher whatever the search metric's mode.
    rows.sort(key=lambda r: (not math.isfinite(r.best_val_dice), -_nan0(r.best_val_dice)))
    return rows


def _fill_from_history(row: TrialRow, client, metric: str) -> None:
    """Best validation Dice, the HD95 at that epoch, epochs run and the ranking metric's history,
    from the MLflow run (one value per epoch: the last logged per step wins)."""

    def by_step(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(row.run_id, key)}

    dice, hd95 = by_step("val_dice"), by_step("val_hd95")
    if dice:
        step = max(dice, key=lambda s: (dice[s], -s))  # the first epoch of the best value
        row.best_val_dice, row.hd95 = float(dice[step]), float(hd95.get(step, float("nan")))
    history = by_step(metric)
    row.history = [float(history[s]) for s in sorted(history)]
    # the epochs the run logged (the MLflow run and the table agree; Tune's count is used only
    # for a trial without a run)
    row.epochs = len(by_step("train_total")) or row.epochs


def _nan0(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def finish_child_runs(client, rows: list[TrialRow], max_epochs: int) -> None:
    """End every trial's run as Tune ended the trial: FINISHED when it completed or ASHA stopped
    it (a stopped trial's training is killed mid-way and leaves its run RUNNING:
    `sweeps.trial._train`), FAILED when it errored. The epochs a stopped trial trained are what
    its run's history shows (`collect_rows`)."""
    for r in rows:
        if not r.run_id:
            continue
        client.set_tag(r.run_id, "tsesnet.epochs_run", str(r.epochs))
        if r.status == "TERMINATED" and r.epochs < max_epochs:
            client.set_tag(r.run_id, "tsesnet.stopped_early", "true")
        status = "FAILED" if r.status == "ERROR" else "FINISHED"
        if client.get_run(r.run_id).info.status != status:
            client.set_terminated(r.run_id, status)


def log_parent_start(client, run_id, cfg, base_cfg, store, st, n_parallel) -> None:
    """The sweep's settings, search space and base training config, on its parent run."""
    from tsesnet.common.yaml_config import dump_yaml

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


def metric_label(metric: str) -> str:
    """The search metric's column name: the metric, marked as what the search ranked on."""
    return f"{metric} (search)"


def _row_values(r: TrialRow, metric: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"trial": r.trial}
    for path, v in r.params.items():
        out[path.rsplit(".", 1)[-1]] = v
    out.update({"epochs": r.epochs, "best val DSC": r.best_val_dice, "HD95 mm": r.hd95})
    if metric:
        out[metric_label(metric)] = r.metric_value
    out["status"] = r.status
    return out


def results_csv(rows: list[TrialRow], metric: str | None = None) -> str:
    """The results table as CSV: trial, every searched path, epochs, DSC, HD95, the search
    metric's last value (column `metric`, when given), status, run id."""
    buf = io.StringIO()
    paths = list(rows[0].params) if rows else []
    w = csv.writer(buf)
    extra = [metric] if metric else []
    w.writerow(["trial", *paths, "epochs", "best_val_dice", "val_hd95", *extra, "status", "run_id"])
    for r in rows:
        w.writerow(
            [r.trial, *(r.params[p] for p in paths), r.epochs, r.best_val_dice, r.hd95]
            + ([r.metric_value] if metric else [])
            + [r.status, r.run_id or ""]
        )
    return buf.getvalue()


def table_title(name: str, rows: list[TrialRow], metric: str, mode: str) -> str:
    """The line above the table: what orders it and what the search ranked on."""
    return (
        f"sweep {name}: {len(rows)} trials, sorted by best val DSC (the score registration "
        f"compares); Tune and Optuna ranked them on {metric} ({mode}), shown as "
        f"'{metric_label(metric)}'"
    )


def table_cell(v) -> str:
    """How `results_table` shows a value: 4 decimals, 3 significant digits below 0.01 or from
    1000 on, "-" for a non-finite number."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.4f}"
    return str(v)


def results_table(rows: list[TrialRow], metric: str | None = None) -> str:
    """The terminal table, in the order given (best first); with `metric`, its column too."""
    if not rows:
        return "(no trials)"
    cols = list(dict.fromkeys(["trial", *(_row_values(rows[0], metric).keys())]))
    ordered = [c for c in COLUMNS if c in cols] + [c for c in cols if c not in COLUMNS]

    cells = [[table_cell(_row_values(r, metric).get(c, "")) for c in ordered] for r in rows]
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


def optuna_figures(cfg: spacemod.SweepConfig, rows: list[TrialRow]) -> dict[str, Any]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as
    matplotlib figures, the objective axis labelled with the search metric (Optuna's default
    is "Objective Value"); a plot Optuna cannot draw is left out with a note."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(cfg, rows)
    better = "higher" if cfg.mode == "max" else "lower"
    target = f"{cfg.metric} (last value per trial; {better} is better)"
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    figures = {}
    for fname, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is "experimental"
                ax = plot(study, target_name=target)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            # e.g. importances need two finished trials with different values
            print(f"note: no {fname} plot: {err}", flush=True)
            continue
        figures[fname] = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    return figures


def optuna_plots(cfg: spacemod.SweepConfig, rows: list[TrialRow], out_dir: Path) -> list[Path]:
    """`optuna_figures` as PNGs in `out_dir`."""
    import matplotlib.pyplot as plt

    made = []
    for fname, fig in optuna_figures(cfg, rows).items():
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        path = out_dir / f"{fname}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def log_parent_end(client, run_id, cfg, rows, best, version, alias) -> None:
    """The results table, Optuna's plots, the best trial and its registered version."""
    import tempfile

    client.log_text(run_id, results_csv(rows, cfg.metric), "sweep/results.csv")
    with tempfile.TemporaryDirectory() as d:
        for path in optuna_plots(cfg, rows, Path(d)):
            client.log_artifact(run_id, str(path), "sweep/plots")
    client.log_metric(run_id, "trials", len(rows))
    client.log_metric(run_id, "trials_failed", sum(r.status == "ERROR" for r in rows))
    client.log_metric(run_id, "epochs_total", sum(r.epochs for r in rows))
    if best is not None:
        client.log_metric(run_id, "best_val_dice", best.best_val_dice)
        if math.isfinite(best.metric_value):
            client.log_metric(run_id, f"best_trial_{cfg.metric}", best.metric_value)
        client.set_tag(run_id, "tsesnet.best_trial", best.trial)
        if best.run_id:
            client.set_tag(run_id, "tsesnet.best_run_id", best.run_id)
    if version:
        client.set_tag(run_id, "tsesnet.model_version", str(version))
