"""`tsesnet sweep`: the search-space file, and real Ray Tune + Optuna + MLflow sweeps (slow)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from data_store.errors import InputError
from sweeps import report, runner, trial
from sweeps import space as spacemod
from tsesnet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tsesnet" / "configs"
PAPER_SPACE = {"alpha", "beta", "tau", "fusion", "lr"}


# --- the search-space file -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_tiny.yaml"])
def test_shipped_sweep_configs_load_and_search_the_paper_choices(name):
    cfg = spacemod.load(CONFIGS / name)
    params = {p.short: p for p in cfg.params()}
    assert set(params) == PAPER_SPACE
    assert params["alpha"].kind == "uniform" and params["alpha"].args == (0.1, 1.0)
    assert params["beta"].args == (0.0, 1.0)
    assert params["tau"].kind == "loguniform" and params["tau"].args == (1e-5, 1.0)
    assert set(params["fusion"].args) == {"tsff", "meanpool", "cnn", "stt", "tsff_bottleneck"}
    assert cfg.train_config_path().is_file()


def _write(tmp_path, data) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_plain_value_fixes_a_parameter(tmp_path):
    cfg = spacemod.load(
        _write(tmp_path, {"space": {"loss.alpha": 0.7, "loss.tau": {"loguniform": [1e-4, 1e-1]}}})
    )
    assert cfg.fixed() == {"loss.alpha": 0.7}
    assert [p.path for p in cfg.params()] == ["loss.tau"]
    tune_space = spacemod.tune_space(cfg)
    assert tune_space["loss.alpha"] == 0.7


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"trails": 3, "space": {"a.b": {"choice": [1, 2]}}}, "unknown key trails"),
        ({"search": {"algo": "tpe"}, "space": {"a.b": {"choice": [1]}}}, "search.algo"),
        ({"space": {"loss.alpha": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"loss.alpha": {"uniform": [1.0, 0.1]}}}, "lower bound 1.0"),
        ({"space": {"loss.tau": {"loguniform": [0, 1]}}}, "must be > 0"),
        ({"space": {"loss.alpha": {"uniform": [0.1]}}}, "two numbers"),
        ({"space": {"model.fusion": ["tsff", "cnn"]}}, "{choice: [...]}"),
        ({"space": {"data.patches_per_epoch": {"int": [1.5, 4]}}}, "integers"),
        ({"space": {"loss.alpha": 0.5}}, "searches nothing"),
        ({"trials": "many", "space": {"a.b": {"choice": [1, 2]}}}, "expected int"),
        (
            {"trials": 0, "space": {"a.b": {"choice": [1, 2]}}},
            "trials=0 is out of range; it must be in [1, inf)",
        ),
        ({"search": {"algorithm": "grid"}, "space": {"a.b": {"choice": [1]}}}, "'tpe', 'random'"),
        ({"scheduler": {"algorithm": "pbt"}, "space": {"a.b": {"choice": [1]}}}, "'asha', 'fifo'"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, data, needle):
    with pytest.raises(InputError) as err:
        spacemod.load(_write(tmp_path, data))
    assert needle in str(err.value)
    assert "s.yaml" in str(err.value)


def test_sweep_files_read_floats_like_training_configs(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("set: [loss.tau=1e-5]\nspace:\n  loss.tau: {loguniform: [1e-5, 1e-1]}\n")
    cfg = spacemod.load(p)
    assert cfg.params()[0].args == (1e-5, 0.1) and all(
        type(a) is float for a in cfg.params()[0].args
    )
    assert runner.base_train_config(cfg).loss.tau == 1e-5


def test_missing_sweep_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        spacemod.load(tmp_path / "nope.yaml")


def test_optuna_distributions_match_what_optuna_search_derives():
    from ray.tune.search.optuna import OptunaSearch

    cfg = spacemod.load(CONFIGS / "sweep.yaml")
    derived = OptunaSearch.convert_search_space(spacemod.tune_space(cfg))
    assert derived == spacemod.optuna_distributions(cfg)


def test_trial_config_takes_the_sampled_values_and_rejects_unknown_paths():
    cfg = spacemod.load(CONFIGS / "sweep_tiny.yaml")
    base = runner.base_train_config(cfg)
    values = {"loss.alpha": 0.25, "loss.tau": 3e-3, "model.fusion": "stt", "optim.lr": 1e-3}
    t = trial.trial_train_config(base, values, "/tmp/x")
    assert (t.loss.alpha, t.loss.tau, t.model.fusion, t.optim.lr) == (0.25, 3e-3, "stt", 1e-3)
    assert t.schedule.val_every == 1 and t.run.register is False
    assert t.schedule.epochs == 2 and t.run.cpus_per_worker == 0.5  # the sweep's `set`
    with pytest.raises(InputError, match="space.loss.gamma: unknown key loss.gamma"):
        trial.trial_train_config(base, {"loss.gamma": 1.0}, "")
    cfg.space["model.fusion"] = {"choice": ["tsff", "transformer"]}
    with pytest.raises(InputError, match="transformer"):
        trial.check_space(cfg, base)


def test_concurrency_follows_resources():
    one_cpu = {"CPU": 1.25, "GPU": 0.0}
    assert runner.concurrency(one_cpu, {"CPU": 16.0}) == 12
    assert runner.concurrency(one_cpu, {"CPU": 16.0}, limit=3) == 3
    gpu = {"CPU": 2.25, "GPU": 2.0}  # 2 workers with a GPU each
    assert runner.concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(InputError, match="GPUs"):
        runner.concurrency(gpu, {"CPU": 64.0})


def _rows():
    mk = report.TrialRow
    return [
        mk("t001", "TERMINATED", _p(0.5, "tsff"), 3, 0.61, 4.2, "r1", history=[0.3, 0.5, 0.61]),
        mk("t002", "TERMINATED", _p(0.9, "cnn"), 1, 0.20, 9.0, "r2", history=[0.2]),
        mk("t003", "ERROR", _p(0.2, "stt"), 0, float("nan"), float("nan"), None),
        mk("t004", "TERMINATED", _p(0.3, "meanpool"), 3, 0.70, 3.1, "r4", history=[0.4, 0.7]),
    ]


def _p(alpha, fusion):
    return {
        "loss.alpha": alpha,
        "loss.beta": 0.5,
        "loss.tau": 1e-3,
        "model.fusion": fusion,
        "optim.lr": 1e-3,
    }


def test_results_table_and_csv():
    rows = sorted(_rows(), key=lambda r: -r.best_val_dice if math.isfinite(r.best_val_dice) else 9)
    table = report.results_table(rows)
    header = table.splitlines()[0].split()
    for col in ("trial", "alpha", "beta", "tau", "fusion", "lr", "epochs", "DSC", "HD95"):
        assert col in header
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["t004", "t001", "t002", "t003"]
    csv_text = report.results_csv(rows)
    assert csv_text.splitlines()[0].startswith("trial,loss.alpha,loss.beta,loss.tau,model.fusion")
    assert len(csv_text.splitlines()) == 5


def test_the_search_metric_is_shown_and_labelled():
    """Before: the table claimed to be "sorted by best_val_soft_dice", a column it did not show,
    while it was sorted by val DSC. Now the title says what orders it and the search metric is
    a labelled column (its last value per trial, what Optuna was told), in the CSV too."""
    rows = sorted(_rows(), key=lambda r: -r.best_val_dice if math.isfinite(r.best_val_dice) else 9)
    title = report.table_title("s", rows, "best_val_soft_dice", "max")
    assert "sorted by best val DSC" in title and "best_val_soft_dice (max)" in title
    lines = report.results_table(rows, "best_val_soft_dice").splitlines()
    assert "best_val_soft_dice (search)" in lines[0]
    column = lines[0].index("best_val_soft_dice (search)")
    assert [line[column:].split()[0] for line in lines[2:]] == ["0.7000", "0.6100", "0.2000", "-"]
    header, first = report.results_csv(rows, "best_val_soft_dice").splitlines()[:2]
    assert header.split(",")[-3:] == ["best_val_soft_dice", "status", "run_id"]
    assert first.split(",")[-3] == "0.7"


def test_the_optuna_plots_name_their_metric():
    """Before: the optimisation history's axis read Optuna's "Objective Value"."""
    import matplotlib.pyplot as plt

    cfg = spacemod.load(CONFIGS / "sweep_tiny.yaml")
    figs = report.optuna_figures(cfg, _rows())
    ylabel = figs["optimization_history"].axes[0].get_ylabel()
    assert ylabel.startswith(f"{cfg.metric} (last value per trial; higher is better)"), ylabel
    texts = [t.get_text() for ax in figs["parallel_coordinate"].axes for t in ax.texts]
    labels = [ax.get_ylabel() for ax in figs["parallel_coordinate"].axes] + texts
    assert any(cfg.metric in x for x in labels), labels
    for fig in figs.values():
        plt.close(fig)


def test_rows_take_the_whole_history_from_mlflow(tmp_path, mlflow_uri):
    """A trial resumed at its last checkpoint reports to Tune only the epochs after it (here the
    second); its best (epoch 1, DSC 0.6) is in its MLflow run. A `stop` budget can also end a
    sweep after the searcher created a trial that never ran (no config, no results): no row."""
    import mlflow
    import pandas as pd
    from ray.tune import Result

    cfg = spacemod.load(CONFIGS / "sweep_tiny.yaml")
    config = {"loss.alpha": 0.5, "loss.beta": 0.1, "loss.tau": 0.1, "model.fusion": "tsff"}
    ran = Result(
        metrics={"config": {**config, "optim.lr": 1e-3}, trial.EPOCHS: 2},
        checkpoint=None,
        error=None,
        path=str(tmp_path / "t001"),
        metrics_dataframe=pd.DataFrame({"val_dice": [0.4], "val_hd95": [7.0], cfg.metric: [0.6]}),
    )
    never = Result(metrics=None, checkpoint=None, error=None, path=str(tmp_path / "t002"))
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("collect")
    child = client.create_run(exp, tags={"tsesnet.sweep": "s", "tsesnet.trial": "t001"})
    for step, (dice, hd95) in enumerate([(0.6, 5.0), (0.4, 7.0)]):
        for key, value in (("val_dice", dice), ("val_hd95", hd95), ("train_total", 1.0)):
            client.log_metric(child.info.run_id, key, value, step=step)
        client.log_metric(child.info.run_id, cfg.metric, 0.6, step=step)
    rows = report.collect_rows([ran, never], cfg, client, exp, "s")
    assert [(r.trial, r.epochs, r.best_val_dice, r.hd95) for r in rows] == [("t001", 2, 0.6, 5.0)]
    assert rows[0].params["model.fusion"] == "tsff" and rows[0].history == [0.6, 0.6]
    assert rows[0].run_id == child.info.run_id


def test_optuna_plots_are_written(tmp_path):
    cfg = spacemod.load(CONFIGS / "sweep_tiny.yaml")
    made = report.optuna_plots(cfg, _rows(), tmp_path)
    names = {p.stem for p in made}
    assert {"optimization_history", "parallel_coordinate"} <= names
    for p in made:
        assert p.stat().st_size > 1000


# --- real sweeps: a local Ray, an SQLite-backed MLflow, the tiny store (slow) ----------------


def _tiny_cfg(tmp_path, trials=4):
    """The shipped tiny sweep, written as a user would write it: `1e-5`, not `1.0e-5` (YAML 1.1
    reads `1e-5` as a string; the sweep loader is the training loader, YAML 1.2 floats)."""
    text = (CONFIGS / "sweep_tiny.yaml").read_text().replace("1.0e-5", "1e-5")
    text = text.replace("train_config: tiny.yaml", f"train_config: {CONFIGS / 'tiny.yaml'}")
    assert "loss.tau: {loguniform: [1e-5, 1.0]}" in text
    (tmp_path / "sweep_tiny.yaml").write_text(text)
    cfg = spacemod.load(tmp_path / "sweep_tiny.yaml")
    assert cfg.params()[2].args == (1e-5, 1.0)
    cfg.trials = trials
    cfg.set = [*cfg.set, f"run.storage_path={tmp_path / 'ray'}"]
    return cfg


def test_a_killed_trial_leaves_its_run_to_the_sweep(mlflow_uri, tmp_path):
    """Tune kills a trial ASHA stops, and the sweep ends the trial's run FINISHED. The trial's
    training must not take the SIGTERM for a Ctrl-C and end the run KILLED on its way out (in CI
    that came after the sweep's FINISHED). Here the training is the driver's own signal handling
    and run ending around a wait, with the driver's choice of who ends a failed run, in a
    process that exits on SIGTERM as a Ray worker does."""
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("trial")).info.run_id
    ready = tmp_path / "training"
    script = tmp_path / "trial_task.py"
    script.write_text(
        "import signal, sys, time\n"
        "from sweeps import trial\n"
        "from tsesnet.training import driver\n"
        "def train(store, cfg, name, callbacks, ends_failed_runs=True):\n"
        "    driver._catch_signals()\n"
        f"    with driver.ended_as({run_id!r}, ends_failed=ends_failed_runs):\n"
        f"        open({str(ready)!r}, 'w').close()\n"
        "        time.sleep(120)\n"
        "driver.train = train\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a Ray worker's main loop\n"
        "trial._train('store', None, 'name', None)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the training never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    assert client.get_run(run_id).info.status == "RUNNING"  # for the sweep to end


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _ray_logs_mention(text: str) -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p.name for p in logs.glob("*") if p.is_file() and text in p.read_text(errors="ignore")]


@pytest.mark.slow
def test_tiny_sweep_tracks_every_trial_and_registers_the_best(
    ray_session, tiny_store, mlflow_uri, tmp_path, capsys
):
    import mlflow

    res = runner.run_sweep(str(tiny_store), _tiny_cfg(tmp_path), name="tiny-sweep")
    assert [r.status for r in res.rows] == ["TERMINATED"] * 4
    assert len({r.trial for r in res.rows}) == 4
    # Sorted by the metric, best first; every trial ran 1..2 epochs (ASHA may stop it at a rung).
    dices = [r.best_val_dice for r in res.rows]
    assert dices == sorted(dices, reverse=True) and all(0 <= d <= 1 for d in dices)
    assert all(1 <= r.epochs <= 2 for r in res.rows)

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_run(res.parent_run_id).info.experiment_id
    parents = client.search_runs([exp], filter_string="tags.`tsesnet.kind` = 'sweep'")
    assert [p.info.run_id for p in parents] == [res.parent_run_id]
    children = _children(client, res.parent_run_id)
    assert len(children) == 4
    by_trial = {c.data.tags["tsesnet.trial"]: c for c in children}
    for row in res.rows:
        child = by_trial[row.trial]
        assert child.info.status == "FINISHED"
        for path in ("loss.alpha", "loss.beta", "loss.tau", "model.fusion", "optim.lr"):
            assert child.data.params[path] == str(row.params[path]) or math.isclose(
                float(child.data.params[path]), float(row.params[path]), rel_tol=1e-9
            )
        hist = client.get_metric_history(child.info.run_id, "val_dice")
        assert len(hist) == row.epochs  # one per epoch, none lost

    # The parent holds the search space, the results table and Optuna's plots.
    arts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/search_space.yaml", "sweep/results.csv", "sweep/plots"} <= arts
    plots = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep/plots")}
    assert "sweep/plots/optimization_history.png" in plots
    assert "sweep/plots/parallel_coordinate.png" in plots

    # The best trial's weights are a new registered version: @challenger without --promote.
    assert res.best is res.rows[0] and res.model_version is not None
    mv = client.get_model_version("tsesnet", res.model_version)
    assert mv.run_id == res.best.run_id
    assert res.alias == "challenger"
    assert mv.tags["registration_reason"].startswith("a sweep registers its best as @challenger")
    assert mv.tags["protocol"] and mv.tags["protocol.n_val_cases"]
    assert str(client.get_model_version_by_alias("tsesnet", res.alias).version) == str(
        res.model_version
    )

    # Two trials at a time on 2 CPUs: their runs overlapped, and SQLite never locked.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert _ray_logs_mention("database is locked") == []


def _terminated_trials(exp_dir: Path) -> set[str]:
    """Trials the Tune experiment state on disk lists as finished (what a restore will see)."""
    import json

    out = set()
    for state in exp_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue  # being rewritten
        for item in data.get("trial_data", []):
            trial = json.loads(item[0]) if isinstance(item, list) else {}
            if trial.get("status") == "TERMINATED":
                out.add(trial.get("custom_dirname") or trial.get("trial_id"))
    return out


def _sweep_cmd(store, cfg_file, *extra) -> list[str]:
    import sys

    return [sys.executable, "-m", "tsesnet.cli", "sweep", "--store", str(store),
            "--config", str(cfg_file), "--name", "killed", *extra]  # fmt: skip


@pytest.mark.slow
def test_interrupted_sweep_registers_nothing_and_resumes_to_the_same_answer(
    ray_session, tiny_store, mlflow_uri, tmp_path
):
    """Ctrl-C (SIGINT) once a trial has finished: exit 130, runs KILLED, nothing registered.
    `--resume` finishes it: the table, the parent run and the registered version agree with the
    child runs' own histories; trials finished before were not run again. `--resume` of the
    finished sweep registers nothing new; `--resume --trials 4` proposes one more trial and
    `--trials 2` is a one-line error."""
    import os
    import signal
    import subprocess
    import time

    import mlflow

    cfg = _tiny_cfg(tmp_path, trials=3)
    cfg_file = tmp_path / "sweep.yaml"
    data = yaml.safe_load((CONFIGS / "sweep_tiny.yaml").read_text())
    data.update(train_config=str(CONFIGS / "tiny.yaml"), set=cfg.set, trials=3)
    cfg_file.write_text(yaml.safe_dump(data))
    exp_dir = tmp_path / "ray" / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}

    def run(*extra, timeout=600):
        out = subprocess.run(_sweep_cmd(tiny_store, cfg_file, *extra), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return out.returncode, out.stdout + out.stderr

    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        _sweep_cmd(tiny_store, cfg_file), env=env, cwd=tmp_path, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 240
    while not (done_before := _terminated_trials(exp_dir)):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=180) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    log.close()
    text = (tmp_path / "driver.log").read_text()
    assert (
        "interrupted" in text
        and "--resume" in text
        and "registered" not in text.replace("nothing registered", "")
    )
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("tsesnet").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`tsesnet.kind` = 'sweep'")
    assert parent.info.status == "KILLED"
    assert client.search_model_versions("name = 'tsesnet'") == []

    def lines(trial):
        return (exp_dir / trial / "result.json").read_text().count("\n")

    before = {t: lines(t) for t in done_before}
    code, out = run("--resume")
    assert code == 0, out[-3000:]
    assert {t: lines(t) for t in done_before} == before  # finished trials did not run again
    table = {line.split()[0]: line for line in out.splitlines() if re.match(r"t\d{3} ", line)}
    assert sorted(table) == ["t001", "t002", "t003"]
    children = {c.data.tags["tsesnet.trial"]: c for c in _children(client, parent.info.run_id)}
    assert sorted(children) == ["t001", "t002", "t003"]
    best = {}
    for t, c in children.items():
        assert c.info.status == "FINISHED"
        hist = client.get_metric_history(c.info.run_id, "val_dice")
        steps = [m.step for m in hist]
        assert steps and len(steps) == len(set(steps)), f"{t}: {steps}"
        best[t] = max(m.value for m in hist)
        assert report.table_cell(best[t]) in table[t]  # the table shows each trial's own best
    winner = max(best, key=best.get)
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tsesnet.best_trial"] == winner
    assert parent.data.metrics["best_val_dice"] == pytest.approx(best[winner])
    (mv,) = client.search_model_versions("name = 'tsesnet'")
    assert mv.run_id == children[winner].info.run_id

    code, out = run("--resume")  # finished: nothing new trained or registered
    assert code == 0 and len(client.search_model_versions("name = 'tsesnet'")) == 1, out[-2000:]
    code, out = run("--resume", "--trials", "2")
    assert code == 2 and "fewer than the 3 trials" in out and out.count("\n") <= 3, out[-2000:]
    code, out = run("--resume", "--trials", "4")
    assert code == 0, out[-3000:]
    assert sorted(p.name for p in exp_dir.glob("t[0-9][0-9][0-9]")) == [
        "t001", "t002", "t003", "t004"
    ]  # fmt: skip
    assert {t: lines(t) for t in done_before} == before


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_or_losing_trials(
    ray_session, tiny_store, mlflow_uri, tmp_path, capsys
):
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    cfg = _tiny_cfg(tmp_path, trials=3)
    cfg_file = tmp_path / "sweep.yaml"
    data = yaml.safe_load((CONFIGS / "sweep_tiny.yaml").read_text())
    data.update(train_config=str(CONFIGS / "tiny.yaml"), set=cfg.set, trials=3)
    cfg_file.write_text(yaml.safe_dump(data))
    exp_dir = tmp_path / "ray" / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [
        sys.executable,
        "-m",
        "tsesnet.cli",
        "sweep",
        "--store",
        str(tiny_store),
        "--config",
        str(cfg_file),
        "--name",
        "killed",
    ]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (done_before := _terminated_trials(exp_dir)):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    log.close()
    assert driver.returncode == -signal.SIGKILL

    def lines(trial):
        return (exp_dir / trial / "result.json").read_text().count("\n")

    before = {t: lines(t) for t in done_before}
    # Without --resume the sweep refuses to start over; a sweep that never ran can't resume.
    with pytest.raises(InputError, match=r"pass resume=True to continue it, or name for a new"):
        runner.run_sweep(str(tiny_store), spacemod.load(cfg_file), name="killed")
    # the command line says the same by its flags
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr
    assert (
        again.stderr.strip()
        .splitlines()[-1]
        .endswith("pass --resume to continue it, or --name for a new sweep")
    )
    with pytest.raises(InputError, match="no sweep 'other' to resume"):
        runner.run_sweep(str(tiny_store), spacemod.load(cfg_file), name="other", resume=True)

    argv = ["sweep", "--store", str(tiny_store), "--config", str(cfg_file)]
    args = build_parser().parse_args([*argv, "--name", "killed", "--resume"])
    assert runner.cli(args) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out and "best val DSC" in out
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)

    table = [line.split()[0] for line in out.splitlines() if re.match(r"t\d{3} ", line)]
    assert sorted(table) == ["t001", "t002", "t003"]
    assert sorted(p.name for p in exp_dir.glob("t[0-9][0-9][0-9]")) == ["t001", "t002", "t003"]
    # Trials finished before the kill were not run again.
    assert {t: lines(t) for t in done_before} == before
    # One parent, one child per trial: nothing duplicated in MLflow either.
    parents = client.search_runs(
        [client.get_experiment_by_name("tsesnet").experiment_id],
        filter_string="tags.`tsesnet.sweep` = 'killed' and tags.`tsesnet.kind` = 'sweep'",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(client, parents[0].info.run_id)
    assert sorted(c.data.tags["tsesnet.trial"] for c in children) == ["t001", "t002", "t003"]
    for c in children:
        assert c.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_dice")]
        assert steps and len(steps) == len(set(steps)), f"{c.data.tags['tsesnet.trial']}: {steps}"
