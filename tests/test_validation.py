"""Every class of bad input is rejected by `load_case` with one line: case, file, problem.

Each row of the table starts from a valid one-case cohort, breaks one thing, and states which
case and file the message must name and what it must say. A bad case never hides the good ones:
discovery still lists them and they load.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import (
    forge_header,
    make_affine,
    make_arrays,
    save_nifti,
    save_without_spacing,
    write_layout_cohort,
)

from data_store.errors import InputError
from data_store.layouts import discover
from data_store.nifti import ReadOptions
from data_store.source_reader import AFFINE_TOL_MM, load_case

CASE = "case_000"
Breaker = Callable[[Path], Path]


def _phase(root: Path, t: int, ext: str = ".nii.gz") -> Path:
    return root / "imagesTr" / f"{CASE}_{t:04d}{ext}"


def _mask(root: Path) -> Path:
    return root / "labelsTr" / f"{CASE}.nii.gz"


def _shifted(mm: float) -> np.ndarray:
    affine = make_affine("ras")
    affine[:3, 3] += mm
    return affine


def _overwrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    return save_nifti(path, data, make_affine("ras") if affine is None else affine)


def _truncate_gz(keep: int) -> Breaker:
    def breaker(root: Path) -> Path:
        path = _phase(root, 1)
        raw = path.read_bytes()
        path.write_bytes(raw[:keep])
        return path

    return breaker


def _truncate_nii(root: Path) -> Path:
    gz = _phase(root, 1)
    raw = gzip.decompress(gz.read_bytes())
    gz.unlink()
    path = _phase(root, 1, ".nii")
    path.write_bytes(raw[: 352 + 100])  # the header, then 100 of the 672 data bytes
    return path


def _with_nan(root: Path, value: float) -> Path:
    image, _ = make_arrays(phases=2, dtype="float32")
    image[1, 2, 3, 4] = value
    return _overwrite(_phase(root, 1), image[1])


def _bad_mask_values(root: Path) -> Path:
    _, mask = make_arrays()
    mask[0, 0, 0] = 2
    return _overwrite(_mask(root), mask)


def _degenerate_affine(root: Path) -> Path:
    """Phase 0 with a zero third column in its sform (no direction for axis k)."""
    header = nib.Nifti1Header()
    header.set_data_shape((6, 7, 8))
    header.set_data_dtype(np.int16)
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
    path = _phase(root, 0)
    nib.save(nib.Nifti1Image(make_arrays()[0][0], None, header=header), str(path))
    return path


def _two_files_one_phase(root: Path) -> Path:
    image, _ = make_arrays()
    return _overwrite(_phase(root, 1, ".nii"), image[1])  # sorted first, named first


def _orphan_mask(root: Path) -> Path:
    _, mask = make_arrays()
    return _overwrite(root / "labelsTr" / "case_009.nii.gz", mask)


# (id, how to break the cohort -> the file the message must name, problem text, case)
NNUNET_TABLE: list[tuple[str, Breaker, str, str]] = [
    (
        "non-nifti",
        lambda r: (_phase(r, 1).write_bytes(b"this is not an image" * 20), _phase(r, 1))[1],
        "not a NIfTI file",
        CASE,
    ),
    ("empty-file", lambda r: (_phase(r, 2).write_bytes(b""), _phase(r, 2))[1], "empty file", CASE),
    ("truncated-nii.gz-end", _truncate_gz(-20), "truncated file (the gzip data ends early)", CASE),
    ("truncated-nii.gz-header", _truncate_gz(60), "truncated file", CASE),
    ("truncated-nii", _truncate_nii, "truncated or corrupt image data", CASE),
    (
        "phase-shapes-differ",
        lambda r: _overwrite(_phase(r, 2), np.zeros((6, 7, 9), np.int16)),
        "phase shapes differ: phase 2 is (6, 7, 9), phase 0 is (6, 7, 8)",
        CASE,
    ),
    (
        "phase-affine-differs",
        lambda r: _overwrite(_phase(r, 1), make_arrays()[0][1], _shifted(0.5)),
        f"phase 1 affine differs from phase 0's: voxels move by up to 0.866 mm "
        f"(tolerance {AFFINE_TOL_MM} mm)",
        CASE,
    ),
    (
        "mask-affine-differs",
        lambda r: _overwrite(_mask(r), make_arrays()[1], _shifted(0.1)),
        "mask affine differs from phase 0's",
        CASE,
    ),
    ("nan-voxels", lambda r: _with_nan(r, np.nan), "1 NaN and 0 Inf voxels", CASE),
    ("inf-voxels", lambda r: _with_nan(r, -np.inf), "0 NaN and 1 Inf voxels", CASE),
    ("mask-values", _bad_mask_values, "mask values other than {0, 1}: 2 in 1 voxels", CASE),
    (
        "mask-shape",
        lambda r: _overwrite(_mask(r), np.zeros((6, 7, 9), np.uint8)),
        "mask shape (6, 7, 9) differs from image shape (6, 7, 8)",
        CASE,
    ),
    (
        "no-pre-contrast",
        lambda r: (_phase(r, 0).unlink(), _phase(r, 0))[1],
        f"no pre-contrast phase: {CASE}_0000.nii.gz is missing",
        CASE,
    ),
    (
        "one-phase",
        lambda r: (_phase(r, 1).unlink(), _phase(r, 2).unlink(), _phase(r, 0))[2],
        "fewer than two phases: found 1",
        CASE,
    ),
    (
        "2d-image",
        lambda r: _overwrite(_phase(r, 1), np.zeros((6, 7), np.int16)),
        "image is 2D (6, 7)",
        CASE,
    ),
    (
        "single-slice",
        lambda r: _overwrite(_phase(r, 0), np.zeros((6, 7, 1), np.int16)),
        "image is 2D (shape (6, 7, 1) has a single slice)",
        CASE,
    ),
    (
        "5d-image",
        lambda r: _overwrite(_phase(r, 1), np.zeros((6, 7, 8, 1, 2), np.int16)),
        "image is 5D (6, 7, 8, 1, 2)",
        CASE,
    ),
    (
        "4d-phase-file",
        lambda r: _overwrite(_phase(r, 1), np.zeros((6, 7, 8, 2), np.int16)),
        "image is 4D (6, 7, 8, 2), expected a 3D volume per phase (this layout has one 3D file",
        CASE,
    ),
    (
        "degenerate-affine",
        _degenerate_affine,
        "affine is degenerate (no direction for an axis)",
        CASE,
    ),
    ("two-files-one-phase", _two_files_one_phase, "two files for phase 1", CASE),
    ("mask-without-image", _orphan_mask, "mask has no image files", "case_009"),
]


@pytest.mark.parametrize(
    ("breaker", "problem", "case"),
    [pytest.param(b, p, c, id=i) for i, b, p, c in NNUNET_TABLE],
)
def test_bad_nnunet_input_names_case_file_and_problem(tmp_path, breaker, problem, case):
    write_layout_cohort("nnunet", tmp_path, n_cases=1, phases=3, dataset_json=False)
    bad_file = breaker(tmp_path)
    sources = {c.case_id: c for c in discover(tmp_path)}
    with pytest.raises(InputError) as info:
        load_case(sources[case])
    err = info.value
    assert str(err) == f"case {case}: {bad_file}: {err.problem}"
    assert problem in err.problem
    assert "\n" not in str(err)
    assert err.case == case and Path(err.path) == bad_file


NIFTI4D_TABLE = [
    ("3d-file", (6, 7, 8), "fewer than two phases: a 3D image (6, 7, 8) is one phase"),
    ("one-volume", (6, 7, 8, 1), "fewer than two phases: a 3D image (6, 7, 8) is one phase"),
    ("5d-file", (6, 7, 8, 2, 2), "image is 5D (6, 7, 8, 2, 2)"),
    ("2d-file", (6, 7), "image is 2D (6, 7)"),
]


@pytest.mark.parametrize(
    ("shape", "problem"), [pytest.param(s, p, id=i) for i, s, p in NIFTI4D_TABLE]
)
def test_bad_nifti4d_input(tmp_path, shape, problem):
    path = _overwrite(tmp_path / "dyn.nii.gz", np.zeros(shape, np.int16))
    (source,) = discover(tmp_path, "nifti4d")
    with pytest.raises(InputError, match="^case dyn: ") as info:
        load_case(source)
    assert Path(info.value.path) == path and problem in info.value.problem


def test_bts_missing_p0_and_mamamia_bad_name(tmp_path):
    bts = write_layout_cohort("bts", tmp_path / "bts", centres={"C1": 2})
    bts["C1_1"].phase_files[0].unlink()
    sources = {c.case_id: c for c in discover(tmp_path / "bts")}
    with pytest.raises(InputError) as info:
        load_case(sources["C1_1"])
    assert str(info.value) == (
        f"case C1_1: {tmp_path / 'bts' / 'C1' / 'C1_1' / 'P0.nii.gz'}: "
        "no pre-contrast phase: P0.nii.gz is missing"
    )
    assert load_case(sources["C1_2"]).image.shape[0] == 6  # the good case still loads

    write_layout_cohort("mamamia", tmp_path / "mm", case_ids=("DUKE_001",))
    stray = tmp_path / "mm" / "images" / "DUKE_001" / "duke_001_sub.nii.gz"
    _overwrite(stray, np.zeros((6, 7, 8), np.int16))
    (source,) = discover(tmp_path / "mm")
    with pytest.raises(InputError, match="unexpected file name") as info:
        load_case(source)
    assert Path(info.value.path) == stray


def test_truncated_data_after_a_valid_header(tmp_path):
    """A large .nii.gz cut in its data: the header reads, the voxels do not (nibabel would only
    fail on get_fdata; load_case reads eagerly and says so)."""
    affine = make_affine("ras")
    noise = np.random.default_rng(0).integers(-3000, 3000, size=(2, 40, 40, 40)).astype(np.int16)
    files = [
        save_nifti(tmp_path / "imagesTr" / f"big_{t:04d}.nii.gz", noise[t], affine) for t in (0, 1)
    ]
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) // 2])
    (source,) = discover(tmp_path)
    with pytest.raises(InputError) as info:
        load_case(source)
    assert str(info.value) == (
        f"case big: {files[1]}: truncated or corrupt image data "
        "(EOFError: Compressed file ended before the end-of-stream marker was reached)"
    )


def test_tolerance_accepts_float32_rounding(tmp_path):
    """Affines that differ by far less than AFFINE_TOL_MM (header rounding) are accepted."""
    write_layout_cohort("nnunet", tmp_path, n_cases=1, phases=2, dataset_json=False)
    _overwrite(_phase(tmp_path, 1), make_arrays()[0][1], _shifted(AFFINE_TOL_MM / 10))
    (source,) = discover(tmp_path)
    assert load_case(source).image.shape == (2, 8, 7, 6)


def test_bad_case_does_not_hide_good_ones(tmp_path):
    write_layout_cohort("nnunet", tmp_path, n_cases=3, phases=2)
    _phase(tmp_path, 1).write_bytes(b"garbage")
    loaded, rejected = [], []
    for source in discover(tmp_path):
        try:
            loaded.append(load_case(source).source.case_id)
        except InputError as err:
            rejected.append(err.case)
    assert loaded == ["case_001", "case_002"] and rejected == [CASE]


# --------------------------------------------------------------- refused before reading voxels


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_forged_header_is_refused_before_any_voxel_is_read(tmp_path, name):
    """A 4 KB file whose header claims 2000^3 int16 voxels (16 GB): one line, at once."""
    import time

    write_layout_cohort("nnunet", tmp_path, n_cases=1, phases=2, dataset_json=False)
    _phase(tmp_path, 1).unlink()
    path = forge_header(tmp_path / "imagesTr" / f"{CASE}_0001{name[4:]}", (2000, 2000, 2000))
    assert path.stat().st_size <= 4096
    (source,) = discover(tmp_path)
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        load_case(source)
    assert time.perf_counter() - start < 2.0
    err = info.value
    assert err.case == CASE and Path(err.path) == path and "\n" not in str(err)
    if name.endswith(".gz"):  # the true size is only known by decompressing: the limit says no
        assert err.problem == (
            "the header declares 2000x2000x2000 int16 voxels (14.9 GiB), more than the 4 GiB "
            "limit per file (max_image_bytes)"
        )
    else:
        assert err.problem.startswith(
            "truncated or corrupt image data (expected 16000000000 bytes of voxels after the "
            "header, found 3700"
        )


def test_size_limit_is_configurable(tmp_path):
    write_layout_cohort("nnunet", tmp_path, n_cases=1, phases=2, dataset_json=False)  # 6x7x8 int16
    (source,) = discover(tmp_path)
    assert load_case(source, ReadOptions(max_image_bytes=6 * 7 * 8 * 2)).image.shape[0] == 2
    with pytest.raises(InputError, match=r"int16 voxels \(672 bytes\), more than the 671 bytes"):
        load_case(source, ReadOptions(max_image_bytes=6 * 7 * 8 * 2 - 1))
    with pytest.raises(InputError, match=r"more than the 671 bytes limit") as info:
        load_case(source, ReadOptions(max_image_bytes=671))
    assert Path(info.value.path) == _phase(tmp_path, 0)
    with pytest.raises(InputError, match="max_image_bytes must be > 0, got 0") as info:
        ReadOptions(max_image_bytes=0)
    assert info.value.param == "max_image_bytes"


RGB = [("R", "u1"), ("G", "u1"), ("B", "u1")]


@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        ("complex64", "complex64 (NIfTI datatype 32)"),
        (RGB, "R/G/B (3 values per voxel) (NIfTI datatype 128)"),
        ("complex128", "complex128 (NIfTI datatype 1792)"),
    ],
)
def test_unsupported_voxel_types_are_one_line(tmp_path, dtype, shown):
    write_layout_cohort("nnunet", tmp_path, n_cases=1, phases=2, dataset_json=False)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    data = np.zeros((6, 7, 8), dtype=np.dtype(dtype))
    path = _phase(tmp_path, 1)
    img = nib.Nifti1Image(data, make_affine("ras"), header=header)
    nib.save(img, str(path))
    (source,) = discover(tmp_path)
    with pytest.raises(InputError) as info:
        load_case(source)
    assert str(info.value) == (
        f"case {CASE}: {path}: unsupported voxel type {shown}: tsesnet stores real-valued "
        "scalar images (integer or float, at most 8 bytes)"
    )


def test_zero_spacing_is_refused_or_assumed_and_recorded(tmp_path):
    image, mask = make_arrays(phases=2)
    for t in range(2):
        save_without_spacing(_phase(tmp_path, t), image[t])
    save_without_spacing(_mask(tmp_path), mask)
    (source,) = discover(tmp_path)
    with pytest.raises(InputError) as info:
        load_case(source)
    assert str(info.value) == (
        f"case {CASE}: {_phase(tmp_path, 0)}: no voxel spacing: pixdim[1:4] is (0, 0, 0) and "
        "the file has no sform; pass `assume_spacing=Z Y X` (mm) to ingest it with a spacing "
        "you know"
    )
    # the command line names its flag (`tsesnet ingest` renders the line: test_ingest.py)
    flags = {"assume_spacing": "--assume-spacing"}
    assert "pass `--assume-spacing Z Y X` (mm)" in info.value.naming(flags)
    loaded = load_case(source, ReadOptions(assume_spacing=(3.0, 0.8, 0.7)))
    assert loaded.spacing == pytest.approx((3.0, 0.8, 0.7)) and loaded.spacing_assumed
    with pytest.raises(InputError, match="three positive sizes"):
        ReadOptions(assume_spacing=(1.0, 0.0, 1.0))
    # a file with a spacing keeps its own, the option notwithstanding
    write_layout_cohort("nnunet", tmp_path / "ok", n_cases=1, phases=2, dataset_json=False)
    (ok,) = discover(tmp_path / "ok")
    kept = load_case(ok, ReadOptions(assume_spacing=(9.0, 9.0, 9.0)))
    assert kept.spacing == pytest.approx((1.5, 0.8, 0.7)) and not kept.spacing_assumed


def _loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)  # points at itself


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _broken(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("gone.nii.gz"))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_loop, "symbolic link loop: the path never reaches a file"),
        (_directory, "a directory, not a NIfTI file"),
        (_broken, "broken symbolic link (its target"),
    ],
)
def test_unreadable_phase_path_rejects_its_case(tmp_path, make, problem):
    """Such a phase used to be skipped silently: the case was stored with a phase missing."""
    write_layout_cohort("nnunet", tmp_path, n_cases=2, phases=3, dataset_json=False)
    bad = _phase(tmp_path, 1)
    make(bad)
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert bad in sources[CASE].phase_files
    with pytest.raises(InputError) as info:
        load_case(sources[CASE])
    assert str(info.value).startswith(f"case {CASE}: {bad}: {problem}")
    assert load_case(sources["case_001"]).image.shape[0] == 3  # the other case is untouched


def test_stray_phase_number_is_rejected_and_changes_no_other_case(tmp_path):
    """One stray GAP_0999 used to give every case a 1000-long phase_present."""
    write_layout_cohort("nnunet", tmp_path, n_cases=2, phases=3, dataset_json=False)
    image, _ = make_arrays()
    gap = _overwrite(tmp_path / "imagesTr" / "GAP_0999.nii.gz", image[0])
    stray = _overwrite(tmp_path / "imagesTr" / "case_001_0999.nii.gz", image[0])
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert sources[CASE].phase_present == (True, True, True)
    assert load_case(sources[CASE]).image.shape[0] == 3
    with pytest.raises(InputError) as info:
        load_case(sources["case_001"])
    assert str(info.value) == (
        f"case case_001: {stray}: phase 999 is beyond the cohort's phases 0..2 (the longest "
        "case numbered without a gap has 3); phase numbers run 0..k, with missing phases only "
        "in between"
    )
    with pytest.raises(InputError, match="no pre-contrast phase: GAP_0000.nii.gz is missing"):
        load_case(sources["GAP"])
    assert Path(sources["GAP"].problem_path).parent == gap.parent
    # dataset.json's channel count is the cohort's phases when it gives one
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "pre", "1": "post"}}')
    sources = {s.case_id: s for s in discover(tmp_path)}
    with pytest.raises(InputError, match=r"phase 2 is beyond the cohort's phases 0..1 \(dataset"):
        load_case(sources[CASE])


def test_bts_phase_beyond_p5_is_rejected(tmp_path):
    write_layout_cohort("bts", tmp_path, centres={"C1": 2})
    p7 = _overwrite(tmp_path / "C1" / "C1_2" / "P7.nii.gz", make_arrays()[0][0])
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert sources["C1_1"].phase_present == (True,) * 6
    with pytest.raises(InputError, match="phase 7 is beyond the cohort's phases 0..5") as info:
        load_case(sources["C1_2"])
    assert Path(info.value.path) == p7
