"""What a `tsesnet` command prints on the console, and the full log beside it.

By default the console gets the platform's own lines (one per stage, one per epoch, the trials
of a sweep, results and errors) and its progress bars; everything else goes to a log file only,
named on the command's first line: the output of Ray's processes with their prefixes (Ray Train's
set-up messages, raylet warnings, the placement-group cleaner's "Found multiple active Ray
instances" traceback), the third-party libraries' logging (MLflow, Ray, Tune, Optuna), Python
warnings and what Ray's C++ core writes to the driver's stderr descriptor. `-v`/`--verbose` puts
all of it on the console as well. Colour codes are never written: Ray's own printer of worker
output colours its prefixes even into a file, so it is replaced.

A worker's line reaches the console when the worker printed it on stdout (the training loop's and
the sweep trials' lines): Ray's and the libraries' messages there go to stderr (logging), except
the raylet's, which is left out by name.

Nothing happens at import; `start` is called by `tsesnet.cli` for the commands that run long.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


def log_dir() -> Path:
    """Where a command's log goes unless `--log-file` says: this user's state folder
    (``$XDG_STATE_HOME/tsesnet/logs``, else ``~/.local/state/tsesnet/logs``), never the working
    directory (a refused command leaves nothing where it was typed)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "tsesnet" / "logs"


#: Packages whose lines are ours (their loggers reach the console at INFO without `-v`).
OWN_LOGGERS = ("tsesnet", "data_store", "sweeps")
#: Sources of forwarded output that are Ray's own processes, never a worker of ours.
RAY_PROCESSES = ("raylet", "autoscaler", "gcs_server")
# Ray Train turns a worker's print into a log record and, when stdout is wrapped (as `start`
# does), prints it too: every epoch line arrived twice. Keep print a print. Ray Train reads it in
# its controller and workers and passes it to them from the driver's environment (and a sweep
# trial passes it in its runtime_env, `sweeps.trial`).
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass
class _Console:
    verbose: bool
    path: Path
    log: TextIO
    lock: threading.Lock
    out: TextIO  # the real stdout and stderr (sys.stdout and sys.stderr tee to the log)
    err: TextIO


_STATE: list[_Console] = []  # the command's console, once `start` ran


class _Tee:
    """A text stream that writes to the console stream and to the log (a progress bar's
    redraws, which start with a carriage return, to the console only)."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if not text.startswith("\r"):
            self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def start(command: str, *, verbose: bool = False, log_file: str | None = None) -> Path:
    """Open the command's log and quiet what is not ours (unless `verbose`); return the log path.

    What the command prints itself goes to the console and the log. Sets, before Ray, MLflow or
    Tune are imported (the processes Ray starts inherit it): no Ray log deduplication (it masks
    numbers, so it merged different trials' epoch lines and printed them late, "[repeated 3x
    across cluster]"); MLflow's loggers left to the root logger configured here; without
    `verbose`, Tune's legacy reporter (at `verbose=0` it prints nothing, the new one always
    prints its box and a TensorBoard hint) and no MLflow download bars; Ray Train's print
    patch off (`RAY_TRAIN_ENV`).

    Args:
        command: the subcommand (names the default log file).
        verbose: everything on the console too.
        log_file: the log's path (default `log_dir()/COMMAND-UTCTIME-PID.log`).
    """
    if log_file:
        path = Path(log_file).expanduser()
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = log_dir() / f"{command.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (the process's life)
    log.write(f"# tsesnet {' '.join(sys.argv[1:])}  (pid {os.getpid()}, {time.ctime()})\n")
    state = _Console(verbose, path.resolve(), log, threading.Lock(), sys.stdout, sys.stderr)
    if not verbose:
        state.err = _stderr_to_log(log)
    _STATE[:] = [state]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _configure_logging(verbose, log, command, state.err)
    # On stdout: an error stays the one line on stderr.
    print(f"tsesnet {command}: full log in {path}", file=state.out, flush=True)
    sys.stdout, sys.stderr = _Tee(state.out, log), _Tee(state.err, log)
    return path


def _stderr_to_log(log: TextIO) -> TextIO:
    """Point file descriptor 2 at the log; return a stream on the console's stderr.

    Ray's C++ core writes its own log lines to descriptor 2 of the driver process (e.g.
    "core_worker.cc: Actor ... has constructor arguments in the object store"), past Python.
    """
    sys.stderr.flush()
    console = os.fdopen(
        os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
    )
    os.dup2(log.fileno(), 2)  # the log is opened for appending: both writers add whole lines
    return console


def log_path() -> Path | None:
    """The running command's log file, or None (no `start`: the Python API, tests)."""
    return _STATE[0].path if _STATE else None


def is_verbose() -> bool:
    """Whether the console shows everything (`-v`), or no console was started."""
    return not _STATE or _STATE[0].verbose


class _ConsoleFilter(logging.Filter):
    """Without `-v`: our own loggers' records; warnings and errors of the others go to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OWN_LOGGERS


def _configure_logging(verbose: bool, log: TextIO, command: str, err: TextIO) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(err)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        to_console.addFilter(_ConsoleFilter())
    root.handlers = [to_file, to_console]
    logging.captureWarnings(True)  # Python warnings through logging: to the log, or with -v
    if command in ("sweep", "science"):
        _adopt_optuna()


def _adopt_optuna() -> None:
    """Optuna's own stderr handler off; its records go to the root logger (the log file)."""
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def attach_ray() -> None:
    """After `ray.init` in a command's driver: print the workers' output as this module says.

    Replaces Ray's printer of forwarded worker output (`ray_print_logs`, which colours its
    prefixes and deduplicates) with `_worker_lines`, and sends Ray's logger's records through the
    root logger (the log; the console with `-v`); without `-v`, MLflow's direct messages
    ("Registered model ... already exists", "Created version") go to the log only: `register`
    says what it registered in one line. Does nothing when no console was started.
    """
    if not _STATE:
        return
    from tsesnet import compat

    dispatcher, ray_worker = compat.ray_log_dispatcher(), compat.ray_worker_module()
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _worker_lines)
    # The cluster's error messages (the raylet's "N PYTHON worker processes have been started"
    # warnings among them) are printed by a thread of Ray's through this module function.
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: _worker_lines(data)
    # Ray's logger has a stderr handler of its own: Tune's "The `process_trial_result` operation
    # took 0.56 s, which may be a performance bottleneck" reached the console on a loaded
    # machine. Its records go through the root logger instead, as the other libraries' do.
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers, ray_logger.propagate = [], True
    if not _STATE[0].verbose and "mlflow" in sys.modules:
        from mlflow.utils import logging_utils

        # Its `eprint` stream, to the log only (`disable_logging` would not last: MLflow turns
        # it back on after each model it logs).
        stream, log = logging_utils.MLFLOW_LOGGING_STREAM, _STATE[0].log
        stream.write, stream.flush = log.write, log.flush


def _worker_lines(data: dict) -> None:
    """Ray's batch of one worker's output lines: all to the log, ours to the console."""
    state = _STATE[0]
    pid = str(data.get("pid", ""))
    lines = data.get("lines", [])
    if pid in ("raylet", "autoscaler"):
        prefix = f"({pid}) "
    else:
        prefix = f"({data.get('actor_name') or data.get('task_name') or ''} pid={pid}) "
    if pid == "autoscaler":  # its raw status tables: only the events among them
        from tsesnet import compat

        lines = compat.ray_autoscaler_events(lines)
    is_err = bool(data.get("is_err"))
    with state.lock:
        for line in lines:
            state.log.write(f"{prefix}{line}\n")
        if state.verbose:
            _write(state, "\n".join(prefix + line for line in lines), is_err)
        elif lines and not is_err and pid not in RAY_PROCESSES:
            _write(state, "\n".join(lines), False)
        elif pid == "raylet":  # the cluster's errors (a worker killed, out of memory)
            shown = [line for line in lines if not line.lstrip().startswith("WARNING")]
            if shown:
                _write(state, "\n".join(prefix + line for line in shown), True)


def say(text: str, *, err: bool = False) -> None:
    """Print a line of ours above any progress bar (and into the log)."""
    if not _STATE:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
        return
    state = _STATE[0]
    with state.lock:
        state.log.write(text + "\n")
        _write(state, text, err)


def _write(state: _Console, text: str, err: bool) -> None:
    """`text` on the real console stream, the progress bars cleared around it."""
    from tqdm import tqdm

    stream = state.err if err else state.out
    if not state.err.isatty():  # no bar to clear and redraw (each redraw stays in a file)
        stream.write(text + "\n")
        stream.flush()
        return
    with tqdm.external_write_mode(file=sys.stderr):  # bars draw on sys.stderr
        stream.write(text + "\n")
        stream.flush()


def progress(total: int | None, desc: str, unit: str, *, enabled: bool = True, **kwargs):
    """A tqdm bar on stderr with elapsed time and ETA; off a terminal it redraws at most every
    30 s (a redirected log keeps every redraw). `enabled=False`: a bar that draws nothing."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.1 if tty else 30.0,
        dynamic_ncols=tty,
        **kwargs,
    )


def hms(seconds: float) -> str:
    """`H:MM:SS` (or `M:SS` under an hour) of a duration."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
