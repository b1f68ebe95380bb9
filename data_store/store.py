"""The Zarr v3 case store: its on-disk format, the writer of one case, and the reader API.

Shape legend: T phases, Z Y X voxels in canonical order (see `data_store.geometry`).

Layout (one Zarr v3 hierarchy; a local path or any fsspec URL, e.g. ``s3://bucket/store``)::

    STORE/zarr.json          root group; attributes: schema_version, cases (the index: one
                             summary per case), n_folds, fold_rule, fingerprint
                             (`data_store.index`)
    STORE/.lock              while an ingest writes: who holds the store (`data_store.lock`)
    STORE/CASE/zarr.json     one group per case; attributes below
    STORE/CASE/image         (T, Z, Y, X) the scanner's dtype and values (lossless)
    STORE/CASE/mask          (Z, Y, X) uint8 in {0, 1}; absent for unlabelled cases
    STORE/CASE/foreground    (N, 3) int32 (z, y, x) of up to 10,000 mask voxels (nnU-Net's
                             "class locations"): the sampler centres foreground patches
                             without decoding the whole mask

Case attributes: ``case_id``, ``schema_version``, ``spacing`` (mm, Z Y X), ``geometry``
(`Geometry.to_attrs`: original affine, shape, orientation transform, qform/sform),
``canonical_orientation``, ``phases`` (stored), ``phase_present`` (nominal phases, e.g. BTS
P0..P5), ``phase_index`` (nominal index of each stored phase), ``times`` (s, or null),
``percentiles`` (0.1 %/99.9 % over all phases), ``intensity_min``/``intensity_max``,
``dtype``, ``sources`` (role, path, sha256 of every source file), ``site``, ``layout``,
``labelled``, ``foreground_voxels``, ``foreground_bbox`` ([start, stop) per axis, or null),
``split`` ("train" or "test"; absent in stores written before it: "train"), ``source_4d``
(true when all phases came from one 4D file), ``spacing_assumed`` (true when the spacing came
from ``--assume-spacing``), ``integrity`` (the record of every array and chunk file written and
the digest of the other attributes, `data_store.integrity`; absent in stores written before
it, without the digest in stores of the previous release), ``dicom`` (studies ingested from
DICOM only: the UIDs and grid a DICOM SEG of a result references, `data_store.dicom`) and
``complete`` (written last).

Writing a case is crash-safe: it is written under ``.tmp-CASE@HOST.PID.UUID``, read back and
compared with what was meant (its integrity record is made from that read), and renamed to
``CASE`` (an atomic ``rename`` on a local store; on object stores, where there is no rename,
the copy is checked against the record once in place, and the root index is what makes a case
visible). Replacing a case whose sources changed moves the old group to
``.old-CASE@HOST.PID.UUID`` first. `clean_leftovers` removes only entries of this process or of
a process on this host that is gone, and renames an ``.old-`` entry back when its case is
missing: a stored case is never lost.

Reading: `open_store` checks the index (`data_store.index.load_index`), and the first read of a
case in a process (its data or its attributes) runs `Store.check_case` (the cheap integrity
check), so a damaged or edited case is one line naming the case and file, never zeros where a
chunk was deleted, a codec traceback, or a mask written on a grid someone moved.

Chunks and codec, measured (``python tests/benchmarks/measure_chunks.py``: the phantom of
``tests/benchmarks/bench_loader.py``, 6x100x320x320 int16, half air, tissue, per-phase
enhancement, noise sigma 20; 60 random 6-phase 48x96x96 patch reads per layout, the layouts
interleaved patch by patch so that the shared machine's load (average 12 on 2 CPUs) hits them
alike; raw 123 MB):

    ==================================  ====  =====  ==========  ======  ============
    chunk (T,Z,Y,X), codec              MB    ratio  median ms   p10 ms  whole case s
    ==================================  ====  =====  ==========  ======  ============
    T,24,64,64 blosc-lz4-5 shuffle      72    1.70   28.5        13.6    0.26
    T,24,48,48 blosc-lz4-5 shuffle      74    1.67   27.2        19.3    0.29
    T,16,64,64 blosc-lz4-5 shuffle      72    1.70   32.7        16.2    0.32
    T,32,96,96 blosc-lz4-5 shuffle      74    1.66   32.3        18.8    0.28
    T,48,96,96 blosc-lz4-5 shuffle      74    1.66   39.1        21.6    0.33
    T,48,96,96 zstd-3                   64    1.92   176.6       79.8    0.45
    T,24,64,64 zstd-3                   63    1.95   83.0        47.4    0.40
    T,24,64,64 blosc-zstd-1 shuffle     56    2.21   80.7        34.9    0.37
    T,24,64,64 blosc-lz4-5 bitshuffle   60    2.06   34.1        19.2    0.23
    1,48,96,96 blosc-lz4-5 (per phase)  74    1.66   47.8        34.6    0.31
    T,24,64,64 uncompressed             147   0.83   12.2        7.6     0.19
    ==================================  ====  =====  ==========  ======  ============

An earlier, non-interleaved run on a quieter machine ranked them the same (lz4 T,24,64,64:
13-16 ms; T,24,48,48: 15-19 ms; T,48,96,96 zstd-3: 40-62 ms; in-memory slice: 0.8 ms).

Decision: chunks (T, 24, 64, 64), all phases in one chunk (a patch always needs every phase;
per-phase chunks read 1.7x slower), Blosc-LZ4 level 5 with byte shuffle: the fastest
compressed layout, 1.7x smaller than raw. zstd saves 12-20 % more disk but decodes 3-6x
slower; bitshuffle saves 17 % for 20 % slower reads; uncompressed reads 2x faster but doubles
the disk (and network) bytes. Chunks much smaller than the patch pay zarr's per-chunk
overhead; patch-sized chunks over-read up to 8x. No sharding: one writer per case anyway,
and it read slower (T,24,48,48 in T,48,96,96 shards: 20-24 ms vs 15-19 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.geometry import Geometry
from data_store.index import (
    FOLD_RULE,
    SCHEMA_VERSION,
    SPLITS,
    IndexEntry,
    assign_folds,
    case_summary,
    init_store,
    load_index,
    scan_cases,
    store_fingerprint,
    write_index,
)
from data_store.integrity import (
    ARRAYS,
    CaseRecord,
    Problem,
    attrs_digest,
    check_arrays,
    check_deep,
    check_files,
    check_recorded,
    check_unrecorded,
    check_values,
    record_case,
)
from data_store.location import (
    Owner,
    StoreLocation,
    check_case_id,
    parse_entry,
    temp_name,
)

__all__ = [
    "FOLD_RULE",
    "SCHEMA_VERSION",
    "Case",
    "Leftovers",
    "Store",
    "StoreLocation",
    "assign_folds",
    "case_summary",
    "check_case_id",
    "clean_leftovers",
    "cli_export",
    "cli_info",
    "init_store",
    "open_store",
    "scan_cases",
    "store_fingerprint",
    "write_case",
    "write_index",
]

IMAGE_CHUNK_ZYX = (24, 64, 64)  # spatial chunk; the phase axis is never split (see docstring)
FOREGROUND_SAMPLES = 10_000
CANONICAL = "nibabel closest RAS+ (flips/permutations only), transposed to (Z=S, Y=A, X=R)"


def _codecs():
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]


# --------------------------------------------------------------------------- writing


def phase_presence(src: Any, t: int) -> tuple[list[bool], list[int]]:
    """(nominal phase presence, nominal index of each of the t stored phases)."""
    present = list(src.phase_present) if src.phase_present else [True] * t
    index = [i for i, p in enumerate(present) if p]
    if len(index) != t:  # no nominal numbering given: phases are 0..t-1
        return [True] * t, list(range(t))
    return present, index


def source_roles(src: Any, t: int | None = None) -> list[tuple[str, str]]:
    """(role, path) of a case's source files: phaseN (N nominal), image4d, mask."""
    if src.layout == "nifti4d":
        roles = [("image4d", str(src.phase_files[0]))]
    elif src.layout == "dicom":  # many files per phase: numbered in path order
        roles = [(f"dicom{n}", str(p)) for n, p in enumerate(src.phase_files)]
    else:
        if t is None:
            t = len(src.phase_files)
        _, index = phase_presence(src, t)
        roles = [(f"phase{i}", str(p)) for i, p in zip(index, src.phase_files, strict=False)]
    if src.mask_file is not None:
        roles.append(("mask", str(src.mask_file)))
    return roles


def write_case(location: StoreLocation | str, loaded: Any) -> dict[str, Any]:
    """Writes one validated case under a temporary name, verifies it, renames it into place.

    The arrays are read back from the store and compared with what was meant before the case
    is marked complete; its integrity record is made from that read (`record_case`).

    Args:
        location: the store (it must exist: `init_store`).
        loaded: a `data_store.loading.LoadedCase` (image (T, Z, Y, X), mask (Z, Y, X) or None).

    Returns:
        The case's root-index summary (`case_summary`).

    Raises:
        InputError: the copy read back or renamed into place is not what was written.
    """
    import zarr

    if not isinstance(location, StoreLocation):
        location = StoreLocation.parse(location)
    case_id = check_case_id(loaded.source.case_id)
    image = np.ascontiguousarray(loaded.image)  # (T, Z, Y, X)
    t, z, y, x = image.shape
    chunks = (t, *(min(c, s) for c, s in zip(IMAGE_CHUNK_ZYX, (z, y, x), strict=True)))
    tmp = temp_name("tmp", case_id)
    group = zarr.open_group(location.zarr_target(tmp), mode="w", zarr_format=3)
    try:
        group.create_array(
            "image", data=image, chunks=chunks, compressors=_codecs(), dimension_names="TZYX"
        )
        foreground = _Foreground()
        expected = {"image": image}
        if loaded.mask is not None:
            foreground = _write_mask(group, loaded.mask, chunks[1:], case_id)
            expected.update(mask=foreground.mask, foreground=foreground.sample)
        attrs = _case_attrs(loaded, image, foreground)
        record = record_case(location, tmp, case_id, expected, attrs)
        attrs["integrity"] = record.to_attrs()
        group.update_attributes(attrs)
        group.update_attributes({"complete": True})  # last: a group without it is not a case
        _rename_into_place(location, tmp, case_id)
    except BaseException:
        location.remove(tmp)
        raise
    _check_in_place(location, case_id, record)
    return case_summary({**attrs, "complete": True})


def _check_in_place(location: StoreLocation, case_id: str, record: CaseRecord) -> None:
    """The renamed case's files must be the recorded ones (an object store's rename is a copy);
    a case that is not is removed, not left half there."""
    problems = check_files(location, case_id, record)
    if problems:
        location.remove(case_id)
        first = problems[0]
        text = f"copy into place incomplete: {first.problem}"
        raise InputError(text, case=case_id, path=first.path)


@dataclass(frozen=True)
class _Foreground:
    """What a case's attributes say about its mask.

    Attributes:
        voxels: number of mask voxels (0 for an unlabelled case).
        bbox: [start, stop) per axis (Z, Y, X) of the mask voxels, or None when there are none.
        mask: (Z, Y, X) uint8, the mask written (None for an unlabelled case).
        sample: (N, 3) int32, the ``foreground`` array written.
    """

    voxels: int = 0
    bbox: list[list[int]] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    sample: np.ndarray | None = field(default=None, repr=False)


def _write_mask(
    group: Any, mask: np.ndarray, chunks_zyx: tuple[int, ...], case_id: str
) -> _Foreground:
    """Writes the ``mask`` and ``foreground`` arrays of a labelled case; returns `_Foreground`."""
    foreground = _foreground(mask, case_id)
    group.create_array(
        "mask",
        data=foreground.mask,
        chunks=chunks_zyx,
        compressors=_codecs(),
        dimension_names="ZYX",
    )
    sample = foreground.sample
    group.create_array("foreground", data=sample, chunks=(max(1, len(sample)), 3))
    return foreground


def _foreground(mask: np.ndarray, case_id: str) -> _Foreground:
    """The mask as stored (uint8), its voxel count and bounding box, and the foreground
    sample: what `_write_mask` writes, computed without writing."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)  # (Z, Y, X)
    coords = np.argwhere(mask).astype(np.int32)  # (N, 3) z, y, x
    fg_count, bbox = int(len(coords)), None
    if fg_count:  # [start, stop) per axis: patches outside it need no mask read
        first, stop = coords.min(0), coords.max(0) + 1
        bbox = [[int(a), int(b)] for a, b in zip(first, stop, strict=True)]
    if len(coords) > FOREGROUND_SAMPLES:
        # Seeded by the case ID: rewriting a case with the same mask keeps the same sample.
        seed = int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16)
        keep = np.random.default_rng(seed).choice(len(coords), FOREGROUND_SAMPLES, False)
        coords = coords[np.sort(keep)]
    sample = np.ascontiguousarray(coords.reshape(-1, 3))
    return _Foreground(voxels=fg_count, bbox=bbox, mask=mask, sample=sample)


def stored_differs(location: StoreLocation | str, loaded: Any) -> str | None:
    """Why the stored case is not what writing ``loaded`` (read from its sources) would store,
    or None when it is: the same attributes, a current integrity record that vouches for them
    and for the values the sources give, and stored files that match the record (every file's
    and every decoded array's sha256). What `tsesnet ingest` runs before it calls a case
    "unchanged": nothing stored in the case (its record included) is trusted on its own word.
    """
    if not isinstance(location, StoreLocation):
        location = StoreLocation.parse(location)
    case_id = loaded.source.case_id
    try:
        attrs = location.read_json(f"{case_id}/zarr.json")["attributes"]
        record = CaseRecord.from_attrs(attrs["integrity"]) if "integrity" in attrs else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its zarr.json or integrity record is unreadable ({type(err).__name__})"
    if record is None:
        return "it has no integrity record"
    if record.attributes is None:
        return "its integrity record predates attribute coverage (upgraded)"
    image = np.ascontiguousarray(loaded.image)  # (T, Z, Y, X)
    expected = {"image": image}
    foreground = _Foreground()
    if loaded.mask is not None:
        foreground = _foreground(loaded.mask, case_id)
        expected.update(mask=foreground.mask, foreground=foreground.sample)
    wanted = json.loads(json.dumps(_case_attrs(loaded, image, foreground)))  # as stored
    if attrs_digest(wanted) != attrs_digest(attrs):
        keys = (set(wanted) | set(attrs)) - _NOT_READ
        keys = sorted(k for k in keys if _differ(wanted, attrs, k))
        return f"its attributes differ from what its sources give ({', '.join(keys)})"
    if record.attributes != attrs_digest(attrs):
        return "its attributes differ from its integrity record"
    if set(record.arrays) != set(expected):
        return f"its record lists {sorted(record.arrays)}, its sources give {sorted(expected)}"
    for name, array in expected.items():
        rec = record.arrays[name]
        sha = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        if (rec.shape, rec.dtype, rec.sha256) != (array.shape, str(array.dtype), sha):
            return f"its {name} values differ from what its sources give"
    problems = check_recorded(location, case_id, record, attrs)
    return f"its stored data differs from its record ({problems[0].problem})" if problems else None


_NOT_READ = {"integrity", "complete"}


def _differ(a: dict, b: dict, key: str) -> bool:
    if key == "sources":
        strip = [
            [{k: v for k, v in s.items() if k != "path"} for s in d.get(key) or []] for d in (a, b)
        ]
        return strip[0] != strip[1]
    return a.get(key) != b.get(key)


def _case_attrs(loaded: Any, image: np.ndarray, foreground: _Foreground) -> dict[str, Any]:
    """The case group's attributes (see the module docstring), all but ``complete``."""
    from data_store.normalize import intensity_percentiles

    src = loaded.source
    t, z, y, x = image.shape
    lo, hi = intensity_percentiles(image)
    present, phase_index = phase_presence(src, t)
    sources = [{"role": r, "path": p} for r, p in source_roles(src, t)]
    for s in sources:
        s["sha256"] = loaded.sha256[s["path"]] if s["path"] in loaded.sha256 else _sha(s)
        s["path"] = os.path.abspath(s["path"])
    return {
        "case_id": src.case_id,
        "schema_version": SCHEMA_VERSION,
        "shape": [z, y, x],
        "spacing": [float(v) for v in loaded.geometry.spacing],
        "geometry": loaded.geometry.to_attrs(),
        "canonical_orientation": CANONICAL,
        "phases": t,
        "phase_present": present,
        "phase_index": phase_index,
        "times": [float(v) for v in src.times] if src.times else None,
        "percentiles": [lo, hi],
        "intensity_min": float(image.min()),
        "intensity_max": float(image.max()),
        "dtype": str(image.dtype),
        "sources": sources,
        "site": src.site,
        "layout": src.layout,
        "labelled": loaded.mask is not None,
        "foreground_voxels": foreground.voxels,
        "foreground_bbox": foreground.bbox,
        "split": "test" if src.subset == "test" else "train",
        **({"source_4d": True} if getattr(loaded, "source_4d", False) else {}),
        **({"spacing_assumed": True} if getattr(loaded, "spacing_assumed", False) else {}),
        **({"dicom": loaded.dicom} if getattr(loaded, "dicom", None) else {}),
    }


def _rename_into_place(location: StoreLocation, tmp: str, case_id: str) -> None:
    """Renames the complete ``tmp`` group to ``case_id``, moving an older copy aside first."""
    old = None
    if location.exists(case_id):
        old = temp_name("old", case_id)
        location.rename(case_id, old)
    location.rename(tmp, case_id)
    if old:
        location.remove(old)


def _sha(source: dict) -> str:
    from data_store.loading import file_sha256

    return file_sha256(source["path"])


@dataclass
class Leftovers:
    """What `clean_leftovers` found.

    Attributes:
        removed: temporary entries removed (their writer is gone).
        restored: ``.old-`` entries renamed back to their missing case.
        kept: one line per entry left alone, saying why (its writer may still be running).
    """

    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def cleaned(self) -> list[str]:
        """The entries removed or restored, sorted."""
        return sorted(self.removed + self.restored)


def clean_leftovers(location: StoreLocation) -> Leftovers:
    """Removes ``.tmp-*``/``.old-*`` entries whose writer is gone (this process, or a process on
    this host that no longer runs); entries named before owners were recorded count as gone.

    An ``.old-CASE-*`` whose ``CASE`` is missing (a crash between the two renames of a
    replacement) is renamed back instead: a stored case is never lost. Entries of a running
    process or of another host are kept and listed in `Leftovers.kept`.
    """
    me, found = Owner.me(), Leftovers()
    for name in location.entries():
        entry = parse_entry(name)
        if entry is None:
            continue
        if entry.owner is not None and entry.owner != me:
            running = entry.owner.running()
            if running is None:
                found.kept.append(
                    f"{name}: made by {entry.owner}, another host (remove it by hand once no "
                    "ingest runs there)"
                )
            elif running:
                found.kept.append(f"{name}: in use by {entry.owner}")
            if running is not False:
                continue
        restore = entry.kind == "old" and not location.exists(entry.case_id)
        try:
            check_case_id(entry.case_id)
        except InputError:
            restore = False  # not a name a case can have: nothing to restore
        if restore:
            location.rename(name, entry.case_id)
            found.restored.append(name)
        else:
            location.remove(name)
            found.removed.append(name)
    return found


# --------------------------------------------------------------------------- reading


@dataclass
class Case:
    """One case read from the store.

    Attributes:
        case_id: the case ID.
        image: (T, Z, Y, X) in the stored (scanner's) dtype.
        mask: (Z, Y, X) uint8 in {0, 1}, or None for an unlabelled case.
        spacing: mm, (Z, Y, X).
        geometry: how to write arrays back on the original grid.
        percentiles: (lo, hi) 0.1 %/99.9 % over all phases, for `normalize_intensity`.
        attrs: all of the case group's attributes.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple[float, float, float]
    geometry: Geometry
    percentiles: tuple[float, float]
    attrs: dict = field(repr=False)


class Store:
    """Read access to a store; picklable (zarr handles reopen lazily in each process).

    Opening checks the index against every case's attributes (`load_index`); the first read of
    a case in a process checks the case against its integrity record (`check_case`), so every
    reader (export, training, prediction) refuses a damaged case with one line.

    Attributes:
        path: the store's path or URL.
        case_ids: sorted case IDs.
        entries: case ID -> `IndexEntry` (phases, shape, split, fold, ...).
        index: case ID -> the index entry as stored (JSON), as older callers read it.
        fingerprint: stable hash of what is stored (`store_fingerprint`).
        fingerprint_version: 2, or 1 for a store whose index was last written before the
            fingerprint covered folds and attributes.
        n_folds: number of folds.
        index_problems: with ``strict=False`` (`tsesnet store verify`), what is wrong with the
            index per case instead of an error; `case_ids` then lists the cases whose group
            could be read.
    """

    def __init__(self, path: str | os.PathLike, *, strict: bool = True):
        self.location = StoreLocation.parse(path)
        self.path = self.location.url
        index = load_index(self.location, strict=strict)
        self.index: dict[str, dict[str, Any]] = index.raw
        self.index_problems: list[Problem] = index.problems  # empty unless strict=False
        self.entries: dict[str, IndexEntry] = {c: index.entries[c] for c in index.attrs}
        self.case_ids: list[str] = sorted(self.entries)
        self.fingerprint: str = index.fingerprint
        self.fingerprint_version: int = index.fingerprint_version
        self.n_folds: int = index.n_folds
        self._attrs = index.attrs
        self._groups: dict[str, Any] = {}
        self._arrays: dict[tuple[str, str], Any] = {}
        self._checked: set[str] = set()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_groups"], state["_arrays"], state["_checked"] = {}, {}, set()
        return state

    def __repr__(self) -> str:
        return f"Store({self.path!r}, {len(self.case_ids)} cases, {self.n_folds} folds)"

    def _entry(self, case_id: str) -> IndexEntry:
        try:
            return self.entries[case_id]
        except (KeyError, TypeError):
            raise InputError(
                f"no such case in store {self.path} (it has {len(self.case_ids)} cases)",
                case=str(case_id),
            ) from None

    # ------------------------------------------------------------------ integrity

    def check_case(self, case_id: str) -> None:
        """The cheap integrity check of a case, run once per case per process before its data
        or attributes are read: arrays present, shapes/dtypes/chunks as recorded, each array's
        metadata by sha256, every recorded chunk file present with its recorded size, nothing
        unrecorded, no symbolic links, the attributes by their recorded digest and their values
        sound (`data_store.integrity.check_values`).

        Cost, measured on a 6x100x320x320 int16 case (250 chunk files): see the README's
        Reliability section.

        Raises:
            InputError: one line naming the case, the file and the problem.
        """
        if case_id in self._checked:
            return
        problems = self.case_problems(case_id)
        if problems:
            first = problems[0]
            more = f"; {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
            raise InputError(
                f"{first.problem}{more} (`tsesnet store verify {self.path}` checks every case)",
                case=case_id,
                path=first.path,
            )
        self._checked.add(case_id)

    def check_cases(self, case_ids: list[str]) -> None:
        """`check_case` for every case of a list (a training run's, before its workers start),
        so a damaged case stops the run at once, in one line, not in a worker mid-epoch.

        Raises:
            InputError: the first damaged case, with how many others are damaged.
        """
        damaged = [(c, p) for c in case_ids for p in self.case_problems(c)[:1]]
        if damaged:
            (cid, first), more = damaged[0], len(damaged) - 1
            tail = f"; {more} more damaged case(s)" if more else ""
            raise InputError(
                f"{first.problem}{tail} (`tsesnet store verify {self.path}` lists them)",
                case=cid,
                path=first.path,
            )
        self._checked.update(case_ids)

    def case_problems(self, case_id: str, *, deep: bool = False) -> list[Problem]:
        """Everything the cheap check (and with ``deep``, the checksums) finds wrong with a case.

        Nothing is opened through a folder whose files are not as recorded (or that holds a
        symbolic link): the file listing comes first.
        """
        self._entry(case_id)
        attrs = self._attrs[case_id]
        record, problems = self._record(case_id, attrs)
        if problems:
            return problems
        if record is None:
            problems = self._link_problems(case_id)
        else:
            problems = check_files(self.location, case_id, record)
        if problems:
            return problems
        values = check_values(self.location, case_id, attrs)
        arrays, problems = self._open_arrays(case_id)
        problems = values + problems
        if record is None:
            return problems + check_unrecorded(self.location, case_id, attrs, arrays, decode=deep)
        problems += check_arrays(self.location, case_id, record, attrs, arrays)
        if deep and not problems:
            problems += check_deep(self.location, case_id, record)
        return problems

    def has_record(self, case_id: str) -> bool:
        """Whether the case was stored with an integrity record."""
        self._entry(case_id)
        return "integrity" in self._attrs[case_id]

    def _record(self, case_id: str, attrs: dict) -> tuple[CaseRecord | None, list[Problem]]:
        if "integrity" not in attrs:
            return None, []
        try:
            return CaseRecord.from_attrs(attrs["integrity"]), []
        except ValueError as err:
            where = self.location.path(f"{case_id}/zarr.json")
            return None, [Problem(case_id, where, f"integrity record malformed ({err})")]

    def _link_problems(self, case_id: str) -> list[Problem]:
        """Symbolic links in the array folders of a case without a record."""
        problems = []
        for name in ARRAYS:
            _, links = self.location.list_files(f"{case_id}/{name}")
            for link in links:
                where = self.location.path(f"{case_id}/{name}/{link}".rstrip("/"))
                problems.append(Problem(case_id, where, f"{name}: symbolic link in the store"))
        return problems

    def _open_arrays(self, case_id: str) -> tuple[dict[str, Any], list[Problem]]:
        """Opens the case's group and arrays (metadata only) into this process's caches."""
        import zarr

        meta = self.location.path(f"{case_id}/zarr.json")
        try:
            group = self._groups.get(case_id) or zarr.open_group(
                self.location.zarr_target(case_id), mode="r"
            )
        except Exception as err:  # a damaged zarr.json: one line, never a traceback
            return {}, [Problem(case_id, meta, f"case group unreadable ({type(err).__name__})")]
        self._groups[case_id] = group
        arrays, problems = {}, []
        for name in ARRAYS:
            try:
                arrays[name] = group.get(name, None)
            except Exception as err:
                arrays[name] = None
                where = self.location.path(f"{case_id}/{name}/zarr.json")
                problems.append(
                    Problem(case_id, where, f"{name} metadata unreadable ({type(err).__name__})")
                )
            self._arrays[(case_id, name)] = arrays[name]
        return arrays, problems

    @contextmanager
    def _decoding(self, case_id: str, name: str):
        """Turns a codec error while reading chunks into one line naming the case and array."""
        try:
            yield
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"{name} chunks could not be decoded ({type(err).__name__}: {err}); "
                f"`tsesnet store verify {self.path} --deep` checks every chunk",
                case=case_id,
                path=self.location.path(f"{case_id}/{name}"),
            ) from err

    # ------------------------------------------------------------------ the index

    def group(self, case_id: str):
        """The case's zarr group (opened, and checked, once per process)."""
        self.check_case(case_id)
        return self._groups[case_id]

    def array(self, case_id: str, name: str):
        """The case's zarr array `name` ("image", "mask", "foreground"), or None if absent;
        opened once per process (opening reads metadata: a patch read should not)."""
        self.check_case(case_id)
        return self._arrays[(case_id, name)]

    def fold_of(self, case_id: str) -> int:
        """The case's fold, or -1 for an unlabelled or test case (no fold)."""
        fold = self._entry(case_id).fold
        return -1 if fold is None else int(fold)

    def labelled(self, case_id: str) -> bool:
        return self._entry(case_id).labelled

    def split_of(self, case_id: str) -> str:
        """ "train" or "test" (stores written before splits were recorded: "train")."""
        return self._entry(case_id).split

    def case_ids_in(self, split: str) -> list[str]:
        """The sorted IDs of one split ("train" or "test"), labelled or not.

        Raises:
            InputError: an unknown split name.
        """
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}: a store has the splits {', '.join(SPLITS)}")
        return [c for c in self.case_ids if self.entries[c].split == split]

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """(train IDs, validation IDs) for a fold: labelled cases of the train split, sorted.

        Test cases are never in either list.
        """
        if not 0 <= fold < self.n_folds:
            raise InputError(f"fold {fold} out of range: the store has {self.n_folds} folds")
        pool = [c for c in self.case_ids if self.fold_of(c) >= 0]
        val = [c for c in pool if self.fold_of(c) == fold]
        return [c for c in pool if self.fold_of(c) != fold], val

    def source_paths(self) -> list[str]:
        """Every source file path the cases record (as ingest saw them), from the attributes
        read at open, without the per-case check: for refusing outputs that would overwrite a
        source (`tsesnet predict`), never for reading data."""
        paths = []
        for attrs in self._attrs.values():
            for src in attrs.get("sources") or ():
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    paths.append(src["path"])
        return paths

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        """The case group's attributes (as read, and checked against the index, at open), after
        the cheap check (`check_case`): readers use them (percentiles, geometry, bbox)."""
        self.check_case(case_id)
        return dict(self._attrs[case_id])

    def shape(self, case_id: str) -> tuple[int, int, int, int]:
        """(T, Z, Y, X) from the index, without opening the case."""
        e = self._entry(case_id)
        return (e.phases, *e.shape)

    def nbytes(self, case_id: str) -> int:
        """Decoded bytes of image + mask."""
        t, z, y, x = self.shape(case_id)
        itemsize = np.dtype(self._entry(case_id).dtype).itemsize
        return t * z * y * x * itemsize + z * y * x

    # ------------------------------------------------------------------ data

    def foreground(self, case_id: str) -> np.ndarray:
        """(N, 3) int32 (z, y, x) of up to 10,000 foreground voxels; (0, 3) if none/unlabelled."""
        array = self.array(case_id, "foreground")
        if array is None:
            return np.zeros((0, 3), np.int32)
        with self._decoding(case_id, "foreground"):
            return np.asarray(array[...], dtype=np.int32).reshape(-1, 3)

    def read_region(
        self, case_id: str, region: tuple[slice, slice, slice], *, mask: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (T, z, y, x) and mask (z, y, x) of a (Z, Y, X) region, decoded concurrently.

        The mask is None for an unlabelled case or when ``mask=False``.
        """
        image_array, mask_array = self.array(case_id, "image"), self.array(case_id, "mask")
        image_sel = (slice(None), *region)
        if not mask or mask_array is None:
            with self._decoding(case_id, "image"):
                return image_array[image_sel], None
        from data_store.compat import zarr_sync

        async def both():  # the two arrays' chunks decode together: ~1/3 less time measured
            return await asyncio.gather(
                image_array.async_array.getitem(image_sel), mask_array.async_array.getitem(region)
            )

        with self._decoding(case_id, "image and mask"):
            image, mask_region = zarr_sync(both())
        return image, mask_region

    def read_case(self, case_id: str) -> Case:
        """Reads a whole case (image, mask, geometry) into memory."""
        image_array, mask_array = self.array(case_id, "image"), self.array(case_id, "mask")
        attrs = self.case_attrs(case_id)
        with self._decoding(case_id, "image"):
            image = image_array[...]
        with self._decoding(case_id, "mask"):
            mask = mask_array[...] if mask_array is not None else None
        return Case(
            case_id=case_id,
            image=image,
            mask=mask,
            spacing=tuple(float(s) for s in attrs["spacing"]),
            geometry=Geometry.from_attrs(attrs["geometry"]),
            percentiles=tuple(float(p) for p in attrs["percentiles"]),
            attrs=attrs,
        )


def open_store(path: str | os.PathLike) -> Store:
    """Opens a store for reading (a local path or an fsspec URL), checking its index.

    Raises:
        InputError: if the path is not a tsesnet store, or its index is damaged or forged (one
            line naming the store, or the case and file).
    """
    return Store(path)


# --------------------------------------------------------------------------- CLI


def info_rows(store: Store) -> list[dict[str, Any]]:
    """The rows of `store info` (the JSON schema's ``cases`` list)."""
    return [
        {
            "id": cid,
            "phases": e.phases,
            "shape": list(e.shape),
            "spacing": list(e.spacing),
            "spacing_assumed": e.spacing_assumed,
            "labelled": e.labelled,
            "site": e.site,
            "split": e.split,
            "fold": e.fold,
        }
        for cid, e in ((c, store.entries[c]) for c in store.case_ids)
    ]


def info_table(store: Store) -> str:
    """The text `tsesnet store info` prints: one line per case, then the totals."""
    rows = info_rows(store)
    header = ["id", "phases", "shape (Z,Y,X)", "spacing mm (Z,Y,X)", "labelled", "site"]
    header += ["split", "fold"]
    table = [
        [
            r["id"],
            str(r["phases"]),
            "x".join(map(str, r["shape"])),
            "x".join(f"{s:.3g}" for s in r["spacing"])
            + (" (assumed)" if r["spacing_assumed"] else ""),
            "yes" if r["labelled"] else "no",
            r["site"] or "-",
            r["split"],
            "-" if r["fold"] is None else str(r["fold"]),
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in table)) if table else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    n_lab = sum(r["labelled"] for r in rows)
    n_test = sum(r["split"] == "test" for r in rows)
    voxels = sum(r["phases"] * int(np.prod(r["shape"])) for r in rows)
    lines.append(
        f"{len(rows)} cases ({n_lab} labelled, {len(rows) - n_lab} unlabelled), "
        f"{len(rows) - n_test} train, {n_test} test (never in a fold), "
        f"{voxels / 1e6:.1f} M voxels, {store.n_folds} folds, fingerprint {store.fingerprint}"
    )
    return "\n".join(lines)


def cli_info(args: argparse.Namespace) -> int:
    """`tsesnet store info STORE [--json]`: a table of cases and totals; exit status 1 (and one
    line per damaged case on stderr) when the cheap integrity check finds a damaged case."""
    store = open_store(args.store)
    damaged = {}
    for cid in store.case_ids:
        problems = store.case_problems(cid)
        if problems:
            damaged[cid] = problems[0]
    if args.json:
        rows = info_rows(store)
        for row in rows:
            row["intact"] = row["id"] not in damaged
        doc = {"cases": rows, "n_folds": store.n_folds, "fingerprint": store.fingerprint}
        print(json.dumps(doc, indent=2))
    else:
        print(info_table(store))
    for problem in damaged.values():
        print(f"damaged: {problem}", file=sys.stderr)
    if damaged:
        print(
            f"{len(damaged)} damaged case(s): `tsesnet store verify {store.path}` lists every "
            "problem; rerun `tsesnet ingest` on their sources to repair them",
            file=sys.stderr,
        )
    return 1 if damaged else 0


def export_case(store: Store, case_id: str, out: str | os.PathLike) -> list[Path]:
    """Writes a case back as NIfTI on its original grid; returns the files written.

    Files: ``OUT/CASE_000t.nii.gz`` per stored phase, t its nominal index (``OUT/CASE.nii.gz``,
    phases on the 4th axis, when the source was one 4D file: the nifti4d layout, or a 4D
    ``_0000`` file of an nnU-Net or MAMA-MIA case) and ``OUT/CASE_mask.nii.gz`` for a labelled
    case. A damaged case raises `InputError` before any file is written.
    Shape, affine, qform/sform codes and voxel values equal the source files' (voxel dtype is
    the stored one: the source's, native byte order).
    """
    from data_store.geometry import write_nifti

    case = store.read_case(case_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if case.attrs.get("layout") == "nifti4d" or case.attrs.get("source_4d"):
        path = out / f"{case_id}.nii.gz"
        write_nifti(path, case.image, case.geometry)  # (T, Z, Y, X) -> (i, j, k, T)
        written.append(path)
    else:
        index = case.attrs.get("phase_index") or list(range(case.image.shape[0]))
        for t, nominal in enumerate(index):
            path = out / f"{case_id}_{nominal:04d}.nii.gz"
            write_nifti(path, case.image[t], case.geometry)
            written.append(path)
    if case.mask is not None:
        path = out / f"{case_id}_mask.nii.gz"
        write_nifti(path, case.mask, case.geometry, dtype=np.uint8)
        written.append(path)
    return written


def cli_export(args: argparse.Namespace) -> int:
    """`tsesnet store export STORE --case ID OUT`."""
    store = open_store(args.store)
    for path in export_case(store, args.case, args.out):
        print(path)
    return 0
