"""A case's integrity record (what a complete case holds) and the checks against it.

Zarr reads a missing chunk file as the fill value, so a deleted chunk is all zeros with no
error, and a truncated one fails deep inside a codec. Ingest therefore records, in each case's
``integrity`` attribute, every array it wrote (``image``, ``mask``, ``foreground``) as read back
from the store after writing:

- ``shape``, ``dtype`` and ``chunks`` (the chunk grid);
- ``files``: every chunk file that exists (``c/0/1/0/0`` -> [bytes, sha256 of the file]). Zarr
  writes no file for a chunk that is all fill value, so the list is what was on disk, not the
  full grid;
- ``meta_sha256``: sha256 of the array's ``zarr.json`` (codecs, fill value, shape);
- ``sha256``: sha256 of the decoded array (C-order bytes).

and (version 2) ``attributes``: sha256 of the case's attributes (`attrs_digest`: all but the
record itself, ``complete`` and the source files' paths), so an edited percentile, affine or
bounding box is refused like a deleted chunk. Version-1 records (written before attributes
were covered) still read; `tsesnet store verify --record` or a re-ingest upgrades them.

Both kinds of checksum, because they answer different questions: a chunk file's checksum names
the damaged file (``image chunk c/0/1/0/0``) and is checked without decoding anything; the
decoded checksum is what the data is, independent of codec and chunking (two sites ingesting
the same cohort with other Blosc builds store other bytes, the same values). So the store
fingerprint covers the decoded checksums (`CaseRecord.content_digest`), and the index keeps
a digest of the whole record (`CaseRecord.digest`) to tell an edited record from its entry.

Checks, each a list of `Problem` (one line each: case, file, problem):

- `check_files` (cheap; `Store.check_case` runs it once per case per process before reading
  data): the recorded arrays' metadata files are present with their recorded sha256 (a codec
  added to ``image/zarr.json`` is refused), chunk files present with the recorded sizes, no
  unrecorded chunk files, no symbolic links; and `check_arrays`: the arrays open with the
  recorded shape, dtype and chunks, consistent with the case's attributes, which must have the
  recorded digest; `check_values`: the attribute values readers use are sound (finite
  percentiles, an affine that gives the stored shape and spacing, a bbox inside the volume).
- `check_deep` (``tsesnet store verify --deep``): every file's sha256 and every decoded array's
  sha256 as recorded.
- `check_unrecorded`: what can be said of a case stored before records existed (arrays present,
  shapes and dtypes as the attributes say); deleted chunks cannot be told from zeros there.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.location import StoreLocation

__all__ = [
    "ARRAYS",
    "RECORD_VERSION",
    "ArrayRecord",
    "CaseRecord",
    "Problem",
    "check_arrays",
    "check_deep",
    "check_files",
    "check_recorded",
    "check_stored",
    "check_unrecorded",
    "check_values",
    "record_case",
]

RECORD_VERSION = 2
_READ_VERSIONS = (1, 2)  # 1: written before the attributes were covered
ARRAYS = ("image", "mask", "foreground")
_CHUNK_KEY = re.compile(r"^c(/\d+)+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a stored case.

    Attributes:
        case_id: the case.
        path: the file or folder concerned (a local path or a URL).
        problem: what is wrong, e.g. "image chunk c/0/1/0/0 missing".
    """

    case_id: str
    path: str
    problem: str

    def error(self) -> InputError:
        """The `InputError` a reader raises for it."""
        return InputError(self.problem, case=self.case_id, path=self.path)

    def __str__(self) -> str:
        return str(self.error())


@dataclass(frozen=True)
class ArrayRecord:
    """What one stored array held when it was written.

    Attributes:
        shape: the array's shape.
        dtype: its dtype (numpy name).
        chunks: its chunk shape.
        sha256: sha256 of the decoded array's C-order bytes.
        meta_sha256: sha256 of the array's ``zarr.json``.
        files: chunk key (``c/0/1/0/0``) -> (bytes, sha256 of the file).
    """

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    sha256: str
    meta_sha256: str
    files: dict[str, tuple[int, str]]

    def to_attrs(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunks": list(self.chunks),
            "sha256": self.sha256,
            "meta_sha256": self.meta_sha256,
            "files": {k: [size, sha] for k, (size, sha) in sorted(self.files.items())},
        }

    @classmethod
    def from_attrs(cls, d: Any) -> ArrayRecord:
        """Parses `to_attrs` output; ValueError says what is malformed (the record is input:
        its chunk keys become paths, so only ``c/N/N/...`` keys are accepted)."""
        if not isinstance(d, dict):
            raise ValueError("an array record is not an object")
        files = d.get("files")
        if not isinstance(files, dict):
            raise ValueError("no chunk file list")
        parsed = {}
        for key, entry in files.items():
            if not _CHUNK_KEY.match(str(key)):
                raise ValueError(f"chunk key {key!r} is not of the form c/0/1/...")
            if not (isinstance(entry, list) and len(entry) == 2 and _is_size(entry[0])):
                raise ValueError(f"chunk {key}: expected [bytes, sha256]")
            parsed[key] = (int(entry[0]), _hex(entry[1], f"chunk {key}"))
        return cls(
            shape=_ints(d.get("shape"), "shape"),
            dtype=_dtype_name(d.get("dtype")),
            chunks=_ints(d.get("chunks"), "chunks"),
            sha256=_hex(d.get("sha256"), "sha256"),
            meta_sha256=_hex(d.get("meta_sha256"), "meta_sha256"),
            files=parsed,
        )


@dataclass(frozen=True)
class CaseRecord:
    """The integrity record of one case.

    Attributes:
        arrays: the arrays, by name (`ARRAYS`).
        attributes: `attrs_digest` of the case's attributes; None in a version-1 record
            (written before the attributes were covered).
    """

    arrays: dict[str, ArrayRecord]
    attributes: str | None = None

    @property
    def version(self) -> int:
        return 1 if self.attributes is None else RECORD_VERSION

    def to_attrs(self) -> dict[str, Any]:
        doc = {
            "version": self.version,
            "arrays": {n: a.to_attrs() for n, a in sorted(self.arrays.items())},
        }
        if self.attributes is not None:  # a version-1 record reads back byte for byte
            doc["attributes"] = self.attributes
        return doc

    @classmethod
    def from_attrs(cls, d: Any) -> CaseRecord:
        """Parses a case's ``integrity`` attribute (ValueError if it is malformed)."""
        if not isinstance(d, dict) or d.get("version") not in _READ_VERSIONS:
            raise ValueError(f"not a version-{RECORD_VERSION} integrity record")
        arrays = d.get("arrays")
        if not isinstance(arrays, dict) or "image" not in arrays:
            raise ValueError("the record lists no image array")
        unknown = set(arrays) - set(ARRAYS)
        if unknown:
            raise ValueError(f"the record lists unknown arrays {sorted(unknown)}")
        attributes = None
        if d["version"] >= 2:
            attributes = _hex(d.get("attributes"), "attributes")
        return cls({n: ArrayRecord.from_attrs(a) for n, a in arrays.items()}, attributes)

    def digest(self) -> str:
        """sha256 of the whole record's canonical JSON (files included): the index keeps it."""
        return _json_sha(self.to_attrs())

    def content_digest(self) -> str:
        """sha256 of each array's shape, dtype and decoded checksum: what the data is, whatever
        the codec; the store fingerprint covers it."""
        return _json_sha({n: [list(a.shape), a.dtype, a.sha256] for n, a in self.arrays.items()})


def record_digests(attrs: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """(`CaseRecord.digest`, `CaseRecord.content_digest`, `CaseRecord.attributes`) of a case's
    record from its attributes; None if it has none, all "malformed" for a bad one."""
    if "integrity" not in attrs:
        return None
    try:
        record = CaseRecord.from_attrs(attrs["integrity"])
    except ValueError:
        return "malformed", "malformed", "malformed"
    return record.digest(), record.content_digest(), record.attributes


def attrs_digest(attrs: dict[str, Any]) -> str:
    """sha256 of a case's attributes as readers use them: all but ``integrity`` (the record
    that holds this digest), ``complete`` and the source files' paths (where the cohort sat
    on the ingesting machine: two sites storing the same cohort get the same digest)."""
    doc = {k: v for k, v in attrs.items() if k not in ("integrity", "complete")}
    if isinstance(doc.get("sources"), list):
        doc["sources"] = [
            {k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s
            for s in doc["sources"]
        ]
    return _json_sha(doc)


def _json_sha(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- recording


def record_case(
    location: StoreLocation,
    group: str,
    case_id: str,
    expected: dict[str, np.ndarray] | None,
    attrs: dict[str, Any] | None = None,
) -> CaseRecord:
    """Reads a case group's arrays back from the store and records them (see module docstring).

    Args:
        location: the store.
        group: the group's entry name (a temporary name while writing).
        case_id: the case, for messages.
        expected: what was just written, by array name; every array read back must equal it.
            None records what is there (`tsesnet store verify --record`).
        attrs: the case's attributes (without ``integrity``), recorded by their digest; None
            makes a version-1 record (arrays only).

    Raises:
        InputError: an array reads back different from what was written, or cannot be read.
    """
    import zarr

    arrays = {}
    names = list(expected) if expected is not None else list(ARRAYS)
    for name in names:
        key = f"{group}/{name}"
        where = location.path(key)
        files, links = location.list_files(key)
        if "zarr.json" not in files:
            if expected is None and name != "image":
                continue  # an unlabelled case has no mask
            raise InputError(f"{name} array missing after writing", case=case_id, path=where)
        if links:
            raise InputError(f"{name}: symbolic link {links[0]!r}", case=case_id, path=where)
        try:
            array = zarr.open_array(location.zarr_target(key), mode="r")
            decoded = np.ascontiguousarray(array[...])
        except Exception as err:  # a codec or metadata error: one line, never a traceback
            why = f"{name} cannot be read back ({type(err).__name__}: {err})"
            raise InputError(why, case=case_id, path=where) from err
        if expected is not None and not _same(decoded, expected[name]):
            raise InputError(
                f"{name} reads back different from what was written", case=case_id, path=where
            )
        arrays[name] = _array_record(location, key, array, decoded, files)
    return CaseRecord(arrays, None if attrs is None else attrs_digest(attrs))


def _array_record(
    location: StoreLocation, key: str, array: Any, decoded: np.ndarray, files: dict[str, int]
) -> ArrayRecord:
    """The `ArrayRecord` of an array already read back (``files``: its listing)."""
    chunk_keys = sorted(k for k in files if k != "zarr.json")
    contents = location.read_many([f"{key}/{k}" for k in [*chunk_keys, "zarr.json"]])
    digests = {k: _sha(contents[f"{key}/{k}"]) for k in [*chunk_keys, "zarr.json"]}
    return ArrayRecord(
        shape=tuple(int(s) for s in array.shape),
        dtype=str(np.dtype(array.dtype)),
        chunks=tuple(int(c) for c in array.chunks),
        sha256=hashlib.sha256(decoded.tobytes()).hexdigest(),
        meta_sha256=digests["zarr.json"],
        files={k: (int(files[k]), digests[k]) for k in chunk_keys},
    )


# --------------------------------------------------------------------------- checks


def check_files(location: StoreLocation, case_id: str, record: CaseRecord) -> list[Problem]:
    """The cheap file check: recorded files present with their sizes, nothing unrecorded, and
    each array's metadata (``zarr.json``: codecs, fill value, shape) as recorded: metadata
    decides how every chunk decodes, so it is checked by its sha256 (three small reads)."""
    problems = []
    metas = location.read_many([f"{case_id}/{name}/zarr.json" for name in record.arrays])
    for name, rec in record.arrays.items():
        key = f"{case_id}/{name}"
        files, links = location.list_files(key)

        def add(rel: str, text: str, key=key) -> None:
            problems.append(Problem(case_id, location.path(f"{key}/{rel}".rstrip("/")), text))

        for link in links:
            add(link, f"{name} chunk {link} is a symbolic link" if link else f"{name} is a link")
        if "zarr.json" not in files:
            add("", f"{name} array missing (no zarr.json)")
            continue
        meta = metas.get(f"{key}/zarr.json")
        if meta is not None and _sha(meta) != rec.meta_sha256:
            add("zarr.json", f"{name} metadata zarr.json differs from the record (edited)")
        for chunk, (size, _) in sorted(rec.files.items()):
            if chunk not in files:
                add(chunk, f"{name} chunk {chunk} missing")
            elif files[chunk] != size:
                add(chunk, f"{name} chunk {chunk} is {files[chunk]} bytes, recorded {size}")
        for extra in sorted(set(files) - set(rec.files) - {"zarr.json"}):
            add(extra, f"{name} file {extra} is not in the record")
    return problems


def check_arrays(
    location: StoreLocation, case_id: str, record: CaseRecord, attrs: dict[str, Any], arrays: dict
) -> list[Problem]:
    """Opened arrays (name -> zarr array or None) against the record and the case attributes."""
    problems = []
    for name, rec in record.arrays.items():
        array = arrays.get(name)
        path = location.path(f"{case_id}/{name}")
        if array is None:
            problems.append(Problem(case_id, path, f"{name} array missing"))
            continue
        got = (tuple(array.shape), str(np.dtype(array.dtype)), tuple(array.chunks))
        want = (rec.shape, rec.dtype, rec.chunks)
        if got != want:
            text = f"{name} is {_describe(*got)}, recorded {_describe(*want)}"
            problems.append(Problem(case_id, path, text))
    return problems + _attrs_vs_record(location, case_id, record, attrs)


def _attrs_vs_record(
    location: StoreLocation, case_id: str, record: CaseRecord, attrs: dict[str, Any]
) -> list[Problem]:
    """The case attributes (phases, shape, dtype, labelled) must describe the recorded arrays."""
    image = record.arrays["image"]
    path = location.path(f"{case_id}/zarr.json")
    said = (int(attrs["phases"]), *(int(s) for s in attrs["shape"]))
    problems = []
    if image.shape != said or image.dtype != str(attrs["dtype"]):
        problems.append(
            Problem(
                case_id,
                path,
                f"attributes say image {_describe(said, attrs['dtype'])}, the record "
                f"{_describe(image.shape, image.dtype)}",
            )
        )
    if bool(attrs["labelled"]) != ("mask" in record.arrays):
        has = "has" if "mask" in record.arrays else "has no"
        text = f"attributes say labelled={bool(attrs['labelled'])}, the record {has} mask"
        problems.append(Problem(case_id, path, text))
    if record.attributes is not None and attrs_digest(attrs) != record.attributes:
        text = (
            "case attributes differ from the integrity record (edited after ingest: "
            "percentiles, geometry, bounding box or another value readers use)"
        )
        problems.append(Problem(case_id, path, text))
    return problems


def check_values(location: StoreLocation, case_id: str, attrs: dict[str, Any]) -> list[Problem]:
    """The attribute values readers use are sound, record or not: finite percentiles with
    lo <= hi, a geometry whose affine gives the stored shape and spacing, and a foreground
    bounding box inside the volume (an old store's case has no record to vouch for them)."""
    path = location.path(f"{case_id}/zarr.json")
    why = _bad_values(attrs)
    return [Problem(case_id, path, f"case attributes: {why}")] if why else []


def _bad_values(attrs: dict[str, Any]) -> str | None:
    from data_store.geometry import Geometry

    shape = tuple(int(s) for s in attrs["shape"])
    spacing = tuple(float(s) for s in attrs["spacing"])
    p = attrs.get("percentiles")
    if not (isinstance(p, list) and len(p) == 2 and all(_finite(v) for v in p) and p[0] <= p[1]):
        return f"percentiles {p!r} are not two finite numbers lo <= hi"
    try:
        geometry = Geometry.from_attrs(attrs["geometry"])
        derived = Geometry.from_affine(geometry.affine, geometry.shape)
    except (KeyError, TypeError, ValueError, InputError) as err:
        return f"geometry unreadable ({type(err).__name__}: {err})"
    if not np.array_equal(derived.ornt, geometry.ornt) or derived.canonical_shape != shape:
        got = "x".join(map(str, derived.canonical_shape))
        return (
            f"geometry's affine and shape give a {got} volume (or another orientation), the "
            f"stored one is {'x'.join(map(str, shape))}"
        )
    said = (derived.spacing, geometry.spacing)
    if not all(np.allclose(s, spacing, rtol=1e-6, atol=0) for s in said):
        shown = "x".join(f"{v:.4g}" for v in derived.spacing)
        return f"geometry's affine gives spacing {shown} mm, the attributes say {spacing}"
    bbox = attrs.get("foreground_bbox")
    if bbox is not None:
        inside = (
            isinstance(bbox, list)
            and len(bbox) == 3
            and all(
                isinstance(b, list) and len(b) == 2 and all(_is_size(v) for v in b) for b in bbox
            )
            and all(0 <= lo < hi <= n for (lo, hi), n in zip(bbox, shape, strict=True))
        )
        if not inside:
            return f"foreground_bbox {bbox!r} is not inside the {'x'.join(map(str, shape))} volume"
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


def check_deep(location: StoreLocation, case_id: str, record: CaseRecord) -> list[Problem]:
    """The deep check: every recorded file's sha256 and every decoded array's sha256."""
    import zarr

    problems = []
    for name, rec in record.arrays.items():
        key = f"{case_id}/{name}"
        wanted = {**{k: sha for k, (_, sha) in rec.files.items()}, "zarr.json": rec.meta_sha256}
        contents = location.read_many([f"{key}/{k}" for k in wanted])
        before = len(problems)
        for chunk, sha in sorted(wanted.items()):
            data, where = contents[f"{key}/{chunk}"], location.path(f"{key}/{chunk}")
            what = f"{name} metadata zarr.json" if chunk == "zarr.json" else f"{name} chunk {chunk}"
            if data is None:
                problems.append(Problem(case_id, where, f"{what} missing"))
            elif _sha(data) != sha:
                problems.append(Problem(case_id, where, f"{what} checksum differs from the record"))
        if len(problems) > before:
            continue  # the decoded checksum can only differ too
        where = location.path(key)
        try:
            array = zarr.open_array(location.zarr_target(key), mode="r")
            decoded = np.ascontiguousarray(array[...])
        except Exception as err:
            text = f"{name} cannot be decoded ({type(err).__name__})"
            problems.append(Problem(case_id, where, text))
            continue
        if hashlib.sha256(decoded.tobytes()).hexdigest() != rec.sha256:
            text = f"{name} decodes to other values than recorded"
            problems.append(Problem(case_id, where, text))
    return problems


def check_recorded(
    location: StoreLocation, case_id: str, record: CaseRecord, attrs: dict[str, Any]
) -> list[Problem]:
    """Everything a recorded case can be checked for against its record, reading every file:
    `check_files`, `check_arrays` (attributes included), then `check_deep`."""
    import zarr

    problems = check_files(location, case_id, record)
    if problems:
        return problems
    try:
        group = zarr.open_group(location.zarr_target(case_id), mode="r")
        arrays = {name: group.get(name, None) for name in ARRAYS}
    except Exception as err:  # a damaged zarr.json: one line, never a traceback
        where = location.path(f"{case_id}/zarr.json")
        return [Problem(case_id, where, f"case group unreadable ({type(err).__name__})")]
    problems = check_arrays(location, case_id, record, attrs, arrays)
    return problems or check_deep(location, case_id, record)


def check_unrecorded(
    location: StoreLocation,
    case_id: str,
    attrs: dict[str, Any],
    arrays: dict[str, Any],
    *,
    decode: bool = False,
) -> list[Problem]:
    """What can be checked of a case without a record: the arrays the attributes imply are
    there with their shapes and dtype (and, with ``decode``, decode without error)."""
    t, shape = int(attrs["phases"]), tuple(int(s) for s in attrs["shape"])
    want = {"image": ((t, *shape), str(attrs["dtype"]))}
    if attrs["labelled"]:
        want["mask"] = (shape, "uint8")
    problems = []
    for name, (wshape, wdtype) in want.items():
        array, path = arrays.get(name), location.path(f"{case_id}/{name}")
        if array is None:
            problems.append(Problem(case_id, path, f"{name} array missing"))
        elif (tuple(array.shape), str(np.dtype(array.dtype))) != (wshape, wdtype):
            got = _describe(tuple(array.shape), np.dtype(array.dtype))
            text = f"{name} is {got}, attributes say {_describe(wshape, wdtype)}"
            problems.append(Problem(case_id, path, text))
        elif decode:
            try:
                array[...]
            except Exception as err:
                text = f"{name} cannot be decoded ({type(err).__name__})"
                problems.append(Problem(case_id, path, text))
    return problems


def check_stored(location: StoreLocation, case_id: str, attrs: dict[str, Any]) -> list[Problem]:
    """The cheap file check from a case's attributes alone (no index needed): what ingest runs
    to decide whether a stored case can be kept as it is or must be written again."""
    if "integrity" not in attrs:
        wanted = ["image", *(["mask"] if attrs.get("labelled") else [])]
        return [
            Problem(case_id, location.path(f"{case_id}/{n}"), f"{n} array missing")
            for n in wanted
            if not location.exists(f"{case_id}/{n}/zarr.json")
        ]
    try:
        record = CaseRecord.from_attrs(attrs["integrity"])
    except ValueError as err:
        where = location.path(f"{case_id}/zarr.json")
        return [Problem(case_id, where, f"integrity record malformed ({err})")]
    return check_files(location, case_id, record)


# --------------------------------------------------------------------------- helpers


def _same(decoded: np.ndarray, expected: np.ndarray) -> bool:
    expected = np.asarray(expected)
    same_kind = decoded.shape == expected.shape and decoded.dtype == expected.dtype
    return same_kind and np.array_equal(decoded, expected)


def _sha(data: bytes | None) -> str:
    return hashlib.sha256(data or b"").hexdigest()


def _describe(shape, dtype, chunks=None) -> str:
    text = f"{'x'.join(map(str, shape)) or 'scalar'} {np.dtype(dtype)}"
    return text if chunks is None else f"{text} in {'x'.join(map(str, chunks))} chunks"


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(_is_size(i) for i in v):
        raise ValueError(f"{what} is not a list of whole numbers")
    return tuple(v)


def _hex(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise ValueError(f"{what}: not a sha256 hex digest")
    return v


def _dtype_name(v: Any) -> str:
    if not isinstance(v, str):  # np.dtype(None) would be float64
        raise ValueError(f"dtype {v!r} is not a dtype name")
    try:
        return str(np.dtype(v))
    except TypeError as err:
        raise ValueError(f"dtype {v!r} is not a numpy dtype") from err
