"""Layout detection and case discovery for nnU-Net, MAMA-MIA, BTS and 4D NIfTI cohorts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from nifti_factory import make_affine, save_nifti, write_layout_cohort

from data_store.errors import InputError
from data_store.layouts import LAYOUTS, detect_layout, discover
from data_store.source_reader import load_case


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS) - {"dicom"}))  # dicom: test_dicom.py
def test_every_layout_is_detected_and_loads(tmp_path, layout):
    written = write_layout_cohort(layout, tmp_path)
    assert detect_layout(tmp_path) == layout
    sources = discover(tmp_path)
    assert [s.case_id for s in sources] == sorted(written)
    for source in sources:
        case = written[source.case_id]
        assert source.layout == layout
        assert list(source.phase_files) == case.phase_files
        assert source.mask_file == case.mask_file
        loaded = load_case(source)
        geometry = loaded.geometry
        assert np.array_equal(loaded.image, geometry.to_canonical(case.image))
        assert loaded.image.dtype == np.int16
        assert np.array_equal(loaded.mask, geometry.to_canonical(case.mask))
        assert loaded.mask.dtype == np.uint8
        assert set(loaded.sha256) == {str(f) for f in source.files}


def test_nnunet_train_test_and_dataset_json(tmp_path):
    write_layout_cohort("nnunet", tmp_path, n_cases=2, test_cases=1, phases=3)
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert [s.subset for s in sources.values()] == ["train", "train", "test"]
    assert sources["case_002"].mask_file is None and not sources["case_002"].labelled
    assert load_case(sources["case_002"]).mask is None
    assert sources["case_000"].times is None
    # dataset.json says 3 channels: a case with only 2 has its third phase marked missing
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["acquisition_times_s"] = [0, 60, 120]  # as data_store.synth writes them
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "imagesTr" / "case_001_0001.nii.gz").unlink()
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert sources["case_001"].phase_present == (True, False, True)
    assert sources["case_001"].times == (0.0, 120.0)
    assert sources["case_000"].times == (0.0, 60.0, 120.0)
    assert load_case(sources["case_001"]).image.shape[0] == 2


def test_phase_counts_may_differ_between_cases(tmp_path):
    write_layout_cohort("nnunet", tmp_path / "a", n_cases=1, phases=2, dataset_json=False)
    written = write_layout_cohort("nnunet", tmp_path / "b", n_cases=2, phases=4, dataset_json=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b", dirs_exist_ok=True)  # case_000: 2 phases
    for f in written["case_000"].phase_files[2:]:
        f.unlink()
    phases = {s.case_id: load_case(s).image.shape[0] for s in discover(tmp_path / "b")}
    assert phases == {"case_000": 2, "case_001": 4}


def test_mamamia_site_times_and_lowercase_files(tmp_path):
    write_layout_cohort("mamamia", tmp_path, case_ids=("DUKE_001", "ISPY1_1001"), phases=3)
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert sources["DUKE_001"].site == "DUKE" and sources["ISPY1_1001"].site == "ISPY1"
    assert sources["DUKE_001"].times == (0.0, 90.0, 180.0)
    assert sources["DUKE_001"].phase_files[0].name == "duke_001_0000.nii.gz"
    assert sources["DUKE_001"].mask_file.name == "duke_001.nii.gz"


def test_mamamia_without_times_or_masks(tmp_path):
    write_layout_cohort("mamamia", tmp_path, case_ids=("NACT_01",), times=False)
    shutil.rmtree(tmp_path / "segmentations")
    (source,) = discover(tmp_path)
    assert source.times is None and source.mask_file is None


def test_bts_missing_phases_sites_and_lists(tmp_path):
    write_layout_cohort(
        "bts",
        tmp_path,
        centres={"C1": 2, "C2": 1},
        missing={"C1_2": (2, 3, 4, 5)},
        unlabelled=("C2_1",),
        train=("C1_1", "C1_2"),
        test=("C2_1",),
    )
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert {k: s.site for k, s in sources.items()} == {"C1_1": "C1", "C1_2": "C1", "C2_1": "C2"}
    assert {k: s.subset for k, s in sources.items()} == {
        "C1_1": "train",
        "C1_2": "train",
        "C2_1": "test",
    }
    assert sources["C1_1"].phase_present == (True,) * 6
    assert sources["C1_2"].phase_present == (True, True, False, False, False, False)
    assert [f.name for f in sources["C1_2"].phase_files] == ["P0.nii.gz", "P1.nii.gz"]
    loaded = load_case(sources["C1_2"])
    assert loaded.image.shape[0] == 2
    assert loaded.source.phase_present == (True, True, False, False, False, False)
    assert sources["C2_1"].mask_file is None


@pytest.mark.parametrize("suffix", ["_mask", "_seg"])
def test_nifti4d_mask_naming_and_single_file(tmp_path, suffix):
    written = write_layout_cohort("nifti4d", tmp_path, mask_suffix=suffix, unlabelled=("dyn01",))
    sources = {s.case_id: s for s in discover(tmp_path)}
    assert sources["dyn00"].mask_file.name == f"dyn00{suffix}.nii.gz"
    assert sources["dyn01"].mask_file is None
    loaded = load_case(sources["dyn00"])
    assert loaded.image.shape == (3, 8, 7, 6)
    assert loaded.source.phase_present == (True, True, True)
    (single,) = discover(written["dyn00"].phase_files[0])  # SRC may be one 4D file
    assert single.case_id == "dyn00" and single.mask_file == sources["dyn00"].mask_file


@pytest.mark.parametrize("make", ["empty", "unknown"])
def test_empty_or_unknown_source_lists_layouts(tmp_path, make):
    if make == "unknown":
        (tmp_path / "notes.txt").write_text("no images here")
        (tmp_path / "sub").mkdir()
    with pytest.raises(InputError) as info:
        discover(tmp_path)
    message = str(info.value)
    assert message.startswith(
        f"{tmp_path}: {'empty source folder' if make == 'empty' else 'unknown layout'}"
    )
    for name in LAYOUTS:
        assert name in message


def test_forced_layout_with_no_cases_and_unknown_layout_name(tmp_path):
    write_layout_cohort("nnunet", tmp_path)
    with pytest.raises(InputError, match=r"empty source: no cases in the bts layout"):
        discover(tmp_path, "bts")
    with pytest.raises(InputError, match=r"unknown layout 'analyze'; understood layouts: nnunet"):
        discover(tmp_path, "analyze")
    with pytest.raises(InputError, match="source not found"):
        discover(tmp_path / "missing")


def test_duplicate_case_ids_name_both_files(tmp_path):
    written = write_layout_cohort("nifti4d", tmp_path / "4d", n_cases=1)
    first = written["dyn00"].phase_files[0]
    second = save_nifti(
        tmp_path / "4d" / "dyn00.nii", np.zeros((6, 7, 8, 2), np.int16), make_affine()
    )
    with pytest.raises(InputError) as info:
        discover(tmp_path / "4d")
    assert (
        str(info.value) == f"case dyn00: {tmp_path / '4d'}: duplicate case ID: {second} and {first}"
    )

    written = write_layout_cohort("nnunet", tmp_path / "nn", n_cases=1)
    test_copy = tmp_path / "nn" / "imagesTs" / "case_000_0000.nii.gz"
    test_copy.parent.mkdir()
    shutil.copy(written["case_000"].phase_files[0], test_copy)
    with pytest.raises(InputError, match="duplicate case ID") as info:
        discover(tmp_path / "nn")
    assert str(written["case_000"].phase_files[0]) in str(info.value)
    assert str(test_copy) in str(info.value)

    write_layout_cohort("bts", tmp_path / "bts", centres={"C1": 1})
    shutil.copytree(tmp_path / "bts" / "C1", tmp_path / "bts" / "C9")  # C9/C1_1 as well
    with pytest.raises(
        InputError, match=r"case C1_1: .*duplicate case ID: .*C1/C1_1/P0.nii.gz and .*C9"
    ):
        discover(tmp_path / "bts")


def test_hidden_and_other_files_are_ignored(tmp_path):
    write_layout_cohort("nnunet", tmp_path, n_cases=1)
    (tmp_path / "imagesTr" / "._case_000_0000.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "imagesTr" / "README.md").write_text("notes")
    (source,) = discover(tmp_path)
    assert len(source.phase_files) == 3


def test_declared_test_splits(tmp_path):
    """imagesTs/labelsTs (nnU-Net), test.txt (BTS), train_test_splits.csv (MAMA-MIA)."""
    write_layout_cohort("nnunet", tmp_path / "nn", n_cases=2, test_cases=2, labelled_test=True)
    sources = {s.case_id: s for s in discover(tmp_path / "nn")}
    assert {k: (s.subset, s.labelled) for k, s in sources.items()} == {
        "case_000": ("train", True),
        "case_001": ("train", True),
        "case_002": ("test", True),
        "case_003": ("test", True),
    }
    write_layout_cohort("mamamia", tmp_path / "mm", case_ids=("DUKE_001", "DUKE_002", "ISPY1_1001"))
    (tmp_path / "mm" / "train_test_splits.csv").write_text(
        "train_split,test_split\nDUKE_001,ispy1_1001\nDUKE_002,\n"
    )
    sources = {s.case_id: s.subset for s in discover(tmp_path / "mm")}
    assert sources == {"DUKE_001": "train", "DUKE_002": "train", "ISPY1_1001": "test"}
    (tmp_path / "mm" / "train_test_splits.csv").write_text("train,holdout\nDUKE_001,x\n")
    with pytest.raises(InputError, match="train_test_splits.csv has no test_split column"):
        discover(tmp_path / "mm")


def test_nnunet_4d_channel_file_is_read_as_its_phases(tmp_path):
    """dcm2niix's 4D series put in nnU-Net folders as CASE_0000 (the only channel file)."""
    written = write_layout_cohort("nifti4d", tmp_path / "4d", n_cases=1, phases=4, affine="lps")
    (tmp_path / "nn" / "imagesTr").mkdir(parents=True)
    (tmp_path / "nn" / "labelsTr").mkdir()
    shutil.copy(written["dyn00"].phase_files[0], tmp_path / "nn" / "imagesTr" / "dyn_0000.nii.gz")
    shutil.copy(written["dyn00"].mask_file, tmp_path / "nn" / "labelsTr" / "dyn.nii.gz")
    (source,) = discover(tmp_path / "nn")
    loaded = load_case(source)
    assert loaded.image.shape == (4, 8, 7, 6) and loaded.source_4d
    assert loaded.source.phase_present == (True,) * 4
    assert np.array_equal(loaded.image, loaded.geometry.to_canonical(written["dyn00"].image))
    # beside other channel files a 4D file is still refused: one 3D file per phase
    save_nifti(
        tmp_path / "nn" / "imagesTr" / "dyn_0001.nii.gz", written["dyn00"].image[1], make_affine()
    )
    (source,) = discover(tmp_path / "nn")
    with pytest.raises(InputError, match=r"image is 4D \(6, 7, 8, 4\).*one 3D file per phase"):
        load_case(source)
