"""Small synthetic NIfTI cohorts in every layout `data_store.layouts` understands, for tests.

Every writer takes a root folder (usually pytest's ``tmp_path``) and returns
``{case_id: WrittenCase}`` with the arrays it wrote in *file* order, so a test can compare what
comes back from loading (canonical order, via ``Geometry.to_canonical``) or from an export.

    # tests/ is on sys.path under pytest
    from nifti_factory import write_layout_cohort, write_nnunet
    cases = write_nnunet(tmp_path, n_cases=2, phases=3, affine="lps")
    cases = write_layout_cohort("bts", tmp_path, missing={"C1_2": (2, 3, 4, 5)})

Voxels are deterministic by `seed`: a smooth-ish random background plus an enhancing box, and
the mask is that box (values {0, 1}). Arrays are tiny (default 6 x 7 x 8) so tests stay fast.

Layouts written (see `data_store.layouts` for the rules they follow):
    nnunet   imagesTr/CASE_000t.nii.gz, labelsTr/CASE.nii.gz, imagesTs/ (unlabelled), dataset.json
    mamamia  images/CASE/case_000t.nii.gz, segmentations/expert/case.nii.gz,
             patient_info_files/case.json with acquisition times
    bts      CENTER/CASE/Pt.nii.gz, CENTER_gt/CASE.nii.gz, train.txt / test.txt
    nifti4d  CASE.nii.gz (phases on axis 4) + CASE_mask.nii.gz
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

#: Affine kinds accepted by `make_affine`; the axis codes nibabel gives them.
AFFINE_KINDS = {
    "ras": ("R", "A", "S"),
    "lps": ("L", "P", "S"),
    "las": ("L", "A", "S"),
    "oblique": ("R", "A", "S"),  # rotated 20 deg about x and 10 deg about z: closest is RAS
    "sagittal": ("A", "I", "L"),  # axes permuted as well as flipped
}


@dataclass
class WrittenCase:
    """What a writer put on disk for one case (arrays in file (i, j, k) order).

    Attributes:
        case_id: the case ID the layout gives.
        image: (T, i, j, k) the phases written (only the present ones for BTS gaps).
        mask: (i, j, k) uint8 or None when unlabelled.
        affine: (4, 4) the affine written to every file of the case.
        phase_files: the files written, in phase order (one file for nifti4d).
        mask_file: the mask file or None.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    phase_files: list[Path]
    mask_file: Path | None


def make_affine(
    kind: str = "ras",
    spacing: tuple[float, float, float] = (0.7, 0.8, 1.5),
    origin: tuple[float, float, float] = (-20.0, 15.0, 30.0),
) -> np.ndarray:
    """A (4, 4) affine of the given orientation `kind` (see `AFFINE_KINDS`).

    Args:
        kind: "ras", "lps", "las", "oblique" or "sagittal".
        spacing: voxel size (mm) along file axes (i, j, k).
        origin: world position (mm) of voxel (0, 0, 0).
    """
    si, sj, sk = spacing
    if kind == "ras":
        lin = np.diag([si, sj, sk])
    elif kind == "lps":
        lin = np.diag([-si, -sj, sk])
    elif kind == "las":
        lin = np.diag([-si, sj, sk])
    elif kind == "oblique":
        a, b = np.deg2rad(20.0), np.deg2rad(10.0)
        rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rot_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
        lin = rot_z @ rot_x @ np.diag([si, sj, sk])
    elif kind == "sagittal":
        lin = np.array([[0.0, 0.0, -sk], [si, 0.0, 0.0], [0.0, -sj, 0.0]])
    else:
        raise ValueError(f"unknown affine kind {kind!r}; known: {sorted(AFFINE_KINDS)}")
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = origin
    return affine


def make_arrays(
    shape: tuple[int, int, int] = (6, 7, 8),
    phases: int = 3,
    dtype: str | np.dtype = "int16",
    seed: int = 0,
    labelled: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Deterministic (T, i, j, k) phases and an (i, j, k) uint8 box mask.

    Phase 0 is the background; later phases add enhancement inside the box.
    """
    rng = np.random.default_rng(seed)
    background = rng.integers(50, 200, size=shape)
    box = np.zeros(shape, dtype=np.uint8)
    box[1 : shape[0] // 2 + 1, 2 : shape[1] // 2 + 2, 2 : shape[2] // 2 + 2] = 1
    image = np.stack(
        [background + 100 * t * box.astype(np.int64) for t in range(phases)]
    )  # (T, i, j, k)
    return image.astype(dtype), (box if labelled else None)


def save_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    nifti2: bool = False,
    slope_inter: tuple[float, float] | None = None,
) -> Path:
    """Writes `data` (file order) with `affine` as sform and qform (code 1); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return path


def write_nnunet(
    root: Path,
    n_cases: int = 2,
    *,
    phases: int = 3,
    test_cases: int = 0,
    shape: tuple[int, int, int] = (6, 7, 8),
    affine: str = "ras",
    dtype: str = "int16",
    dataset_json: bool = True,
    labelled_test: bool = False,
    seed: int = 0,
) -> dict[str, WrittenCase]:
    """nnU-Net raw: `n_cases` labelled in imagesTr/labelsTr, `test_cases` in imagesTs
    (unlabelled, or with `labelled_test` labelled in labelsTs/, as `tsesnet synth` writes)."""
    root = Path(root)
    out = {}
    for n in range(n_cases + test_cases):
        train = n < n_cases
        labelled = train or labelled_test
        case_id = f"case_{n:03d}"
        images = root / ("imagesTr" if train else "imagesTs")
        labels = root / ("labelsTr" if train else "labelsTs")
        image, mask = make_arrays(shape, phases, dtype, seed + n, labelled)
        aff = make_affine(affine)
        files = [
            save_nifti(images / f"{case_id}_{t:04d}.nii.gz", image[t], aff) for t in range(phases)
        ]
        mask_file = save_nifti(labels / f"{case_id}.nii.gz", mask, aff) if labelled else None
        out[case_id] = WrittenCase(case_id, image, mask, aff, files, mask_file)
    if dataset_json:
        meta = {
            "channel_names": {str(t): "pre" if t == 0 else f"post{t}" for t in range(phases)},
            "labels": {"background": 0, "tumour": 1},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def write_mamamia(
    root: Path,
    case_ids: tuple[str, ...] = ("DUKE_001", "ISPY1_1001"),
    *,
    phases: int = 3,
    shape: tuple[int, int, int] = (6, 7, 8),
    affine: str = "lps",
    dtype: str = "int16",
    times: bool = True,
    seed: int = 0,
) -> dict[str, WrittenCase]:
    """MAMA-MIA: upper-case case folders with lower-case file names, as the public release.

    With `times`, ``patient_info_files/case.json`` holds
    ``{"imaging_data": {"acquisition_times": [0, 90, 180, ...]}}`` (seconds).
    """
    root = Path(root)
    out = {}
    for n, case_id in enumerate(case_ids):
        low = case_id.lower()
        image, mask = make_arrays(shape, phases, dtype, seed + n)
        aff = make_affine(affine)
        folder = root / "images" / case_id
        files = [save_nifti(folder / f"{low}_{t:04d}.nii.gz", image[t], aff) for t in range(phases)]
        mask_file = save_nifti(root / "segmentations" / "expert" / f"{low}.nii.gz", mask, aff)
        if times:
            info = {
                "patient_id": case_id,
                "imaging_data": {"acquisition_times": [90.0 * t for t in range(phases)]},
            }
            (root / "patient_info_files").mkdir(parents=True, exist_ok=True)
            (root / "patient_info_files" / f"{low}.json").write_text(json.dumps(info))
        out[case_id] = WrittenCase(case_id, image, mask, aff, files, mask_file)
    return out


def write_bts(
    root: Path,
    centres: dict[str, int] | None = None,
    *,
    phases: int = 6,
    missing: dict[str, tuple[int, ...]] | None = None,
    unlabelled: tuple[str, ...] = (),
    train: tuple[str, ...] | None = None,
    test: tuple[str, ...] | None = None,
    shape: tuple[int, int, int] = (6, 7, 8),
    affine: str = "las",
    dtype: str = "int16",
    seed: int = 0,
) -> dict[str, WrittenCase]:
    """BTS: ``CENTER/CENTER_i/Pt.nii.gz`` and ``CENTER_gt/CENTER_i.nii.gz``.

    Args:
        centres: centre name -> number of cases (default ``{"C1": 2, "C2": 1}``).
        missing: case ID -> phase indices not written (e.g. ``{"C1_2": (2, 3, 4, 5)}``).
        unlabelled: case IDs written without a mask.
        train, test: IDs written to ``train.txt`` / ``test.txt`` (None: no file).
    """
    root = Path(root)
    centres = {"C1": 2, "C2": 1} if centres is None else centres
    missing = missing or {}
    out = {}
    n = 0
    for centre, count in centres.items():
        for i in range(1, count + 1):
            case_id = f"{centre}_{i}"
            image, mask = make_arrays(shape, phases, dtype, seed + n, case_id not in unlabelled)
            n += 1
            aff = make_affine(affine)
            kept = [t for t in range(phases) if t not in missing.get(case_id, ())]
            files = [
                save_nifti(root / centre / case_id / f"P{t}.nii.gz", image[t], aff) for t in kept
            ]
            mask_file = None
            if mask is not None:
                mask_file = save_nifti(root / f"{centre}_gt" / f"{case_id}.nii.gz", mask, aff)
            out[case_id] = WrittenCase(case_id, image[kept], mask, aff, files, mask_file)
    for name, ids in (("train.txt", train), ("test.txt", test)):
        if ids is not None:
            (root / name).write_text("".join(f"{i}\n" for i in ids))
    return out


def write_nifti4d(
    root: Path,
    n_cases: int = 2,
    *,
    phases: int = 3,
    shape: tuple[int, int, int] = (6, 7, 8),
    affine: str = "oblique",
    dtype: str = "int16",
    mask_suffix: str = "_mask",
    unlabelled: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, WrittenCase]:
    """4D NIfTI: ``CASE.nii.gz`` (i, j, k, T) and ``CASE{mask_suffix}.nii.gz`` beside it."""
    root = Path(root)
    out = {}
    for n in range(n_cases):
        case_id = f"dyn{n:02d}"
        image, mask = make_arrays(shape, phases, dtype, seed + n, case_id not in unlabelled)
        aff = make_affine(affine)
        f = save_nifti(root / f"{case_id}.nii.gz", np.moveaxis(image, 0, -1), aff)
        mask_file = None
        if mask is not None:
            mask_file = save_nifti(root / f"{case_id}{mask_suffix}.nii.gz", mask, aff)
        out[case_id] = WrittenCase(case_id, image, mask, aff, [f], mask_file)
    return out


WRITERS = {
    "nnunet": write_nnunet,
    "mamamia": write_mamamia,
    "bts": write_bts,
    "nifti4d": write_nifti4d,
}


def write_layout_cohort(layout: str, root: Path, **kwargs) -> dict[str, WrittenCase]:
    """Writes a small cohort in `layout` ("nnunet", "mamamia", "bts", "nifti4d")."""
    return WRITERS[layout](root, **kwargs)


# ------------------------------------------------------------------ hostile files


def forge_header(
    path: Path,
    shape: tuple[int, ...],
    dtype: str | np.dtype = "int16",
    *,
    data_bytes: int = 3700,
) -> Path:
    """A NIfTI-1 file whose header declares `shape` x `dtype` voxels but which holds only
    `data_bytes` bytes of voxel data (the default makes a 4 KB ``.nii``); ``.nii.gz`` names are
    gzip-compressed, so only decompressing would show the shortfall."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_data_offset(352)
    header.set_sform(make_affine("ras"), code=1)
    header.set_qform(make_affine("ras"), code=1)
    raw = header.binaryblock + b"\0" * 4 + bytes(data_bytes)  # + the empty extension flag
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def save_without_spacing(path: Path, data: np.ndarray, pixdim=(0.0, 0.0, 0.0)) -> Path:
    """A file with no sform and no qform (codes 0) whose pixdim[1:4] are as given: nibabel
    would replace zeros by 1 on writing, so the header bytes are patched after it wrote them."""
    import gzip
    import struct

    path = Path(path)
    plain = path.with_name(path.name.removesuffix(".gz"))
    img = nib.Nifti1Image(np.asarray(data), None)
    img.header["qform_code"] = 0
    img.header["sform_code"] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(plain))
    raw = bytearray(plain.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1:4] (little-endian header)
    plain.unlink()
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path
