"""`tsesnet ingest` on Ray: every layout, bad cases among good ones, reruns, a crash mid-write."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from nifti_factory import save_nifti, write_cohort

from data_store.ingest import ingest
from data_store.store import open_store
from tsesnet.cli import main


@pytest.mark.parametrize("layout", ["nnunet", "mamamia", "bts", "nifti4d"])
def test_every_layout_ingests(tmp_path, ray_session, layout):
    kwargs = {"test_cases": 1} if layout == "nnunet" else {}
    cases = write_cohort(layout, tmp_path / "src", **kwargs)
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
    write_cohort("mamamia", tmp_path / "first")
    assert main(["ingest", str(tmp_path / "first"), str(tmp_path / "store")]) == 0
    before = open_store(tmp_path / "store").case_ids
    cases = write_cohort("nnunet", tmp_path / "src", n_cases=3)
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
    cases = write_cohort("nnunet", tmp_path / "src", n_cases=3)
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
    assert [e for e in (tmp_path / "store").iterdir() if e.name.startswith(".")] == []


CRASH = """
import os, sys
import data_store.store as st
from data_store.layouts import discover
from data_store.loading import load_case

src, store = sys.argv[1], sys.argv[2]
location = st.StoreLocation.parse(store)
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
    write_cohort("nnunet", tmp_path / "src", n_cases=2)
    ingest(tmp_path / "src", tmp_path / "store", progress=False)
    kept = open_store(tmp_path / "store").read_case("case_000").image
    write_cohort("nnunet", tmp_path / "src", n_cases=4)  # same first two, two new cases
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
