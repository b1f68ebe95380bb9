"""`tsesnet.tracking.runs`: where runs go, and a tracking database that cannot race."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path):
    """Reproduces 'two trainings started at once in a new directory: the second dies in MLflow's
    SQLite schema migration': without the lock, 6 of 6 such processes died here."""
    code = (
        "from tsesnet.tracking.runs import ensure_database, find_or_create_run\n"
        "e = ensure_database('race')\n"
        "print(e, find_or_create_run(e, 'same-name')[0])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in outs]
    experiments = {out.split()[0] for out, _ in outs}
    assert len(experiments) == 1  # one experiment, whoever created it
    assert (tmp_path / "mlflow.db").is_file()


def test_a_trial_that_loses_the_race_to_insert_its_store_still_logs_it(mlflow_uri, monkeypatch):
    """Two sweep trials log the same store to one experiment at once. MLflow's SQL store looks
    the dataset up, then inserts it, so the later insert fails on its unique key: a trial of the
    tiny sweep failed that way in a full run. Here the other trial inserts the dataset between
    the lookup and the insert (its real `log_input`), and the insert fails as it did there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tsesnet.tracking import runs

    exp = mlflow.create_experiment("trials")
    real, calls = mlflow.log_input, []

    def racing(dataset, context=None):
        calls.append(context)
        if len(calls) == 1:
            with mlflow.start_run(experiment_id=exp, nested=True):  # the other trial
                real(dataset, context=context)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        return real(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run(experiment_id=exp) as run:
        runs.log_store_input("/data/cohort.zarr", "f" * 16, 0)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["cohort.zarr"] and calls == ["fold 0"] * 2


def test_search_values_are_quoted_safely():
    import pytest

    from tsesnet.tracking.runs import quote

    assert quote("it's") == '"it\'s"' and quote('a"b') == "'a\"b'"
    with pytest.raises(ValueError, match="both quote"):
        quote("a'b\"c")


def test_a_trial_logs_to_the_sweeps_store_without_writing_the_environment(tmp_path):
    """A Tune trial gets the tracking URI the sweep driver resolved (`TrialSetup`) and hands it
    to MLflow explicitly: its child run lands in the sweep's database although the trial's
    process has no `MLFLOW_TRACKING_URI` and another working directory, and the trial's
    environment is left as it was (it used to export the URI)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    driver = (
        "import sys\n"
        "from tsesnet.tracking.runs import ensure_database, find_or_create_run\n"
        "e = ensure_database('sweeps', sys.argv[1])\n"
        "print(e, find_or_create_run(e, 'parent', uri=sys.argv[1])[0])\n"
    )
    trial = (
        "import os, sys\n"
        "from sweeps.trial import TrialSetup, _child_run\n"
        "from tsesnet.training.config import TrainConfig\n"
        "uri, e, parent = sys.argv[1:]\n"
        "setup = TrialSetup('sw', '', '', TrainConfig(), '', uri, e, parent)\n"
        "print(_child_run(setup, 'sw-t001', 't001'), os.environ.get('MLFLOW_TRACKING_URI'))\n"
    )
    (tmp_path / "sweep").mkdir()
    (tmp_path / "trial").mkdir()

    def run(code, *args, cwd):
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-800:]
        return done.stdout.split()

    experiment, parent = run(driver, uri, cwd=tmp_path / "sweep")
    child, exported = run(trial, uri, experiment, parent, cwd=tmp_path / "trial")
    assert exported == "None"
    got = mlflow.MlflowClient(uri).get_run(child)
    assert got.info.experiment_id == experiment
    assert got.data.tags["mlflow.parentRunId"] == parent
    assert not list((tmp_path / "trial").iterdir())  # nothing tracked where the trial ran
