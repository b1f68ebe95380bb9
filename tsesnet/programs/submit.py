"""`tsesnet submit`: run a `tsesnet` command on a Ray cluster as a job, with what it needs.

A job runs in a copy of the code uploaded with it (`working_dir`), so three things must travel
with the submission that a plain `ray job submit --runtime-env platform/runtime_env.yaml` cannot
carry: the location of the checkout (the YAML's `working_dir: "."` is the directory the command
was typed in), `MLFLOW_TRACKING_URI` (Ray's runtime env cannot read the caller's environment,
and without it the job's runs would go to its temporary copy), and the commit of the code
(the copy has no `.git`). This module builds one runtime env with all three:

- `tsesnet submit [--address URL] -- tsesnet train ...` submits through Ray's job SDK, follows
  the job's output and exits with its outcome; the job's metadata records the commit too;
- `tsesnet submit --print-runtime-env > FILE` writes the same runtime env for
  `ray job submit --runtime-env FILE -- ...`, which then works from any directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml

import tsesnet
from data_store.errors import InputError
from data_store.local_ray import FORWARDED_ENV
from tsesnet.tracking import runs

BASE_ENV = Path("platform") / "runtime_env.yaml"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Runtime env keys that pass from the caller's environment to the job when set: object storage
# and MLflow settings (`data_store.local_ray.FORWARDED_ENV`), and the artifact folder.
PASSED_ENV = ("MLFLOW_ARTIFACTS_DESTINATION", *FORWARDED_ENV)


def repo_root() -> Path:
    """The checkout whose `tsesnet` package is running: what a job uploads.

    Raises:
        InputError: `tsesnet` is installed from a wheel, not a checkout of the repository.
    """
    root = Path(tsesnet.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / BASE_ENV).is_file():
        raise InputError(
            f"tsesnet runs from {root}, which is not a checkout of the repository; run the "
            "tsesnet of a checkout (its .venv/bin/tsesnet), or submit `tsesnet ...` without a "
            "working_dir to a cluster whose image holds the code"
        )
    return root


def _absolute_tracking_uri() -> str:
    """`runs.tracking_uri()` with a relative `sqlite:///` path made absolute (the job's cwd
    is a temporary copy, so a relative path would point into it)."""
    uri = runs.tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def job_env_vars(root: Path, extra: list[str]) -> dict[str, str]:
    """The environment a job needs: tracking, the submitted commit, and `--env KEY=VALUE`s.

    Raises:
        InputError: an `--env` item that is not KEY=VALUE.
    """
    env = {k: v for k in PASSED_ENV if (v := os.environ.get(k))}
    env.update(MLFLOW_TRACKING_URI=_absolute_tracking_uri())
    env[runs.COMMIT_ENV] = runs.git_commit(root)
    folder = env.get("MLFLOW_ARTIFACTS_DESTINATION")
    if folder and "://" not in folder:  # the job's cwd is a temporary copy
        env["MLFLOW_ARTIFACTS_DESTINATION"] = str(Path(folder).resolve())
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def runtime_env(extra_env: list[str] | None = None) -> dict:
    """`platform/runtime_env.yaml` with this checkout as `working_dir` and `job_env_vars`."""
    root = repo_root()
    env = yaml.safe_load((root / BASE_ENV).read_text())
    env["working_dir"] = str(root)
    env["env_vars"] = {**env.get("env_vars", {}), **job_env_vars(root, list(extra_env or []))}
    return env


def render_runtime_env(env: dict) -> str:
    """The runtime env as YAML for `ray job submit --runtime-env FILE`, with a header."""
    header = (
        "# Written by `tsesnet submit --print-runtime-env` for\n"
        "#   ray job submit --address URL --runtime-env THIS_FILE -- tsesnet ...\n"
        f"# Code: {env['working_dir']} at {env['env_vars'][runs.COMMIT_ENV]}. "
        "Write it again after a commit.\n"
    )
    return header + yaml.safe_dump(env, sort_keys=False)


def job_address(given: str | None) -> str:
    """The job API URL: `--address`, else `$RAY_API_SERVER_ADDRESS`, else an http `$RAY_ADDRESS`.

    Raises:
        InputError: none given, or not an http(s) URL.
    """
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError(
            "no cluster to submit to: pass --address http://HEAD:8265 (the dashboard's job API) "
            "or set RAY_API_SERVER_ADDRESS"
        )
    if urlparse(address).scheme not in ("http", "https"):
        raise InputError(f"--address {address!r} is not the job API's http://HOST:PORT URL")
    return address


def check_tracking_reaches(address: str) -> None:
    """Refuse a remote cluster with the default local SQLite database, which it can't reach.

    Raises:
        InputError: `MLFLOW_TRACKING_URI` unset and the cluster is not on this machine.
    """
    if os.environ.get("MLFLOW_TRACKING_URI") or urlparse(address).hostname in LOOPBACK:
        return
    raise InputError(
        f"MLFLOW_TRACKING_URI is not set: the cluster at {address} would log to "
        f"{runs.tracking_uri()} "
        "on its own disk; set it to the cluster's MLflow server (http://mlflow-host:5000)"
    )


def _client(address: str):
    """Ray's job SDK client for `address`.

    Raises:
        InputError: the job API can't be reached, or refuses this client (no or a wrong token).
    """
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError or its AuthenticationError
        raise InputError(f"cannot use the Ray job API at {address}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    """The first line of an error's message, with a hint when it is about the token."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if any(w in str(err).lower() for w in ("401", "403", "unauthori", "token")):
        text += (
            " (token authentication: export RAY_AUTH_MODE=token and put the cluster's token in "
            "~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN)"
        )
    return text


def submit(address: str, entrypoint: list[str], env: dict, submission_id: str | None) -> tuple:
    """Submit `entrypoint` as a job with runtime env `env`; return (client, job id).

    Raises:
        InputError: the cluster can't be reached or refuses the job.
    """
    client = _client(address)
    metadata = {
        "tsesnet.git_commit": env["env_vars"][runs.COMMIT_ENV],
        "tsesnet.working_dir": env["working_dir"],
    }
    try:
        job_id = client.submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env=env,
            metadata=metadata,
            submission_id=submission_id,
        )
    except Exception as err:
        raise InputError(f"the Ray job API at {address} refused the job: {_one_line(err)}") from err
    return client, job_id


def follow(client, job_id: str) -> str:
    """Print the job's output as it comes until it ends; return its final status name."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return client.get_job_status(job_id).value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet submit` (read by `cli`)."""
    parser.add_argument("--address", default=None, metavar="URL", help="job API, http://HEAD:8265")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    parser.add_argument(
        "--submission-id", default=None, metavar="ID", help="the job's ID (default: Ray's)"
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument(
        "--print-runtime-env",
        action="store_true",
        help="write the runtime env YAML for `ray job submit --runtime-env FILE` and exit",
    )
    parser.add_argument(
        "entrypoint",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the command the job runs, e.g. -- tsesnet train --store s3://b/x.zarr",
    )


def cli(args) -> int:
    """`tsesnet submit [--address URL] [--env K=V] [--no-wait] -- COMMAND ...`."""
    entrypoint = list(args.entrypoint or [])
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]
    env = runtime_env(args.env)
    if args.print_runtime_env:
        sys.stdout.write(render_runtime_env(env))
        return 0
    if not entrypoint:
        raise InputError("nothing to run: give the command after --, e.g. -- tsesnet train ...")
    address = job_address(args.address)
    check_tracking_reaches(address)
    client, job_id = submit(address, entrypoint, env, args.submission_id)
    print(
        f"submitted job {job_id} to {address}: {shlex.join(entrypoint)}\n"
        f"code {env['working_dir']} at {env['env_vars'][runs.COMMIT_ENV]}, "
        f"MLflow {env['env_vars']['MLFLOW_TRACKING_URI']}",
        flush=True,
    )
    if args.no_wait:
        print(f"follow it with: ray job logs --address {address} -f {job_id}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\njob {job_id} keeps running; stop it with: ray job stop --address {address} {job_id}"
        )
        return 130
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
