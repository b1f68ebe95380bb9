"""The handlers of the `tsesnet` commands that data_store owns: `synth`, `store info` and
`store export` (`tsesnet.cli` parses the flags and dispatches here; `ingest` and `store verify`
keep theirs in `data_store.ingest` and `data_store.verify`).

Each handler takes the parsed `argparse.Namespace` and returns an exit status.
"""

from __future__ import annotations

from pathlib import Path

from data_store.errors import InputError
from data_store.phantom import SynthConfig
from data_store.synth import write_cohort


def synth(args) -> int:
    """`tsesnet synth OUT --cases N [--seed S] [--shape Z Y X] [--phases T]`."""
    overrides = {}
    if getattr(args, "shape", None):
        overrides["shape"] = tuple(args.shape)
    if getattr(args, "phases", None) is not None:
        overrides["phases"] = args.phases
    if args.cases < 1:
        raise InputError(f"--cases {args.cases}: need at least 1")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: need a non-negative integer")
    cfg = SynthConfig(**overrides)
    test_cases = int(getattr(args, "test_cases", 0) or 0)
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
