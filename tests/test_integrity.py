"""Integrity: deleted, truncated or corrupt chunks and edited indexes are refused, never zeros.

Zarr reads a missing chunk file as the fill value. These tests damage real stores on disk the
way a bad copy or a tester does (delete, truncate, overwrite, edit JSON) and check what every
reader and `tsesnet store verify` say. Stores are built in-process (`build_store`, no Ray).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from nifti_factory import write_layout_cohort
from test_store import build_store

from data_store.errors import InputError
from data_store.sampler import PatchSampler, SamplerConfig
from data_store.store import open_store
from tsesnet.cli import main

SHAPE = (70, 70, 30)  # file (i, j, k): canonical (30, 70, 70), 2x2x2 chunks of (24, 64, 64)


@pytest.fixture()
def store_path(tmp_path) -> Path:
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=3, phases=2, shape=SHAPE)
    build_store(tmp_path / "src", tmp_path / "store", folds=2)
    return tmp_path / "store"


def _chunk(store: Path, case: str, array: str = "image", nth: int = 1) -> Path:
    return sorted(p for p in (store / case / array / "c").rglob("*") if p.is_file())[nth]


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_clean_store_verifies_cheap_deep_and_json(store_path, capsys):
    assert main(["store", "verify", str(store_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"{store_path}: 3 cases, 0 damaged, 3 intact (cheap check: index, arrays, "
        "shapes, dtypes, chunk files and sizes)"
    ]
    assert main(["store", "verify", str(store_path), "--deep", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["deep"] and doc["cases"] == 3 and doc["damaged"] == []
    record = open_store(store_path).case_attrs("case_000")["integrity"]
    assert set(record["arrays"]) == {"image", "mask", "foreground"}
    assert len(record["arrays"]["image"]["files"]) == 8  # every image chunk has tissue


def test_deleted_chunks_are_refused_by_every_reader(store_path, capsys):
    image_chunk = _chunk(store_path, "case_000")
    mask_chunk = _chunk(store_path, "case_001", "mask", 0)
    image_chunk.unlink()
    mask_chunk.unlink()
    store = open_store(store_path)  # the index itself is sound
    key = image_chunk.relative_to(store_path / "case_000" / "image").as_posix()
    expected = f"case case_000: {image_chunk}: image chunk {key} missing"
    with pytest.raises(InputError) as info:
        store.read_case("case_000")
    assert str(info.value).startswith(expected)
    with pytest.raises(InputError, match="mask chunk c/.* missing"):
        store.read_region("case_001", (slice(0, 4), slice(0, 4), slice(0, 4)))
    assert store.read_case("case_002").image.shape == (2, 30, 70, 70)  # intact cases still read
    with pytest.raises(InputError) as info:  # a training driver's check before workers start
        open_store(store_path).check_cases(["case_002", "case_000", "case_001"])
    assert str(info.value).startswith(expected) and "; 1 more damaged case(s)" in str(info.value)
    # the training sampler, as a Ray Train worker gets it (pickled: it checks again there)
    sampler = PatchSampler(
        pickle.loads(pickle.dumps(store)),
        ["case_000"],
        SamplerConfig(patch=(8, 16, 16), cache_bytes=0),
    )
    with pytest.raises(InputError, match="^case case_000: .*image chunk c/.* missing"):
        sampler.patch(0, 0)
    out = store_path.parent / "out"
    assert main(["store", "export", str(store_path), "--case", "case_000", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}")
    assert not out.exists() or not list(out.iterdir())  # nothing half-exported
    assert main(["store", "info", str(store_path)]) == 1
    err = capsys.readouterr().err
    assert "damaged: case case_000: " in err and "damaged: case case_001: " in err
    assert main(["store", "verify", str(store_path)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == expected and lines[1].startswith("case case_001: ")
    assert lines[2].startswith(f"{store_path}: 3 cases, 2 damaged, 1 intact")


def test_truncated_chunk_is_one_line_not_a_traceback(store_path, capsys):
    chunk = _chunk(store_path, "case_000")
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[: size // 2])
    assert main(["store", "export", str(store_path), "--case", "case_000", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"is {size // 2} bytes, recorded {size}" in err
    # without a record (a store written before records), the codec's error becomes one line
    _strip_records(store_path)
    store = open_store(store_path)
    with pytest.raises(InputError) as info:
        store.read_case("case_000")
    assert str(info.value).startswith(
        f"case case_000: {store_path / 'case_000' / 'image'}: image chunks could not be decoded ("
    )
    assert "\n" not in str(info.value)


def test_corrupt_chunk_of_the_same_size_is_found_by_deep(store_path, capsys):
    chunk = _chunk(store_path, "case_002")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert main(["store", "verify", str(store_path)]) == 0  # sizes are as recorded
    capsys.readouterr()
    assert main(["store", "verify", str(store_path), "--deep"]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    key = chunk.relative_to(store_path / "case_002" / "image").as_posix()
    assert line == f"case case_002: {chunk}: image chunk {key} checksum differs from the record"


def test_edited_index_values_are_refused(store_path, capsys):
    root = store_path / "zarr.json"
    original = root.read_text()
    _edit_json(root, lambda d: d["attributes"]["cases"]["case_001"].update(phases=4))
    with pytest.raises(InputError) as info:
        open_store(store_path)
    assert str(info.value).startswith(
        f"case case_001: {store_path / 'case_001' / 'zarr.json'}: index says phases 4, the "
        "case's attributes say 2 (the index is out of date or edited;"
    )
    assert main(["store", "info", str(store_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["store", "verify", str(store_path)]) == 1
    assert capsys.readouterr().out.startswith("case case_001: ")
    # the case's attributes edited to match: its integrity record disagrees
    case_meta = store_path / "case_001" / "zarr.json"
    case_original = case_meta.read_text()
    _edit_json(case_meta, lambda d: d["attributes"].update(phases=4))
    with pytest.raises(InputError, match="attributes say image 4x30x70x70 int16, the record 2x"):
        open_store(store_path).read_case("case_001")
    root.write_text(original)
    case_meta.write_text(case_original)
    _edit_json(root, lambda d: d["attributes"]["cases"]["case_000"].update(fold=1 - _fold(d)))
    with pytest.raises(InputError, match="index puts the case in fold"):
        open_store(store_path)
    root.write_text(original)
    _edit_json(root, lambda d: d["attributes"].update(fingerprint="0" * 16))
    with pytest.raises(InputError, match="the index's fingerprint 0000000000000000 is not the one"):
        open_store(store_path)


def _fold(doc: dict) -> int:
    return doc["attributes"]["cases"]["case_000"]["fold"]


def test_fingerprint_covers_what_is_stored(tmp_path, monkeypatch):
    import data_store.store_writer as store_writer

    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2, phases=2)
    a = build_store(tmp_path / "src", tmp_path / "a")
    b = build_store(tmp_path / "src", tmp_path / "b")
    assert a.fingerprint == b.fingerprint  # same sources, same stored values
    # other chunk bytes (another codec, as another Blosc build might write), the same values
    from zarr.codecs import ZstdCodec

    monkeypatch.setattr(store_writer, "_codecs", lambda: [ZstdCodec(level=3)])
    c = build_store(tmp_path / "src", tmp_path / "c")
    files = [s.case_attrs("case_000")["integrity"]["arrays"]["image"]["files"] for s in (a, c)]
    assert files[0] != files[1] and c.fingerprint == a.fingerprint
    monkeypatch.undo()
    # same sources, different stored values (a bad writer, a hand edit with a new record)
    from data_store.index import write_index
    from data_store.layouts import discover
    from data_store.location import StoreLocation
    from data_store.source_reader import load_case
    from data_store.store_writer import write_case

    loaded = load_case(discover(tmp_path / "src")[0])
    loaded.image[0, 0, 0, 0] += 1
    location = StoreLocation.parse(tmp_path / "b")
    write_case(location, loaded)
    write_index(location, 2)
    changed = open_store(tmp_path / "b")
    assert changed.index["case_000"]["checksums"] == a.index["case_000"]["checksums"]
    assert changed.fingerprint != a.fingerprint


def _strip_records(store: Path) -> None:
    """Turns a store into one written before integrity records and splits existed: the case
    attributes and the index as the earlier code wrote them, with its fingerprint."""
    index = json.loads((store / "zarr.json").read_text())
    cases = index["attributes"]["cases"]
    index["attributes"].pop("fingerprint_version", None)
    for cid, entry in cases.items():
        for key in ("integrity", "content", "attributes", "split"):
            entry.pop(key, None)
        _edit_json(
            store / cid / "zarr.json",
            lambda d: [d["attributes"].pop(k, None) for k in ("integrity", "split")],
        )
    h = hashlib.sha256(b"tsesnet-store-v1")
    for cid in sorted(cases):
        h.update(json.dumps([cid, cases[cid]["checksums"]]).encode())
    index["attributes"]["fingerprint"] = h.hexdigest()[:16]
    (store / "zarr.json").write_text(json.dumps(index))


def test_store_without_records_opens_reads_and_can_be_recorded(store_path, capsys):
    kept = open_store(store_path).read_case("case_000").image
    _strip_records(store_path)
    legacy_fingerprint = json.loads((store_path / "zarr.json").read_text())["attributes"][
        "fingerprint"
    ]
    store = open_store(store_path)
    assert store.fingerprint == legacy_fingerprint  # unchanged for stores written before
    np.testing.assert_array_equal(store.read_case("case_000").image, kept)
    assert store.split_of("case_000") == "train" and store.split(0)[1]
    assert main(["store", "verify", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "3 case(s) have no integrity record" in out and "--record" in out
    assert main(["store", "verify", str(store_path), "--record"]) == 0
    out = capsys.readouterr().out
    assert "recorded 3 case(s)" in out and "have no integrity record" not in out
    recorded = open_store(store_path)
    assert recorded.has_record("case_000") and recorded.fingerprint != legacy_fingerprint
    _chunk(store_path, "case_000").unlink()
    assert main(["store", "verify", str(store_path)]) == 1
