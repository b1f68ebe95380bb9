"""Writing one case into the case store (format: `data_store.store`), and cleaning up after a
writer that died.

Writing a case is crash-safe: it is written under ``.tmp-CASE@HOST.PID.UUID``, read back and
compared with what was meant (its integrity record is made from that read), and renamed to
``CASE`` (an atomic ``rename`` on a local store; on object stores, where there is no rename,
the copy is checked against the record once in place, and the root index is what makes a case
visible). Replacing a case whose sources changed moves the old group to
``.old-CASE@HOST.PID.UUID`` first. `clean_leftovers` removes only entries of this process or of
a process on this host that is gone, and renames an ``.old-`` entry back when its case is
missing: a stored case is never lost.

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

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.index import SCHEMA_VERSION, case_summary
from data_store.integrity import (
    CaseRecord,
    attrs_digest,
    check_files,
    check_recorded,
    record_case,
)
from data_store.location import (
    Owner,
    StoreLocation,
    check_case_id,
    parse_entry,
    temp_name,
)

IMAGE_CHUNK_ZYX = (24, 64, 64)  # spatial chunk; the phase axis is never split (see docstring)
FOREGROUND_SAMPLES = 10_000
CANONICAL = "nibabel closest RAS+ (flips/permutations only), transposed to (Z=S, Y=A, X=R)"


def _codecs():
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]


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
        loaded: a `data_store.source_reader.LoadedCase` (image (T, Z, Y, X), mask (Z, Y, X) or
            None).

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
    from data_store.source_reader import file_sha256

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
