"""What `tsesnet train` and `tsesnet sweep` print: a short console of the platform's own lines
(one per stage, one per epoch with its time and ETA), no colour codes when redirected, and the
full output of Ray and the libraries in the log file the first line names (or on the console
with `-v`). The epochs printed are the epochs MLflow holds, numbered alike (from 1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "platform" / "configs"

# Before: a 2-epoch tiny training printed 25 lines (50 beside another Ray instance: its
# placement-group cleaner's 30-line traceback), a 2-trial tiny sweep 59.
TRAIN_LINES_MAX = 14
SWEEP_LINES_MAX = 30


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, as typed
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "mlartifacts"),
        PYTHONPATH=str(ROOT),
    )
    return env


def _tsesnet(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`tsesnet ARGS` with stdout and stderr redirected to pipes (not a terminal)."""
    out = subprocess.run(
        [sys.executable, "-m", "tsesnet.cli", *args],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _lines(out: subprocess.CompletedProcess) -> list[str]:
    return (out.stdout + out.stderr).splitlines()


def _log_of(out: subprocess.CompletedProcess, tmp_path: Path) -> str:
    first = out.stdout.splitlines()[0]
    m = re.fullmatch(r"tsesnet \w+: full log in (.+)", first)
    assert m, first
    return (tmp_path / m.group(1)).read_text()


def _epochs_printed(lines: list[str], run: str) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(rf"{run} \[epoch (\d+)/", line))]


def _steps(tmp_path: Path, run_name: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`tsesnet.run_name` = '{run_name}'",
    )
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_total"))


@pytest.mark.slow
def test_training_prints_a_short_plain_console_and_logs_everything(trained_tiny):
    """The session's 2-epoch tiny training (`trained_tiny`), run beside another Ray instance
    (the test session's) with its output piped."""
    out, folder = trained_tiny.output, trained_tiny.folder
    lines = _lines(out)
    assert len(lines) <= TRAIN_LINES_MAX, "\n".join(lines)
    assert "\x1b" not in out.stdout + out.stderr
    assert not any("Traceback" in x or "pid=" in x or "INFO" in x for x in lines), lines
    epoch_lines = [x for x in lines if x.startswith("quiet [epoch")]
    assert len(epoch_lines) == 2 and all(
        re.search(r"elapsed \d+:\d\d, ETA", x) for x in epoch_lines
    )
    # The console, MLflow and the plots count epochs alike: 1, 2.
    assert _epochs_printed(lines, "quiet") == [1, 2] == _steps(folder, "quiet")
    log = _log_of(out, folder)
    assert "(RayTrainWorker pid=" in log and "quiet [epoch 2/2]" in log and "\x1b" not in log


@pytest.mark.slow
def test_verbose_training_prints_rays_output_uncoloured(tiny_store, tmp_path):
    log_file = tmp_path / "my.log"
    out = _tsesnet(
        tmp_path,
        "train", "--store", str(tiny_store), "--config", str(CONFIGS / "tiny.yaml"),
        "--set", f"run.storage_path={tmp_path / 'ray'}", "--name", "loud", "-v",
        "--log-file", str(log_file),
    )  # fmt: skip
    assert out.stdout.splitlines()[0] == f"tsesnet train: full log in {log_file}"
    assert "(RayTrainWorker pid=" in out.stdout + out.stderr
    assert "\x1b" not in out.stdout + out.stderr
    assert "(RayTrainWorker pid=" in log_file.read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_rays_own_log_records_go_to_the_log_and_to_the_console_only_with_v(verbose, tmp_path):
    """Ray's logger has a stderr handler of its own. Tune's "which may be a performance
    bottleneck" warnings, written through it on a loaded machine, took a sweep's console past
    SWEEP_LINES_MAX in CI. They go where every other library's records go."""
    script = (
        "import logging, sys\n"
        "from tsesnet.common import console\n"
        f"console.start('sweep', verbose={verbose})\n"
        "import ray  # Ray's logger and its handler are made here, after the console\n"
        "console.attach_ray()\n"
        "logging.getLogger('ray.tune.utils.util').warning("
        "'The `process_trial_result` operation took 0.563 s, which may be a performance "
        "bottleneck.')\n"
    )
    env = {**_env(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    on_console = "performance bottleneck" in out.stdout + out.stderr
    assert on_console == verbose, out.stdout + out.stderr
    assert "performance bottleneck" in _log_of(out, tmp_path)


@pytest.mark.slow
def test_sweep_prints_trials_and_epochs_without_tunes_banners(tiny_store, tmp_path):
    """A 2-trial tiny sweep (2 epochs per trial at most): each trial's epoch lines are the
    epochs its MLflow run holds."""
    out = _tsesnet(
        tmp_path,
        "sweep", "--store", str(tiny_store), "--config", str(CONFIGS / "sweep_tiny.yaml"),
        "--trials", "2", "--name", "quiet", "--set", f"run.storage_path={tmp_path / 'ray'}",
    )  # fmt: skip
    lines = _lines(out)
    assert len(lines) <= SWEEP_LINES_MAX, "\n".join(lines)
    text = out.stdout + out.stderr
    assert "\x1b" not in text
    for noise in ("Configuration for experiment", "TensorBoard", "(raylet)", "Traceback", "pid="):
        assert noise not in text, noise
    finished = [x for x in lines if re.match(r"trial t00\d finished \(\d/2, elapsed .* ETA", x)]
    assert len(finished) == 2, lines
    for trial in ("t001", "t002"):
        run = f"quiet-{trial}"
        printed = _epochs_printed(lines, run)
        assert printed and printed == _steps(tmp_path, run), (trial, printed)
    log = _log_of(out, tmp_path)
    assert "pid=" in log and "\x1b" not in log
