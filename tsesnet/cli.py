"""The `tsesnet` command: the top-level parser, the options every long command shares, and the
dispatch to the module that owns each subcommand.

Each command's own arguments are declared beside its handler: the module named in `COMMANDS`
holds both the handler (it takes the parsed `argparse.Namespace` and returns an exit status)
and the function that adds the command's arguments to its parser. Only the module of the
command being run is imported (`build_parser(only=...)`), so `tsesnet --help` stays fast and
nothing heavy (torch, ray, mlflow, zarr) is imported for a command that is not run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import NamedTuple


class Command(NamedTuple):
    """One `tsesnet` command: where its handler and its arguments live, and its one-line help."""

    handler: str  # "module:function", called with the parsed arguments
    arguments: str  # "module:function", adds the command's arguments to its parser
    help: str


# command -> its Command, in the order `tsesnet --help` lists them; an explicit registry
# (STYLE.md §9). "GROUP ACTION" names an action of a command group (`GROUPS`).
COMMANDS = {
    "synth": Command(
        "data_store.cli:synth",
        "data_store.cli:add_synth_arguments",
        "write a synthetic DCE-MRI cohort (nnU-Net raw layout)",
    ),
    "ingest": Command(
        "data_store.ingest:cli",
        "data_store.ingest:add_arguments",
        "validate a NIfTI or DICOM cohort and store it as Zarr",
    ),
    "store info": Command(
        "data_store.cli:store_info",
        "data_store.cli:add_store_info_arguments",
        "table of cases and totals",
    ),
    "store export": Command(
        "data_store.cli:store_export",
        "data_store.cli:add_store_export_arguments",
        "write a case back as NIfTI on its original grid",
    ),
    "store verify": Command(
        "data_store.verify:cli",
        "data_store.verify:add_arguments",
        "check every case against its integrity record",
    ),
    "model-summary": Command(
        "tsesnet.programs.model_summary:cli",
        "tsesnet.programs.model_summary:add_arguments",
        "parameters, MACs, FLOPs and step memory",
    ),
    "train": Command(
        "tsesnet.training.driver:cli",
        "tsesnet.training.driver:add_arguments",
        "train TSESNet on Ray Train, tracked in MLflow",
    ),
    "sweep": Command(
        "sweeps.runner:cli",
        "sweeps.runner:add_arguments",
        "Ray Tune + Optuna sweep over alpha, beta, tau and fusion",
    ),
    "config keys": Command(
        "tsesnet.training.config_keys:cli",
        "tsesnet.training.config_keys:add_arguments",
        "every training-config key: type, default, range, help",
    ),
    "models list": Command(
        "tsesnet.tracking.models:cli_list",
        "tsesnet.tracking.models:add_list_arguments",
        "registered models and their aliases",
    ),
    "models show": Command(
        "tsesnet.tracking.models:cli_show",
        "tsesnet.tracking.models:add_show_arguments",
        "versions, aliases and metrics of one model",
    ),
    "models promote": Command(
        "tsesnet.tracking.models:cli_promote",
        "tsesnet.tracking.models:add_promote_arguments",
        "point an alias at a version",
    ),
    "predict": Command(
        "tsesnet.serving.predict:cli",
        "tsesnet.serving.predict_cli:add_arguments",
        "batch prediction with Ray Data from an MLflow model",
    ),
    "evaluate": Command(
        "tsesnet.serving.evaluate:cli",
        "tsesnet.serving.evaluate:add_arguments",
        "DSC, HD95 and sensitivity of predicted masks",
    ),
    "demo": Command(
        "tsesnet.programs.demo:cli",
        "tsesnet.programs.demo:add_arguments",
        "the whole platform end to end on a synthetic cohort",
    ),
    "science": Command(
        "tsesnet.programs.science:cli",
        "tsesnet.programs.science:add_arguments",
        "single phase vs the time series, fusions and Table 3's ablations",
    ),
    "submit": Command(
        "tsesnet.programs.submit:cli",
        "tsesnet.programs.submit:add_arguments",
        "run a command on a Ray cluster as a job, with this checkout and its commit",
    ),
}

#: Command groups: GROUP -> (the Namespace attribute naming its action, its one-line help).
GROUPS = {
    "store": ("store_command", "inspect, export or verify a store"),
    "config": ("config_command", "what a training config holds"),
    "models": ("models_command", "browse and promote registered models"),
}

#: command -> "module:function" of its handler.
HANDLERS = {name: command.handler for name, command in COMMANDS.items()}

#: Commands that run long and start Ray: a quiet console and a full log (`tsesnet.common.console`).
LOGGED = ("ingest", "train", "sweep", "predict", "demo", "science")


def _load(target: str):
    """The function a "module:function" names (its module imported now)."""
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `tsesnet` parser: one subparser per command of `COMMANDS`, in its order.

    Args:
        only: the first word of a command line; only that command's (or group's) arguments are
            added, so only its module is imported. None adds every command's (the reference
            pages, the tests).
    """
    p = argparse.ArgumentParser(
        prog="tsesnet", description="Breast-tumour segmentation in 4D DCE-MRI on Ray and MLflow."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        first, _, action = name.partition(" ")
        if action and first not in groups:
            dest, group_help = GROUPS[first]
            group = sub.add_parser(first, help=group_help)
            groups[first] = group.add_subparsers(dest=dest, required=True, metavar="ACTION")
        s = (groups[first] if action else sub).add_parser(action or name, help=command.help)
        if only is None or only == first:
            _load(command.arguments)(s)
            if name in LOGGED:
                _log_options(s)
    return p


def _log_options(s) -> None:
    """`-v/--verbose` and `--log-file` of the commands in `LOGGED`."""
    s.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print everything Ray and the libraries print (default: the platform's own lines; "
        "the rest goes to the log file)",
    )
    s.add_argument(
        "--log-file",
        default=None,
        metavar="FILE",
        help="the full log, Ray's output included (default: ~/.local/state/tsesnet/logs/"
        "COMMAND-TIME-PID.log, under $XDG_STATE_HOME if set; the first line says where)",
    )


def _handler_key(args: argparse.Namespace) -> str:
    if args.command in GROUPS:
        return f"{args.command} {getattr(args, GROUPS[args.command][0])}"
    return args.command


def main(argv: list[str] | None = None) -> int:
    """Run one `tsesnet` command; its exit status.

    Given `argv` (a caller in Python, e.g. a test), output is left as it is; from the process's
    own command line (`argv` None), the long commands get a quiet console and a full log.
    """
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=words[0] if words else "")
    args = parser.parse_args(argv)
    if argv is None and args.command in LOGGED:
        from tsesnet.common import console

        console.start(args.command, verbose=args.verbose, log_file=args.log_file)
    return _run(args, _flags(parser, args))


def _flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """The command's flags by the parameter they set: ``{"wait": "--wait", ...}``; an
    `InputError` shows each parameter it names (its `param`, its placeholders) by its flag."""
    for word in _handler_key(args).split():
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = choices.choices[word]
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def _run(args: argparse.Namespace, flags: dict[str, str]) -> int:
    handler = _load(HANDLERS[_handler_key(args)])
    from data_store.errors import InputError
    from tsesnet.common.cluster import disconnect

    try:
        return int(handler(args) or 0)
    except InputError as err:
        disconnect()
        print(f"error: {err.naming(flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", 2)  # `training.driver.Stopped` names SIGTERM
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as err:
        if not _is_service_error(err) or os.environ.get("TSESNET_TRACEBACK"):
            raise
        disconnect()
        # Object storage, the tracking server or the cluster unreachable or refusing: what is
        # wrong is out there, and a traceback of the libraries between says no more than this.
        text = " ".join(str(err).split())[:500] or "no message"
        print(f"error: {type(err).__name__}: {text}", file=sys.stderr)
        return 1


#: Libraries whose exceptions say a service (S3, MLflow's server, Ray) failed or is unreachable.
_SERVICE_MODULES = ("botocore", "aiobotocore", "s3fs", "aiohttp", "urllib3", "requests", "mlflow")


def _is_service_error(err: BaseException) -> bool:
    """Whether `err` (or its cause) is an I/O or service error rather than a bug here."""
    while err is not None:
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in _SERVICE_MODULES:
            return True
        err = err.__cause__
    return False


if __name__ == "__main__":
    sys.exit(main())
