"""Ingest speed of a DICOM study against the same volume as NIfTI, side by side, one run.

    PYTHONPATH=.:tests .venv/bin/python tests/benchmarks/bench_dicom_ingest.py [--shape T I J K]

One study of T phases of I x J x K int16 voxels (default 6 x 256 x 256 x 64, as a breast DCE
series, one file per slice, one series per phase: 384 files) written by `dicom_factory`, and the
same array with the same affine as one 4D ``.nii.gz`` (as dcm2niix would give it). Times, on the
same machine in the same process: `load_case` (discovery + read + validation, the part the
format changes) and the whole `tsesnet ingest` (Ray start, read, write to Zarr, verify, index),
each once, NIfTI then DICOM. Prints a markdown table with the ratio DICOM / NIfTI.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_factory import make_image, write_study

from data_store.layouts import discover
from data_store.source_reader import load_case
from tsesnet.cli import main


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(shape: tuple[int, int, int, int]) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    image = make_image(shape)
    study = write_study(root / "dicom", image)
    (root / "nifti").mkdir()
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), study.affine), str(root / "nifti/c.nii.gz"))
    rows = []
    for name in ("nifti", "dicom"):
        read = _timed(lambda n=name: load_case(discover(root / n)[0]))
        argv = ["ingest", str(root / name), str(root / f"{name}.zarr"), "--workers", "1"]
        whole = _timed(lambda argv=argv: main(argv))
        rows.append((name, read, whole))
    n_files = sum(len(f) for f in study.files.values())
    print(f"\n{shape[0]} phases x {shape[1]}x{shape[2]}x{shape[3]} int16; DICOM: {n_files} files\n")
    print("| source | load_case s | tsesnet ingest s |")
    print("|---|---|---|")
    for name, read, whole in rows:
        print(f"| {name} | {read:.2f} | {whole:.2f} |")
    (_, r0, w0), (_, r1, w1) = rows
    print(f"| ratio DICOM / NIfTI | {r1 / r0:.2f} | {w1 / w0:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(6, 256, 256, 64))
    run(tuple(parser.parse_args().shape))
