"""The `tsesnet` commands that data_store owns: `synth`, `store info` and `store export`, each a
handler and, beside it, the function that adds its arguments (`tsesnet.cli` dispatches here;
`ingest` and `store verify` keep theirs in `data_store.ingest` and `data_store.verify`).

Each handler takes the parsed `argparse.Namespace` and returns an exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.phantom import SynthConfig
from data_store.store import Store, open_store
from data_store.synth import write_cohort


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet synth` (read by `synth`)."""
    parser.add_argument("out", metavar="OUT", help="folder to write the cohort to (created)")
    parser.add_argument("--cases", type=int, required=True, metavar="N", help="number of cases")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="volume size in voxels (32 96 96)",
    )
    parser.add_argument(
        "--phases", type=int, default=None, metavar="T", help="DCE phases per case (default: 6)"
    )
    parser.add_argument(
        "--test-cases",
        type=int,
        default=0,
        metavar="K",
        help="put the last K cases in imagesTs/ (labels in labelsTs/)",
    )


def synth(args: argparse.Namespace) -> int:
    """`tsesnet synth OUT --cases N [--seed S] [--shape Z Y X] [--phases T]`."""
    overrides = {}
    if args.shape:
        overrides["shape"] = tuple(args.shape)
    if args.phases is not None:
        overrides["phases"] = args.phases
    if args.cases < 1:
        raise InputError(f"--cases {args.cases}: need at least 1")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: need a non-negative integer")
    cfg = SynthConfig(**overrides)
    test_cases = args.test_cases
    sp = cfg.voxel_mm
    times = cfg.acquisition_times
    print(
        f"synth: {args.cases} cases, seed {args.seed}, shape (Z, Y, X) {cfg.shape}, "
        f"spacing {tuple(round(s, 3) for s in sp)} mm, {cfg.phases} phases at "
        f"{', '.join(f'{t:g}' for t in times)} s"
    )

    def report(case_id, split, case):
        diam = ", ".join(f"{d:.1f}" for d in case.tumour_diameters_mm)
        print(
            f"  {case_id}  {split:5s}  {case.orientation}  "
            f"{len(case.tumour_diameters_mm)} tumour(s), diameters {diam} mm, "
            f"{int(case.mask.sum())} labelled voxels"
        )

    ids = write_cohort(args.out, args.cases, args.seed, cfg, test_cases, progress=report)
    n_train = len(ids) - test_cases
    out = Path(args.out)
    print(
        f"wrote {len(ids)} cases to {out}: imagesTr/ + labelsTr/ ({n_train} cases, "
        f"{n_train * cfg.phases} images)"
        + (f", imagesTs/ + labelsTs/ ({test_cases})" if test_cases else "")
        + ", dataset.json"
    )
    return 0


def info_rows(store: Store) -> list[dict[str, Any]]:
    """The rows of `store info` (the JSON schema's ``cases`` list)."""
    return [
        {
            "id": cid,
            "phases": e.phases,
            "shape": list(e.shape),
            "spacing": list(e.spacing),
            "spacing_assumed": e.spacing_assumed,
            "labelled": e.labelled,
            "site": e.site,
            "split": e.split,
            "fold": e.fold,
        }
        for cid, e in ((c, store.entries[c]) for c in store.case_ids)
    ]


def info_table(store: Store) -> str:
    """The text `tsesnet store info` prints: one line per case, then the totals."""
    rows = info_rows(store)
    header = ["id", "phases", "shape (Z,Y,X)", "spacing mm (Z,Y,X)", "labelled", "site"]
    header += ["split", "fold"]
    table = [
        [
            r["id"],
            str(r["phases"]),
            "x".join(map(str, r["shape"])),
            "x".join(f"{s:.3g}" for s in r["spacing"])
            + (" (assumed)" if r["spacing_assumed"] else ""),
            "yes" if r["labelled"] else "no",
            r["site"] or "-",
            r["split"],
            "-" if r["fold"] is None else str(r["fold"]),
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in table)) if table else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    n_lab = sum(r["labelled"] for r in rows)
    n_test = sum(r["split"] == "test" for r in rows)
    voxels = sum(r["phases"] * int(np.prod(r["shape"])) for r in rows)
    lines.append(
        f"{len(rows)} cases ({n_lab} labelled, {len(rows) - n_lab} unlabelled), "
        f"{len(rows) - n_test} train, {n_test} test (never in a fold), "
        f"{voxels / 1e6:.1f} M voxels, {store.n_folds} folds, fingerprint {store.fingerprint}"
    )
    return "\n".join(lines)


def add_store_info_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet store info` (read by `store_info`)."""
    parser.add_argument("store", metavar="STORE", help="a store written by ingest")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def store_info(args: argparse.Namespace) -> int:
    """`tsesnet store info STORE [--json]`: a table of cases and totals; exit status 1 (and one
    line per damaged case on stderr) when the cheap integrity check finds a damaged case."""
    store = open_store(args.store)
    damaged = {}
    for cid in store.case_ids:
        problems = store.case_problems(cid)
        if problems:
            damaged[cid] = problems[0]
    if args.json:
        rows = info_rows(store)
        for row in rows:
            row["intact"] = row["id"] not in damaged
        doc = {"cases": rows, "n_folds": store.n_folds, "fingerprint": store.fingerprint}
        print(json.dumps(doc, indent=2))
    else:
        print(info_table(store))
    for problem in damaged.values():
        print(f"damaged: {problem}", file=sys.stderr)
    if damaged:
        print(
            f"{len(damaged)} damaged case(s): `tsesnet store verify {store.path}` lists every "
            "problem; rerun `tsesnet ingest` on their sources to repair them",
            file=sys.stderr,
        )
    return 1 if damaged else 0


def export_case(store: Store, case_id: str, out: str | os.PathLike) -> list[Path]:
    """Writes a case back as NIfTI on its original grid; returns the files written.

    Files: ``OUT/CASE_000t.nii.gz`` per stored phase, t its nominal index (``OUT/CASE.nii.gz``,
    phases on the 4th axis, when the source was one 4D file: the nifti4d layout, or a 4D
    ``_0000`` file of an nnU-Net or MAMA-MIA case) and ``OUT/CASE_mask.nii.gz`` for a labelled
    case. A damaged case raises `InputError` before any file is written.
    Shape, affine, qform/sform codes and voxel values equal the source files' (voxel dtype is
    the stored one: the source's, native byte order).
    """
    from data_store.nifti import write_nifti

    case = store.read_case(case_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if case.attrs.get("layout") == "nifti4d" or case.attrs.get("source_4d"):
        path = out / f"{case_id}.nii.gz"
        write_nifti(path, case.image, case.geometry)  # (T, Z, Y, X) -> (i, j, k, T)
        written.append(path)
    else:
        index = case.attrs.get("phase_index") or list(range(case.image.shape[0]))
        for t, nominal in enumerate(index):
            path = out / f"{case_id}_{nominal:04d}.nii.gz"
            write_nifti(path, case.image[t], case.geometry)
            written.append(path)
    if case.mask is not None:
        path = out / f"{case_id}_mask.nii.gz"
        write_nifti(path, case.mask, case.geometry, dtype=np.uint8)
        written.append(path)
    return written


def add_store_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet store export` (read by `store_export`)."""
    parser.add_argument("store", metavar="STORE", help="a store written by ingest")
    parser.add_argument("--case", required=True, metavar="ID", help="the case to export")
    parser.add_argument("out", metavar="OUT", help="folder for its NIfTI files")


def store_export(args: argparse.Namespace) -> int:
    """`tsesnet store export STORE --case ID OUT`."""
    store = open_store(args.store)
    for path in export_case(store, args.case, args.out):
        print(path)
    return 0
