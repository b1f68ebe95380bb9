"""NIfTI reading and writing: a file's voxels, affine and header in, a canonical volume back out
on the case's original grid.

Shape legend: T phases, Z Y X voxels in the store's canonical order, i j k voxels in the file's
own order. The canonical orientation and what is kept to go back: `data_store.geometry`.

Voxel values: `read_nifti` returns the values stored in the file in their own dtype (native
byte order; big-endian files are byte-swapped). When the header has a non-trivial scaling
(`scl_slope` not in {0, 1} or `scl_inter` not 0), the exact transform applied is
``float32(raw) * float32(slope) + float32(inter)`` and the result is float32; `NiftiVolume.scaling`
records ``(slope, inter)``. Spacing is taken from the affine's column norms, in the affine's
units, which NIfTI files from scanners give in mm.

Refused before any voxel is read (`read_nifti`, one line naming the file): voxel types other than
real scalars (complex, RGB, float128: `SUPPORTED_KINDS`); a header whose declared voxel data is
larger than the file holds after the header (uncompressed files) or than
`ReadOptions.max_image_bytes` (any file; for a ``.nii.gz`` the true size is only known by
decompressing it); and a file without a spacing: no sform, and a zero or non-finite
``pixdim[1:4]`` (nibabel would silently read such a file with 1 mm voxels), unless
`ReadOptions.assume_spacing` gives one, which is then recorded as assumed.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from data_store.errors import InputError
from data_store.geometry import Geometry, canonical_source_axes

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "NiftiVolume",
    "ReadOptions",
    "read_nifti",
    "save_nifti",
    "write_nifti",
]

#: 4 GiB of decoded voxels per file. The largest breast DCE files seen in public cohorts are a
#: 4D series of 6 phases of 512 x 512 x 200 int16 voxels (0.6 GiB); a 4D float64 series of 10
#: phases of 512 x 512 x 160 is 3.1 GiB. Ingest holds about three copies of a case in memory
#: (the read, the stacked phases, the canonical copy), so the default bounds a worker to ~12 GiB.
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024**3
#: numpy kinds of the voxel types stored: signed/unsigned integers and floats up to 8 bytes.
SUPPORTED_KINDS = "iuf"
_GZIP_SUFFIXES = (".gz",)


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """What `read_nifti` accepts beyond the defaults (the `tsesnet ingest` flags).

    Attributes:
        max_image_bytes: the most decoded voxel bytes one file may declare.
        assume_spacing: (Z, Y, X) mm for files that have no spacing (no sform and a zero
            pixdim); None rejects such files. Files that have a spacing keep their own.
    """

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    assume_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0:
            raise InputError(f"must be > 0, got {self.max_image_bytes}", param="max_image_bytes")
        if self.assume_spacing is not None:
            spacing = tuple(float(s) for s in self.assume_spacing)
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise InputError(
                    f"needs three positive sizes in mm (Z Y X), got {spacing}",
                    param="assume_spacing",
                )
            object.__setattr__(self, "assume_spacing", spacing)


# --------------------------------------------------------------------------- reading


class NiftiVolume(NamedTuple):
    """What `read_nifti` returns; unpacks as ``data, affine, header, scaling = ...``.

    Attributes:
        data: the voxel array in file (i, j, k[, t, ...]) order, native byte order, the file's
            dtype (float32 when `scaling` is not None).
        affine: (4, 4) float64 voxel-to-world affine (sform if set, else qform, as nibabel).
        image: the nibabel image (header access: ``image.header``; data already read).
        scaling: (slope, inter) when the header's scaling was applied, else None.
        spacing_assumed: the file had no spacing and `affine` uses `ReadOptions.assume_spacing`.
    """

    data: np.ndarray
    affine: np.ndarray
    image: nib.Nifti1Image
    scaling: tuple[float, float] | None
    spacing_assumed: bool = False

    @property
    def geometry(self) -> Geometry:
        """The geometry of the file's first three axes."""
        return Geometry.from_image(self.image, self.affine if self.spacing_assumed else None)


def read_nifti(
    path: str | os.PathLike, *, case: str | None = None, options: ReadOptions | None = None
) -> NiftiVolume:
    """Reads a NIfTI-1 or NIfTI-2 file completely into memory.

    The header is checked first (voxel type, declared size, spacing: see the module
    docstring), then the whole data block is read, so truncated or corrupt files fail now, with
    a clear message, not later in a worker.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        case: the case ID to name in error messages.
        options: size limit and assumed spacing (default `ReadOptions()`).

    Returns:
        A `NiftiVolume`; see the module docstring for the value/dtype rules.

    Raises:
        InputError: "file not found" (or what the path is instead: a directory, a broken
            symbolic link, a link loop), "cannot read file", "not a NIfTI file", an unsupported
            voxel type, a declared size too large, no spacing, or "truncated or corrupt image
            data", naming the case and file.
    """
    path = Path(path)
    options = options or ReadOptions()
    if not path.is_file():
        raise InputError(_not_a_file(path), case=case, path=str(path))
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", case=case, path=str(path))
    img = _load_header(path, case)
    _check_voxel_type(img, path, case)
    _check_declared_size(img, path, case, options.max_image_bytes)
    affine, assumed = _affine(img, path, case, options.assume_spacing)
    raw, slope, inter = _read_voxels(img, path, case)
    if raw.dtype.byteorder not in ("=", "|"):
        raw = raw.astype(raw.dtype.newbyteorder("="))
    scaling = None
    if (slope, inter) != (1.0, 0.0):
        scaling = (slope, inter)
        raw = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return NiftiVolume(raw, affine, img, scaling, assumed)


def _not_a_file(path: Path) -> str:
    """What a path that is not a regular file is, for the message."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "symbolic link loop: the path never reaches a file"
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    if path.is_dir():
        return "a directory, not a NIfTI file"
    if path.exists():
        return "not a regular file (a device, socket or pipe)"
    return "file not found"


def _load_header(path: Path, case: str | None) -> nib.Nifti1Image:
    """nibabel's image of the file, header read, no voxels read yet."""
    try:
        img = nib.load(str(path), mmap=False)
    except nib.filebasedimages.ImageFileError as err:
        raise InputError(_diagnose(path, err), case=case, path=str(path)) from err
    except Exception as err:  # permission, gzip header, short header...
        why = f"{type(err).__name__}: {_short(err, path)}"
        if "not a gzip file" in str(err).lower():
            why = "not gzip data although the name ends in .gz"
            raise InputError(f"not a NIfTI file ({why})", case=case, path=str(path)) from err
        raise InputError(f"cannot read file ({why})", case=case, path=str(path)) from err
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(
            f"not a NIfTI file (nibabel reads it as {type(img).__name__})",
            case=case,
            path=str(path),
        )
    return img


def _check_voxel_type(img: nib.Nifti1Image, path: Path, case: str | None) -> None:
    """Only real scalar voxels (integers, floats up to 8 bytes) are stored."""
    dtype = img.header.get_data_dtype()
    if dtype.kind in SUPPORTED_KINDS and dtype.fields is None and dtype.itemsize <= 8:
        return
    if dtype.fields is not None:
        what = f"{'/'.join(dtype.names)} ({len(dtype.names)} values per voxel)"
    else:
        what = str(dtype.newbyteorder("="))
    raise InputError(
        f"unsupported voxel type {what} (NIfTI datatype {int(img.header['datatype'])}): "
        "tsesnet stores real-valued scalar images (integer or float, at most 8 bytes)",
        case=case,
        path=str(path),
    )


def _check_declared_size(img: nib.Nifti1Image, path: Path, case: str | None, limit: int) -> None:
    """The voxel data the header declares must fit in the file and under the limit."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    declared = math.prod(shape) * img.header.get_data_dtype().itemsize
    what = f"{'x'.join(map(str, shape))} {img.header.get_data_dtype().newbyteorder('=')}"
    if not path.name.lower().endswith(_GZIP_SUFFIXES):
        offset = int(img.dataobj.offset)
        held = max(0, path.stat().st_size - offset)
        if declared > held:
            raise InputError(
                f"truncated or corrupt image data (expected {declared} bytes of voxels after the "
                f"header, found {held}: the header declares {what})",
                case=case,
                path=str(path),
            )
    if declared > limit:
        raise InputError(
            f"the header declares {what} voxels ({_size(declared)}), more than the "
            f"{_size(limit)} limit per file ({{max_image_bytes}})",
            case=case,
            path=str(path),
            params=["max_image_bytes"],
        )


def _size(n: int) -> str:
    """Bytes in the largest binary unit that fits: "14.9 GiB", "4 GiB", "672 bytes"."""
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.3g} {name}"
    return f"{n} bytes"


def _read_voxels(img: nib.Nifti1Image, path: Path, case: str | None):
    """(raw voxels, slope, inter), every voxel read now."""
    try:
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled())
        return raw, float(proxy.slope), float(proxy.inter)
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError on short data
        short = re.search(r"Expected (\d+) bytes, got (\d+) bytes", str(err))
        why = (
            f"expected {short[1]} bytes of voxels after the header, found {short[2]}"
            if short
            else f"{type(err).__name__}: {_short(err, path)}"
        )
        raise InputError(
            f"truncated or corrupt image data ({why})", case=case, path=str(path)
        ) from err


def _affine(
    img: nib.Nifti1Image, path: Path, case: str | None, assume: tuple[float, ...] | None
) -> tuple[np.ndarray, bool]:
    """(the affine to use, whether its spacing is assumed): see the module docstring."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if int(img.header["sform_code"]) > 0:
        return affine, False  # the sform's columns are the spacing
    pixdim = _raw_pixdim(img, path)
    ndim = min(3, len(img.header.get_data_shape()))
    if all(math.isfinite(p) and p != 0 for p in pixdim[:ndim]):
        return affine, False
    if assume is None:
        shown = ", ".join(f"{p:g}" for p in pixdim)
        raise InputError(
            f"no voxel spacing: pixdim[1:4] is ({shown}) and the file has no sform; pass "
            "`{assume_spacing=Z Y X}` (mm) to ingest it with a spacing you know",
            case=case,
            path=str(path),
            params=["assume_spacing"],
        )
    ornt = io_orientation(affine)  # nibabel's affine for this file, with 1 mm voxels
    for c, axis in enumerate(canonical_source_axes(ornt)):
        column = affine[:3, axis]
        affine[:3, axis] = column / np.linalg.norm(column) * assume[c]
    return affine, True


def _raw_pixdim(img: nib.Nifti1Image, path: Path) -> tuple[float, float, float]:
    """pixdim[1:4] as stored in the file: nibabel's loaded header has zeros replaced by 1."""
    size = type(img.header).template_dtype.itemsize
    opener = gzip.open if path.name.lower().endswith(_GZIP_SUFFIXES) else open
    with opener(path, "rb") as f:
        block = f.read(size)
    raw = type(img.header)(binaryblock=block, endianness=img.header.endianness, check=False)
    return tuple(float(p) for p in raw["pixdim"][1:4])


# --------------------------------------------------------------------------- writing


def write_nifti(
    path: str | os.PathLike,
    vol_zyx: np.ndarray,
    geometry: Geometry,
    dtype: np.dtype | str | None = None,
) -> None:
    """Writes a canonical volume back on the original grid of the case's phase-0 file.

    The file gets the source's shape (i, j, k), affine, qform/sform codes and NIfTI version,
    so it opens on top of the scan in 3D Slicer or ITK-SNAP. Voxel values are written as given
    (no scaling).

    Args:
        path: output ``.nii`` or ``.nii.gz`` path (parent folders are created).
        vol_zyx: (Z, Y, X) for a 3D file, or (T, Z, Y, X) for a 4D file with phases on axis 4.
        geometry: the case's `Geometry`.
        dtype: on-disk dtype (default: the array's dtype).
    """
    vol = np.asarray(vol_zyx)
    if vol.ndim not in (3, 4):
        raise ValueError(f"vol_zyx must be (Z, Y, X) or (T, Z, Y, X), got shape {vol.shape}")
    if dtype is not None:
        vol = vol.astype(dtype, copy=False)
    data = geometry.to_original(vol)  # (i, j, k) or (T, i, j, k)
    if data.ndim == 4:
        data = np.ascontiguousarray(np.moveaxis(data, 0, -1))  # (i, j, k, T)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    save_nifti(
        path,
        data,
        geometry.affine,
        qform=geometry.qform,
        qform_code=geometry.qform_code,
        sform_code=geometry.sform_code,
        version=geometry.nifti_version,
    )


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    qform: np.ndarray | None = None,
    qform_code: int = 1,
    sform_code: int = 1,
    version: int = 1,
    units: tuple[str, str] | None = None,
    scaling: bool = True,
) -> None:
    """The one NIfTI writer: `data` in file (i, j, k[, t]) order as written, with its header.

    `write_nifti` (a case's canonical volume back on its source grid) and the synthetic cohort
    (`data_store.synth`) both write through it.

    Args:
        path: output ``.nii`` or ``.nii.gz`` path (parent folders are created).
        data: the voxels in file axis order; its dtype is the on-disk dtype.
        affine: (4, 4) voxel-to-world; the sform.
        qform: the qform (default: `affine`).
        qform_code: the qform's code.
        sform_code: the sform's code.
        version: 1 (NIfTI-1) or 2 (NIfTI-2).
        units: ``xyzt_units`` as nibabel names them (``("mm", "sec")``), None: not set.
        scaling: write ``scl_slope``/``scl_inter`` as 1 and 0 (voxels stored as given);
            False leaves nibabel's defaults (also unscaled).
    """
    cls = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    img = cls(data, affine)
    img.header.set_data_dtype(data.dtype)
    if units is not None:
        img.header.set_xyzt_units(*units)
    img.set_qform(affine if qform is None else qform, code=qform_code)
    img.set_sform(affine, code=sform_code)
    if scaling:
        img.header.set_slope_inter(1.0, 0.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _diagnose(path: Path, err: BaseException) -> str:
    """Why nibabel could not recognise a file: a truncated header, bad gzip data, or not NIfTI."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(540)
                while f.read(1 << 20):  # the whole stream, to see whether it ends early
                    pass
        else:
            head = path.read_bytes()[:540]
    except gzip.BadGzipFile:
        return "not a NIfTI file (not gzip data although the name ends in .gz)"
    except EOFError:
        return "truncated file (the gzip data ends early)"
    except (OSError, zlib.error) as gz_err:
        return f"corrupt file ({type(gz_err).__name__}: {_short(gz_err, path)})"
    if len(head) < 348:
        return f"truncated header ({len(head)} bytes; a NIfTI header has 348)"
    return f"not a NIfTI file ({_short(err, path)})"


def _short(err: BaseException, path: Path, limit: int = 160) -> str:
    """One line of an exception's text without the file name (the message names it already)."""
    text = str(err)
    for quoted in (f'"{path}"', f"'{path}'", f"from {path}", str(path)):
        text = text.replace(quoted, "")
    text = " ".join(text.replace(" - ", " ").split()).strip(" :-") or type(err).__name__
    if text.startswith("Cannot work out file type of"):
        text = "no valid NIfTI header"
    return text if len(text) <= limit else text[: limit - 3] + "..."
