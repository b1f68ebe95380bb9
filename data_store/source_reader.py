"""The reader of one case's source files (NIfTI or DICOM, as `data_store.layouts` found them):
validated and loaded into memory in the store's canonical orientation (`load_case`).

Shape legend: T phases, Z Y X canonical voxels, i j k voxels in file order.

Every problem raises `InputError(problem, case=ID, path=FILE)`, whose text is one line
``case ID: FILE: problem``. Checked, in order:

- discovery problems recorded in `CaseSource.problem` (no pre-contrast file, two files for a
  phase, a mask without an image, an unexpected file name);
- each file: exists and is a regular file (not a directory, a broken link or a link loop), is
  readable, is NIfTI, has a supported voxel type, declares no more voxel data than it holds (or
  than the size limit), has a spacing (or one is assumed), data not truncated (read eagerly):
  see `data_store.nifti.read_nifti`;
- dimensionality: a phase file is 3D (multi-file layouts) or 4D with phases on axis 4 (nifti4d,
  and the single ``_0000`` file of an nnU-Net or MAMA-MIA case, which then holds every phase);
  trailing axes of length 1 beyond the third are dropped first; 2D images, including a 3D file
  with a spatial axis of length 1, and 5D images are rejected;
- at least two phases (pre-contrast + one post-contrast);
- every phase has phase 0's shape, and an affine within `AFFINE_TOL_MM` of phase 0's;
- no NaN or Inf voxels (float data);
- mask: its shape equals the image's, its affine is within `AFFINE_TOL_MM`, values are {0, 1}.

Values: the scanner's stored values and dtype (see `data_store.nifti.read_nifti`; scaled
files come out as float32 ``raw * slope + inter``). Phases of different dtypes are stacked in
``np.result_type`` of their dtypes, which holds every value exactly (int16 + float32 ->
float32, int16 + uint16 -> int32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_store.errors import InputError
from data_store.geometry import Geometry
from data_store.layouts import CaseSource
from data_store.nifti import NiftiVolume, ReadOptions, read_nifti

__all__ = ["AFFINE_TOL_MM", "LoadedCase", "affine_mismatch_mm", "file_sha256", "load_case"]

#: Two affines match when they place every corner of the volume within this distance (mm).
#: 0.01 mm is ~1 % of a breast MRI voxel and far above float32 rounding of header affines.
AFFINE_TOL_MM = 0.01
_AXIS4 = "a 4D image with phases on axis 4"


@dataclass
class LoadedCase:
    """One validated case in memory.

    Attributes:
        source: the case's `CaseSource` (for nifti4d with `phase_present` filled in).
        image: (T, Z, Y, X) canonical, the scanner's dtype and values (int16 usually).
        mask: (Z, Y, X) uint8 in {0, 1}, or None for an unlabelled case.
        geometry: the phase-0 file's geometry.
        sha256: source file path (str) -> sha256 hex digest, for every file read.
        source_4d: every phase came from one 4D file.
        spacing_assumed: the spacing is `ReadOptions.assume_spacing`, not the files'.
        dicom: for a DICOM study, the references a DICOM SEG of a result needs
            (`data_store.dicom.DicomPhases.refs`); None otherwise.
    """

    source: CaseSource
    image: np.ndarray
    mask: np.ndarray | None
    geometry: Geometry
    sha256: dict[str, str]
    source_4d: bool = False
    spacing_assumed: bool = False
    dicom: dict | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, (Z, Y, X)."""
        return self.geometry.spacing


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def affine_mismatch_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where the two affines put the volume's 8 corner voxels."""
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ]
    ).T  # (4, 8)
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) @ corners
    return float(np.sqrt((diff[:3] ** 2).sum(axis=0)).max())


def load_case(source: CaseSource, options: ReadOptions | None = None) -> LoadedCase:
    """Reads and validates one case, returning it in canonical (T, Z, Y, X) order.

    Args:
        source: the case's files.
        options: size limit and assumed spacing for every file (default `ReadOptions()`).

    Raises:
        InputError: one line naming the case, the file and the problem (see module docstring).
    """
    _check_discovered(source)
    reader = _Reader(source.case_id, options or ReadOptions())
    if source.layout == "dicom":
        return _load_dicom(source, reader)
    read = _read_4d if source.layout == "nifti4d" else _read_phase_files
    phases = read(source, reader)
    image = phases.geometry.to_canonical(phases.image)  # (T, Z, Y, X)
    mask = None
    if source.mask_file is not None:
        mask = _load_mask(source.mask_file, phases.geometry, reader)
    times = source.times if source.times and len(source.times) == image.shape[0] else None
    return LoadedCase(
        source=dataclasses.replace(source, phase_present=tuple(phases.present), times=times),
        image=image,
        mask=mask,
        geometry=phases.geometry,
        sha256=reader.sha,
        source_4d=phases.source_4d,
        spacing_assumed=reader.assumed,
    )


def _load_dicom(source: CaseSource, reader: _Reader) -> LoadedCase:
    """A DICOM study (`data_store.dicom`): its phases, and its SEG or NIfTI mask."""
    from data_store.dicom import read_dicom_phases, read_seg_mask

    cid = source.case_id
    phases = read_dicom_phases(list(source.phase_files), cid, reader.options)
    for path in phases.files:
        reader.sha[str(path)] = file_sha256(path)
    _check_finite(phases.image, phases.files[0], cid)
    geometry = phases.geometry
    mask = None
    if source.mask_file is not None and source.mask_file.suffix.lower() in (".nii", ".gz"):
        mask = _load_mask(source.mask_file, geometry, reader)
    elif source.mask_file is not None:
        try:
            data = read_seg_mask(source.mask_file, phases.refs, geometry.shape)
        except InputError as err:
            raise err.moved(case=cid, path=err.path) from None
        reader.sha[str(source.mask_file)] = file_sha256(source.mask_file)
        mask = geometry.to_canonical(data)
    times = tuple(phases.times) if phases.times else None
    return LoadedCase(
        source=dataclasses.replace(
            source,
            phase_files=tuple(phases.files),
            phase_present=(True,) * phases.image.shape[0],
            times=times,
        ),
        image=geometry.to_canonical(phases.image),
        mask=mask,
        geometry=geometry,
        sha256=reader.sha,
        dicom=phases.refs,
    )


@dataclass
class _Reader:
    """Reads one case's files: the options, and what was read (checksums, assumed spacing)."""

    case_id: str
    options: ReadOptions
    sha: dict[str, str] = dataclasses.field(default_factory=dict)
    assumed: bool = False

    def read(self, path: Path) -> NiftiVolume:
        vol = read_nifti(path, case=self.case_id, options=self.options)
        self.sha[str(path)] = file_sha256(path)
        self.assumed = self.assumed or vol.spacing_assumed
        return vol


@dataclass
class _Phases:
    """A case's phases as read, before the mask.

    Attributes:
        image: (T, i, j, k) in file order.
        geometry: the phase-0 file's geometry.
        present: nominal phase presence (`CaseSource.phase_present`).
        source_4d: all phases came from one 4D file.
    """

    image: np.ndarray
    geometry: Geometry
    present: tuple[bool, ...]
    source_4d: bool = False


def _check_discovered(source: CaseSource) -> None:
    """Raises the problem discovery recorded, or the lack of any image file."""
    if source.problem:
        path = source.problem_path or (source.files[0] if source.files else None)
        raise InputError(source.problem, case=source.case_id, path=_s(path))
    if not source.phase_files:
        raise InputError(
            "fewer than two phases: no image files", case=source.case_id, path=_s(source.mask_file)
        )


def _read_4d(source: CaseSource, reader: _Reader) -> _Phases:
    """The nifti4d layout: one file, phases on axis 4."""
    cid = source.case_id
    path = source.phase_files[0]
    vol = reader.read(path)
    data = _squeeze(vol.data, path, cid, _AXIS4)
    if data.ndim == 3:
        raise InputError(
            f"fewer than two phases: a 3D image {data.shape} is one phase "
            "(the nifti4d layout needs phases on axis 4)",
            case=cid,
            path=str(path),
        )
    if data.ndim != 4:
        raise InputError(_dim_problem(data.shape, _AXIS4), case=cid, path=str(path))
    return _phases_on_axis4(vol, data, path, cid)


def _phases_on_axis4(vol: NiftiVolume, data: np.ndarray, path: Path, cid: str) -> _Phases:
    """A 4D file's (i, j, k, T) data, T >= 2 (a length-1 axis 4 was dropped), as its phases."""
    _check_spatial(data.shape[:3], data.shape, path, cid)
    geometry = _geometry(vol, path, cid)
    _check_finite(data, path, cid)
    image = np.moveaxis(data, -1, 0)  # (i, j, k, T) -> (T, i, j, k)
    return _Phases(image, geometry, (True,) * image.shape[0], source_4d=True)


def _read_phase_files(source: CaseSource, reader: _Reader) -> _Phases:
    """Multi-file layouts: one 3D file per phase, each on phase 0's grid (or one 4D file)."""
    cid = source.case_id
    if len(source.phase_files) < 2:
        return _read_single_file(source, reader)
    vols: list[np.ndarray] = []
    ref: NiftiVolume | None = None  # phase 0
    for t, path in enumerate(source.phase_files):
        vol = reader.read(path)
        data = _squeeze(vol.data, path, cid)
        if data.ndim != 3:
            extra = " (this layout has one 3D file per phase)" if data.ndim == 4 else ""
            raise InputError(_dim_problem(data.shape) + extra, case=cid, path=str(path))
        _check_spatial(data.shape, data.shape, path, cid)
        if ref is None:
            ref, geometry = vol, _geometry(vol, path, cid)
        else:
            if data.shape != geometry.shape:
                raise InputError(
                    f"phase shapes differ: phase {t} is {data.shape}, phase 0 is {geometry.shape}",
                    case=cid,
                    path=str(path),
                )
            _check_affine(vol.affine, ref.affine, geometry.shape, f"phase {t}", path, cid)
        _check_finite(data, path, cid)
        vols.append(data)
    dtype = np.result_type(*vols)
    image = np.stack([v.astype(dtype, copy=False) for v in vols])  # (T, i, j, k)
    return _Phases(image, geometry, source.phase_present or (True,) * image.shape[0])


def _read_single_file(source: CaseSource, reader: _Reader) -> _Phases:
    """A case with one phase file: a 4D file holding every phase (dcm2niix's dynamic series put
    in nnU-Net or MAMA-MIA folders as ``CASE_0000``) is read as its phases; a 3D one is one
    phase, too few."""
    cid, path = source.case_id, source.phase_files[0]
    vol = reader.read(path)
    data = _squeeze(vol.data, path, cid)
    if data.ndim == 4:
        return _phases_on_axis4(vol, data, path, cid)
    if data.ndim != 3:
        raise InputError(_dim_problem(data.shape), case=cid, path=str(path))
    raise InputError(_too_few(1), case=cid, path=str(path))


# ---------------------------------------------------------------------------------- checks


def _s(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _geometry(vol: NiftiVolume, path: Path, cid: str) -> Geometry:
    try:
        return vol.geometry
    except InputError as err:
        raise err.moved(case=cid, path=str(path)) from err


def _too_few(n: int) -> str:
    return f"fewer than two phases: found {n} (need pre-contrast + at least one post-contrast)"


def _dim_problem(shape: tuple[int, ...], expected: str = "a 3D volume per phase") -> str:
    return f"image is {len(shape)}D {tuple(shape)}, expected {expected}"


def _squeeze(
    data: np.ndarray, path: Path, cid: str, expected: str = "a 3D volume per phase"
) -> np.ndarray:
    """Drops trailing length-1 axes beyond the third ((i, j, k, 1) -> (i, j, k))."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise InputError(_dim_problem(data.shape, expected), case=cid, path=str(path))
    return data


def _check_spatial(spatial: tuple[int, ...], shape: tuple[int, ...], path: Path, cid: str) -> None:
    if min(spatial[:3]) < 2:
        raise InputError(
            f"image is 2D (shape {tuple(shape)} has a single slice), expected a 3D volume",
            case=cid,
            path=str(path),
        )


def _check_affine(
    affine: np.ndarray, ref: np.ndarray, shape: tuple[int, ...], what: str, path: Path, cid: str
) -> None:
    moved = affine_mismatch_mm(affine, ref, shape)
    if moved > AFFINE_TOL_MM:
        raise InputError(
            f"{what} affine differs from phase 0's: voxels move by up to {moved:.3g} mm "
            f"(tolerance {AFFINE_TOL_MM} mm)",
            case=cid,
            path=str(path),
        )


def _check_finite(data: np.ndarray, path: Path, cid: str) -> None:
    if data.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(data)
    if bad.any():
        n_nan = int(np.isnan(data).sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxels (first at voxel {first})",
            case=cid,
            path=str(path),
        )


def _load_mask(path: Path, geometry: Geometry, reader: _Reader) -> np.ndarray:
    """(Z, Y, X) uint8 mask, validated against the phase-0 geometry."""
    cid = reader.case_id
    vol = reader.read(path)
    data = _squeeze(vol.data, path, cid)
    if data.shape != geometry.shape:
        raise InputError(
            f"mask shape {data.shape} differs from image shape {geometry.shape}",
            case=cid,
            path=str(path),
        )
    _check_affine(vol.affine, geometry.affine, geometry.shape, "mask", path, cid)
    outside = (data != 0) & (data != 1)  # also catches NaN
    if outside.any():
        values = np.unique(data[outside])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
        raise InputError(
            f"mask values other than {{0, 1}}: {shown} in {int(outside.sum())} voxels",
            case=cid,
            path=str(path),
        )
    return geometry.to_canonical(data.astype(np.uint8))  # (Z, Y, X)
