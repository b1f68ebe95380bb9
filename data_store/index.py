"""The store's root group: the case index, the folds, the fingerprint, and their checks.

The root's attributes are ``schema_version``, ``cases`` (case ID -> `IndexEntry`), ``n_folds``,
``fold_rule`` and ``fingerprint``. The index is derived from the complete case groups on disk
(`write_index`), never edited in place, so it can always be rebuilt.

A store travels between sites and buckets, and its index is input like any file: `load_index`
checks it before anything else is read. Refused for the whole store (one line naming the store):
a missing or unknown schema, an index that is not a table of entries, a case ID that `check_case_id`
rejects (``../../victim`` never becomes a path), two IDs that differ only in letter case, a
fingerprint that is not the one of the cases listed. Per case (one line naming the case and its
``zarr.json``): a malformed entry, a case group that is missing, a symbolic link, incomplete or
of another case, entry values (phases, shape, spacing, dtype, labelled, site, split, source
checksums, integrity record and attribute digests) that differ from the case's own attributes,
and a fold that the fold rule does not give.

Folds: patient-level, patient = case ID (each supported layout has one case per patient;
MAMA-MIA IDs are patient IDs). The labelled cases of the ``train`` split are ordered by
sha256("tsesnet-folds-v1:" + ID) and dealt round-robin into k folds: deterministic, balanced to
within one case, independent of ingestion order. Unlabelled cases and ``test`` cases have no
fold. Folds are a function of that set of IDs: adding cases can move others.

Fingerprint (``fingerprint_version`` 2): a hash of the number of folds and, per case, its ID,
source checksums, split, fold, the checksums of its stored arrays' decoded values (`content`,
independent of the codec's bytes) and the digest of its attributes (`attributes`, source paths
left out): two sites storing the same cohort with the same folds get the same fingerprint; a
re-fold, an edited percentile or affine, other values give another. A root written before
version 2 (no ``fingerprint_version``) keeps its version-1 fingerprint (case IDs, source
checksums, content and split: not the folds, not the attributes) until the index is next
written (`tsesnet ingest`, `tsesnet store verify --record`), which moves it to version 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import pydantic
from pydantic import ConfigDict, Field

from data_store import schema
from data_store.errors import InputError
from data_store.integrity import Problem, record_digests
from data_store.location import StoreLocation, check_case_id

__all__ = [
    "FOLD_RULE",
    "SCHEMA_VERSION",
    "FINGERPRINT_VERSION",
    "SPLITS",
    "IndexEntry",
    "StoreIndex",
    "assign_folds",
    "case_summary",
    "init_store",
    "load_index",
    "read_root",
    "scan_cases",
    "store_fingerprint",
    "write_index",
]

SCHEMA_VERSION = 1
#: 2: the fingerprint covers the folds and the case attributes (1: neither; module docstring).
FINGERPRINT_VERSION = 2
Split = Literal["train", "test"]
SPLITS = get_args(Split)
FOLD_SALT = "tsesnet-folds-v1:"
FOLD_RULE = (
    "patient-level (patient = case ID): labelled IDs of the train split sorted by "
    "sha256('tsesnet-folds-v1:' + ID), dealt round-robin into n_folds; unlabelled and test "
    "cases have no fold"
)
#: Entries of the root that are not cases: the writer lock (`data_store.lock`).
NOT_CASES = (".lock", ".lock.guard")
_REBUILD = "rebuild the index with `tsesnet ingest` or `tsesnet store verify STORE --record`"


_Size = Annotated[int, Field(ge=1)]
_Mm = Annotated[float, Field(gt=0)]
_Text = Annotated[str, Field(min_length=1)]


# The index is read as JSON written by this or another release: keys it does not know are left
# alone (as before), values are checked strictly (`IndexEntry.parse`).
@pydantic.with_config(ConfigDict(extra="ignore", allow_inf_nan=False))
@dataclass(frozen=True)
class IndexEntry:
    """One case's entry in the root index (what `store info` shows without opening the case).

    Attributes:
        phases: stored phases T.
        shape: (Z, Y, X).
        spacing: mm, (Z, Y, X).
        labelled: whether the case has a mask.
        site: BTS centre or MAMA-MIA dataset, or None.
        dtype: the image dtype.
        checksums: (role, sha256) of every source file.
        fold: the case's fold, None for unlabelled and test cases.
        split: "train" (folds are dealt over these) or "test" (held out).
        integrity: the digest of the case's whole integrity record, None for cases stored
            before records existed.
        content: the digest of the stored arrays' decoded checksums (what the fingerprint
            covers), None for cases stored before records existed.
        attributes: the digest of the case's attributes (`attrs_digest`) from its record,
            None for cases whose record predates it.
        spacing_assumed: the spacing came from ``--assume-spacing``, not the files.
    """

    phases: _Size
    shape: tuple[_Size, _Size, _Size]
    spacing: tuple[_Mm, _Mm, _Mm]
    labelled: bool
    site: _Text | None
    dtype: _Text
    checksums: tuple[tuple[str, str], ...]
    fold: Annotated[int, Field(ge=0)] | None = None
    split: Split = "train"
    integrity: _Text | None = None
    content: _Text | None = None
    spacing_assumed: bool = False
    attributes: _Text | None = None

    @classmethod
    def parse(cls, raw: Any, n_folds: int) -> IndexEntry:
        """An entry from the index's JSON; ValueError (one line) says which value is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("index entry is not an object")
        try:
            entry = schema.validate(cls, {"site": None, **raw})  # `site` may be left out
        except InputError as err:
            raise ValueError(f"index entry: {err}") from None
        if entry.fold is not None and entry.fold >= n_folds:
            raise ValueError(f"index entry has fold {entry.fold!r}, not one of the {n_folds} folds")
        return entry


def case_summary(attrs: dict[str, Any]) -> dict[str, Any]:
    """The root index's entry for a case, from its group attributes (all but the fold).

    ``integrity``, ``content``, ``attributes`` and ``spacing_assumed`` appear only when the
    case has them, so the entries of a store written before they existed read back the same.
    """
    summary = {
        "phases": int(attrs["phases"]),
        "shape": list(attrs["shape"]),
        "spacing": list(attrs["spacing"]),
        "labelled": bool(attrs["labelled"]),
        "site": attrs.get("site"),
        "dtype": attrs["dtype"],
        "checksums": [[s["role"], s["sha256"]] for s in attrs["sources"]],
        "split": attrs.get("split", "train"),
    }
    digests = record_digests(attrs)
    if digests is not None:
        summary["integrity"], summary["content"], attributes = digests
        if attributes is not None:
            summary["attributes"] = attributes
    if attrs.get("spacing_assumed"):
        summary["spacing_assumed"] = True
    return summary


def assign_folds(labelled_ids: list[str], n_folds: int) -> dict[str, int]:
    """Deterministic, balanced patient-level folds (see the module docstring)."""
    order = sorted(
        labelled_ids, key=lambda c: (hashlib.sha256((FOLD_SALT + c).encode()).hexdigest(), c)
    )
    return {case_id: i % n_folds for i, case_id in enumerate(order)} if n_folds else {}


def fold_ids(cases: dict[str, Any]) -> list[str]:
    """The IDs folds are dealt over: labelled cases of the train split (entries or summaries)."""
    return [c for c, e in cases.items() if _get(e, "labelled") and _get(e, "split") == "train"]


def store_fingerprint(
    index: dict[str, Any], n_folds: int = 0, version: int = FINGERPRINT_VERSION
) -> str:
    """A stable hash of what the index says is stored (order-independent; module docstring).

    Args:
        index: case ID -> `IndexEntry` or its JSON (``checksums``, optional ``content``,
            ``attributes``, ``split``, ``fold``).
        n_folds: the store's number of folds (version 2 covers it).
        version: `FINGERPRINT_VERSION`, or 1 for a root written before it.
    """
    if version == FINGERPRINT_VERSION:
        h = hashlib.sha256(f"tsesnet-store-fingerprint-v{version}".encode())
        h.update(json.dumps({"n_folds": n_folds}).encode())
        for case_id in sorted(index):
            e = index[case_id]
            doc = {k: _get(e, k) for k in ("content", "attributes", "split", "fold")}
            doc["checksums"] = [list(c) for c in _get(e, "checksums")]
            h.update(json.dumps([case_id, doc], sort_keys=True).encode())
        return h.hexdigest()[:16]
    h = hashlib.sha256(f"tsesnet-store-v{SCHEMA_VERSION}".encode())  # version 1, as it was
    for case_id in sorted(index):
        e = index[case_id]
        checksums = [list(c) for c in _get(e, "checksums")]
        extra = {"content": _get(e, "content"), "split": _get(e, "split")}
        if extra["content"] is None and extra["split"] == "train":
            h.update(json.dumps([case_id, checksums]).encode())  # as before records existed
        else:
            h.update(json.dumps([case_id, checksums, extra], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _get(entry: Any, key: str) -> Any:
    defaults = {"split": "train", "content": None, "attributes": None, "fold": None}
    if isinstance(entry, IndexEntry):
        return getattr(entry, key)
    return entry.get(key, defaults.get(key))


# --------------------------------------------------------------------------- writing


def init_store(location: StoreLocation) -> None:
    """Creates the root group if missing; refuses a folder that holds something else."""
    import zarr

    if check_target(location):
        # "a", never "w": zarr's "w" empties the folder, the lock file and a writer's entries too
        root = zarr.open_group(location.zarr_target(), mode="a", zarr_format=3)
        root.update_attributes({"schema_version": SCHEMA_VERSION, "cases": {}, "n_folds": 0})
        return
    read_root(location)  # validates it is a store


def check_target(location: StoreLocation) -> bool:
    """True for a path where a new store can be made (missing or empty but for the lock), False
    for an existing store; raises for a folder that holds something else."""
    entries = [e for e in location.entries() if e not in NOT_CASES and not e.startswith(".lock.")]
    if entries and "zarr.json" not in entries:
        raise InputError(
            "not a tsesnet store (a non-empty folder without zarr.json); choose a new path",
            path=location.url,
        )
    return not entries


def scan_cases(location: StoreLocation) -> dict[str, dict[str, Any]]:
    """Reads every complete case group's attributes (the source of truth for the index)."""
    found = {}
    for name in location.entries():
        if name.startswith((".", "__")) or name == "zarr.json" or location.is_link(name):
            continue
        try:
            check_case_id(name)
            meta = location.read_json(f"{name}/zarr.json")
        except (OSError, ValueError):
            continue  # a stray file or folder: not a case
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if isinstance(attrs, dict) and attrs.get("complete") and attrs.get("case_id") == name:
            found[name] = attrs
    return found


def write_index(location: StoreLocation, n_folds: int) -> dict[str, Any]:
    """Rebuilds the root index from the case groups present and writes it in one update.

    The index is derived from the complete case groups on disk, so a run that crashed before
    updating it loses nothing: the next run's index lists every case that was renamed in.
    """
    import zarr

    cases = {cid: case_summary(a) for cid, a in scan_cases(location).items()}
    folds = assign_folds(fold_ids(cases), n_folds)
    for cid, s in cases.items():
        s["fold"] = folds.get(cid)
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "cases": cases,
        "n_folds": n_folds,
        "fold_rule": FOLD_RULE,
        "fingerprint": store_fingerprint(cases, n_folds),
        "fingerprint_version": FINGERPRINT_VERSION,
    }
    # One zarr.json write: atomic on a local store (zarr >= 3.1.3), one PUT on object stores.
    zarr.open_group(location.zarr_target(), mode="r+").attrs.put(attrs)
    return attrs


# --------------------------------------------------------------------------- reading


def read_root(location: StoreLocation) -> dict[str, Any]:
    """The root group's attributes, after checking that this is a store of a known schema."""
    if not location.exists("zarr.json"):
        raise InputError(
            "not a tsesnet store (no zarr.json: missing or another kind of folder); "
            "create one with `tsesnet ingest SRC STORE`",
            path=location.url,
        )
    if location.is_link("zarr.json"):
        raise InputError("the store's zarr.json is a symbolic link", path=location.url)
    try:
        meta = location.read_json("zarr.json")
        attrs = meta["attributes"] if meta.get("node_type") == "group" else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise InputError(
            f"not a tsesnet store (zarr.json unreadable: {type(err).__name__}); "
            "create one with `tsesnet ingest`",
            path=location.url,
        ) from err
    if not isinstance(attrs, dict) or "schema_version" not in attrs:
        raise InputError("not a tsesnet store (no schema_version attribute)", path=location.url)
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise InputError(
            f"store schema version {attrs['schema_version']} is not {SCHEMA_VERSION}; re-ingest",
            path=location.url,
        )
    return attrs


@dataclass
class StoreIndex:
    """A checked index (`load_index`).

    Attributes:
        raw: case ID -> the entry as read (JSON).
        entries: case ID -> `IndexEntry`, for the cases whose entry parsed.
        attrs: case ID -> the case group's attributes, for the cases whose group was read.
        n_folds: number of folds.
        fingerprint: the fingerprint of the cases listed.
        fingerprint_version: the root's fingerprint version (1: written before version 2).
        problems: what is wrong, per case (empty for a sound index).
    """

    raw: dict[str, Any]
    entries: dict[str, IndexEntry]
    attrs: dict[str, dict[str, Any]]
    n_folds: int
    fingerprint: str
    problems: list[Problem] = field(default_factory=list)
    fingerprint_version: int = FINGERPRINT_VERSION


def load_index(location: StoreLocation, *, strict: bool = True) -> StoreIndex:
    """Reads and checks the index against every case group's attributes (module docstring).

    Args:
        location: the store.
        strict: raise on the first per-case problem (else they are listed in `problems`).

    Raises:
        InputError: a problem of the whole index (always), or of one case (``strict``), one
            line naming the store or the case and file.
    """
    root = read_root(location)
    raw, n_folds = _table(root, location)
    for cid in raw:
        check_case_id(cid, store=location.url)
    _no_case_collisions(raw, location)
    index = StoreIndex(raw, {}, {}, n_folds, "")
    for cid, value in raw.items():
        try:
            index.entries[cid] = IndexEntry.parse(value, n_folds)
        except ValueError as err:
            index.problems.append(Problem(cid, location.path("zarr.json"), f"index: {err}"))
    _check_against_cases(location, index)
    _check_folds(location, index)
    version = root.get("fingerprint_version", 1)
    if version not in (1, FINGERPRINT_VERSION):
        raise InputError(
            f"fingerprint version {version!r} is unknown to this tsesnet (it knows 1 and "
            f"{FINGERPRINT_VERSION}): written by a newer release?",
            path=location.url,
        )
    index.fingerprint_version = version
    index.fingerprint = store_fingerprint(index.entries, n_folds, version)
    stated = root.get("fingerprint")
    if stated is not None and not index.problems and stated != index.fingerprint:
        raise InputError(
            f"the index's fingerprint {stated} is not the one of the cases it lists "
            f"({index.fingerprint}): the index was edited; {_REBUILD}",
            path=location.url,
        )
    if strict and index.problems:
        first, more = index.problems[0], len({p.case_id for p in index.problems}) - 1
        tail = f"; {more} more damaged case(s), `tsesnet store verify` lists them" if more else ""
        raise InputError(
            f"{first.problem}{tail}{_writer_note(location)}", case=first.case_id, path=first.path
        )
    return index


def _writer_note(location: StoreLocation) -> str:
    """While a writer holds the store, its cases and index disagree until it ends: say so."""
    from data_store.lock import read_holder

    exists, holder = read_holder(location)
    if not exists or (holder is not None and holder.gone()):
        return ""
    who = holder.describe() if holder else "another process"
    return f"; {who} holds the store's writer lock: retry when it is done"


def _table(root: dict[str, Any], location: StoreLocation) -> tuple[dict[str, Any], int]:
    """The index table and n_folds, checked for type."""
    raw, n_folds = root.get("cases", {}), root.get("n_folds", 0)
    if not isinstance(raw, dict):
        raise InputError("the index ('cases') is not a table of case entries", path=location.url)
    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 0:
        raise InputError(f"n_folds {n_folds!r} is not a whole number >= 0", path=location.url)
    return raw, int(n_folds)


def _no_case_collisions(raw: dict[str, Any], location: StoreLocation) -> None:
    seen: dict[str, str] = {}
    for cid in sorted(raw):
        other = seen.setdefault(cid.lower(), cid)
        if other != cid:
            raise InputError(
                f"the index lists case IDs {other!r} and {cid!r}, which differ only in letter "
                "case (they are one folder on a case-insensitive file system)",
                path=location.url,
            )


def _check_against_cases(location: StoreLocation, index: StoreIndex) -> None:
    """Every entry against its case group's own attributes (one batch read of zarr.json).

    A case folder or zarr.json that is a symbolic link is refused before it is read: it could
    point anywhere on the machine.
    """
    links = {c for c in index.entries if location.is_link(c) or location.is_link(f"{c}/zarr.json")}
    for cid in sorted(links):
        index.problems.append(Problem(cid, location.path(cid), "case folder is a symbolic link"))
    metas = location.read_many([f"{c}/zarr.json" for c in index.entries if c not in links])
    for cid, entry in index.entries.items():
        if cid in links:
            continue
        meta_key = f"{cid}/zarr.json"
        where = location.path(meta_key)
        attrs, why = _case_attrs(metas[meta_key], cid)
        if why:
            index.problems.append(Problem(cid, where, why))
            continue
        index.attrs[cid] = attrs
        why = _entry_differs(entry, attrs)
        if why:
            why = f"{why} (the index is out of date or edited; {_REBUILD})"
            index.problems.append(Problem(cid, where, why))


def _case_attrs(data: bytes | None, cid: str) -> tuple[dict[str, Any], str | None]:
    """(attributes, None) of a case group's zarr.json, or ({}, what is wrong)."""
    if data is None:
        return {}, "listed in the index but missing from the store"
    try:
        meta = json.loads(data)
        attrs = meta["attributes"] if meta.get("node_type") == "group" else None
    except (ValueError, KeyError, AttributeError, TypeError):
        attrs = None
    if not isinstance(attrs, dict):
        return {}, "case group metadata unreadable (not a Zarr group's zarr.json)"
    if attrs.get("case_id") != cid or not attrs.get("complete"):
        return {}, f"the group is not a complete case {cid!r} (case_id {attrs.get('case_id')!r})"
    try:
        case_summary(attrs)
    except (KeyError, TypeError, ValueError) as err:
        return {}, f"case attributes malformed ({type(err).__name__}: {err})"
    return attrs, None


def _entry_differs(entry: IndexEntry, attrs: dict[str, Any]) -> str | None:
    """What the index entry says differently from the case's attributes, or None."""
    try:
        theirs = IndexEntry.parse({**case_summary(attrs), "fold": None}, 0)
    except ValueError as err:
        return f"case attributes malformed ({err})"
    for name in ("phases", "shape", "spacing", "dtype", "labelled", "site", "split"):
        mine, said = getattr(entry, name), getattr(theirs, name)
        if mine != said:
            return f"index says {name} {_show(mine)}, the case's attributes say {_show(said)}"
    if entry.checksums != theirs.checksums:
        return "index source checksums differ from the case's attributes"
    mine, said = (
        (entry.integrity, entry.content, entry.attributes),
        (
            theirs.integrity,
            theirs.content,
            theirs.attributes,
        ),
    )
    if mine != said:
        return "index integrity digest differs from the case's record"
    if entry.spacing_assumed != theirs.spacing_assumed:
        return "index says spacing_assumed differently from the case's attributes"
    return None


def _check_folds(location: StoreLocation, index: StoreIndex) -> None:
    """Every entry's fold is the one the fold rule gives."""
    rule = assign_folds(fold_ids(index.entries), index.n_folds)
    for cid, entry in index.entries.items():
        if entry.fold != rule.get(cid):
            index.problems.append(
                Problem(
                    cid,
                    location.path("zarr.json"),
                    f"index puts the case in fold {entry.fold}, the fold rule gives "
                    f"{rule.get(cid)} ({_REBUILD})",
                )
            )


# --------------------------------------------------------------------------- value checks


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
