"""The Zarr store: round trips through `store export`, the reader API, folds, `store info`.

Stores are built in-process (`load_case` + `write_case` + `write_index`, the same functions the
Ray ingest tasks run) so these tests need no Ray; tests/test_ingest.py covers the driver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import nibabel.tests
import numpy as np
import pytest
from nifti_factory import write_layout_cohort

from data_store.cli import export_case
from data_store.errors import InputError
from data_store.index import assign_folds, init_store, write_index
from data_store.layouts import discover
from data_store.location import StoreLocation
from data_store.normalize import intensity_percentiles, normalize_intensity
from data_store.source_reader import load_case
from data_store.store import open_store
from data_store.store_writer import clean_leftovers, write_case
from tsesnet.cli import main

NIB_DATA = Path(nibabel.tests.__file__).parent / "data"


def build_store(src: Path, store: Path, layout: str = "auto", folds: int = 2):
    """Ingests a cohort in-process (no Ray) and opens it."""
    location = StoreLocation.parse(store)
    store.mkdir(parents=True, exist_ok=True)
    init_store(location)
    for source in discover(src, layout):
        write_case(location, load_case(source))
    write_index(location, folds)
    return open_store(store)


def assert_same_nifti(exported: Path, source: Path, volume: int | None = None):
    """Same shape, affine, qform/sform codes, dtype kind and voxel values."""
    a, b = nib.load(exported), nib.load(source)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    for code in ("qform_code", "sform_code"):
        assert int(a.header[code]) == int(b.header[code])
    va, vb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert va.dtype.newbyteorder("=") == vb.dtype.newbyteorder("=")
    np.testing.assert_array_equal(va, vb)


# ----------------------------------------------------------------------- normalisation


def test_percentiles_are_shared_across_phases():
    image = np.stack([np.arange(1000), np.arange(1000, 2000)]).astype(np.int16)  # (T=2, N)
    lo, hi = intensity_percentiles(image)
    assert lo == pytest.approx(np.percentile(image, 0.1)) and hi == pytest.approx(
        np.percentile(image, 99.9)
    )
    out = normalize_intensity(image, lo, hi)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0].mean() < out[1].mean()  # phase 1's enhancement over phase 0 is kept


def test_normalize_scale_shift_equals_clip_then_affine():
    rng = np.random.default_rng(0)
    image = rng.integers(-100, 2000, (2, 5, 6, 7)).astype(np.int16)
    base = np.clip((image.astype(np.float64) - 10) / 1490, 0, 1)
    got = normalize_intensity(image, 10.0, 1500.0, scale=1.1, shift=-0.05)
    np.testing.assert_allclose(got, base * 1.1 - 0.05, atol=1e-5)
    assert not normalize_intensity(np.full((2, 3), 7), 7.0, 7.0).any()  # constant image -> 0


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["ras", "lps", "las", "oblique", "sagittal"])
def test_export_round_trip_synthetic(tmp_path, kind):
    cases = write_layout_cohort("nnunet", tmp_path / "src", n_cases=1, phases=3, affine=kind)
    store = build_store(tmp_path / "src", tmp_path / "store")
    (case_id,) = cases
    written = export_case(store, case_id, tmp_path / "out")
    assert len(written) == 4
    for t, f in enumerate(cases[case_id].phase_files):
        assert_same_nifti(tmp_path / "out" / f"{case_id}_{t:04d}.nii.gz", f)
    assert_same_nifti(tmp_path / "out" / f"{case_id}_mask.nii.gz", cases[case_id].mask_file)
    case = store.read_case(case_id)
    assert case.image.shape[0] == 3 and case.mask.shape == case.image.shape[1:]
    assert case.geometry.canonical_shape == case.image.shape[1:]


def test_export_round_trip_bts_missing_phases_and_4d(tmp_path):
    bts = write_layout_cohort("bts", tmp_path / "bts", missing={"C1_2": (2, 3, 4, 5)})
    store = build_store(tmp_path / "bts", tmp_path / "s1")
    assert store.read_case("C1_2").image.shape[0] == 2
    assert store.case_attrs("C1_2")["phase_present"] == [True, True, False, False, False, False]
    export_case(store, "C1_2", tmp_path / "o1")
    for t, f in enumerate(bts["C1_2"].phase_files):
        assert_same_nifti(tmp_path / "o1" / f"C1_2_{t:04d}.nii.gz", f)
    dyn = write_layout_cohort("nifti4d", tmp_path / "dyn", n_cases=1)
    store = build_store(tmp_path / "dyn", tmp_path / "s2", layout="nifti4d")
    export_case(store, "dyn00", tmp_path / "o2")
    assert_same_nifti(tmp_path / "o2" / "dyn00.nii.gz", dyn["dyn00"].phase_files[0])


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
def test_export_round_trip_nibabel_4d_files(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(NIB_DATA / name, src / "scan.nii.gz")
    store = build_store(src, tmp_path / "store", layout="nifti4d")
    assert store.shape("scan")[0] == 2
    export_case(store, "scan", tmp_path / "out")
    assert_same_nifti(tmp_path / "out" / "scan.nii.gz", src / "scan.nii.gz")
    if name == "example_nifti2.nii.gz":
        assert isinstance(nib.load(tmp_path / "out" / "scan.nii.gz"), nib.Nifti2Image)


def test_export_round_trip_big_endian_anatomical(tmp_path):
    images = tmp_path / "src" / "imagesTr"
    images.mkdir(parents=True)
    for t in range(2):  # anatomical.nii is one 3D volume: its copy is phase 1
        shutil.copy(NIB_DATA / "anatomical.nii", images / f"anat_{t:04d}.nii")
    store = build_store(tmp_path / "src", tmp_path / "store", layout="nnunet")
    assert store.read_case("anat").image.dtype == np.dtype("int16")  # native order in the store
    export_case(store, "anat", tmp_path / "out")
    assert_same_nifti(tmp_path / "out" / "anat_0001.nii.gz", images / "anat_0001.nii")
    assert not store.labelled("anat") and store.read_case("anat").mask is None


def test_export_via_cli(tmp_path, capsys):
    cases = write_layout_cohort("mamamia", tmp_path / "src")
    build_store(tmp_path / "src", tmp_path / "store")
    case_id = sorted(cases)[0]
    out = tmp_path / "out"
    assert main(["store", "export", str(tmp_path / "store"), "--case", case_id, str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(
        [f"{case_id}_0000.nii.gz", f"{case_id}_0001.nii.gz", f"{case_id}_0002.nii.gz"]
        + [f"{case_id}_mask.nii.gz"]
    )
    for t, f in enumerate(cases[case_id].phase_files):
        assert_same_nifti(out / f"{case_id}_{t:04d}.nii.gz", f)
    assert main(["store", "export", str(tmp_path / "store"), "--case", "NOPE", str(out)]) == 2
    assert "case NOPE" in capsys.readouterr().err


# ----------------------------------------------------------------------- reader, folds, info


def test_case_attributes_and_fsspec_url(tmp_path):
    cases = write_layout_cohort("mamamia", tmp_path / "src")
    store = build_store(tmp_path / "src", tmp_path / "store")
    url_store = open_store(f"file://{tmp_path / 'store'}")
    assert url_store.case_ids == store.case_ids == sorted(cases)
    assert url_store.fingerprint == store.fingerprint
    case_id = store.case_ids[0]
    attrs = store.case_attrs(case_id)
    for key in (
        "spacing",
        "geometry",
        "canonical_orientation",
        "phases",
        "phase_present",
        "times",
        "percentiles",
        "sources",
        "site",
        "labelled",
    ):
        assert key in attrs, key
    assert attrs["times"] is not None and attrs["site"] == case_id.split("_")[0]
    assert all(len(s["sha256"]) == 64 and Path(s["path"]).is_absolute() for s in attrs["sources"])
    case = url_store.read_case(case_id)
    lo, hi = intensity_percentiles(case.image)
    assert case.percentiles == pytest.approx((lo, hi))


def test_open_store_rejects_non_stores(tmp_path):
    with pytest.raises(InputError, match="not a tsesnet store"):
        open_store(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="not a tsesnet store"):
        init_store(StoreLocation.parse(tmp_path))


def test_folds_are_deterministic_balanced_and_labelled_only(tmp_path):
    ids = [f"P{i:03d}" for i in range(23)]
    folds = assign_folds(ids, 5)
    assert folds == assign_folds(list(reversed(ids)), 5)  # independent of order
    counts = np.bincount(list(folds.values()), minlength=5)
    assert counts.max() - counts.min() <= 1
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=4, test_cases=1)
    store = build_store(tmp_path / "src", tmp_path / "store", folds=2)
    unlabelled = [c for c in store.case_ids if not store.labelled(c)]
    assert len(unlabelled) == 1 and store.fold_of(unlabelled[0]) == -1
    seen = []
    for k in range(2):
        train, val = store.split(k)
        assert not set(train) & set(val) and unlabelled[0] not in train + val
        seen += val
    assert sorted(seen) == sorted(c for c in store.case_ids if store.labelled(c))
    with pytest.raises(InputError):
        store.split(2)


def test_store_info_json_schema_and_table(tmp_path, capsys):
    write_layout_cohort("bts", tmp_path / "src", unlabelled=("C2_1",))
    build_store(tmp_path / "src", tmp_path / "store", folds=2)
    assert main(["store", "info", str(tmp_path / "store"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in doc["cases"]] == ["C1_1", "C1_2", "C2_1"]
    for c in doc["cases"]:
        assert set(c) == {
            *("id", "phases", "shape", "spacing", "spacing_assumed", "labelled", "site"),
            *("split", "fold", "intact"),
        }
        assert c["split"] == "train" and c["spacing_assumed"] is False
        assert c["phases"] == 6 and len(c["shape"]) == 3 and len(c["spacing"]) == 3
        assert c["shape"] == [8, 7, 6]  # (Z, Y, X) of a (6, 7, 8) LAS file
        assert c["spacing"] == pytest.approx([1.5, 0.8, 0.7])
    assert doc["cases"][2]["labelled"] is False and doc["cases"][2]["fold"] is None
    assert main(["store", "info", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "C2_1" in out and "3 cases (2 labelled, 1 unlabelled)" in out


def test_fsspec_object_store_without_rename(tmp_path):
    """The non-local code path (fsspec listing, copy-style rename, no os calls) on memory://."""
    cases = write_layout_cohort("nnunet", tmp_path / "src", n_cases=2)
    url = f"memory://tsesnet-test-{tmp_path.name}/store"
    location = StoreLocation.parse(url)
    assert not location.local
    init_store(location)
    sources = discover(tmp_path / "src")
    for source in sources:
        write_case(location, load_case(source))
    write_case(location, load_case(sources[0]))  # replacing a case: .old- moved away, removed
    write_index(location, 2)
    assert [e for e in location.entries() if e.startswith(".")] == []
    store = open_store(url)
    assert store.case_ids == sorted(cases)
    case = store.read_case("case_001")
    np.testing.assert_array_equal(case.image, case.geometry.to_canonical(cases["case_001"].image))
    image, mask = store.read_region("case_001", (slice(0, 2), slice(1, 3), slice(0, 4)))
    assert image.shape == (3, 2, 2, 4) and mask.shape == (2, 2, 4)


def test_leftovers_cleaned_and_interrupted_replacement_restored(tmp_path):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2)
    store = build_store(tmp_path / "src", tmp_path / "store")
    root = tmp_path / "store"
    (root / "case_000").rename(root / ".old-case_000-0123abcd")  # crash between the renames
    (root / ".tmp-case_001-89abcdef").mkdir()  # crash while writing
    gone = clean_leftovers(StoreLocation.parse(root))
    assert gone.restored == [".old-case_000-0123abcd"]
    assert gone.removed == [".tmp-case_001-89abcdef"]
    assert sorted(e.name for e in root.iterdir()) == ["case_000", "case_001", "zarr.json"]
    assert open_store(root).read_case("case_000").image.shape == store.shape("case_000")


def test_verify_names_orphans_and_repair_removes_only_them(tmp_path, capsys):
    """What the index does not list is an orphan: `store verify` names each (a complete case
    an interrupted ingest never indexed, a copy cut short, a dead writer's temporary entry),
    `--repair` removes them and nothing the index lists."""
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=3)
    root = tmp_path / "store"
    location = StoreLocation.parse(root)
    root.mkdir()
    init_store(location)
    sources = discover(tmp_path / "src")
    for source in sources[:2]:
        write_case(location, load_case(source))
    write_index(location, 2)
    indexed = open_store(root).case_ids
    write_case(location, load_case(sources[2]))  # complete, but the run died before the index
    shutil.copytree(root / "case_000", root / "case_copy")  # a copy cut short: no zarr.json
    (root / "case_copy" / "zarr.json").unlink()
    (root / ".tmp-case_009@elsewhere.999999.0123456789ab").mkdir()  # a dead writer's entry

    assert main(["store", "verify", str(root)]) == 0
    out = capsys.readouterr().out
    orphans = [ln for ln in out.splitlines() if ln.startswith("note: orphan")]
    assert len(orphans) == 3, out
    assert any("case_002" in ln and "did not commit" in ln for ln in orphans), out
    assert any("case_copy" in ln and "not a case" in ln for ln in orphans), out
    assert any(".tmp-case_009" in ln and "temporary entry" in ln for ln in orphans), out

    assert main(["store", "verify", str(root), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 orphan(s): case_002, case_copy" in out, out
    # Another host's entry is not known to be gone: kept, and still named.
    assert sorted(e.name for e in root.iterdir() if not e.name.startswith(".lock")) == [
        ".tmp-case_009@elsewhere.999999.0123456789ab",
        *indexed,
        "zarr.json",
    ]
    assert main(["store", "verify", str(root), "--deep"]) == 0


# ----------------------------------------------------------------------- test splits


def test_test_split_is_stored_shown_and_never_in_a_fold(tmp_path, capsys):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=4, test_cases=2, labelled_test=True)
    store = build_store(tmp_path / "src", tmp_path / "store", folds=2)
    assert store.case_ids_in("test") == ["case_004", "case_005"]
    assert store.case_ids_in("train") == ["case_000", "case_001", "case_002", "case_003"]
    assert store.case_attrs("case_004")["split"] == "test" and store.labelled("case_004")
    for cid in store.case_ids_in("test"):
        assert store.fold_of(cid) == -1 and store.entries[cid].fold is None
    for k in range(2):
        train, val = store.split(k)
        assert sorted(train + val) == store.case_ids_in("train")
    with pytest.raises(InputError, match="unknown split 'val'"):
        store.case_ids_in("val")
    assert main(["store", "info", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "split" in out.splitlines()[0]
    assert [ln.split()[6] for ln in out.splitlines()[1:7]] == ["train"] * 4 + ["test"] * 2
    assert "6 cases (6 labelled, 0 unlabelled), 4 train, 2 test (never in a fold)" in out
    assert main(["store", "info", str(tmp_path / "store"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["cases"]
    assert [r["split"] for r in rows] == ["train"] * 4 + ["test"] * 2


def test_4d_channel_file_exports_as_one_4d_file(tmp_path):
    written = write_layout_cohort("nifti4d", tmp_path / "4d", n_cases=1, phases=3)
    images = tmp_path / "nn" / "imagesTr"
    images.mkdir(parents=True)
    shutil.copy(written["dyn00"].phase_files[0], images / "dyn_0000.nii.gz")
    store = build_store(tmp_path / "nn", tmp_path / "store")
    assert store.shape("dyn")[0] == 3 and store.case_attrs("dyn")["source_4d"] is True
    (path,) = export_case(store, "dyn", tmp_path / "out")
    assert path.name == "dyn.nii.gz"
    assert_same_nifti(path, images / "dyn_0000.nii.gz")
