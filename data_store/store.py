"""The Zarr v3 case store: its on-disk format and the reader API (`Store`, `open_store`).

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

Writing: `data_store.store_writer` (crash-safe, one case at a time). The ``store info`` and
``store export`` commands: `data_store.cli`.

Reading: `open_store` checks the index (`data_store.index.load_index`), and the first read of a
case in a process (its data or its attributes) runs `Store.check_case` (the cheap integrity
check), so a damaged or edited case is one line naming the case and file, never zeros where a
chunk was deleted, a codec traceback, or a mask written on a grid someone moved.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.geometry import Geometry
from data_store.index import SPLITS, IndexEntry, load_index
from data_store.integrity import (
    ARRAYS,
    CaseRecord,
    Problem,
    check_arrays,
    check_deep,
    check_files,
    check_unrecorded,
    check_values,
)
from data_store.location import StoreLocation


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
