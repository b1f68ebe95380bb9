"""The geometry contract at the I/O edge: where a case's voxels sit in the world, and how to move
between a file's axis order and the store's.

Shape legend: T phases, Z Y X voxels in the store's canonical order, i j k voxels in the file's
own order.

The canonical orientation is nibabel's closest RAS+ orientation (`io_orientation`: axis flips
and permutations only, never resampling, so it has an exact inverse), then the array transposed
from (i=R, j=A, k=S) to (Z=S, Y=A, X=R). `Geometry` keeps what is needed to go back: the phase-0
file's affine and shape, the orientation transform, and the header's qform/sform codes so that
`data_store.nifti.write_nifti` reproduces the source file's affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from data_store.errors import InputError

__all__ = ["Geometry", "canonical_source_axes"]


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a case's voxels sit in the world, and how to move between file and store order.

    Attributes:
        affine: (4, 4) float64, the phase-0 file's original voxel-to-world affine.
        shape: original 3D shape in file (i, j, k) order.
        ornt: (3, 2) nibabel orientation transform original -> RAS+ (row a: the RAS axis that
            file axis a becomes, and +1/-1 for a flip).
        spacing: voxel size in mm in canonical (Z, Y, X) order.
        qform_code: the phase-0 file's qform code, reproduced by `write_nifti`.
        sform_code: the phase-0 file's sform code, reproduced by `write_nifti`.
        qform: (4, 4) the phase-0 file's qform affine (None: use `affine`).
        nifti_version: 1 or 2, the phase-0 file's format, reproduced by `write_nifti`.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    ornt: np.ndarray
    spacing: tuple[float, float, float]
    qform_code: int = 1
    sform_code: int = 1
    qform: np.ndarray | None = field(default=None)
    nifti_version: int = 1

    @classmethod
    def from_affine(
        cls,
        affine: np.ndarray,
        shape: tuple[int, ...],
        *,
        qform_code: int = 1,
        sform_code: int = 1,
        qform: np.ndarray | None = None,
        nifti_version: int = 1,
    ) -> Geometry:
        """Builds the geometry of a volume from its affine and (i, j, k) shape.

        Raises:
            InputError: if the affine is degenerate (an axis with no clear direction).
        """
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
        ornt = io_orientation(affine)
        if np.isnan(ornt).any():
            rows = np.round(affine, 4).tolist()
            raise InputError(f"affine is degenerate (no direction for an axis): {rows}")
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (i, j, k) voxel sizes
        src = canonical_source_axes(ornt)
        spacing = tuple(float(zooms[a]) for a in src)
        return cls(
            affine=affine,
            shape=tuple(int(s) for s in shape[:3]),
            ornt=ornt.astype(np.float64),
            spacing=spacing,
            qform_code=int(qform_code),
            sform_code=int(sform_code),
            qform=None if qform is None else np.asarray(qform, dtype=np.float64),
            nifti_version=int(nifti_version),
        )

    @classmethod
    def from_image(cls, img: nib.Nifti1Image, affine: np.ndarray | None = None) -> Geometry:
        """The geometry of a loaded nibabel NIfTI image (its first three axes).

        Args:
            img: the image.
            affine: an affine to use instead of the image's (an assumed spacing); it is also
                what a qform-coded export writes.
        """
        hdr = img.header
        qcode = int(hdr["qform_code"])
        qform = hdr.get_qform() if qcode > 0 else None
        if affine is not None and qform is not None:
            qform = affine
        return cls.from_affine(
            img.affine if affine is None else affine,
            img.shape[:3],
            qform_code=qcode,
            sform_code=int(hdr["sform_code"]),
            qform=qform,
            nifti_version=2 if isinstance(img, nib.Nifti2Image) else 1,
        )

    @property
    def orientation(self) -> str:
        """The phase-0 file's orientation as nibabel axis codes (``RAS``, ``LPS``...), the closest
        axes for an oblique affine: what training records and prediction compares."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def obliquity_deg(self) -> float:
        """The largest angle, in degrees, between a voxel axis of the phase-0 file and the world
        axis closest to it: the rotation that reorienting to the canonical order (axis swaps and
        flips only) leaves in the volume (nibabel's `obliquity`)."""
        from nibabel.affines import obliquity

        return float(np.degrees(np.max(np.abs(obliquity(self.affine)))))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape in canonical (Z, Y, X) order."""
        return tuple(self.shape[a] for a in canonical_source_axes(self.ornt))

    @property
    def canonical_affine(self) -> np.ndarray:
        """(4, 4) affine mapping canonical (z, y, x, 1) voxel indices to world (RAS mm)."""
        # nibabel's inv_ornt_aff maps RAS-reoriented (r, a, s) indices to original (i, j, k).
        ras_to_orig = nib.orientations.inv_ornt_aff(self.ornt, self.shape)
        zyx_to_ras = np.eye(4)[[2, 1, 0, 3]].T  # (z, y, x) -> (r=x, a=y, s=z)
        return self.affine @ ras_to_orig @ zyx_to_ras

    def to_canonical(self, vol: np.ndarray) -> np.ndarray:
        """Reorients a volume from file order to the store's canonical order.

        Args:
            vol: (..., i, j, k) in the file's axis order; leading axes (e.g. phases) are kept.

        Returns:
            (..., Z, Y, X) C-contiguous, same dtype and values (flips and transposes only).
        """
        vol = np.asarray(vol)
        self._check_shape(vol.shape[-3:], self.shape, "file (i, j, k)")
        lead = vol.ndim - 3
        flips = tuple(lead + a for a in range(3) if self.ornt[a, 1] < 0)
        if flips:
            vol = np.flip(vol, axis=flips)
        src = canonical_source_axes(self.ornt)
        vol = vol.transpose(*range(lead), *(lead + a for a in src))
        return np.ascontiguousarray(vol)

    def to_original(self, vol: np.ndarray) -> np.ndarray:
        """Exact inverse of `to_canonical`: (..., Z, Y, X) -> (..., i, j, k), C-contiguous."""
        vol = np.asarray(vol)
        self._check_shape(vol.shape[-3:], self.canonical_shape, "canonical (Z, Y, X)")
        lead = vol.ndim - 3
        src = canonical_source_axes(self.ornt)  # canonical axis c came from file axis src[c]
        inverse = [src.index(a) for a in range(3)]
        vol = vol.transpose(*range(lead), *(lead + c for c in inverse))
        flips = tuple(lead + a for a in range(3) if self.ornt[a, 1] < 0)
        if flips:
            vol = np.flip(vol, axis=flips)
        return np.ascontiguousarray(vol)

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able dict (lists and numbers) for Zarr attributes; inverse of `from_attrs`."""
        return {
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "ornt": self.ornt.tolist(),
            "spacing": list(self.spacing),
            "canonical": "RAS+ transposed to (Z=S, Y=A, X=R)",
            "qform_code": self.qform_code,
            "sform_code": self.sform_code,
            "qform": None if self.qform is None else self.qform.tolist(),
            "nifti_version": self.nifti_version,
        }

    @classmethod
    def from_attrs(cls, d: dict[str, Any]) -> Geometry:
        """Rebuilds a `Geometry` from `to_attrs` output (extra keys are ignored)."""
        qform = d.get("qform")
        return cls(
            affine=np.asarray(d["affine"], dtype=np.float64),
            shape=tuple(int(s) for s in d["shape"]),
            ornt=np.asarray(d["ornt"], dtype=np.float64),
            spacing=tuple(float(s) for s in d["spacing"]),
            qform_code=int(d.get("qform_code", 1)),
            sform_code=int(d.get("sform_code", 1)),
            qform=None if qform is None else np.asarray(qform, dtype=np.float64),
            nifti_version=int(d.get("nifti_version", 1)),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.to_attrs() == other.to_attrs()

    __hash__ = None  # mutable numpy fields: not hashable

    @staticmethod
    def _check_shape(got: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
        if tuple(got) != tuple(want):
            raise ValueError(f"volume's last three axes {tuple(got)} != {what} shape {want}")


def canonical_source_axes(ornt: np.ndarray) -> list[int]:
    """For canonical axes (Z=S, Y=A, X=R), the file axis each one comes from."""
    file_axis_of_ras = [0, 0, 0]
    for a in range(3):
        file_axis_of_ras[int(ornt[a, 0])] = a
    return [file_axis_of_ras[2], file_axis_of_ras[1], file_axis_of_ras[0]]
