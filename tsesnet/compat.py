"""Every private name of a third-party library that the `tsesnet` package uses: the one place to
change when Ray Train, MLflow or PyTorch moves one.

Each is listed in `PRIVATE` with what it is for; `tests/test_compat.py` imports every one of them
on the installed versions and fails naming the library, its version and the name if one is gone,
and at run time a missing one is an ImportError saying the same. Nothing here imports Ray until a
function is called. `data_store.compat` holds the data store's (Zarr's, Ray's auth config).
"""

from __future__ import annotations

from typing import Any

from data_store.compat import SUPPORTED, Private

__all__ = ["SUPPORTED", "PRIVATE"]

TRAIN_SNAPSHOT = Private(
    "ray",
    "ray.train.v2._internal.constants",
    "CHECKPOINT_MANAGER_SNAPSHOT_FILENAME",
    "telling whether a Ray Train run folder holds a run to resume",
)
TRAIN_CONTEXT = Private(
    "ray",
    "ray.train.v2._internal.execution.context",
    None,
    "quieting Ray Train's per-report log (its logger is named after this file)",
)
DISPATCH_MODE = Private(
    "torch",
    "torch.utils._python_dispatch",
    "TorchDispatchMode",
    "measuring live tensor memory in `tsesnet model-summary`",
)
TREE_LEAVES = Private(
    "torch",
    "torch.utils._pytree",
    "tree_leaves",
    "the tensors in an operator's output in `tsesnet model-summary`",
)
MLFLOW_ALEMBIC = Private(
    "mlflow",
    "mlflow.store.db.utils",
    "_get_alembic_config",
    "telling whether MLflow can open a tracking database's schema revision",
)
RAY_LOG_DISPATCHER = Private(
    "ray",
    "ray._private.ray_logging",
    "global_worker_stdstream_dispatcher",
    "printing forwarded worker output our way (`tsesnet.common.console`)",
)
RAY_WORKER = Private(
    "ray",
    "ray._private.worker",
    None,
    "its `print_to_stdstream`, through which Ray's thread prints the cluster's error messages",
)
RAY_AUTOSCALER_EVENTS = Private(
    "ray",
    "ray._private.worker",
    "filter_autoscaler_events",
    "the events among the autoscaler's raw status output",
)
PRIVATE = (
    TRAIN_SNAPSHOT,
    TRAIN_CONTEXT,
    DISPATCH_MODE,
    TREE_LEAVES,
    MLFLOW_ALEMBIC,
    RAY_LOG_DISPATCHER,
    RAY_WORKER,
    RAY_AUTOSCALER_EVENTS,
)


def train_snapshot_filename() -> str:
    """The file Ray Train's checkpoint manager writes in a run folder once it has a checkpoint."""
    return TRAIN_SNAPSHOT.load()


def train_report_logger_name() -> str | None:
    """The name of the logger of Ray Train's per-report log; None if this Ray has no such file."""
    try:
        return TRAIN_CONTEXT.load().__file__
    except ImportError:
        return None  # only a log level is lost


def mlflow_alembic_config(db_url: str) -> Any:
    """MLflow's alembic config for its tracking-database migrations (`db_url` may be "")."""
    return MLFLOW_ALEMBIC.load()(db_url=db_url)


def torch_dispatch_mode() -> type:
    """PyTorch's `TorchDispatchMode` base class (sees every operator call)."""
    return DISPATCH_MODE.load()


def tree_leaves(tree: Any) -> list:
    """The leaves of a nested structure of tensors (PyTorch's pytree)."""
    return TREE_LEAVES.load()(tree)


def ray_log_dispatcher() -> Any:
    """Ray's dispatcher of the worker output forwarded to the driver (handlers by name)."""
    return RAY_LOG_DISPATCHER.load()


def ray_worker_module() -> Any:
    """Ray's driver-side worker module (its `print_to_stdstream` prints the cluster's errors)."""
    return RAY_WORKER.load()


def ray_autoscaler_events(lines) -> list[str]:
    """The event lines among the autoscaler's raw output lines."""
    return list(RAY_AUTOSCALER_EVENTS.load()(lines))
