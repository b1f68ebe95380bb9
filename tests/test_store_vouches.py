"""The store vouches for everything its readers use; its repairs repair; its folds are kept.

Each test edits a real store on disk the way a careless colleague or an attacker would (JSON
edits of ``zarr.json``, values rewritten with zarr, a record recomputed to match) and then runs
the CLI as a user does. Stores are built in-process (`build_store`, no Ray) except where
`tsesnet ingest` itself is under test (the session Ray, reused by the in-process CLI).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from nifti_factory import write_layout_cohort
from test_store import build_store

from data_store.errors import InputError
from data_store.store import open_store
from tsesnet.cli import main

SHAPE = (40, 40, 20)  # file (i, j, k): canonical (20, 40, 40)


@pytest.fixture()
def store_path(tmp_path) -> Path:
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=3, phases=2, shape=SHAPE)
    build_store(tmp_path / "src", tmp_path / "store", folds=2)
    return tmp_path / "store"


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _snapshot(store: Path) -> dict[str, bytes]:
    """Every file of a store but the lock: what "nothing already stored changed" compares."""
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


def _shift_affine(attrs: dict) -> None:
    attrs["geometry"]["affine"][0][3] -= 500.0  # the world origin 500 mm off: same grid shape


EDITS = {
    "percentiles_plausible": lambda a: a.update(percentiles=[0.0, 1.0]),
    "percentiles_nan": lambda a: a.update(percentiles=[float("nan"), float("nan")]),
    "affine_offset_500mm": _shift_affine,
    "foreground_bbox_moved": lambda a: a.update(foreground_bbox=[[0, 1], [0, 1], [0, 1]]),
    "foreground_bbox_outside": lambda a: a.update(foreground_bbox=[[0, 99], [0, 99], [0, 99]]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_case_attribute_is_refused_by_verify_and_every_reader(store_path, edit, capsys):
    _edit_json(store_path / "case_000" / "zarr.json", lambda d: EDITS[edit](d["attributes"]))
    meta = str(store_path / "case_000" / "zarr.json")
    for deep in ([], ["--deep"]):
        assert main(["store", "verify", str(store_path), *deep]) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"case case_000: {meta}: ") and "attributes" in out[0]
        assert "1 damaged, 2 intact" in out[-1]
    out_dir = store_path.parent / "export"
    assert main(["store", "export", str(store_path), "--case", "case_000", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: case case_000: {meta}: ")
    assert not out_dir.exists() or not list(out_dir.iterdir())
    store = open_store(store_path)
    with pytest.raises(InputError, match="^case case_000: "):
        store.case_attrs("case_000")  # what the sampler and training read percentiles from
    assert store.read_case("case_001").image.shape == (2, 20, 40, 40)  # others still read


@pytest.mark.parametrize("edit", ["percentiles_nan", "foreground_bbox_outside"])
def test_unusable_values_are_refused_in_a_store_without_records(store_path, edit, capsys):
    from test_integrity import _strip_records

    _strip_records(store_path)
    _edit_json(store_path / "case_001" / "zarr.json", lambda d: EDITS[edit](d["attributes"]))
    assert main(["store", "verify", str(store_path)]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"case case_001: {store_path / 'case_001' / 'zarr.json'}: case attr")


def test_array_metadata_edit_is_refused_by_the_quick_check(store_path, capsys):
    """A transpose codec added to image/zarr.json: the same chunk files decode to swapped axes."""
    meta = store_path / "case_000" / "image" / "zarr.json"
    transpose = {"name": "transpose", "configuration": {"order": [0, 1, 3, 2]}}
    _edit_json(meta, lambda d: d["codecs"].insert(0, transpose))
    assert main(["store", "verify", str(store_path)]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert (
        line == f"case case_000: {meta}: image metadata zarr.json differs from the record (edited)"
    )
    out_dir = store_path.parent / "export"
    assert main(["store", "export", str(store_path), "--case", "case_000", str(out_dir)]) == 2
    assert "image metadata zarr.json differs" in capsys.readouterr().err
    assert not out_dir.exists() or not list(out_dir.iterdir())


def _forge(store: Path, case: str = "case_000") -> None:
    """Wipes a quarter of every slice of a case's image and edits its record to match (the
    chunk files' sizes and sha256, the decoded sha256), as someone covering an edit would."""
    image = zarr.open_array(str(store / case / "image"), mode="r+")
    values = image[...]
    values[:, :, : values.shape[2] // 2, : values.shape[3] // 2] = 0
    image[...] = values
    folder = store / case / "image"
    files = {
        p.relative_to(folder).as_posix(): [
            p.stat().st_size,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        ]
        for p in sorted((folder / "c").rglob("*"))
        if p.is_file()
    }
    decoded = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()

    def edit(doc):
        doc["attributes"]["integrity"]["arrays"]["image"].update(files=files, sha256=decoded)

    _edit_json(store / case / "zarr.json", edit)


def test_verify_record_refuses_a_forged_record_unless_accept_current(store_path, capsys):
    clean = open_store(store_path).read_case("case_000").image
    _forge(store_path)
    assert main(["store", "verify", str(store_path), "--deep"]) == 1  # the index disagrees
    capsys.readouterr()
    before = _snapshot(store_path)
    assert main(["store", "verify", str(store_path), "--record"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: case case_000: {store_path / 'case_000' / 'zarr.json'}: cannot record: its "
        "integrity record is not the one the index lists"
    )
    assert "pass --accept-current to record what is there now" in err[0]
    assert _snapshot(store_path) == before
    # the record removed instead of recomputed: refused the same way
    _edit_json(store_path / "case_000" / "zarr.json", lambda d: d["attributes"].pop("integrity"))
    assert main(["store", "verify", str(store_path), "--record"]) == 2
    assert "its integrity record was removed" in capsys.readouterr().err
    # a user who knows the edit is wanted says so, and is told what was accepted
    assert main(["store", "verify", str(store_path), "--record", "--accept-current"]) == 0
    out = capsys.readouterr().out
    assert "case case_000: accepted as it is now, although its integrity record was removed" in out
    assert not np.array_equal(open_store(store_path).read_case("case_000").image, clean)


def test_reingest_rewrites_a_forged_case_from_its_sources(tmp_path, ray_session, capsys):
    src, store = tmp_path / "src", tmp_path / "store"
    write_layout_cohort("nnunet", src, n_cases=3, phases=2, shape=SHAPE)
    assert main(["ingest", str(src), str(store), "--folds", "2"]) == 0
    clean = open_store(store).read_case("case_000").image
    fingerprint = open_store(store).fingerprint
    _forge(store)
    capsys.readouterr()
    assert main(["ingest", str(src), str(store)]) == 0
    out = capsys.readouterr().out
    assert "stored 1, unchanged 2" in out
    assert "case case_000: its image values differ from what its sources give" in out
    assert main(["store", "verify", str(store), "--deep"]) == 0
    rewritten = open_store(store)
    np.testing.assert_array_equal(rewritten.read_case("case_000").image, clean)
    assert rewritten.fingerprint == fingerprint


def test_reingest_rewrites_edited_attributes_and_cases_without_a_record(
    tmp_path, ray_session, capsys
):
    from test_integrity import _strip_records

    src, store = tmp_path / "src", tmp_path / "store"
    write_layout_cohort("nnunet", src, n_cases=3, phases=2, shape=SHAPE)
    assert main(["ingest", str(src), str(store), "--folds", "2"]) == 0
    wanted = open_store(store).case_attrs("case_002")
    _edit_json(store / "case_002" / "zarr.json", lambda d: _shift_affine(d["attributes"]))
    _strip_records(store)  # and no case has a record: a store from before records
    chunk = sorted(p for p in (store / "case_001" / "image" / "c").rglob("*") if p.is_file())[0]
    chunk.unlink()  # deleted: reads as zeros, nothing can tell without a record
    capsys.readouterr()
    assert main(["ingest", str(src), str(store)]) == 0
    out = capsys.readouterr().out
    assert "stored 3, unchanged 0" in out and "rewrote 3 case(s)" in out
    assert "case case_001: it has no integrity record" in out
    assert main(["store", "verify", str(store), "--deep"]) == 0
    repaired = open_store(store)
    assert repaired.case_attrs("case_002")["geometry"] == wanted["geometry"]
    assert chunk.exists() and all(repaired.has_record(c) for c in repaired.case_ids)
    # once repaired, a rerun finds every case as its sources give it
    assert main(["ingest", str(src), str(store)]) == 0
    assert "stored 0, unchanged 3" in capsys.readouterr().out


def test_reingest_keeps_the_folds_and_refuses_another_count_without_refold(
    tmp_path, ray_session, capsys
):
    src, store = tmp_path / "src", tmp_path / "store"
    write_layout_cohort("nnunet", src, n_cases=6, phases=2, shape=SHAPE)
    assert main(["ingest", str(src), str(store), "--folds", "2"]) == 0
    first = open_store(store)
    folds = {c: first.fold_of(c) for c in first.case_ids}
    assert main(["ingest", str(src), str(store)]) == 0  # no --folds: the store's are kept
    again = open_store(store)
    assert again.n_folds == 2 and {c: again.fold_of(c) for c in again.case_ids} == folds
    assert again.fingerprint == first.fingerprint
    capsys.readouterr()
    before = _snapshot(store)
    assert main(["ingest", str(src), str(store), "--folds", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the store has 2 folds; --folds 3" in err[0] and "--refold" in err[0]
    assert _snapshot(store) == before
    assert main(["ingest", str(src), str(store), "--folds", "3", "--refold"]) == 0
    refolded = open_store(store)
    assert refolded.n_folds == 3 and refolded.fingerprint != first.fingerprint


def test_fingerprint_covers_folds_and_attributes_not_where_the_store_is(tmp_path):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=4, phases=2, shape=SHAPE)
    a = build_store(tmp_path / "src", tmp_path / "a", folds=2)
    b = build_store(tmp_path / "src", tmp_path / "elsewhere" / "b", folds=2)
    c = build_store(tmp_path / "src", tmp_path / "c", folds=3)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint_version == 2
    moved = tmp_path / "moved_src"
    (tmp_path / "src").rename(moved)  # another site's paths: the same stored case
    d = build_store(moved, tmp_path / "d", folds=2)
    assert d.fingerprint == a.fingerprint


def _as_previous_release(store: Path) -> str:
    """Turns a store into one the previous release wrote: version-1 records (no attribute
    digest), index entries without ``attributes``, the version-1 fingerprint. Returns it."""
    from data_store.index import store_fingerprint
    from data_store.integrity import CaseRecord

    index = json.loads((store / "zarr.json").read_text())
    attrs = index["attributes"]
    for cid, entry in attrs["cases"].items():
        case_meta = store / cid / "zarr.json"
        doc = json.loads(case_meta.read_text())
        record = CaseRecord.from_attrs(doc["attributes"]["integrity"])
        old = CaseRecord(record.arrays).to_attrs()
        assert old["version"] == 1
        doc["attributes"]["integrity"] = old
        case_meta.write_text(json.dumps(doc))
        entry.pop("attributes")
        entry["integrity"] = hashlib.sha256(
            json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    attrs.pop("fingerprint_version")
    attrs["fingerprint"] = store_fingerprint(attrs["cases"], attrs["n_folds"], 1)
    (store / "zarr.json").write_text(json.dumps(index))
    return attrs["fingerprint"]


def test_store_of_the_previous_release_reads_and_is_upgraded_by_record(store_path, capsys):
    old = _as_previous_release(store_path)
    store = open_store(store_path)
    assert store.fingerprint == old and store.fingerprint_version == 1  # unchanged until rewritten
    assert store.read_case("case_000").image.shape == (2, 20, 40, 40)
    assert main(["store", "verify", str(store_path), "--deep"]) == 0
    capsys.readouterr()
    assert main(["store", "verify", str(store_path), "--record"]) == 0
    assert "recorded 3 case(s)" in capsys.readouterr().out
    upgraded = open_store(store_path)
    assert upgraded.fingerprint_version == 2 and upgraded.fingerprint != old
    record = upgraded.case_attrs("case_000")["integrity"]
    assert record["version"] == 2 and "attributes" in record
    _edit_json(store_path / "case_000" / "zarr.json", lambda d: _shift_affine(d["attributes"]))
    assert main(["store", "verify", str(store_path)]) == 1  # now the attributes are covered


def test_reingest_upgrades_a_store_of_the_previous_release(tmp_path, ray_session, capsys):
    src, store = tmp_path / "src", tmp_path / "store"
    write_layout_cohort("nnunet", src, n_cases=2, phases=2, shape=SHAPE)
    assert main(["ingest", str(src), str(store), "--folds", "2"]) == 0
    current = open_store(store).fingerprint
    old = _as_previous_release(store)
    capsys.readouterr()
    assert main(["ingest", str(src), str(store)]) == 0
    out = capsys.readouterr().out
    assert "rewrote 2 case(s)" in out and "predates attribute coverage" in out
    assert f"the fingerprint was {old} (version 1" in out
    assert open_store(store).fingerprint == current


def test_record_does_not_upgrade_a_previous_release_case_whose_files_disagree(store_path, capsys):
    _as_previous_release(store_path)
    chunk = sorted(p for p in (store_path / "case_001" / "image" / "c").rglob("*") if p.is_file())
    raw = bytearray(chunk[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped bit: same size, found by the deep check only
    chunk[0].write_bytes(bytes(raw))
    before = _snapshot(store_path)
    assert main(["store", "verify", str(store_path), "--record"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: case case_001: ")
    assert "checksum differs from the record" in err[0] and _snapshot(store_path) == before
    assert main(["store", "verify", str(store_path), "--accept-current"]) == 2
    assert "--accept-current goes with --record" in capsys.readouterr().err
