"""Job submission as users type it: `ray job submit` and `tsesnet submit`, in subprocesses.

A head started by `platform/local_cluster.sh` (token authentication, free ports, its own HOME
and temp dir) takes jobs from a directory that is not the repository: a job sees the submitted
tree's commit, a failed job is reported as failed, the static runtime env fails clearly, a
submission without the token is refused, and no MLflow experiment keeps its artifacts in the
job's temporary copy of the code. The tutorial's own `ray job submit` and `tsesnet submit`
blocks (docs/pages/tutorial/ray-job.md), with their runs' commit and artifact locations, are run
by `tests/test_readme.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from local_head import BIN, ROOT, free_ports, head_pids, is_loopback, listeners, local_head

from tsesnet.tracking import runs


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The script's head, shared by this file's tests; yields the user's environment."""
    with local_head(tmp_path_factory.mktemp("head") / "home") as env:
        yield env


def _bash(commands: str, env: dict, cwd: Path, timeout: int = 480) -> subprocess.CompletedProcess:
    """Run shell commands as a user types them (`set -euo pipefail`, the venv on PATH)."""
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + commands],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tsesnet(args: list[str], env: dict, cwd: Path, timeout: int = 300):
    return subprocess.run(
        [str(BIN / "tsesnet"), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_tsesnet_submit_follows_the_job_and_reports_its_outcome(head, tmp_path):
    url = f"http://127.0.0.1:{head['DASHBOARD_PORT']}"
    env = dict(head, RAY_AUTH_MODE="token")
    probe = "from tsesnet.tracking.runs import git_commit; print('commit', git_commit())"
    ok = _tsesnet(["submit", "--address", url, "--", "python", "-c", probe], env, tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert f"commit {runs.git_commit(ROOT)}" in ok.stdout  # the job's copy has no .git
    assert "SUCCEEDED" in ok.stdout

    failed = _tsesnet(
        ["submit", "--address", url, "--", "tsesnet", "store", "info", str(tmp_path / "no.zarr")],
        env,
        tmp_path,
    )
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "FAILED" in failed.stdout and "no.zarr" in failed.stdout
    # After jobs (their supervisors and drivers started), still nothing beyond loopback.
    bound = listeners(head_pids(head["RAY_TEMP_DIR"]))
    assert bound and all(is_loopback(a) for a, _, _ in bound), bound


@pytest.mark.slow
def test_static_runtime_env_without_tracking_uri_fails_clearly(head, tiny_store):
    # The file used as it is, from the repository root: the job refuses to log into its copy.
    proc = _bash(
        "export RAY_AUTH_MODE=token\n"
        "ray job submit --address http://127.0.0.1:$DASHBOARD_PORT "
        '--runtime-env platform/runtime_env.yaml -- tsesnet train --store "$STORE" '
        "--config tsesnet/configs/tiny.yaml --name job-static",
        dict(head, STORE=str(tiny_store)),
        ROOT,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "MLFLOW_TRACKING_URI is not set in this Ray job" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_submission_without_the_token_is_refused(head, tmp_path):
    url = f"http://127.0.0.1:{head['DASHBOARD_PORT']}"
    anon = dict(head, HOME=str(tmp_path))  # no token file, no RAY_AUTH_MODE
    out = _tsesnet(["submit", "--address", url, "--", "echo", "hi"], anon, tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and "token" in line.lower(), line

    no_token = dict(anon, RAY_AUTH_MODE="token")
    out = _tsesnet(["submit", "--address", url, "--", "echo", "hi"], no_token, tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr

    plain = _bash(f"ray job submit --address {url} -- echo hi", anon, tmp_path, timeout=120)
    assert plain.returncode != 0 and "hi\n" not in plain.stdout


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--", "tsesnet", "train"], "no cluster to submit to"),
        (["--address", "ray://127.0.0.1:10001", "--", "echo"], "is not the job API"),
        (["--address", "http://127.0.0.1:{port}", "--env", "NOEQUALS", "--", "echo"], "KEY=VALUE"),
        (["--address", "http://127.0.0.1:{port}"], "nothing to run"),
        (["--address", "http://127.0.0.1:{port}", "--", "echo"], "cannot use the Ray job API"),
    ],
)
def test_submit_bad_input_is_one_line(args, problem, tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    out = _tsesnet([a.format(port=port) for a in ["submit", *args]], env, tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error:") and problem in line, line


def test_printed_runtime_env_names_the_checkout_tracking_and_commit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = "sqlite:///rel/mlflow.db"  # relative: made absolute
    env["MLFLOW_ARTIFACTS_DESTINATION"] = "arts"
    out = _tsesnet(["submit", "--print-runtime-env", "--env", "A=b=c"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    spec = yaml.safe_load(out.stdout)
    base = yaml.safe_load((ROOT / "platform" / "runtime_env.yaml").read_text())
    assert spec["working_dir"] == str(ROOT) and spec["excludes"] == base["excludes"]
    assert spec["env_vars"] == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}",
        runs.COMMIT_ENV: runs.git_commit(ROOT),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "arts"),
        "A": "b=c",
    }


def test_git_commit_falls_back_to_the_submitted_commit(tmp_path, monkeypatch):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert runs.git_commit(ROOT).split("-")[0] == sha.stdout.strip()
    monkeypatch.delenv(runs.COMMIT_ENV, raising=False)
    assert runs.git_commit(tmp_path) == "unknown"  # not a checkout, nothing submitted
    monkeypatch.setenv(runs.COMMIT_ENV, "abc123-dirty")
    assert runs.git_commit(tmp_path) == "abc123-dirty"
    assert runs.git_commit(ROOT) != "abc123-dirty"  # a checkout says for itself


def test_new_database_puts_default_experiment_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "db" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    runs.ensure_database("lineage-test")
    import mlflow

    located = {e.name: e.artifact_location for e in mlflow.MlflowClient().search_experiments()}
    assert located["Default"] == (db.parent / "mlartifacts" / "0").as_uri(), located
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    "uri",
    [None, "sqlite:///mlflow.db", "postgresql://mlflow@db:5432/mlflow"],
)
def test_a_job_never_tracks_into_its_temporary_copy(uri, tmp_path, monkeypatch):
    from data_store.errors import InputError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(runs.RAY_JOB_ENV, "{}")
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(InputError, match="MLFLOW_TRACKING_URI|temporary working directory"):
        runs.ensure_database("job-test")
    assert not list(tmp_path.iterdir())  # nothing was created there


def test_submit_help_lists_its_options():
    out = subprocess.run(
        [sys.executable, "-m", "tsesnet.cli", "submit", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for flag in ("--address", "--env", "--no-wait", "--print-runtime-env"):
        assert flag in out.stdout
