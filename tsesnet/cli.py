"""The `tsesnet` command: the parser and the dispatch to the module that owns each subcommand.

Nothing heavy (torch, ray, mlflow, zarr) is imported until a subcommand runs, so `--help` is fast.
Each handler takes the parsed `argparse.Namespace` and returns an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# subcommand -> "module:function"; an explicit registry (STYLE.md §9).
BREAK_LOCK_HELP = (
    "remove STORE's lock when no writer runs but the lock file is unreadable, a link or "
    "another host's"
)

HANDLERS = {
    "synth": "data_store.cli:synth",
    "ingest": "data_store.ingest:cli",
    "store info": "data_store.cli:store_info",
    "store export": "data_store.cli:store_export",
    "store verify": "data_store.verify:cli",
    "model-summary": "tsesnet.programs.model_summary:cli",
    "train": "tsesnet.training.driver:cli",
    "config keys": "tsesnet.training.config_keys:cli",
    "sweep": "sweeps.runner:cli",
    "models list": "tsesnet.tracking.models:cli_list",
    "models show": "tsesnet.tracking.models:cli_show",
    "models promote": "tsesnet.tracking.models:cli_promote",
    "predict": "tsesnet.serving.predict:cli",
    "evaluate": "tsesnet.serving.evaluate:cli",
    "demo": "tsesnet.programs.demo:cli",
    "science": "tsesnet.programs.science:cli",
    "submit": "tsesnet.programs.submit:cli",
}


#: Commands that run long and start Ray: a quiet console and a full log (`tsesnet.common.console`).
LOGGED = ("ingest", "train", "sweep", "predict", "demo", "science")


def _fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `tsesnet` parser: one subparser per command, added by the data, store, training,
    registry, serving and program groups below (in the order `tsesnet --help` lists them)."""
    p = argparse.ArgumentParser(
        prog="tsesnet", description="Breast-tumour segmentation in 4D DCE-MRI on Ray and MLflow."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _data_commands,
        _store_commands,
        _training_commands,
        _registry_commands,
        _serving_commands,
        _programs,
    ):
        add(sub)
    for name in LOGGED:
        _log_options(sub.choices[name])
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


def _set_option(s, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` of the commands that take training-config keys."""
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=help
    )


def _data_commands(sub) -> None:
    s = sub.add_parser("synth", help="write a synthetic DCE-MRI cohort (nnU-Net raw layout)")
    s.add_argument("out", metavar="OUT", help="folder to write the cohort to (created)")
    s.add_argument("--cases", type=int, required=True, metavar="N", help="number of cases")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    s.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="volume size in voxels (32 96 96)",
    )
    s.add_argument(
        "--phases", type=int, default=None, metavar="T", help="DCE phases per case (default: 6)"
    )
    s.add_argument(
        "--test-cases",
        type=int,
        default=0,
        metavar="K",
        help="put the last K cases in imagesTs/ (labels in labelsTs/)",
    )

    s = sub.add_parser("ingest", help="validate a NIfTI or DICOM cohort and store it as Zarr")
    s.add_argument("src", metavar="SRC", help="the cohort folder (NIfTI or DICOM)")
    s.add_argument("store", metavar="STORE", help="the Zarr store to write (path or s3:// URL)")
    s.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "nnunet", "mamamia", "bts", "nifti4d", "dicom"],
        help="how SRC is organised (auto: detected)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray tasks reading cases in parallel (default: the cluster's CPUs)",
    )
    s.add_argument(
        "--folds", type=int, default=None, metavar="K", help="patient-level folds (new store: 5)"
    )
    s.add_argument("--refold", action="store_true", help="let --folds re-deal a store's cases")
    s.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for another writer's lock on STORE (60)",
    )
    s.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    s.add_argument(
        "--assume-spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="voxel size in mm for files that have none (no sform, zero pixdim); recorded",
    )
    s.add_argument(
        "--max-image-gib",
        type=float,
        default=None,
        metavar="G",
        help="largest decoded voxel data one file may declare, GiB (4)",
    )


def _store_commands(sub) -> None:
    store = sub.add_parser("store", help="inspect, export or verify a store")
    ssub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    s = ssub.add_parser("info", help="table of cases and totals")
    s.add_argument("store", metavar="STORE", help="a store written by ingest")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s = ssub.add_parser("export", help="write a case back as NIfTI on its original grid")
    s.add_argument("store", metavar="STORE", help="a store written by ingest")
    s.add_argument("--case", required=True, metavar="ID", help="the case to export")
    s.add_argument("out", metavar="OUT", help="folder for its NIfTI files")
    s = ssub.add_parser("verify", help="check every case against its integrity record")
    s.add_argument("store", metavar="STORE", help="a store written by ingest")
    s.add_argument("--deep", action="store_true", help="also compare every checksum")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.add_argument(
        "--record",
        action="store_true",
        help="first record cases without a current integrity record (refuses a case whose "
        "data disagrees with its record)",
    )
    s.add_argument(
        "--accept-current",
        action="store_true",
        help="with --record: record what is there now also over a record it disagrees with",
    )
    s.add_argument(
        "--repair",
        action="store_true",
        help="remove what the index does not list (orphans: temporary entries of writers that "
        "are gone, cases an interrupted ingest never committed, anything else)",
    )
    s.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="for --record and --repair: lock wait",
    )
    s.add_argument(
        "--break-lock", action="store_true", help="for --record and --repair: " + BREAK_LOCK_HELP
    )


def _training_commands(sub) -> None:
    s = sub.add_parser("model-summary", help="parameters, MACs, FLOPs and step memory")
    s.add_argument("--preset", default="paper", help="tiny, small or paper (paper)")
    s.add_argument(
        "--fusion", default="tsff", help="a temporal fusion, or all to compare them (tsff)"
    )
    s.add_argument("--phases", type=int, default=6, metavar="T", help="DCE phases T (6)")
    s.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="the training patch (data.patch) to count at; the TA modules are fitted to it "
        "(default: the preset's: tiny 16 32 32, small 32 64 64, paper 48 96 96)",
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    s = sub.add_parser("train", help="train TSESNet on Ray Train, tracked in MLflow")
    s.add_argument("--store", required=True, help="the Zarr store to train on (path or URL)")
    s.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a training config YAML, e.g. tsesnet/configs/tiny.yaml (default: the "
        "recommended recipe); `tsesnet config keys` lists every key",
    )
    _set_option(s, "override one config key, e.g. --set schedule.epochs=50 (repeatable)")
    s.add_argument(
        "--workers", type=int, default=None, metavar="N", help="Ray Train workers (run.workers)"
    )
    s.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per worker, 0 for CPU (run.gpus_per_worker)",
    )
    s.add_argument(
        "--name",
        default=None,
        metavar="RUN",
        help="run name; the same name resumes (default: store, preset, fusion, fold, config hash)",
    )

    s = sub.add_parser("sweep", help="Ray Tune + Optuna sweep over alpha, beta, tau and fusion")
    s.add_argument("--store", required=True, help="the Zarr store to train on (path or URL)")
    s.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a sweep config YAML, e.g. tsesnet/configs/sweep_tiny.yaml",
    )
    s.add_argument(
        "--trials", type=int, default=None, metavar="N", help="trials (default: the config's)"
    )
    s.add_argument("--name", default=None, help="sweep name; the same name with --resume resumes")
    s.add_argument("--resume", action="store_true", help="continue the sweep of that name")
    s.add_argument(
        "--promote",
        action="store_true",
        help="let the best trial take @champion when it beats the champion under the same "
        "validation protocol (default: it registers as @challenger)",
    )
    _set_option(
        s,
        "a training setting for every trial, after the sweep config's own `set` "
        "(e.g. run.storage_path=s3://bucket/ray_results)",
    )

    s = sub.add_parser("config", help="what a training config holds")
    csub = s.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    s = csub.add_parser("keys", help="every training-config key: type, default, range, help")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _registry_commands(sub) -> None:
    models = sub.add_parser("models", help="browse and promote registered models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    s = msub.add_parser("list", help="registered models and their aliases")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s = msub.add_parser("show", help="versions, aliases and metrics of one model")
    s.add_argument("name", metavar="NAME", help="registered model name (tsesnet)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s = msub.add_parser("promote", help="point an alias at a version")
    s.add_argument("name", metavar="NAME", help="registered model name")
    s.add_argument("version", metavar="VERSION", help="the version to get the alias")
    s.add_argument("--alias", required=True, metavar="A", help="the alias, e.g. champion")
    s.add_argument("--reason", default="", metavar="TEXT", help="why (kept on the version)")


def _serving_commands(sub) -> None:
    s = sub.add_parser("predict", help="batch prediction with Ray Data from an MLflow model")
    s.add_argument(
        "--model", required=True, metavar="URI", help="models:/NAME@ALIAS, or one model's folder"
    )
    s.add_argument(
        "--input",
        required=True,
        metavar="STORE_OR_DIR",
        help="a store, a NIfTI cohort, or its imagesTr/ or imagesTs/",
    )
    s.add_argument(
        "--output", required=True, metavar="DIR", help="CASE.nii.gz masks and summary.csv"
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray Data actors (default: one per GPU share, else one per CPU, at most one a case)",
    )
    s.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per actor, fractions allowed (default 0: CPU)",
    )
    s.add_argument(
        "--probabilities", action="store_true", help="also write probabilities/CASE.nii.gz"
    )
    s.add_argument(
        "--fold", type=int, default=None, metavar="K", help="a store's cases of validation fold K"
    )
    s.add_argument(
        "--split", choices=["train", "test"], default=None, help="a store's train or test cases"
    )
    s.add_argument(
        "--output-format",
        choices=["nifti", "dicom-seg"],
        default="nifti",
        help="CASE.nii.gz masks (default), or CASE.dcm DICOM SEGs for cases ingested from DICOM",
    )
    s.add_argument(
        "--no-report",
        action="store_true",
        help="skip the per-case pictures report/CASE.png and report.html",
    )
    s.add_argument(
        "--min-component-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="keep components of at least F x the largest (0: all); default: the model's",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files or an interrupted prediction "
        "(never one holding masks or labels predict did not write)",
    )

    s = sub.add_parser("evaluate", help="DSC, HD95 and sensitivity of predicted masks")
    s.add_argument(
        "--pred", required=True, metavar="DIR", help="a tsesnet predict folder (CASE.nii.gz)"
    )
    s.add_argument("--labels", required=True, metavar="DIR", help="binary masks, CASE.nii.gz")
    s.add_argument(
        "--pred-unchecked",
        action="store_true",
        help="score --pred's masks as found, even where its prediction.json (written by tsesnet "
        "predict) says the run is incomplete or its files changed",
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _programs(sub) -> None:
    s = sub.add_parser("demo", help="the whole platform end to end on a synthetic cohort")
    s.add_argument("--out", default="demo_output", metavar="DIR", help="work folder (demo_output)")

    s = sub.add_parser(
        "science", help="single phase vs the time series, fusions and Table 3's ablations"
    )
    s.add_argument(
        "--out", default="science_output", metavar="DIR", help="work folder (science_output)"
    )
    s.add_argument("--config", default=None, metavar="FILE", help="tsesnet/configs/science.yaml")
    _set_option(s, "override one training-config key (repeatable)")
    s.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        metavar="S",
        help="seeds, one training per row and seed (0 1 2 3 4)",
    )
    s.add_argument("--rows", nargs="+", default=None, metavar="KEY", help="a subset of rows")
    s.add_argument(
        "--cases", type=int, default=16, metavar="N", help="synthetic training cases (16)"
    )
    s.add_argument(
        "--test-cases", type=int, default=8, metavar="K", help="synthetic test cases (8)"
    )
    s.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="synthetic volume size (default: the config's)",
    )
    s.add_argument(
        "--experiment", default="tsesnet-science", metavar="NAME", help="MLflow experiment"
    )
    s.add_argument(
        "--docs",
        "--readme",
        dest="docs",
        default=None,
        metavar="PAGE",
        help="write the table between the science markers of PAGE "
        "(make science: docs/pages/explanation/science.md)",
    )
    s.add_argument(
        "--no-train",
        action="store_true",
        help="tabulate what science.csv holds for these seeds and rows; train nothing",
    )

    s = sub.add_parser(
        "submit", help="run a command on a Ray cluster as a job, with this checkout and its commit"
    )
    s.add_argument("--address", default=None, metavar="URL", help="job API, http://HEAD:8265")
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    s.add_argument(
        "--submission-id", default=None, metavar="ID", help="the job's ID (default: Ray's)"
    )
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument(
        "--print-runtime-env",
        action="store_true",
        help="write the runtime env YAML for `ray job submit --runtime-env FILE` and exit",
    )
    s.add_argument(
        "entrypoint",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the command the job runs, e.g. -- tsesnet train --store s3://b/x.zarr",
    )


def _handler_key(args: argparse.Namespace) -> str:
    for group in ("store_command", "models_command", "config_command"):
        action = getattr(args, group, None)
        if action:
            return f"{args.command} {action}"
    return args.command


def main(argv: list[str] | None = None) -> int:
    """Run one `tsesnet` command; its exit status.

    Given `argv` (a caller in Python, e.g. a test), output is left as it is; from the process's
    own command line (`argv` None), the long commands get a quiet console and a full log.
    """
    args = build_parser().parse_args(argv)
    if argv is None and args.command in LOGGED:
        from tsesnet.common import console

        console.start(args.command, verbose=args.verbose, log_file=args.log_file)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    module_name, func_name = HANDLERS[_handler_key(args)].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    from data_store.errors import InputError
    from tsesnet.common.cluster import disconnect

    try:
        return int(handler(args) or 0)
    except InputError as err:
        disconnect()
        print(f"error: {err}", file=sys.stderr)
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
