"""Where MLflow writes, and the small helpers every tracked run shares.

`MLFLOW_TRACKING_URI` picks the tracking server; without it an embedded SQLite database
(`mlflow.db`) and an artifact folder (`mlartifacts/`) in the working directory are used, so
nothing needs a server. Nothing is configured at import: call `tracking_uri()` when needed.

Several processes opening a new SQLite database at once race on its schema migration and die
(seen here: 6 of 6 processes started together failed with "duplicate column name" or an alembic
`CommandError`); once the database exists, 16 concurrent writers logged without an error. So
`configure()` creates and migrates a SQLite database under an exclusive file lock
(`<database>.lock`) before anything else touches it, and the driver calls `ensure_database()`
before Ray workers or Tune trials start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_EXPERIMENT = "tsesnet"
# The tag that finds a run again by its deterministic name (resume, sweeps, registration).
RUN_NAME_TAG = "tsesnet.run_name"
# Carries the submitted tree's commit into a Ray job (whose copy of the code has no .git).
COMMIT_ENV = "TSESNET_GIT_COMMIT"
# Set by Ray in the driver of a submitted job (`ray job submit`, `tsesnet submit`).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def tracking_uri() -> str:
    """The tracking URI: `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_location() -> str | None:
    """Where new experiments keep artifacts when the tracking store is a local database.

    `$MLFLOW_ARTIFACTS_DESTINATION` if set, else `<cwd>/mlartifacts` for the default SQLite
    database; None (the server decides) for any other tracking URI.
    """
    dest = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION")
    if dest:
        return Path(dest).resolve().as_uri() if "://" not in dest else dest
    if "MLFLOW_TRACKING_URI" not in os.environ:
        return (Path.cwd() / "mlartifacts").as_uri()
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def configure(uri: str | None = None) -> str:
    """Point this process's MLflow client at `uri` (default `tracking_uri()`); return the URI.

    Nothing here writes the environment: the processes that need the URI get it passed down
    (`RunPlan.tracking_uri`, `TrialSetup.tracking_uri`, the env_vars of a Ray runtime_env).
    MLflow's `set_tracking_uri` (3.x) exports the URI to the environment by itself.
    """
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        # The first open creates and migrates the schema: one process at a time.
        with _exclusive(Path(uri[len("sqlite:///") :] + ".lock")):
            _create_database(uri, artifact_location())
    else:
        _create_database(uri, artifact_location())
    return uri


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive `flock` on `lock_path` (created if needed) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_database(experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None) -> str:
    """Create the tracking database (schema migrated) and the experiment; return its id.

    Call it once in the driver before any worker or trial logs, with the URI the driver
    resolved (default `tracking_uri()`).

    Raises:
        InputError: in a Ray job, tracking would land in the job's temporary copy of the code.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    artifacts = artifact_location()
    check_outlives_job(uri, artifacts)
    configure(uri)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifacts)
    except MlflowException:
        # Another driver created it between the lookup and the create.
        return client.get_experiment_by_name(experiment).experiment_id


def check_tracking(uri: str | None = None, *, connect_timeout: float = 3.0) -> None:
    """Check that the tracking store can be used, in bounded time, before Ray starts.

    An SQLite database must be an SQLite file (or absent, in a folder that can be written), be
    writable, and hold a schema this MLflow knows; a tracking server must accept a connection
    within `connect_timeout` seconds (MLflow's own client retries for minutes, silently).

    Raises:
        InputError: one line naming the URI (without a password) and the problem.
    """
    uri = uri or tracking_uri()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite" and uri.lower().startswith("sqlite:///"):
        problem = _sqlite_problem(Path(uri[len("sqlite:///") :]), uri)
    elif scheme in ("http", "https"):
        problem = _server_problem(uri, connect_timeout)
    else:
        return
    if problem:
        from data_store.errors import InputError

        raise InputError(f"MLFLOW_TRACKING_URI={_without_password(uri)}: {problem}")


def _without_password(uri: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return uri.replace(f":{parts.password}@", ":***@", 1)


def _sqlite_problem(path: Path, uri: str) -> str | None:
    """Why the SQLite tracking database at `path` cannot be used, or None."""
    import sqlite3

    if not path.exists():
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is not a folder"
        return _unwritable(folder)
    if not path.is_file():
        return f"{path} is not a file"
    try:
        with open(path, "r+b") as f:  # opened for writing, nothing written
            head = f.read(16)
    except OSError as err:
        return f"cannot write {path}: {err.strerror or err}"
    if head and head != b"SQLite format 3\x00":
        return f"{path} is not an SQLite database"
    problem = _unwritable(path.parent)  # SQLite writes its journal beside the database
    if problem or not head:
        return problem
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            rev = None
            if "alembic_version" in tables:
                rev = (db.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[
                    0
                ]
    except sqlite3.Error as err:
        return f"{path} is not a readable SQLite database ({err})"
    if "alembic_version" not in tables:
        return None if not tables else f"{path} is an SQLite database but not MLflow's"
    return _schema_problem(rev, uri)


def _schema_problem(rev: str | None, uri: str) -> str | None:
    """Why an MLflow database at schema revision `rev` cannot be opened by this MLflow."""
    import mlflow
    from alembic.script import ScriptDirectory

    from tsesnet.compat import mlflow_alembic_config

    script = ScriptDirectory.from_config(mlflow_alembic_config(""))
    head = script.get_current_head()
    if rev is None or rev == head:
        return None
    try:
        script.get_revision(rev)
    except Exception:  # noqa: BLE001 - alembic's "no such revision" has several types
        return (
            f"its schema (revision {rev}) was written by a newer MLflow than this one "
            f"({mlflow.__version__}); use that MLflow, or another database"
        )
    return (
        f"its schema (revision {rev}) is older than this MLflow's ({head}); back it up, then "
        f"`mlflow db upgrade {_without_password(uri)}`"
    )


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (tried: a temporary file, removed), or None."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".tsesnet-write-check-", dir=folder)
    except OSError as err:
        return f"cannot write in {folder}: {err.strerror or err}"
    os.close(fd)
    os.unlink(probe)
    return None


def _server_problem(uri: str, timeout: float) -> str | None:
    """Why nothing answers at the tracking server `uri` within `timeout` seconds, or None."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        return (
            f"no tracking server answers at {parts.hostname}:{port} ({why} within "
            f"{timeout:g} s); start it (platform/mlflow_server.sh) or unset MLFLOW_TRACKING_URI"
        )


def _is_database(uri: str) -> bool:
    from mlflow.store.db.db_types import DATABASE_ENGINES

    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_ENGINES


def _create_database(uri: str, artifacts: str | None) -> None:
    """Open a database tracking store once with `artifacts` as its default artifact root.

    A new database gets MLflow's experiment `Default` when it is first opened, with its
    artifacts in `./mlruns` of whatever the working directory is; in a Ray job that is the
    job's temporary copy of the code, deleted with the cluster. Opening it here first gives
    `Default` the platform's artifact root instead.
    """
    if artifacts is None or not _is_database(uri):
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, artifacts)


def check_outlives_job(uri: str, artifacts: str | None) -> None:
    """In a Ray job, refuse a tracking database or artifact folder inside its working directory.

    A submitted job runs in a temporary copy of the uploaded code: an MLflow database or
    artifacts there disappear with the cluster. Outside a job this checks nothing.

    Raises:
        InputError: naming the location and what to set instead.
    """
    if RAY_JOB_ENV not in os.environ:
        return
    from data_store.errors import InputError

    if "MLFLOW_TRACKING_URI" not in os.environ:
        raise InputError(
            "MLFLOW_TRACKING_URI is not set in this Ray job, so its runs would go to the "
            "job's temporary working directory; submit with `tsesnet submit` or a runtime env "
            "from `tsesnet submit --print-runtime-env`, or set it in the runtime env's env_vars"
        )
    here = Path.cwd().resolve()
    if _is_database(uri) and artifacts is None:
        artifacts = (here / "mlruns").as_uri()  # MLflow's default artifact root
    for place in (uri, artifacts):
        local = _local_path(place)
        if local is not None and local.is_relative_to(here):
            raise InputError(
                f"{place} is inside this Ray job's temporary working directory {here}: "
                "give MLFLOW_TRACKING_URI (and MLFLOW_ARTIFACTS_DESTINATION) as absolute "
                "paths or a server URL"
            )


def _local_path(uri: str | None) -> Path | None:
    """The local file a `sqlite:///` or `file:` URI (or a bare path) names; None otherwise."""
    if not uri:
        return None
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve()
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).resolve()
    return None if "://" in uri else Path(uri).resolve()


def git_commit(path: str | Path | None = None) -> str:
    """The git commit of the code being run, with `-dirty` if it had uncommitted changes.

    Read from git where the code is a checkout. A Ray job runs in an uploaded copy of the
    repository without `.git`, and the container image has none either: there the commit comes
    from `$TSESNET_GIT_COMMIT`, which `tsesnet submit` (and the runtime env it writes) and the
    image's build set. "unknown" when neither says.
    """
    cwd = Path(path) if path else Path(__file__).resolve().parent
    return _git_describe(cwd) or os.environ.get(COMMIT_ENV) or "unknown"


def _git_describe(cwd: Path) -> str | None:
    """`<sha>` or `<sha>-dirty` for the checkout holding `cwd`; None where git can't tell."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def system_info() -> dict[str, str]:
    """Devices and library versions, as MLflow tags."""
    import mlflow
    import numpy
    import ray
    import torch

    info = {
        "sys.python": sys.version.split()[0],
        "sys.platform": platform.platform(),
        "sys.cpu_count": str(os.cpu_count()),
        "sys.torch": torch.__version__,
        "sys.ray": ray.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.numpy": numpy.__version__,
        "sys.cuda": str(torch.cuda.is_available()),
        "sys.torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["sys.gpu"] = torch.cuda.get_device_name(0)
        info["sys.gpu_count"] = str(torch.cuda.device_count())
    return info


def find_or_create_run(
    experiment_id: str,
    name: str,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
):
    """The MLflow run tagged `tsesnet.run_name = name` (and `tags`), or a new one.

    `uri` names the tracking store; without it, the one this process's MLflow points at.

    Returns:
        (run id, True when an existing run was found).
    """
    import mlflow

    wanted = {RUN_NAME_TAG: name, **(tags or {})}
    client = mlflow.MlflowClient(uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(f"tags.`{k}` = {quote(v)}" for k, v in wanted.items()),
        max_results=1,
    )
    if found:
        return found[0].info.run_id, True
    run = client.create_run(experiment_id, run_name=name, tags=wanted)
    return run.info.run_id, False


def quote(value: str) -> str:
    """A string literal for an MLflow search filter.

    MLflow's filter parser has no escapes: a value is quoted with the quote it does not contain.

    Raises:
        ValueError: the value holds both quote characters (it cannot be searched for).
    """
    value = str(value)
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise ValueError(f"cannot search MLflow for a value with both quote characters: {value!r}")


def log_store_input(store: str, fingerprint: str, fold: int) -> None:
    """Log the store as the active run's dataset input (the runs table's "Dataset" column):
    source the store's path or URL, digest its fingerprint, context the validation fold."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # a local path resolves to MLflow's local-artifact source, with a warning that it could
        # be read two ways
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(store)
    name = Path(str(store).rstrip("/")).name
    dataset = MetaDataset(source, name=name, digest=fingerprint[:36])
    # Two sweep trials starting at once log the same store to one experiment. MLflow's SQL store
    # looks the dataset up, then inserts it, so the later insert fails on its unique (experiment,
    # name, digest) key and the trial failed. Tried again, it finds the dataset and links it.
    for attempt in range(1, 4):
        try:
            mlflow.log_input(dataset, context=f"fold {fold}")
            return
        except Exception:  # the store's IntegrityError, as MLflow wraps it (SQL or HTTP)
            if attempt == 3:
                raise
            time.sleep(0.2 * attempt)


def ui_base() -> str:
    """Where the MLflow UI of this tracking store is: the server itself for an http(s) URI,
    else where `mlflow ui` serves it by default."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


# The MLflow 3.17 UI opens an experiment in "GenAI" mode (no runs table) unless the URL says
# `workflowType=machine_learning`; every link the platform prints says it.
_MODE = "workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str) -> str:
    """The UI page of a run (a sweep's parent lists its trials as children)."""
    return f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{_MODE}"


def experiment_link(experiment_id: str) -> str:
    """The UI's runs table of an experiment."""
    return f"{ui_base()}/#/experiments/{experiment_id}?{_MODE}"


def model_link(name: str, version: str | None = None) -> str:
    """The UI page of a registered model, or of one of its versions."""
    page = f"models/{name}" + (f"/versions/{version}" if version else "")
    return f"{ui_base()}/#/{page}?{_MODE}"


def ui_hint() -> str:
    """How to open the UI for this tracking store (a command for a local database)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI: {uri}"
    return f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
