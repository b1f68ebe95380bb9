"""DICOM DCE-MRI studies in (`--layout dicom`), DICOM SEG out (`--output-format dicom-seg`).

Studies are written with pydicom by `dicom_factory` (phases as separate series, as one
multi-phase series, as enhanced multi-frame; non-DCE series mixed in; shuffled names and
folders), plus pydicom's own MR test files in every transfer syntax it ships them in. Each is
compared with the same array saved as NIfTI with the affine the DICOM geometry implies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_factory import OBLIQUE, cd_export, edit, make_image, reencode, write_study
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from data_store.dicom import SEG_SOP_CLASS, read_seg_mask, study_case_id
from data_store.errors import InputError
from data_store.layouts import detect_layout, discover
from data_store.nifti import ReadOptions
from data_store.source_reader import load_case
from tsesnet.serving.dicom_seg import write_seg

IDENTIFYING = (b"DOE^JANE", b"PID-12345", b"19700101", b"ACC42")


def _one(src: Path):
    cases = discover(src, "auto")
    assert len(cases) == 1, [c.case_id for c in cases]
    return cases[0]


def _nifti_twin(tmp_path: Path, image: np.ndarray, affine: np.ndarray):
    """The same (T, i, j, k) array as a 4D NIfTI with `affine`, loaded by the NIfTI path."""
    path = tmp_path / "twin" / "case.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine), str(path))
    return load_case(discover(path, "nifti4d")[0])


# ------------------------------------------------------------------------- what is read


@pytest.mark.parametrize("variant", ["series", "multiphase", "enhanced"])
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_variants_read_like_nifti(tmp_path, variant, orientation):
    """Every variant, shuffled among folders with random names and with T2, localizer,
    subtraction and DWI series in the study: the DCE phases only, in time order, equal to the
    NIfTI path's reading of the same array, each skipped series named with its reason."""
    image = make_image(seed=1)
    times = (0.0, 75.5, 151.0)
    study = write_study(
        tmp_path / "src",
        image,
        variant=variant,
        orientation=OBLIQUE if orientation == "oblique" else (1, 0, 0, 0, 1, 0),
        times=times,
        extra=("t2", "localizer", "subtraction", "dwi"),
        shuffle=True,
    )
    assert detect_layout(tmp_path / "src") == "dicom"
    case = _one(tmp_path / "src")
    assert case.case_id == study_case_id(study.study_uid) and case.problem is None
    reasons = " | ".join(case.notes)
    assert len(case.notes) == 4, reasons
    for why in ("localizer", "subtraction", "diffusion", "'t2'"):
        assert why in reasons
    loaded = load_case(case)
    twin = _nifti_twin(tmp_path, image, study.affine)
    np.testing.assert_array_equal(loaded.image, twin.image)
    np.testing.assert_allclose(loaded.geometry.affine, twin.geometry.affine, atol=1e-5)
    assert loaded.source.times == pytest.approx(times, abs=1e-3)
    assert loaded.dicom["study_instance_uid"] == study.study_uid
    assert [p["series_instance_uid"] for p in loaded.dicom["phases"]] == [
        study.series_uids[t] for t in range(3)
    ]


def test_phases_ordered_by_acquisition_time_not_series_number(tmp_path):
    """Series numbers say 10, 11, 12; acquisition times say phase 2 came first."""
    image = make_image(seed=2)
    write_study(tmp_path / "src", image, times=(120.0, 240.0, 0.0))
    loaded = load_case(_one(tmp_path / "src"))
    assert loaded.source.times == pytest.approx((0.0, 120.0, 240.0), abs=1e-3)
    back = loaded.geometry.to_original(loaded.image)
    np.testing.assert_array_equal(back, image[[2, 0, 1]])


def test_multiphase_series_told_apart_by_trigger_time(tmp_path):
    """No TemporalPositionIdentifier, every instance with the series' start as AcquisitionTime:
    the phases come from TriggerTime (ms), and so do the phase times."""
    image = make_image(seed=15)
    study = write_study(tmp_path / "src", image, variant="multiphase", shuffle=True)
    for t in range(3):
        for f in study.files[t]:
            ds = pydicom.dcmread(f)
            del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
            ds.AcquisitionTime = "090000"
            ds.TriggerTime = [90000, 0, 45000][t]  # written out of order
            ds.save_as(f)
    loaded = load_case(_one(tmp_path / "src"))
    assert loaded.source.times == pytest.approx((0.0, 45.0, 90.0))
    np.testing.assert_array_equal(loaded.geometry.to_original(loaded.image), image[[1, 2, 0]])


def test_rescale_slope_and_intercept_applied(tmp_path):
    image = make_image(seed=3)
    write_study(tmp_path / "src", image, variant="multiphase", slope=0.5, intercept=-10.0)
    loaded = load_case(_one(tmp_path / "src"))
    assert loaded.image.dtype == np.float32
    back = loaded.geometry.to_original(loaded.image)
    np.testing.assert_allclose(back, image.astype(np.float32) * 0.5 - 10.0)


def test_two_studies_two_cases_and_ids_carry_no_patient_name(tmp_path):
    write_study(tmp_path / "src" / "a", make_image(seed=4))
    write_study(tmp_path / "src" / "b", make_image(seed=5), variant="enhanced")
    cases = discover(tmp_path / "src", "dicom")
    assert len(cases) == 2 and all(c.problem is None for c in cases)
    assert all(c.case_id.startswith("study-") and "DOE" not in c.case_id for c in cases)


def _pydicom_mr_study(root: Path, names: list[str]) -> np.ndarray:
    """A 2-phase, len(names)-slice multi-phase series made of pydicom's own MR_small files,
    slice k from file names[k] (each in its own transfer syntax); returns the expected
    (T, i, j, k) pixels."""
    study, series = generate_uid(), generate_uid()
    frame_of_reference = generate_uid()
    pixels = []
    for t in range(2):
        for k, name in enumerate(names):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame_of_reference
            ds.SOPInstanceUID = generate_uid()
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]  # the file says DERIVED
            ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 5.0 * k]
            ds.TemporalPositionIdentifier = t + 1
            ds.NumberOfTemporalPositions = 2
            ds.AcquisitionTime = f"0900{10 * t:02d}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(root / f"t{t}_{k}_{name}")
            if t == 0:
                pixels.append(pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array)
    vol = np.stack(pixels, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i, j, k)
    return np.stack([vol, vol])


def test_pydicom_real_mr_files_in_every_transfer_syntax(tmp_path):
    """pydicom's MR_small (64x64 MR) as explicit/implicit little endian, big endian, RLE,
    JPEG-LS and JPEG 2000 lossless: every slice decodes to the same pixels."""
    names = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ]
    (tmp_path / "src").mkdir()
    expected = _pydicom_mr_study(tmp_path / "src", names)
    loaded = load_case(_one(tmp_path / "src"))
    np.testing.assert_array_equal(loaded.geometry.to_original(loaded.image), expected)
    assert loaded.geometry.spacing == pytest.approx((5.0, 0.3125, 0.3125))


def test_pydicom_truncated_mr_file_refused(tmp_path):
    (tmp_path / "src").mkdir()
    _pydicom_mr_study(tmp_path / "src", ["MR_small.dcm", "MR_truncated.dcm", "MR_small.dcm"])
    with pytest.raises(InputError) as err:
        load_case(_one(tmp_path / "src"))
    text = str(err.value)
    assert "\n" not in text and "MR_truncated.dcm" in text and "truncated" in text
    assert text.startswith("case study-") and "series" in text


# ----------------------------------------------------------------------- what is refused


def _defect(kind: str, root: Path) -> tuple[str, str]:
    """Writes a study with one defect; returns (the file the line must name, words in it)."""
    image = make_image(seed=6)
    variant = "multiphase" if kind == "huge" else "series"
    study = write_study(root, image, variant=variant)
    files = study.files[1]  # phase 1's slices, k order
    normal_z = 2.0
    if kind == "missing":
        files[3].unlink()
        return "", "missing slice"
    if kind == "duplicate":
        dup = files[3].with_name("copy.dcm")
        shutil.copy(files[3], dup)
        edit(dup, SOPInstanceUID=generate_uid())
        return "copy.dcm", "duplicate slice"
    if kind == "uneven":
        z = pydicom.dcmread(files[-1]).ImagePositionPatient
        edit(files[-1], ImagePositionPatient=[z[0], z[1], float(z[2]) + 0.6 * normal_z])
        return files[-1].name, "uneven slice spacing"
    if kind == "grid":
        for f in study.files[2]:
            edit(f, PixelSpacing=[0.9, 0.7])
        return "", "grid differs"
    if kind == "sheared":
        for t in range(3):
            for k, f in enumerate(study.files[t]):
                z = pydicom.dcmread(f).ImagePositionPatient
                edit(f, ImagePositionPatient=[float(z[0]) + 0.5 * k, z[1], z[2]])
        return "", "cannot be placed"
    if kind == "orientation":
        edit(files[2], ImageOrientationPatient=[1, 0, 0, 0, 0.99, 0.141])
        return files[2].name, "different orientations"
    if kind == "no_decoder":  # HTJ2K: no decoder for it is installed here
        ds = pydicom.dcmread(files[4])
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        ds["PixelData"].VR = "OB"
        ds.save_as(files[4])
        return files[4].name, "cannot be decoded"
    if kind == "truncated":
        files[5].write_bytes(files[5].read_bytes()[:-40])
        return files[5].name, "truncated"
    if kind == "huge":
        for t in range(3):
            for f in study.files[t]:
                edit(f, Rows=60000, Columns=60000)
        return "", "above the limit"
    if kind == "no_dce":
        for t in (1, 2):
            for f in study.files[t]:
                f.unlink()
        return "", "no DCE series"
    raise ValueError(kind)


DEFECTS = [
    "missing",
    "duplicate",
    "uneven",
    "grid",
    "sheared",
    "orientation",
    "no_decoder",
    "truncated",
    "huge",
    "no_dce",
]


@pytest.mark.parametrize("kind", DEFECTS)
def test_defect_refused_in_one_line(tmp_path, kind):
    name, words = _defect(kind, tmp_path / "src")
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case, ReadOptions())
    text = str(err.value)
    assert "\n" not in text and words in text, text
    assert text.startswith(f"case {case.case_id}: ")
    assert name in text
    if kind not in ("no_dce",):
        assert "series" in text  # the line names the series


@pytest.mark.parametrize(
    "content",
    [b"not dicom at all", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI", b""],
    ids=["text", "truncated-header", "empty"],
)
def test_hostile_files_are_one_line_each(tmp_path, content):
    write_study(tmp_path / "src" / "good", make_image(seed=7))
    (tmp_path / "src" / "bad.dcm").write_bytes(content)
    cases = discover(tmp_path / "src", "dicom")
    good = [c for c in cases if c.problem is None]
    bad = [c for c in cases if c.problem is not None]
    assert len(good) == 1 and len(bad) == 1
    load_case(good[0])  # the good study still reads
    with pytest.raises(InputError) as err:
        load_case(bad[0])
    assert "bad.dcm" in str(err.value) and "\n" not in str(err.value)


def test_enhanced_header_with_absurd_frame_count_is_one_line(tmp_path):
    study = write_study(tmp_path / "src" / "e", make_image(seed=12), variant="enhanced")
    write_study(tmp_path / "src" / "good", make_image(seed=13))
    edit(study.files[0][0], NumberOfFrames=10**9)
    cases = discover(tmp_path / "src", "dicom")
    bad = [c for c in cases if c.problem]
    assert len(cases) == 2 and len(bad) == 1
    assert "declares 1000000000 frames but has 24 per-frame groups" in bad[0].problem


# ----------------------------------------------------------------------------- masks


def test_masks_as_seg_and_as_nifti_beside(tmp_path):
    image = make_image(seed=8)
    study = write_study(tmp_path / "src", image, variant="multiphase", orientation=OBLIQUE)
    loaded = load_case(_one(tmp_path / "src"))
    truth = (loaded.image[2] > 350).astype(np.uint8)  # (Z, Y, X)
    assert 0 < truth.sum() < truth.size
    seg = tmp_path / "seg" / "x.dcm"
    write_seg(seg, truth, loaded.geometry, loaded.dicom, model_uri="models:/t/1")
    ds = pydicom.dcmread(seg)
    assert ds.SOPClassUID == SEG_SOP_CLASS
    read = hd.seg.segread(seg)
    desc = read.get_segment_description(1)
    assert desc.segment_label == "Tumour"
    assert desc.segmented_property_type.value == "108369006"  # SCT Neoplasm
    assert desc.segmented_property_category.value == "49755003"
    assert read.StudyInstanceUID == study.study_uid
    back = read_seg_mask(seg, loaded.dicom, loaded.geometry.shape)
    np.testing.assert_array_equal(loaded.geometry.to_canonical(back), truth)
    # a SEG in the study's folders is its mask
    shutil.copy(seg, tmp_path / "src" / "dynamic" / "zz_seg.dcm")
    case = _one(tmp_path / "src")
    assert case.mask_file.name == "zz_seg.dcm"
    np.testing.assert_array_equal(load_case(case).mask, truth)
    # a NIfTI beside the study (in the folder holding all its files) is its mask
    (tmp_path / "src" / "dynamic" / "zz_seg.dcm").unlink()
    nib.save(nib.Nifti1Image(back, study.affine), str(tmp_path / "src" / "dynamic" / "m.nii.gz"))
    assert detect_layout(tmp_path / "src") == "dicom"
    case = _one(tmp_path / "src")
    np.testing.assert_array_equal(load_case(case).mask, truth)


@pytest.mark.parametrize("variant", ["series", "multiphase", "enhanced"])
def test_seg_of_every_variant_reads_back_on_its_grid(tmp_path, variant):
    """A SEG written for each variant references phase 0's images (instances, or the frames of
    the enhanced file at phase 0's slices) and reads back voxel for voxel."""
    study = write_study(tmp_path / "src", make_image(seed=14), variant=variant, orientation=OBLIQUE)
    loaded = load_case(_one(tmp_path / "src"))
    truth = (loaded.image[2] > 350).astype(np.uint8)
    seg = tmp_path / "x.dcm"
    write_seg(seg, truth, loaded.geometry, loaded.dicom, model_uri="m")
    read = hd.seg.segread(seg)
    refs = read.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == study.series_uids[0]
    sources = {pydicom.dcmread(f).SOPInstanceUID for f in study.files[0]}
    assert {i.ReferencedSOPInstanceUID for i in refs.ReferencedInstanceSequence} <= sources
    if variant == "enhanced":  # phase 0 is frames 1..8 of the file, slice k = frame k + 1
        used = [
            int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for f in read.PerFrameFunctionalGroupsSequence
        ]
        assert sorted(used) == list(range(1, 9))
    back = read_seg_mask(seg, loaded.dicom, loaded.geometry.shape)
    np.testing.assert_array_equal(loaded.geometry.to_canonical(back), truth)


def test_seg_of_nifti_case_says_it_needs_dicom(tmp_path):
    twin = _nifti_twin(tmp_path, make_image(seed=9), np.eye(4))
    with pytest.raises(InputError, match="needs a DICOM source"):
        write_seg(tmp_path / "x.dcm", twin.image[0] > 0, twin.geometry, None, model_uri="m")


# ------------------------------------------------------------- the CLI, the store, the SEG


def _store_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())


def test_ingest_cli_bad_studies_one_line_each_good_ones_stored(tmp_path, ray_session, capsys):
    """One cohort: two good studies (one with extra series), three defective ones and a
    non-DICOM .dcm file. Exit 1, one line per problem, only the good studies stored, and
    nothing identifying in the store."""
    from data_store.store import open_store
    from tsesnet.cli import main

    src = tmp_path / "cohort"
    good_a = write_study(src / "x" / "1", make_image(seed=10), extra=("t2", "localizer"))
    good_b = write_study(src / "y", make_image(seed=11), variant="enhanced", shuffle=True)
    for i, kind in enumerate(("missing", "grid", "truncated")):
        _defect(kind, src / f"bad{i}")
    (src / "notes.dcm").write_text("hello")
    status = main(["ingest", str(src), str(tmp_path / "store"), "--workers", "2"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "Traceback" not in err
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("case ")]
    assert len(lines) == 4, err
    assert sum("notes.dcm" in line for line in lines) == 1
    assert out.count("skipped series") == 2  # the T2 and the localizer, one line each
    store = open_store(tmp_path / "store")
    ids = {study_case_id(good_a.study_uid), study_case_id(good_b.study_uid)}
    assert set(store.case_ids) == ids
    attrs = store.case_attrs(study_case_id(good_a.study_uid))
    assert attrs["layout"] == "dicom" and attrs["times"] == pytest.approx([0.0, 60.0, 120.0])
    assert attrs["dicom"]["study_instance_uid"] == good_a.study_uid
    stored = _store_bytes(tmp_path / "store")
    assert not any(word in stored for word in IDENTIFYING)
    # a rerun finds the good studies unchanged (by the checksums of their files)
    assert main(["ingest", str(src), str(tmp_path / "store")]) == 1
    assert "stored 0, unchanged 2, rejected 4" in capsys.readouterr().out


@pytest.mark.slow
def test_round_trip_dicom_seg_equals_nifti_mask(tmp_path, ray_session, mlflow_uri, capsys):
    """DICOM study -> store -> predict -> DICOM SEG -> read back: voxel for voxel the mask the
    NIfTI path writes for the same volume (same array, same affine, same model)."""
    from test_predict import _canonical_case, _register_tiny

    from tsesnet.cli import main

    canon, _ = _canonical_case(0)  # (T, Z, Y, X) = (3, 16, 32, 32)
    # Axial LPS grid: i = column -> L (x flipped), j = row -> P (y flipped), k -> S.
    image = np.ascontiguousarray(np.flip(canon.transpose(0, 3, 2, 1), axis=(1, 2)))
    study = write_study(tmp_path / "dicom", image, spacing=(0.7, 0.7), step=2.0)
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), study.affine), str(nifti / "c.nii.gz"))
    uri = _register_tiny(tmp_path)
    for name in ("dicom", "nifti"):
        assert main(["ingest", str(tmp_path / name), str(tmp_path / f"store-{name}")]) == 0
    base = ["predict", "--model", uri, "--workers", "1"]
    assert (
        main([*base, "--input", str(tmp_path / "store-nifti"), "--output", str(tmp_path / "o-n")])
        == 0
    )
    assert (
        main(
            [
                *base,
                "--input",
                str(tmp_path / "store-dicom"),
                "--output",
                str(tmp_path / "o-d"),
                "--output-format",
                "dicom-seg",
            ]
        )
        == 0
    )
    expected = np.asarray(nib.load(str(tmp_path / "o-n" / "c.nii.gz")).dataobj)  # (i, j, k)
    cid = study_case_id(study.study_uid)
    seg_file = tmp_path / "o-d" / f"{cid}.dcm"
    seg = hd.seg.segread(seg_file)
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.PatientName == "DOE^JANE"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uids[0]
    from data_store.store import open_store

    attrs = open_store(tmp_path / "store-dicom").case_attrs(cid)
    back = read_seg_mask(seg_file, attrs["dicom"], tuple(attrs["geometry"]["shape"]))
    assert 0 < expected.sum() < expected.size  # the untrained model marks some voxels
    np.testing.assert_array_equal(back, expected)
    # the DICOM folder predicted directly (no store) gives the same SEG
    argv = [*base, "--input", str(tmp_path / "dicom"), "--output", str(tmp_path / "o-raw")]
    assert main([*argv, "--output-format", "dicom-seg"]) == 0
    raw = read_seg_mask(tmp_path / "o-raw" / f"{cid}.dcm", attrs["dicom"], expected.shape)
    np.testing.assert_array_equal(raw, expected)
    with capsys.disabled():
        print(f"\nround trip: {int(expected.sum())} of {expected.size} voxels tumour, equal")
    # a NIfTI-sourced store: one line, nothing written
    capsys.readouterr()
    status = main(
        [
            *base,
            "--input",
            str(tmp_path / "store-nifti"),
            "--output",
            str(tmp_path / "o-x"),
            "--output-format",
            "dicom-seg",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and "needs a DICOM source" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------ exports as scanners and PACS write them


def _assert_like_twin(tmp_path: Path, src: Path, image: np.ndarray, affine: np.ndarray):
    """The study under `src` reads as the NIfTI twin of `image` with `affine`: the same voxels
    in the same place (slices written against the normal are read along it, so the file-order
    affines may differ by that flip; the canonical ones do not); returns (case, loaded)."""
    case = _one(src)
    assert case.problem is None, case.problem
    loaded = load_case(case)
    twin = _nifti_twin(tmp_path, image, affine)
    np.testing.assert_array_equal(loaded.image, twin.image)
    np.testing.assert_allclose(
        loaded.geometry.canonical_affine, twin.geometry.canonical_affine, atol=1e-4
    )
    return case, loaded


def test_pacs_cd_export_with_dicomdir_bare_names_and_clutter(tmp_path):
    """A CD as a PACS burns it: DICOMDIR at the root, PT/ST/SE/IM files in upper case without
    extension, and the clutter of a desktop (a .txt, a .jpg, Thumbs.db, .DS_Store)."""
    image = make_image(seed=20)
    study = write_study(tmp_path / "staging", image, variant="multiphase")
    copies = cd_export(study, tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    assert all(p.is_file() and p.suffix == "" and p.name.isupper() for p in copies)
    (tmp_path / "cd" / "README.TXT").write_text("Viewer on this CD")
    (tmp_path / "cd" / "preview.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (tmp_path / "cd" / "PT000000" / "Thumbs.db").write_bytes(bytes(512))
    (tmp_path / "cd" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    assert detect_layout(tmp_path / "cd") == "dicom"
    case, _ = _assert_like_twin(tmp_path, tmp_path / "cd", image, study.affine)
    assert case.notes == ()


def test_files_without_preamble_are_read(tmp_path):
    """Bare datasets (no 128-byte preamble, no DICM, no file meta; old exports write them), named
    .dcm or not at all, are read like Part 10 files (decided: read, as dcm2niix does)."""
    image = make_image(seed=21)
    study = write_study(tmp_path / "src", image, variant="multiphase")
    for i, path in enumerate(study.all_files):
        reencode(path, preamble=False)
        if i % 2:
            path.rename(path.with_suffix(""))
    assert not is_dicom_part10(study.all_files[0])
    assert detect_layout(tmp_path / "src") == "dicom"
    _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)


def is_dicom_part10(path: Path) -> bool:
    return path.read_bytes()[128:132] == b"DICM"


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, "mixed"],
)
@pytest.mark.parametrize("variant", ["series", "enhanced"])
def test_uncompressed_transfer_syntaxes(tmp_path, syntax, variant):
    image = make_image(seed=22)
    study = write_study(tmp_path / "src", image, variant=variant)
    every = [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
    for i, path in enumerate(sorted(set(study.all_files))):
        reencode(path, every[i % 3] if syntax == "mixed" else syntax)
    _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"])
@pytest.mark.parametrize("variant", ["series", "enhanced"])
def test_jpeg_lossless_as_pacs_export_it(tmp_path, syntax, variant):
    """JPEG Lossless (process 14, selection value 1 or any), the compression PACS exports use
    most: decoded by GDCM (python-gdcm, a dependency), signed values included."""
    image = (make_image(seed=48).astype(np.int32) - 300).astype(np.int16)
    study = write_study(tmp_path / "src", image, variant=variant)
    for path in sorted(set(study.all_files)):
        reencode(path, syntax)
    assert pydicom.dcmread(study.files[0][0]).file_meta.TransferSyntaxUID == syntax
    _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)


GEOMETRIES = {  # orientation (row, column cosines in LPS), slice step along the normal
    "axial-reversed": ((1, 0, 0, 0, 1, 0), -2.0),
    "axial-normal-down": ((1, 0, 0, 0, -1, 0), 2.0),
    "feet-first": ((-1, 0, 0, 0, 1, 0), 2.0),
    "sagittal": ((0, 1, 0, 0, 0, -1), 1.5),
    "sagittal-reversed": ((0, 1, 0, 0, 0, -1), -1.5),
    "sagittal-flipped": ((0, -1, 0, 0, 0, -1), 1.5),
    "coronal": ((1, 0, 0, 0, 0, -1), 2.5),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("variant", ["multiphase", "enhanced"])
def test_orientations_and_slice_directions_read_like_nifti(tmp_path, geometry, variant):
    """Sagittal (common for breast DCE), coronal, feet-first, slices written against the normal:
    the volume is the NIfTI twin's with the affine the geometry implies."""
    orientation, step = GEOMETRIES[geometry]
    image = make_image(seed=23)
    study = write_study(
        tmp_path / "src", image, variant=variant, orientation=orientation, step=step, shuffle=True
    )
    _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)


def _phase_tags(study, keep: str, times=(0.0, 60.0, 120.0), start=9 * 3600.0) -> None:
    """Rewrites a multiphase study's instances so that only `keep` tells the phases apart:
    ``acquisition`` (Siemens: each slice its own AcquisitionTime), ``temporal`` (Philips:
    TemporalPositionIdentifier, one AcquisitionTime for all), ``trigger`` (GE: TriggerTime)."""
    from dicom_factory import _tm

    for t, files in study.files.items():
        for k, path in enumerate(files):
            ds = pydicom.dcmread(path)
            if keep != "temporal":
                del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
            if keep == "acquisition":
                ds.AcquisitionTime = _tm(start + times[t] + 0.25 * k)
            elif keep == "temporal":
                ds.AcquisitionTime = _tm(start)
            else:
                del ds.AcquisitionTime
                ds.TriggerTime = 1000.0 * times[t]
            ds.save_as(path)


@pytest.mark.parametrize("keep", ["acquisition", "temporal", "trigger"])
def test_phases_told_apart_by_one_vendor_tag(tmp_path, keep):
    image = make_image(seed=24)
    study = write_study(tmp_path / "src", image, variant="multiphase", shuffle=True)
    _phase_tags(study, keep, times=(0.0, 62.5, 125.0))
    _, loaded = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    if keep == "temporal":  # one time for every phase: no phase times rather than 0, 0, 0
        assert loaded.source.times is None
    else:
        assert loaded.source.times == pytest.approx((0.0, 62.5, 125.0), abs=1e-3)


@pytest.mark.parametrize("variant", ["series", "multiphase-acquisition", "enhanced"])
def test_acquisition_across_midnight_keeps_phase_order(tmp_path, variant):
    """235959 -> 000010 -> 000110: the phase after midnight is the later one."""
    image = make_image(seed=25)
    start, times = 86399.0, (0.0, 11.0, 71.0)
    kind = variant.split("-")[0]
    study = write_study(tmp_path / "src", image, variant=kind, start=start, times=times)
    if variant == "multiphase-acquisition":
        _phase_tags(study, "acquisition", times=times, start=start)
    _, loaded = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    assert loaded.source.times == pytest.approx(times, abs=1e-3)


@pytest.mark.parametrize("keep", ["temporal", "acquisition", "series"])
def test_phase_cut_short_refused_naming_the_series(tmp_path, keep):
    image = make_image(seed=26)
    variant = "series" if keep == "series" else "multiphase"
    study = write_study(tmp_path / "src", image, variant=variant)
    if keep != "series":
        _phase_tags(study, keep)
    study.files[2][-1].unlink()  # the last phase lacks its top slice
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"case {case.case_id}: ")
    assert "series 1" in text and "phase 2 has 7 slices, phase 0 8" in text, text
    assert study.files[2][-2].name in text  # the phase's last slice there is


def test_rescale_slope_per_slice_applied(tmp_path):
    image = make_image(seed=27)
    study = write_study(tmp_path / "src", image, variant="multiphase")
    expected = image.astype(np.float32)
    for t, files in study.files.items():
        for k, path in enumerate(files):
            edit(path, RescaleSlope=0.5 + 0.125 * k, RescaleIntercept=-3.25 * t)
            expected[t, :, :, k] = image[t, :, :, k] * np.float32(0.5 + 0.125 * k) - 3.25 * t
    _, loaded = _assert_like_twin(tmp_path, tmp_path / "src", expected, study.affine)
    assert loaded.image.dtype == np.float32


@pytest.mark.parametrize(
    "fmt", ["uint8", "uint16-high", "int16-negative", "monochrome1", "12-bit-overlay"]
)
def test_pixel_formats(tmp_path, fmt):
    """8-bit, unsigned 16-bit above 32767, signed with negative values, 12 bits stored in 16
    with an old overlay's bits set above them: the stored values. A
    MONOCHROME1 image reads as its stored (rescaled) values: the photometric interpretation says
    how to display them, not what they measure (decided)."""
    image = make_image(seed=28).astype(np.int32)
    dtype = {"uint8": np.uint8, "uint16-high": np.uint16, "12-bit-overlay": np.uint16}.get(
        fmt, np.int16
    )
    if fmt == "uint8":
        image = np.clip(image // 4, 0, 255)
    elif fmt == "uint16-high":
        image = image * 100 + 20000  # up to ~65000: wrong if read as signed
        assert image.max() > 32767
    elif fmt == "int16-negative":
        image = image - 400
    image = image.astype(dtype)
    study = write_study(tmp_path / "src", image, variant="series", dtype=dtype)
    if fmt == "monochrome1":
        for path in study.all_files:
            edit(path, PhotometricInterpretation="MONOCHROME1")
    if fmt == "12-bit-overlay":
        assert image.max() < 4096
        for path in study.all_files:
            ds = pydicom.dcmread(path)
            ds.BitsStored, ds.HighBit = 12, 11
            ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) | 0x4000).tobytes()
            ds.save_as(path)
    _, loaded = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    np.testing.assert_array_equal(loaded.geometry.to_original(loaded.image), image)


def test_two_studies_in_one_folder_and_one_study_in_two(tmp_path):
    a, b = make_image(seed=29), make_image(seed=30)
    sa = write_study(tmp_path / "src" / "flat", a, variant="multiphase")
    sb = write_study(tmp_path / "src" / "flat", b, variant="series")
    for path in sb.all_files:  # study b's files beside study a's, in the same folder
        path.rename(tmp_path / "src" / "flat" / "dynamic" / f"b_{path.parent.name}_{path.name}")
    sc = write_study(tmp_path / "src" / "c", make_image(seed=31), variant="series")
    moved = tmp_path / "src" / "elsewhere" / "series2"
    shutil.move(str(sc.files[2][0].parent), str(moved))  # phase 2 of study c in another folder
    cases = {c.case_id: c for c in discover(tmp_path / "src", "dicom")}
    assert len(cases) == 3 and all(c.problem is None for c in cases.values())
    for study, image in ((sa, a), (sb, b), (sc, sc.image)):
        loaded = load_case(cases[study_case_id(study.study_uid)])
        np.testing.assert_array_equal(loaded.geometry.to_original(loaded.image), image)


def test_nifti_beside_two_studies_is_no_ones_mask(tmp_path):
    """Two studies in one folder and a NIfTI beside them: whose mask? one line, not a guess."""
    sa = write_study(tmp_path / "src", make_image(seed=32), variant="multiphase")
    sb = write_study(tmp_path / "b", make_image(seed=33), variant="multiphase")
    for path in sb.all_files:
        path.rename(tmp_path / "src" / "dynamic" / ("b_" + path.name))
    nib.save(
        nib.Nifti1Image(np.zeros((12, 10, 8), np.uint8), sa.affine),
        str(tmp_path / "src" / "dynamic" / "mask.nii.gz"),
    )
    cases = discover(tmp_path / "src", "dicom")
    assert len(cases) == 2
    for case in cases:
        assert case.problem and "mask.nii.gz" in case.problem and "2 studies" in case.problem


def test_copies_of_one_instance(tmp_path):
    """An identical copy of a file (same SOP Instance UID, same bytes; exports repeat files) is
    read once and said in one note; a different file under the same SOP Instance UID is
    refused naming both (decided)."""
    image = make_image(seed=34)
    study = write_study(tmp_path / "src", image, variant="multiphase")
    copy = tmp_path / "src" / "copies" / "again.dcm"
    copy.parent.mkdir()
    shutil.copy(study.files[1][3], copy)
    case, _ = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    assert any("again.dcm" in n and "copy" in n for n in case.notes), case.notes
    edit(copy, InstanceNumber=99)  # same UID, other content
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case)
    text = str(err.value)
    assert "\n" not in text and "again.dcm" in text and study.files[1][3].name in text
    assert "SOPInstanceUID" in text


def _seg_file(path: Path, study, loaded, segments: dict[str, np.ndarray], kind="BINARY") -> Path:
    """A highdicom SEG of phase 0 with one segment per label (masks (Z, Y, X) canonical), of
    segmentation type `kind` (BINARY, or FRACTIONAL with the masks' values in [0, 1])."""
    sources = [pydicom.dcmread(p) for p in study.files[0]]
    descs, arrays = [], []
    for n, (label, mask) in enumerate(segments.items(), start=1):
        descs.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=label,
                segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphology"),
                segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
                if "tum" in label.lower()
                else hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
        ijk = loaded.geometry.to_original(mask)  # (i, j, k)
        arrays.append(np.stack([ijk[:, :, k].T for k in range(ijk.shape[2])]))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.stack(arrays, axis=-1).astype(np.uint8 if kind == "BINARY" else np.float32),
        segmentation_type=hd.seg.SegmentationTypeValues[kind],
        segment_descriptions=descs,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)
    return path


def test_seg_with_two_segments_takes_the_tumour_or_says_which(tmp_path):
    study = write_study(tmp_path / "src", make_image(seed=35), variant="series")
    loaded = load_case(_one(tmp_path / "src"))
    tumour = (loaded.image[2] > 350).astype(np.uint8)
    breast = (loaded.image[0] > 150).astype(np.uint8)
    seg = _seg_file(
        tmp_path / "src" / "seg.dcm", study, loaded, {"Breast": breast, "Tumour": tumour}
    )
    np.testing.assert_array_equal(load_case(_one(tmp_path / "src")).mask, tumour)
    _seg_file(seg, study, loaded, {"Region A": breast, "Region B": tumour})
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case)
    text = str(err.value)
    assert "\n" not in text and "seg.dcm" in text and "2 segments" in text
    assert "'Region A'" in text and "'Region B'" in text
    _seg_file(seg, study, loaded, {"Tumour": tumour, "Tumour 2": breast})
    with pytest.raises(InputError, match="2 segments .*, 2 labelled as the tumour"):
        load_case(_one(tmp_path / "src"))


def test_fractional_seg_is_the_tumour_from_half_its_maximum(tmp_path):
    study = write_study(tmp_path / "src", make_image(seed=40), variant="series")
    loaded = load_case(_one(tmp_path / "src"))
    tumour = loaded.image[2] > 350
    halo = loaded.image[0] > 150
    fraction = np.where(tumour, 0.9, np.where(halo, 0.3, 0.0)).astype(np.float32)
    assert (halo & ~tumour).any()
    _seg_file(tmp_path / "src" / "seg.dcm", study, loaded, {"Tumour": fraction}, "FRACTIONAL")
    np.testing.assert_array_equal(load_case(_one(tmp_path / "src")).mask, tumour)


def test_seg_referencing_another_series_refused(tmp_path):
    study = write_study(tmp_path / "src", make_image(seed=36), variant="series")
    loaded = load_case(_one(tmp_path / "src"))
    seg = _seg_file(tmp_path / "src" / "seg.dcm", study, loaded, {"Tumour": loaded.image[2] > 350})
    ds = pydicom.dcmread(seg)
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(seg)
    case = _one(tmp_path / "src")
    assert case.problem and "seg.dcm" in str(case.problem_path) and "1.2.3.4.5" in case.problem


@pytest.mark.parametrize(
    "kind", ["short-pixels", "zero-spacing", "negative-spacing", "nan-position", "no-thickness"]
)
def test_hostile_headers(tmp_path, kind):
    image = make_image(seed=37)
    study = write_study(tmp_path / "src", image, variant="series")
    bad = study.files[1][4]
    if kind == "short-pixels":
        ds = pydicom.dcmread(bad)
        ds.PixelData = ds.PixelData[:-100]
        ds.save_as(bad)
    elif kind.endswith("spacing"):
        value = 0.0 if kind == "zero-spacing" else -0.8
        for path in study.all_files:  # every phase: one grid, but not a placeable one
            edit(path, PixelSpacing=[value, 0.7])
    elif kind == "nan-position":
        raw = bad.read_bytes()
        ds = pydicom.dcmread(bad)
        old = b"\\".join(str(v).encode() for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = ["NaN", "-30.0", "18.0"]
        ds.save_as(bad)
        assert raw != bad.read_bytes() and old
    elif kind == "no-thickness":
        for path in study.all_files:
            ds = pydicom.dcmread(path)
            del ds.SliceThickness
            ds.save_as(path)
        _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
        return
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"case {case.case_id}: ")
    assert "series 1" in text
    if kind in ("short-pixels", "nan-position"):
        assert bad.name in text
    words = {"short-pixels": "pixel data", "nan-position": "ImagePositionPatient"}
    assert words.get(kind, "PixelSpacing") in text, text


@pytest.mark.parametrize("form", ["datetime-utc-offset", "colons", "datetime-date-only"])
def test_acquisition_time_forms(tmp_path, form):
    """Time forms seen in exports: a DT with a UTC offset (``...090200.000000+0100``), an old
    ``09:02:00`` TM, a DT holding only the date (then AcquisitionTime tells). The phases are
    written out of series-number order, so a time that is not understood shows."""
    from dicom_factory import _tm

    image = make_image(seed=38)
    times = (120.0, 240.0, 0.0)
    study = write_study(tmp_path / "src", image, times=times)
    for t, files in study.files.items():
        tm = _tm(9 * 3600.0 + times[t])
        for path in files:
            ds = pydicom.dcmread(path)
            if form == "datetime-utc-offset":
                del ds.AcquisitionTime
                ds.AcquisitionDateTime = f"20240102{tm}+0100"
            elif form == "colons":
                ds.AcquisitionTime = f"{tm[:2]}:{tm[2:4]}:{tm[4:]}"
            else:
                ds.AcquisitionDateTime = "20240102"
            ds.save_as(path)
    loaded = load_case(_one(tmp_path / "src"))
    assert loaded.source.times == pytest.approx((0.0, 120.0, 240.0), abs=1e-3)
    np.testing.assert_array_equal(loaded.geometry.to_original(loaded.image), image[[2, 0, 1]])


@pytest.mark.parametrize("frames", ["slice-major", "no-temporal-index", "shuffled-time-only"])
def test_enhanced_frame_orders(tmp_path, frames):
    """Enhanced MR frames stored slice by slice (each slice's phases together, as some
    scanners do), without TemporalPositionIndex (the FrameAcquisitionDateTime tells), or in
    no order at all: read by each frame's own position and time."""
    image = make_image(seed=39)
    study = write_study(tmp_path / "src", image, variant="enhanced", times=(0.0, 70.0, 140.0))
    path = study.files[0][0]
    ds = pydicom.dcmread(path)
    n_t, n_k = image.shape[0], image.shape[3]
    order = np.arange(n_t * n_k)  # written phase-major: frame t * n_k + k
    if frames == "slice-major":
        order = order.reshape(n_t, n_k).T.ravel()
    elif frames == "shuffled-time-only":
        order = np.random.default_rng(0).permutation(order)
    pixels = ds.pixel_array[order]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in order]
    if frames != "slice-major":
        for item in ds.PerFrameFunctionalGroupsSequence:
            del item.FrameContentSequence[0].TemporalPositionIndex
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path)
    _, loaded = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    assert loaded.source.times == pytest.approx((0.0, 70.0, 140.0), abs=1e-3)


def test_ingest_cli_scanner_and_pacs_exports(tmp_path, ray_session, capsys):
    """One cohort as exports come: a PACS CD (DICOMDIR, bare upper-case names, clutter, a file
    repeated in another folder), a sagittal Siemens-style study across midnight, and three bad
    studies (a phase cut short, a NaN position, a SEG of two unlabelled segments). Exit 1, one
    line per bad study naming it, the good ones stored, the repeated file said once."""
    from data_store.store import open_store
    from tsesnet.cli import main

    src = tmp_path / "cohort"
    cd = write_study(tmp_path / "staging", make_image(seed=41), variant="multiphase")
    copies = cd_export(cd, src / "CD")
    (src / "CD" / "README.TXT").write_text("viewer inside")
    (src / "CD" / "Thumbs.db").write_bytes(bytes(64))
    shutil.copy(copies[5], src / "CD" / "IM_AGAIN")
    sag = write_study(
        src / "sag",
        make_image(seed=42),
        variant="multiphase",
        orientation=(0, 1, 0, 0, 0, -1),
        start=86390.0,
    )
    _phase_tags(sag, "acquisition", start=86390.0)
    short = write_study(src / "short", make_image(seed=43), variant="multiphase")
    _phase_tags(short, "acquisition")
    short.files[2][-1].unlink()
    nan = write_study(src / "nan", make_image(seed=44))
    edit(nan.files[1][3], ImagePositionPatient=["NaN", "-30.0", "16.0"])
    segged = write_study(src / "segged", make_image(seed=45))
    loaded = load_case(_one(src / "segged"))
    two = {"A": loaded.image[2] > 350, "B": loaded.image[0] > 150}
    _seg_file(src / "segged" / "seg.dcm", segged, loaded, two)
    status = main(["ingest", str(src), str(tmp_path / "store"), "--workers", "2"])
    out, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in err
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("case ")]
    assert len(lines) == 3, err
    for study, words in ((short, "phase 2"), (nan, "ImagePositionPatient"), (segged, "segments")):
        line = next(x for x in lines if study_case_id(study.study_uid) in x)
        assert words in line, line
    assert sum("identical copy" in line for line in out.splitlines()) == 1, out
    store = open_store(tmp_path / "store")
    assert set(store.case_ids) == {study_case_id(cd.study_uid), study_case_id(sag.study_uid)}
    times = store.case_attrs(study_case_id(sag.study_uid))["times"]
    assert times == pytest.approx([0.0, 60.0, 120.0])


def test_symlinked_study_folders_are_followed_once(tmp_path):
    """Research exports link studies in from elsewhere: a linked folder is read, a link loop
    is not walked forever, and a study linked twice is one case."""
    image = make_image(seed=46)
    study = write_study(tmp_path / "pacs" / "s1", image, variant="multiphase")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "patient1").symlink_to(tmp_path / "pacs" / "s1")
    (tmp_path / "src" / "again").symlink_to(tmp_path / "pacs" / "s1")
    (tmp_path / "pacs" / "s1" / "loop").symlink_to(tmp_path / "pacs")
    assert detect_layout(tmp_path / "src") == "dicom"
    case, _ = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    assert case.notes == ()  # one file reached by two links is one file, not a copy


def test_seg_of_a_study_whose_images_are_absent(tmp_path):
    """A SEG whose StudyInstanceUID matches no images in SRC: one line naming it."""
    study = write_study(tmp_path / "src" / "a", make_image(seed=47), variant="series")
    loaded = load_case(_one(tmp_path / "src"))
    seg = _seg_file(tmp_path / "src" / "seg.dcm", study, loaded, {"Tumour": loaded.image[2] > 350})
    ds = pydicom.dcmread(seg)
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(seg)
    cases = discover(tmp_path / "src", "dicom")
    bad = [c for c in cases if c.problem]
    assert len(cases) == 2 and len(bad) == 1
    assert bad[0].problem_path == seg
    assert "no images of its study" in bad[0].problem, bad[0].problem


@pytest.mark.parametrize("keep", ["temporal", "acquisition"])
def test_pre_contrast_series_beside_a_multiphase_post_series(tmp_path, keep):
    """A protocol that writes the pre-contrast phase as its own series and the post-contrast
    phases as one multi-phase series (same sequence, same slices): all are the phases, the
    pre-contrast first; a same-sequence series on other slices stays skipped."""
    image = make_image(shape=(4, 12, 10, 8), seed=49)
    study = write_study(tmp_path / "src", image, variant="multiphase")
    _phase_tags(study, keep, times=(0.0, 90.0, 150.0, 210.0))
    pre = generate_uid()
    for path in study.files[0]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = pre, 9, "pre"
        if "TemporalPositionIdentifier" in ds:
            del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
        ds.save_as(path)
    case, loaded = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    if keep == "acquisition":
        assert loaded.source.times == pytest.approx((0.0, 90.0, 150.0, 210.0), abs=1e-3)
    assert [p["series_instance_uid"] for p in loaded.dicom["phases"]] == [
        pre,
        *[study.series_uids[1]] * 3,
    ]
    assert case.notes == ()


def test_size_limit_counts_each_phase_once(tmp_path):
    """One series per phase: the limit weighs each phase's voxels once (it weighed every
    series' images times every phase's slices, T times too much, refusing long dynamics)."""
    image = make_image(shape=(6, 12, 10, 8), seed=50)  # 1920 bytes a phase, 11520 in all
    write_study(tmp_path / "src", image, variant="series")
    case = _one(tmp_path / "src")
    load_case(case, ReadOptions(max_image_bytes=3000))  # 4 x 3000 > 11520: within the limit
    with pytest.raises(InputError, match="above the limit"):
        load_case(case, ReadOptions(max_image_bytes=1900))  # a phase is above it


def test_seg_of_a_study_of_bare_datasets_carries_its_patient(tmp_path):
    """The SEG written for a study read from bare datasets (no preamble) takes the patient and
    study identification from them, as from Part 10 files, so that it files with the study."""
    study = write_study(tmp_path / "src", make_image(seed=51), variant="multiphase")
    for path in study.all_files:
        reencode(path, preamble=False)
    loaded = load_case(_one(tmp_path / "src"))
    truth = (loaded.image[2] > 350).astype(np.uint8)
    seg = tmp_path / "x.dcm"
    sources = [str(p) for p in study.all_files]
    write_seg(seg, truth, loaded.geometry, loaded.dicom, model_uri="m", source_paths=sources)
    read = pydicom.dcmread(seg)
    assert read.PatientName == "DOE^JANE" and read.PatientID == "PID-12345"


def test_two_dynamic_series_of_as_many_phases_refused(tmp_path):
    """A sagittal bilateral DCE written as two multi-phase series (left and right breast), or
    a repeated dynamic: which one is the case cannot be told; one line naming both (it read
    one breast, saying so in a note only)."""
    uid = generate_uid()
    sag = (0, 1, 0, 0, 0, -1)
    left = write_study(
        tmp_path / "src" / "L",
        make_image(seed=52),
        variant="multiphase",
        orientation=sag,
        origin=(60.0, -30.0, 10.0),
        study_uid=uid,
    )
    right = write_study(
        tmp_path / "src" / "R",
        make_image(seed=53),
        variant="multiphase",
        orientation=sag,
        origin=(-60.0, -30.0, 10.0),
        study_uid=uid,
    )
    case = _one(tmp_path / "src")
    assert case.problem, case.notes
    assert "two dynamic series" in case.problem
    assert left.series_uids[0] in case.problem and right.series_uids[0] in case.problem


def test_two_slabs_in_one_series_refused_saying_so(tmp_path):
    """A bilateral sagittal DCE with one slab per breast in one series: the slices form two
    stacks far apart, which the line says (not 'missing slices')."""
    sag = (0, 1, 0, 0, 0, -1)
    study = write_study(
        tmp_path / "src", make_image(seed=54), variant="multiphase", orientation=sag
    )
    for files in study.files.values():
        for path in files[4:]:  # the other breast: 100 mm further along the normal
            x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
            edit(path, ImagePositionPatient=[x - 100.0, y, z])
    case = _one(tmp_path / "src")
    with pytest.raises(InputError) as err:
        load_case(case)
    text = str(err.value)
    assert "\n" not in text and "series 10" in text and "separate stacks" in text, text


def test_series_per_phase_beats_a_series_of_repeated_slices(tmp_path):
    """Three single-time series of the DCE sequence, and a T2 whose slices were acquired twice
    (two temporal positions): the DCE is the three series, not the T2's two 'phases'."""
    image = make_image(seed=55)
    study = write_study(tmp_path / "src", image, variant="series")
    t2 = write_study(
        tmp_path / "src" / "t2",
        make_image(shape=(2, 12, 10, 8), seed=56),
        variant="multiphase",
        study_uid=study.study_uid,
    )
    for path in t2.all_files:
        edit(path, EchoTime=80.0, RepetitionTime=3000.0, SeriesNumber=5)
    case, _ = _assert_like_twin(tmp_path, tmp_path / "src", image, study.affine)
    assert len(case.notes) == 1 and "series 5" in case.notes[0], case.notes
