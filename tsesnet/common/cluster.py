"""The one way the `tsesnet` drivers (train, sweep, predict) reach Ray, and its token file.

`$RAY_ADDRESS` picks a cluster; without it a new local instance starts (`address="local"`: never a
cluster some earlier `ray start` left on this machine), with the dashboard on and bound to 127.0.0.1
(Train V2 needs its state API to free a finished run's placement group: without it the second of two
Train runs in one Ray instance waited forever for the first one's CPUs). Ray's workers run at
niceness 15 by default, so on a busy machine they lose the CPU to everything else; a local instance
started here runs them at 0 (measured by `tests/benchmarks/bench_train.py`): each worker reads
`RAY_worker_niceness` from its own environment, which the job's runtime env sets, so this process's
environment is left alone. Workers' output (the training loop's epoch lines, the prediction
progress) is forwarded to the driver, where `tsesnet` and `ray job logs` show it. An already
initialised session is used as it is, and left running: `disconnect` ends only a connection
`connect` made (a caller's own Ray, a notebook's or the tests' session, outlives the command).

Token authentication and the local instance itself: `data_store.local_ray`.
"""

from __future__ import annotations

import contextlib
import os

from data_store import local_ray

#: Whether `connect` started or joined the Ray this process is connected to (`disconnect`).
_connected_here = False


def connect():
    """Return the `ray` module, connected to the current session, `$RAY_ADDRESS` or a new one.

    A command's driver says which, in one line, before the seconds Ray takes to start, and
    then prints its workers' output through `tsesnet.common.console`.
    """
    global _connected_here
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    from tsesnet.common import console

    if console.log_path() is not None:
        console.say(f"connecting to Ray at {address}" if address else "starting a local Ray")
    # The runtime env of a new local instance's job: every task and actor of it, Ray Train's and
    # Tune's included (a task's own `env_vars` are merged with these).
    local_env = {"env_vars": {"RAY_worker_niceness": "0"}}
    ray = local_ray.connect(log_to_driver=True, runtime_env=local_env)
    _connected_here = True
    console.attach_ray()
    return ray


def disconnect() -> None:
    """Leave the Ray that `connect` connected to before a command prints its last line: Ray
    forwards its workers' log lines from a thread of its own, which would otherwise go on
    printing after the error. A Ray the caller had initialised is not this command's to end."""
    import sys

    global _connected_here
    ray = sys.modules.get("ray")
    if _connected_here and ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()
    _connected_here = False
