"""A synthetic cohort on disk: `write_cohort` writes phantom cases (`data_store.phantom`) in
the nnU-Net raw layout (`tsesnet synth`; its command is `data_store.cli.synth`).

Files: `imagesTr/CASE_TTTT.nii.gz` (one per phase) and `labelsTr/CASE.nii.gz`, the held-out
cases in `imagesTs/` + `labelsTs/`, and `dataset.json` (nnU-Net v2 fields plus the acquisition
times, the generator's parameters and the seed).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from data_store.errors import InputError
from data_store.phantom import CASE_PREFIX, SynthCase, SynthConfig, synthesize


def _save_nifti(path: Path, vol_zyx: np.ndarray, affine: np.ndarray) -> None:
    """A (Z, Y, X) volume as a RAS file (i=X, j=Y, k=Z), through the one NIfTI writer."""
    from data_store.nifti import save_nifti

    data = np.ascontiguousarray(vol_zyx.transpose(2, 1, 0))
    save_nifti(path, data, affine, units=("mm", "sec"), scaling=False)


def _clear_previous(out: Path) -> None:
    """Refuse a non-empty folder unless it holds an earlier synthetic cohort, which is removed."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError("exists and is not a folder", path=str(out))
    if not any(out.iterdir()):
        return
    meta = out / "dataset.json"
    try:
        ours = "synth" in json.loads(meta.read_text())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise InputError(
            "folder is not empty and holds no synthetic cohort; choose a new folder", path=str(out)
        )
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    meta.unlink()


def write_cohort(
    out: str | Path,
    cases: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    test_cases: int = 0,
    progress=None,
) -> list[str]:
    """Write `cases` synthetic cases in the nnU-Net raw layout under `out`.

    The first `cases - test_cases` go to `imagesTr/` + `labelsTr/`, the last `test_cases` to
    `imagesTs/` with their labels in `labelsTs/` (held out for evaluation). `dataset.json` is
    nnU-Net v2 style plus the acquisition times and the generator's parameters and seed. An
    earlier synthetic cohort in `out` is replaced; any other non-empty folder is refused.

    Args:
        out: destination folder.
        cases: number of cases, >= 1.
        seed: cohort seed; case n is drawn from `default_rng([seed, n])`.
        config: generator parameters (None: defaults).
        test_cases: how many of the cases go to the test folders, 0 <= test_cases < cases.
        progress: optional callable(case_id, split, SynthCase) called after each case.

    Returns:
        The case IDs written, in order (`SYN_000`, ...).
    """
    cfg = config or SynthConfig()
    _check_counts(cases, test_cases, seed)
    out = Path(out)
    _clear_previous(out)
    n_train = cases - test_cases
    width = max(3, len(str(cases - 1)))
    ids = [f"{CASE_PREFIX}_{n:0{width}d}" for n in range(cases)]
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_cases else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)

    for n, case_id in enumerate(ids):
        split = "Tr" if n < n_train else "Ts"
        case = synthesize(np.random.default_rng([seed, n]), cfg)
        _save_case(out, split, case_id, case)
        if progress is not None:
            progress(case_id, "train" if split == "Tr" else "test", case)

    meta = _dataset_json(cfg, seed, cases, test_cases)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ids


def _check_counts(cases: int, test_cases: int, seed: int) -> None:
    """Refuses counts no cohort can have, naming the parameter (the CLI: its flag)."""
    if cases < 1:
        raise InputError(f"{cases}: need at least 1", param="cases")
    if not 0 <= test_cases < cases:
        raise InputError(
            f"test cases {test_cases}: need 0 <= test cases < cases ({cases}), "
            "so that at least one case is for training"
        )
    if seed < 0:
        raise InputError(f"{seed}: need a non-negative integer", param="seed")


def _save_case(out: Path, split: str, case_id: str, case: SynthCase) -> None:
    """One NIfTI file per phase in ``images{split}/``, the mask in ``labels{split}/``."""
    for t, vol in enumerate(case.image):
        _save_nifti(out / f"images{split}" / f"{case_id}_{t:04d}.nii.gz", vol, case.affine)
    _save_nifti(out / f"labels{split}" / f"{case_id}.nii.gz", case.mask, case.affine)


def _dataset_json(cfg: SynthConfig, seed: int, cases: int, test_cases: int) -> dict:
    """`dataset.json`: nnU-Net v2 fields plus the acquisition times and the generator's inputs."""
    times = cfg.acquisition_times
    return {
        "name": "SyntheticBreastDCE",
        "description": "Synthetic breast DCE-MRI (data_store.synth): phase 0 pre-contrast, "
        "labels are malignant tumours; benign foci, vessels and FGT enhance too.",
        "channel_names": {
            str(t): "pre-contrast" if t == 0 else f"post-contrast {t} ({times[t]:g} s)"
            for t in range(cfg.phases)
        },
        "labels": {"background": 0, "tumour": 1},
        "numTraining": cases - test_cases,
        "numTest": test_cases,
        "file_ending": ".nii.gz",
        "acquisition_times_s": list(times),
        "synth": {
            "generator": "data_store.synth",
            "seed": seed,
            "cases": cases,
            "test_cases": test_cases,
            "spacing_zyx_mm": list(cfg.voxel_mm),
            "config": dataclasses.asdict(cfg),
        },
    }
