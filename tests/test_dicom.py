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
from dicom_factory import OBLIQUE, edit, make_image, write_study
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

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
