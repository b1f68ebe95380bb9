"""`tsesnet ingest` on Ray: every layout, bad cases among good ones, reruns, a crash mid-write."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from nifti_factory import save_nifti, write_layout_cohort

from data_store.errors import InputError
from data_store.ingest import ingest
from data_store.store import open_store
from tsesnet.cli import main


@pytest.mark.parametrize("layout", ["nnunet", "mamamia", "bts", "nifti4d"])
def test_every_layout_ingests(tmp_path, ray_session, layout):
    kwargs = {"test_cases": 1} if layout == "nnunet" else {}
    cases = write_layout_cohort(layout, tmp_path / "src", **kwargs)
    report = ingest(tmp_path / "src", tmp_path / "store", workers=2, progress=False)
    assert report.ok and report.stored == sorted(cases) and report.n_cases == len(cases)
    store = open_store(tmp_path / "store")
    assert store.case_ids == sorted(cases)
    for case_id, written in cases.items():
        case = store.read_case(case_id)
        assert case.attrs["layout"] == layout
        assert case.image.shape[0] == written.image.shape[0]
        assert (case.mask is None) == (written.mask is None)
        np.testing.assert_array_equal(case.image, case.geometry.to_canonical(written.image))


def test_bad_case_among_good_ones(tmp_path, ray_session, capsys):
    write_layout_cohort("mamamia", tmp_path / "first")
    assert main(["ingest", str(tmp_path / "first"), str(tmp_path / "store")]) == 0
    before = open_store(tmp_path / "store").case_ids
    cases = write_layout_cohort("nnunet", tmp_path / "src", n_cases=3)
    bad = cases["case_001"].phase_files[1]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    capsys.readouterr()
    status = main(["ingest", str(tmp_path / "src"), str(tmp_path / "store"), "--workers", "2"])
    assert status == 1
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("case ")]
    assert len(lines) == 1 and lines[0].startswith(f"case case_001: {bad}: "), err
    store = open_store(tmp_path / "store")
    assert store.case_ids == sorted([*before, "case_000", "case_002"])  # nothing lost
    # a source-level problem is one line and exit status 2
    (tmp_path / "empty").mkdir()
    assert main(["ingest", str(tmp_path / "empty"), str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert open_store(tmp_path / "store").case_ids == store.case_ids


def test_rerun_skips_unchanged_and_replaces_changed(tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the Ray tasks get absolute ones
    cases = write_layout_cohort("nnunet", tmp_path / "src", n_cases=3)
    first = ingest("src", "store", progress=False)
    assert first.stored == sorted(cases)
    again = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    assert again.stored == [] and again.skipped == sorted(cases)
    assert again.fingerprint == first.fingerprint
    changed = cases["case_002"]
    save_nifti(changed.phase_files[1], changed.image[1] + 7, changed.affine)
    third = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    assert third.stored == ["case_002"] and third.skipped == ["case_000", "case_001"]
    assert third.fingerprint != first.fingerprint
    store = open_store(tmp_path / "store")
    case = store.read_case("case_002")
    np.testing.assert_array_equal(case.image[1], case.geometry.to_canonical(changed.image[1] + 7))
    hidden = sorted(e.name for e in (tmp_path / "store").iterdir() if e.name.startswith("."))
    assert hidden == [".lock.guard"]  # no temporary entry left, and no lock held


CRASH = """
import os, sys
import data_store.store_writer as st
from data_store.location import StoreLocation
from data_store.layouts import discover
from data_store.source_reader import load_case

src, store = sys.argv[1], sys.argv[2]
location = StoreLocation.parse(store)
by_id = {s.case_id: s for s in discover(src)}
st.write_case(location, load_case(by_id["case_002"]))  # complete, but the index never updated
calls = [0]
codecs = st._codecs

def dying():  # the second array (the mask) of case_003: the image is already on disk
    calls[0] += 1
    if calls[0] == 2:
        os._exit(9)  # a hard crash: no cleanup runs
    return codecs()

st._codecs = dying
st.write_case(location, load_case(by_id["case_003"]))
"""


def test_crash_mid_write_then_rerun(tmp_path, ray_session):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2)
    ingest(tmp_path / "src", tmp_path / "store", progress=False)
    kept = open_store(tmp_path / "store").read_case("case_000").image
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=4)  # same first two, two new cases
    script = textwrap.dedent(CRASH)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 9, proc.stderr
    leftovers = [e.name for e in Path(tmp_path / "store").iterdir() if e.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and "case_003" in leftovers[0]
    store = open_store(tmp_path / "store")
    assert store.case_ids == ["case_000", "case_001"]  # the half-written case is not visible
    report = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    assert report.cleaned == leftovers
    assert report.stored == ["case_003"]  # case_002 was complete on disk: kept, now indexed
    assert report.skipped == ["case_000", "case_001", "case_002"]
    store = open_store(tmp_path / "store")
    assert store.case_ids == ["case_000", "case_001", "case_002", "case_003"]
    np.testing.assert_array_equal(store.read_case("case_000").image, kept)
    assert store.read_case("case_003").mask is not None


def _hostile_cohort(root: Path) -> dict[str, str]:
    """Three good nnU-Net cases and one case per kind of unreadable input: case ID -> what its
    one rejection line must say."""
    import nibabel as nib
    from nifti_factory import forge_header, make_affine, make_arrays, save_without_spacing

    write_layout_cohort("nnunet", root, n_cases=3, phases=2, dataset_json=False)
    images = root / "imagesTr"
    image, _ = make_arrays(phases=2)
    expected = {}
    for case, problem in (
        ("loop", "symbolic link loop"),
        ("folder", "a directory, not a NIfTI file"),
        ("cplx", "unsupported voxel type complex64"),
        # the hints name the command line's flags (`ingest(names=...)`)
        (
            "huge",
            "the header declares 2000x2000x2000 int16 voxels (14.9 GiB), more than the 4 "
            "GiB limit per file (--max-image-gib)",
        ),
        (
            "nospacing",
            "no voxel spacing: pixdim[1:4] is (0, 0, 0) and the file has no sform; "
            "pass `--assume-spacing Z Y X` (mm)",
        ),
        ("stray", "phase 999 is beyond the cohort's phases 0..1"),
    ):
        save_nifti(images / f"{case}_0000.nii.gz", image[0], make_affine())
        second = images / f"{case}_0001.nii.gz"
        if case == "loop":
            second.symlink_to(second.name)
        elif case == "folder":
            second.mkdir()
        elif case == "cplx":
            nib.save(nib.Nifti1Image(image[1].astype(np.complex64), make_affine()), str(second))
        elif case == "huge":
            forge_header(second, (2000, 2000, 2000))
        elif case == "nospacing":
            save_without_spacing(images / f"{case}_0000.nii.gz", image[0])
            save_without_spacing(second, image[1])
        else:
            save_nifti(second, image[1], make_affine())
            second = save_nifti(images / f"{case}_0999.nii.gz", image[1], make_affine())
        named = images / "nospacing_0000.nii.gz" if case == "nospacing" else second
        expected[case] = f"case {case}: {named}: {problem}"
    return expected


def test_unreadable_inputs_are_one_line_each_and_the_good_cases_are_stored(
    tmp_path, ray_session, capsys
):
    expected = _hostile_cohort(tmp_path / "src")
    store = tmp_path / "store"
    assert main(["ingest", str(tmp_path / "src"), str(store)]) == 1
    err = capsys.readouterr().err
    lines = sorted(ln.strip() for ln in err.splitlines() if ln.strip().startswith("case "))
    assert len(lines) == len(expected), err
    for line, case in zip(lines, sorted(expected), strict=True):
        assert line.startswith(expected[case]), (line, expected[case])
    assert open_store(store).case_ids == ["case_000", "case_001", "case_002"]
    # the same source with a spacing for the file that has none: that case is stored too
    args = ["ingest", str(tmp_path / "src"), str(store), "--assume-spacing", "3", "0.8", "0.7"]
    assert main(args) == 1
    store_now = open_store(store)
    assert "nospacing" in store_now.case_ids
    assert store_now.case_attrs("nospacing")["spacing_assumed"] is True
    assert store_now.entries["nospacing"].spacing == pytest.approx((3.0, 0.8, 0.7))
    capsys.readouterr()
    assert main(["store", "info", str(store)]) == 0
    assert "3x0.8x0.7 (assumed)" in capsys.readouterr().out


def test_synth_test_cohort_is_stored_as_the_test_split(tmp_path, ray_session, capsys):
    """The issue: `tsesnet synth --test-cases K` then `tsesnet ingest` put the test cases in
    the training folds."""
    raw, store = tmp_path / "raw", tmp_path / "store"
    args = ["synth", str(raw), "--cases", "6", "--test-cases", "2", "--shape", "8", "32", "32"]
    assert main([*args, "--phases", "2"]) == 0
    assert main(["ingest", str(raw), str(store), "--folds", "2"]) == 0
    st = open_store(store)
    test = st.case_ids_in("test")
    assert len(test) == 2 and all(st.labelled(c) and st.fold_of(c) == -1 for c in test)
    for fold in range(2):
        train, val = st.split(fold)
        assert not set(test) & set(train + val) and len(train + val) == 4
    capsys.readouterr()
    assert main(["store", "info", str(store)]) == 0
    assert "4 train, 2 test (never in a fold)" in capsys.readouterr().out


def test_ingest_into_a_store_written_before_records(tmp_path, ray_session):
    """Its cases cannot be vouched for (no record), so they are written again from their
    sources with a record: the store is upgraded, to the fingerprint of a fresh ingest."""
    from test_integrity import _strip_records

    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2)
    fresh = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    _strip_records(tmp_path / "store")
    before = open_store(tmp_path / "store").fingerprint
    again = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    assert again.stored == ["case_000", "case_001"] and not again.skipped
    assert all(line.endswith("it has no integrity record") for line in again.rewritten)
    assert again.fingerprint == fresh.fingerprint != before
    assert again.previous_fingerprint == before
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=3)
    more = ingest(tmp_path / "src", tmp_path / "store", progress=False)
    store = open_store(tmp_path / "store")
    assert more.stored == ["case_002"] and more.skipped == ["case_000", "case_001"]
    assert all(store.has_record(c) for c in store.case_ids)
    assert store.fingerprint == more.fingerprint


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--wait", "-1"], "error: --wait must be >= 0 seconds, got -1"),
        (["--folds", "1"], "error: --folds must be at least 2, got 1"),
        (["--workers", "0"], "error: --workers must be at least 1, got 0"),
        (["--assume-spacing", "1", "0", "1"], "error: --assume-spacing needs three positive"),
    ],
)
def test_bad_values_are_named_by_their_flag(tmp_path, capsys, extra, line):
    """The library refuses the value naming its parameter (`wait`, `folds`, ...); the command
    line names the flag that gave it."""
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=1)
    store = tmp_path / "store.zarr"
    assert main(["ingest", str(tmp_path / "src"), str(store), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    with pytest.raises(InputError) as info:
        ingest(tmp_path / "src", store, folds=1)
    assert str(info.value) == "folds must be at least 2, got 1" and info.value.param == "folds"
