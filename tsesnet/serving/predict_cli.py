"""The arguments of `tsesnet predict`, declared beside its handler (`tsesnet.serving.predict.cli`
reads them into a `PredictConfig`)."""

from __future__ import annotations

import argparse


def _fraction(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet predict` (read by `tsesnet.serving.predict.cli`)."""
    parser.add_argument(
        "--model", required=True, metavar="URI", help="models:/NAME@ALIAS, or one model's folder"
    )
    parser.add_argument(
        "--input",
        required=True,
        metavar="STORE_OR_DIR",
        help="a store, a NIfTI cohort, or its imagesTr/ or imagesTs/",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="CASE.nii.gz masks and summary.csv"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray Data actors (default: one per GPU share, else one per CPU, at most one a case)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per actor, fractions allowed (default 0: CPU)",
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="also write probabilities/CASE.nii.gz"
    )
    parser.add_argument(
        "--fold", type=int, default=None, metavar="K", help="a store's cases of validation fold K"
    )
    parser.add_argument(
        "--split", choices=["train", "test"], default=None, help="a store's train or test cases"
    )
    parser.add_argument(
        "--output-format",
        choices=["nifti", "dicom-seg"],
        default="nifti",
        help="CASE.nii.gz masks (default), or CASE.dcm DICOM SEGs for cases ingested from DICOM",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="skip the per-case pictures report/CASE.png and report.html",
    )
    parser.add_argument(
        "--min-component-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="keep components of at least F x the largest (0: all); default: the model's",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder holding other files or an interrupted prediction "
        "(never one holding masks or labels predict did not write)",
    )
