"""A store's index is input: forged case IDs, links and records never reach outside the store.

Stores travel between sites and buckets. Each test forges a real store on disk, runs the
commands a user types, and records every file the process opens or lists (a Python audit hook)
to show that nothing outside the store is read, and nothing outside the output folder written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from nifti_factory import write_layout_cohort
from test_store import build_store

from data_store.errors import InputError
from data_store.index import write_index
from data_store.location import StoreLocation, check_case_id
from data_store.store import open_store
from tsesnet.cli import main

_SEEN: list[str] | None = None  # the paths opened or listed while recording


def _audit(event: str, args: tuple) -> None:
    if _SEEN is not None and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, str | bytes | os.PathLike):
            _SEEN.append(os.fsdecode(path))


sys.addaudithook(_audit)  # process-wide and permanent: it does nothing unless recording


@contextmanager
def recording():
    """Collects the paths this process opens or lists inside the block."""
    global _SEEN
    _SEEN = []
    try:
        yield _SEEN
    finally:
        _SEEN = None


def _outside(seen: list[str], root: Path, allowed: Path) -> list[str]:
    """The paths under `root` (the test's folder) that are not under `allowed` (the store),
    links resolved."""
    out = []
    root, allowed = Path(os.path.realpath(root)), Path(os.path.realpath(allowed))
    for p in seen:
        full = Path(os.path.realpath(p))  # through any link: where the bytes come from
        if full.is_relative_to(root) and not full.is_relative_to(allowed):
            out.append(str(full))
    return out


@pytest.fixture()
def site(tmp_path) -> Path:
    """tmp/site/store (two cases) and tmp/victim/precious: a real case group outside it."""
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2, phases=2)
    build_store(tmp_path / "src", tmp_path / "site" / "store")
    victim = tmp_path / "victim" / "precious"
    shutil.copytree(tmp_path / "site" / "store" / "case_000", victim)
    (tmp_path / "victim" / "precious.nii.gz").write_bytes(b"do not delete")
    return tmp_path / "site" / "store"


BAD_IDS = [
    "../../victim/precious",
    "..",
    ".hidden",
    "a/b",
    "a\\b",
    "x\nerror: all is well",
    "",
    "__zarr",
    "zarr.json",
    "C:precious",
    "x" * 129,
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=range(len(BAD_IDS)))
def test_forged_case_id_is_refused_at_open(site, bad, capsys):
    root = site / "zarr.json"
    doc = json.loads(root.read_text())
    cases = doc["attributes"]["cases"]
    cases[bad] = cases.pop("case_000")
    root.write_text(json.dumps(doc))
    out = site.parent / "out"
    with recording() as seen:
        statuses = [
            main(["store", "info", str(site)]),
            main(["store", "export", str(site), "--case", bad, str(out)]),
            main(["store", "verify", str(site), "--deep"]),
        ]
        with pytest.raises(InputError) as info:
            open_store(site)
    assert statuses == [2, 2, 2]
    err = capsys.readouterr().err.splitlines()
    expected = f"error: {site}: the index lists case ID {bad!r}, which "
    assert len(err) == 3 and all(line.startswith(expected) for line in err), err
    assert info.value.path == str(site) and repr(bad) in str(info.value)
    assert str(site / "zarr.json") in seen  # the hook sees what is read
    assert _outside(seen, site.parent.parent, site) == []  # no victim read, no OUT written
    assert (site.parent.parent / "victim" / "precious.nii.gz").read_bytes() == b"do not delete"
    assert not out.exists()


def test_ids_that_differ_only_in_letter_case_are_refused(site):
    root = site / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["cases"]["CASE_000"] = doc["attributes"]["cases"]["case_000"]
    root.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="'CASE_000' and 'case_000', which differ only in letter"):
        open_store(site)


def test_case_folder_that_is_a_link_is_refused(site):
    victim = site.parent.parent / "victim" / "precious"
    shutil.rmtree(victim)
    (site / "case_000").rename(victim)
    (site / "case_000").symlink_to(victim)
    with recording() as seen, pytest.raises(InputError) as info:
        open_store(site)
    assert str(info.value).startswith(f"case case_000: {site / 'case_000'}: case folder is a sym")
    assert _outside(seen, site.parent.parent, site) == []


def test_chunk_that_is_a_link_is_refused_before_reading(site):
    chunk = sorted(p for p in (site / "case_001" / "image" / "c").rglob("*") if p.is_file())[0]
    target = site.parent.parent / "victim" / "secret.bin"
    target.write_bytes(chunk.read_bytes())  # same size, so only the link gives it away
    chunk.unlink()
    chunk.symlink_to(target)
    store = open_store(site)
    with recording() as seen, pytest.raises(InputError, match="is a symbolic link"):
        store.read_case("case_001")
    assert any(Path(p).is_relative_to(site / "case_001" / "image") for p in seen)
    assert _outside(seen, site.parent.parent, site) == []


def test_forged_record_key_is_never_a_path(site):
    meta = site / "case_001" / "zarr.json"
    doc = json.loads(meta.read_text())
    files = doc["attributes"]["integrity"]["arrays"]["image"]["files"]
    files["../../../victim/precious.nii.gz"] = files.pop(sorted(files)[0])
    meta.write_text(json.dumps(doc))
    write_index(StoreLocation.parse(site), 2)  # a forger with our own tools: a consistent index
    store = open_store(site)
    with recording() as seen, pytest.raises(InputError) as info:
        store.read_case("case_001")
    forged = "chunk key '../../../victim/precious.nii.gz' is not"
    assert f"integrity record malformed (image.files: {forged}" in str(info.value)
    assert main(["store", "verify", str(site), "--deep"]) == 1
    assert _outside(seen, site.parent.parent, site) == []


def test_check_case_id_is_the_rule_for_output_names():
    """`check_case_id` is what prediction must call before building OUT/<id>.nii.gz."""
    assert check_case_id("DUKE_001") == "DUKE_001"
    for bad in BAD_IDS:
        with pytest.raises(InputError, match="case ID"):
            check_case_id(bad)
    with pytest.raises(InputError, match="is a int, not a string"):
        check_case_id(5)
