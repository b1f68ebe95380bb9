"""The Zarr v3 case store: its on-disk format, the writer of one case, and the reader API.

Shape legend: T phases, Z Y X voxels in canonical order (see `data_store.geometry`).

Layout (one Zarr v3 hierarchy; a local path or any fsspec URL, e.g. ``s3://bucket/store``)::

    STORE/zarr.json          root group; attributes: schema_version, cases (the index: one
                             summary per case), n_folds, fold_rule, fingerprint
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
``labelled``, ``foreground_voxels``, ``foreground_bbox`` ([start, stop) per axis, or null)
and ``complete`` (written last).

Writing a case is crash-safe: it is written under ``.tmp-CASE-<uuid>`` and renamed to ``CASE``
when complete (an atomic ``rename`` on a local store; on object stores, where there is no
rename, the root index is what makes a case visible, and it lists only complete cases).
Replacing a case whose sources changed moves the old group to ``.old-CASE-<uuid>`` first.
Leftover ``.tmp-*``/``.old-*`` entries are removed by the next ingest (one writer at a time).

Folds: patient-level, patient = case ID (each supported layout has one case per patient; MAMA-MIA
IDs are patient IDs). Labelled cases are ordered by sha256("tsesnet-folds-v1:" + ID) and dealt
round-robin into k folds: deterministic, balanced to within one case, independent of ingestion
order. Unlabelled cases (prediction inputs) have no fold. Folds are a function of the set of
labelled IDs: adding cases can move others (the fingerprint changes with them).

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.geometry import Geometry

__all__ = [
    "SCHEMA_VERSION",
    "Case",
    "Store",
    "StoreLocation",
    "assign_folds",
    "cli_export",
    "cli_info",
    "open_store",
    "store_fingerprint",
    "write_case",
]

SCHEMA_VERSION = 1
IMAGE_CHUNK_ZYX = (24, 64, 64)  # spatial chunk; the phase axis is never split (see docstring)
FOREGROUND_SAMPLES = 10_000
FOLD_SALT = "tsesnet-folds-v1:"
FOLD_RULE = (
    "patient-level (patient = case ID): labelled IDs sorted by sha256('tsesnet-folds-v1:' + ID),"
    " dealt round-robin into n_folds; unlabelled cases have no fold"
)
CANONICAL = "nibabel closest RAS+ (flips/permutations only), transposed to (Z=S, Y=A, X=R)"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def _codecs():
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]


# --------------------------------------------------------------------------- location


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: a local directory or an fsspec URL.

    Attributes:
        url: what the user gave (a path or URL).
        local: True for a local directory (``file://`` URLs included): atomic renames.
        root: the root path on the filesystem (`fs` path for remote stores).
    """

    url: str
    local: bool
    root: str

    @classmethod
    def parse(cls, path: str | os.PathLike) -> StoreLocation:
        text = os.fspath(path)
        if text.startswith("file://"):
            return cls(text, True, os.path.abspath(text[len("file://") :]))
        if "://" in text:
            import fsspec

            _, root = fsspec.core.url_to_fs(text)
            return cls(text, False, root.rstrip("/"))
        return cls(text, True, os.path.abspath(text))

    @property
    def fs(self):
        """The fsspec filesystem (remote stores only; local ones use `os`)."""
        import fsspec

        return fsspec.core.url_to_fs(self.url)[0]

    def zarr_target(self, name: str | None = None):
        """What to pass to ``zarr.open_group`` for the root or a child entry ``name``."""
        if self.local:
            from zarr.storage import LocalStore

            return LocalStore(os.path.join(self.root, name) if name else self.root)
        return self.url.rstrip("/") + (f"/{name}" if name else "")

    def entries(self) -> list[str]:
        """Names of the root's direct children (files and folders)."""
        if self.local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        fs = self.fs
        if not fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(self.root, detail=False))

    def exists(self, name: str) -> bool:
        if self.local:
            return os.path.exists(os.path.join(self.root, name))
        return self.fs.exists(f"{self.root}/{name}")

    def rename(self, src: str, dst: str) -> None:
        """Renames a child entry (atomic on a local store)."""
        if self.local:
            os.rename(os.path.join(self.root, src), os.path.join(self.root, dst))
        else:
            self.fs.mv(f"{self.root}/{src}", f"{self.root}/{dst}", recursive=True)

    def remove(self, name: str) -> None:
        """Removes a child entry and everything under it; missing is fine."""
        if self.local:
            import shutil

            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        else:
            fs = self.fs
            if fs.exists(f"{self.root}/{name}"):
                fs.rm(f"{self.root}/{name}", recursive=True)


def check_case_id(case_id: str) -> None:
    """A case ID must be usable as one Zarr node name."""
    if (
        not case_id
        or "/" in case_id
        or "\\" in case_id
        or case_id.startswith((".", "__"))
        or case_id == "zarr.json"
    ):
        raise InputError(
            "case ID is not a valid store name (no '/', not starting with '.' or '__')",
            case=case_id,
        )


# --------------------------------------------------------------------------- writing


def case_summary(attrs: dict[str, Any]) -> dict[str, Any]:
    """The root index's entry for a case, from its group attributes."""
    return {
        "phases": int(attrs["phases"]),
        "shape": list(attrs["shape"]),
        "spacing": list(attrs["spacing"]),
        "labelled": bool(attrs["labelled"]),
        "site": attrs.get("site"),
        "dtype": attrs["dtype"],
        "checksums": [[s["role"], s["sha256"]] for s in attrs["sources"]],
    }


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
    else:
        if t is None:
            t = len(src.phase_files)
        _, index = phase_presence(src, t)
        roles = [(f"phase{i}", str(p)) for i, p in zip(index, src.phase_files, strict=False)]
    if src.mask_file is not None:
        roles.append(("mask", str(src.mask_file)))
    return roles


def write_case(location: StoreLocation | str, loaded: Any) -> dict[str, Any]:
    """Writes one validated case under a temporary name, then renames it into place.

    Args:
        location: the store (it must exist: `init_store`).
        loaded: a `data_store.loading.LoadedCase` (image (T, Z, Y, X), mask (Z, Y, X) or None).

    Returns:
        The case's root-index summary (`case_summary`).
    """
    import zarr

    if not isinstance(location, StoreLocation):
        location = StoreLocation.parse(location)
    case_id = loaded.source.case_id
    check_case_id(case_id)
    image = np.ascontiguousarray(loaded.image)  # (T, Z, Y, X)
    t, z, y, x = image.shape
    chunks = (t, *(min(c, s) for c, s in zip(IMAGE_CHUNK_ZYX, (z, y, x), strict=True)))
    tmp = f"{TMP_PREFIX}{case_id}-{uuid.uuid4().hex[:12]}"
    group = zarr.open_group(location.zarr_target(tmp), mode="w", zarr_format=3)
    try:
        group.create_array(
            "image", data=image, chunks=chunks, compressors=_codecs(), dimension_names="TZYX"
        )
        foreground = _Foreground()
        if loaded.mask is not None:
            foreground = _write_mask(group, loaded.mask, chunks[1:], case_id)
        attrs = _case_attrs(loaded, image, foreground)
        group.update_attributes(attrs)
        group.update_attributes({"complete": True})  # last: a group without it is not a case
        _rename_into_place(location, tmp, case_id)
    except BaseException:
        location.remove(tmp)
        raise
    return case_summary({**attrs, "complete": True})


@dataclass(frozen=True)
class _Foreground:
    """What a case's attributes say about its mask.

    Attributes:
        voxels: number of mask voxels (0 for an unlabelled case).
        bbox: [start, stop) per axis (Z, Y, X) of the mask voxels, or None when there are none.
    """

    voxels: int = 0
    bbox: list[list[int]] | None = None


def _write_mask(
    group: Any, mask: np.ndarray, chunks_zyx: tuple[int, ...], case_id: str
) -> _Foreground:
    """Writes the ``mask`` and ``foreground`` arrays of a labelled case; returns `_Foreground`."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)  # (Z, Y, X)
    group.create_array(
        "mask", data=mask, chunks=chunks_zyx, compressors=_codecs(), dimension_names="ZYX"
    )
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
    group.create_array("foreground", data=coords.reshape(-1, 3), chunks=(max(1, len(coords)), 3))
    return _Foreground(voxels=fg_count, bbox=bbox)


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
    }


def _rename_into_place(location: StoreLocation, tmp: str, case_id: str) -> None:
    """Renames the complete ``tmp`` group to ``case_id``, moving an older copy aside first."""
    old = None
    if location.exists(case_id):
        old = f"{OLD_PREFIX}{case_id}-{uuid.uuid4().hex[:12]}"
        location.rename(case_id, old)
    location.rename(tmp, case_id)
    if old:
        location.remove(old)


def _sha(source: dict) -> str:
    from data_store.loading import file_sha256

    return file_sha256(source["path"])


def init_store(location: StoreLocation) -> None:
    """Creates the root group if missing; refuses a folder that holds something else."""
    import zarr

    entries = location.entries()
    if entries and "zarr.json" not in entries:
        raise InputError(
            "not a tsesnet store (a non-empty folder without zarr.json); choose a new path",
            path=location.url,
        )
    if not entries:
        root = zarr.open_group(location.zarr_target(), mode="w", zarr_format=3)
        root.update_attributes({"schema_version": SCHEMA_VERSION, "cases": {}, "n_folds": 0})
        return
    _root_attrs(location)  # validates it is a store


def clean_leftovers(location: StoreLocation) -> list[str]:
    """Removes ``.tmp-*`` and ``.old-*`` entries a crashed ingest left; returns their names.

    An ``.old-CASE-*`` whose ``CASE`` is missing (a crash between the two renames of a
    replacement) is renamed back instead: a stored case is never lost.
    """
    gone = [e for e in location.entries() if e.startswith((TMP_PREFIX, OLD_PREFIX))]
    for name in gone:
        case_id = name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
        if name.startswith(OLD_PREFIX) and not location.exists(case_id):
            location.rename(name, case_id)
        else:
            location.remove(name)
    return gone


def scan_cases(location: StoreLocation) -> dict[str, dict[str, Any]]:
    """Reads every complete case group's attributes (the source of truth for the index)."""
    import zarr

    found = {}
    for name in location.entries():
        if name.startswith((".", "__")) or name == "zarr.json":
            continue
        try:
            attrs = dict(zarr.open_group(location.zarr_target(name), mode="r").attrs)
        except Exception:
            continue  # not a group (stray file): not a case
        if attrs.get("complete") and attrs.get("case_id") == name:
            found[name] = attrs
    return found


def assign_folds(labelled_ids: list[str], n_folds: int) -> dict[str, int]:
    """Deterministic, balanced patient-level folds (see the module docstring)."""
    order = sorted(
        labelled_ids, key=lambda c: (hashlib.sha256((FOLD_SALT + c).encode()).hexdigest(), c)
    )
    return {case_id: i % n_folds for i, case_id in enumerate(order)}


def store_fingerprint(index: dict[str, dict[str, Any]]) -> str:
    """A stable hash of the case IDs and their source checksums (order-independent)."""
    h = hashlib.sha256(f"tsesnet-store-v{SCHEMA_VERSION}".encode())
    for case_id in sorted(index):
        h.update(json.dumps([case_id, index[case_id]["checksums"]]).encode())
    return h.hexdigest()[:16]


def write_index(location: StoreLocation, n_folds: int) -> dict[str, Any]:
    """Rebuilds the root index from the case groups present and writes it in one update.

    The index is derived from the complete case groups on disk, so a run that crashed before
    updating it loses nothing: the next run's index lists every case that was renamed in.
    """
    import zarr

    cases = {cid: case_summary(a) for cid, a in scan_cases(location).items()}
    folds = assign_folds([c for c, s in cases.items() if s["labelled"]], n_folds)
    for cid, s in cases.items():
        s["fold"] = folds.get(cid)
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "cases": cases,
        "n_folds": n_folds,
        "fold_rule": FOLD_RULE,
        "fingerprint": store_fingerprint(cases),
    }
    # One zarr.json write: atomic on a local store (zarr >= 3.1.3), one PUT on object stores.
    zarr.open_group(location.zarr_target(), mode="r+").attrs.put(attrs)
    return attrs


def _root_attrs(location: StoreLocation) -> dict[str, Any]:
    import zarr

    if not location.exists("zarr.json"):
        raise InputError(
            "not a tsesnet store (no zarr.json: missing or another kind of folder); "
            "create one with `tsesnet ingest SRC STORE`",
            path=location.url,
        )
    try:
        attrs = dict(zarr.open_group(location.zarr_target(), mode="r").attrs)
    except Exception as err:
        raise InputError(
            f"not a tsesnet store ({type(err).__name__}); create one with `tsesnet ingest`",
            path=location.url,
        ) from err
    if "schema_version" not in attrs:
        raise InputError("not a tsesnet store (no schema_version attribute)", path=location.url)
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise InputError(
            f"store schema version {attrs['schema_version']} is not {SCHEMA_VERSION}; re-ingest",
            path=location.url,
        )
    return attrs


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

    Attributes:
        path: the store's path or URL.
        case_ids: sorted case IDs.
        fingerprint: stable hash of case IDs and source checksums.
        n_folds: number of folds.
    """

    def __init__(self, path: str | os.PathLike):
        self.location = StoreLocation.parse(path)
        self.path = self.location.url
        attrs = _root_attrs(self.location)
        self.index: dict[str, dict[str, Any]] = attrs.get("cases", {})
        self.case_ids: list[str] = sorted(self.index)
        self.fingerprint: str = attrs.get("fingerprint", store_fingerprint(self.index))
        self.n_folds: int = int(attrs.get("n_folds", 0))
        self._groups: dict[str, Any] = {}
        self._arrays: dict[tuple[str, str], Any] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_groups"], state["_arrays"] = {}, {}
        return state

    def __repr__(self) -> str:
        return f"Store({self.path!r}, {len(self.case_ids)} cases, {self.n_folds} folds)"

    def _entry(self, case_id: str) -> dict[str, Any]:
        try:
            return self.index[case_id]
        except KeyError:
            raise InputError(
                f"no such case in store {self.path} (it has {len(self.case_ids)} cases)",
                case=case_id,
            ) from None

    def group(self, case_id: str):
        """The case's zarr group (opened once per process)."""
        self._entry(case_id)
        if case_id not in self._groups:
            import zarr

            self._groups[case_id] = zarr.open_group(self.location.zarr_target(case_id), mode="r")
        return self._groups[case_id]

    def array(self, case_id: str, name: str):
        """The case's zarr array `name` ("image", "mask", "foreground"), or None if absent;
        opened once per process (opening reads metadata: a patch read should not)."""
        key = (case_id, name)
        if key not in self._arrays:
            g = self.group(case_id)
            self._arrays[key] = g.get(name, None)
        return self._arrays[key]

    def fold_of(self, case_id: str) -> int:
        """The case's fold, or -1 for an unlabelled case (no fold)."""
        fold = self._entry(case_id).get("fold")
        return -1 if fold is None else int(fold)

    def labelled(self, case_id: str) -> bool:
        return bool(self._entry(case_id)["labelled"])

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """(train IDs, validation IDs) for a fold, labelled cases only, sorted."""
        if not 0 <= fold < self.n_folds:
            raise InputError(f"fold {fold} out of range: the store has {self.n_folds} folds")
        labelled = [c for c in self.case_ids if self.labelled(c)]
        val = [c for c in labelled if self.fold_of(c) == fold]
        return [c for c in labelled if self.fold_of(c) != fold], val

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.group(case_id).attrs)

    def shape(self, case_id: str) -> tuple[int, int, int, int]:
        """(T, Z, Y, X) from the index, without opening the case."""
        e = self._entry(case_id)
        return (int(e["phases"]), *(int(s) for s in e["shape"]))

    def nbytes(self, case_id: str) -> int:
        """Decoded bytes of image + mask."""
        t, z, y, x = self.shape(case_id)
        itemsize = np.dtype(self._entry(case_id)["dtype"]).itemsize
        return t * z * y * x * itemsize + z * y * x

    def foreground(self, case_id: str) -> np.ndarray:
        """(N, 3) int32 (z, y, x) of up to 10,000 foreground voxels; (0, 3) if none/unlabelled."""
        g = self.group(case_id)
        if "foreground" not in g:
            return np.zeros((0, 3), np.int32)
        return np.asarray(g["foreground"][...], dtype=np.int32).reshape(-1, 3)

    def read_region(
        self, case_id: str, region: tuple[slice, slice, slice], *, mask: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (T, z, y, x) and mask (z, y, x) of a (Z, Y, X) region, decoded concurrently.

        The mask is None for an unlabelled case or when ``mask=False``.
        """
        image_array, mask_array = self.array(case_id, "image"), self.array(case_id, "mask")
        image_sel = (slice(None), *region)
        if not mask or mask_array is None:
            return image_array[image_sel], None
        from zarr.core.sync import sync

        async def both():  # the two arrays' chunks decode together: ~1/3 less time measured
            return await asyncio.gather(
                image_array.async_array.getitem(image_sel), mask_array.async_array.getitem(region)
            )

        image, mask_region = sync(both())
        return image, mask_region

    def read_case(self, case_id: str) -> Case:
        """Reads a whole case (image, mask, geometry) into memory."""
        g = self.group(case_id)
        attrs = dict(g.attrs)
        return Case(
            case_id=case_id,
            image=g["image"][...],
            mask=g["mask"][...] if "mask" in g else None,
            spacing=tuple(float(s) for s in attrs["spacing"]),
            geometry=Geometry.from_attrs(attrs["geometry"]),
            percentiles=tuple(float(p) for p in attrs["percentiles"]),
            attrs=attrs,
        )


def open_store(path: str | os.PathLike) -> Store:
    """Opens a store for reading (a local path or an fsspec URL).

    Raises:
        InputError: if the path is not a tsesnet store.
    """
    return Store(path)


# --------------------------------------------------------------------------- CLI


def info_rows(store: Store) -> list[dict[str, Any]]:
    """The rows of `store info` (the JSON schema's ``cases`` list)."""
    rows = []
    for cid in store.case_ids:
        e = store.index[cid]
        rows.append(
            {
                "id": cid,
                "phases": int(e["phases"]),
                "shape": [int(s) for s in e["shape"]],
                "spacing": [float(s) for s in e["spacing"]],
                "labelled": bool(e["labelled"]),
                "site": e.get("site"),
                "fold": e.get("fold"),
            }
        )
    return rows


def info_table(store: Store) -> str:
    """The text `tsesnet store info` prints: one line per case, then the totals."""
    rows = info_rows(store)
    header = ["id", "phases", "shape (Z,Y,X)", "spacing mm (Z,Y,X)", "labelled", "site", "fold"]
    table = [
        [
            r["id"],
            str(r["phases"]),
            "x".join(map(str, r["shape"])),
            "x".join(f"{s:.3g}" for s in r["spacing"]),
            "yes" if r["labelled"] else "no",
            r["site"] or "-",
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
    voxels = sum(r["phases"] * int(np.prod(r["shape"])) for r in rows)
    lines.append(
        f"{len(rows)} cases ({n_lab} labelled, {len(rows) - n_lab} unlabelled), "
        f"{voxels / 1e6:.1f} M voxels, {store.n_folds} folds, fingerprint {store.fingerprint}"
    )
    return "\n".join(lines)


def cli_info(args: argparse.Namespace) -> int:
    """`tsesnet store info STORE [--json]`: a table of cases and totals."""
    store = open_store(args.store)
    if args.json:
        rows = info_rows(store)
        doc = {"cases": rows, "n_folds": store.n_folds, "fingerprint": store.fingerprint}
        print(json.dumps(doc, indent=2))
    else:
        print(info_table(store))
    return 0


def export_case(store: Store, case_id: str, out: str | os.PathLike) -> list[Path]:
    """Writes a case back as NIfTI on its original grid; returns the files written.

    Files: ``OUT/CASE_000t.nii.gz`` per stored phase, t its nominal index (``OUT/CASE.nii.gz``,
    phases on the 4th axis, when the source was one 4D file) and ``OUT/CASE_mask.nii.gz`` for a
    labelled case.
    Shape, affine, qform/sform codes and voxel values equal the source files' (voxel dtype is
    the stored one: the source's, native byte order).
    """
    from data_store.geometry import write_nifti

    case = store.read_case(case_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if case.attrs.get("layout") == "nifti4d":
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
