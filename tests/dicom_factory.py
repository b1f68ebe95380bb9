"""Small synthetic DICOM DCE-MRI studies written with pydicom, for tests (beside nifti_factory).

    from dicom_factory import write_study  # tests/ is on sys.path under pytest
    study = write_study(tmp_path / "s1", image, variant="series")

`image` is (T, i, j, k) in the DICOM grid's order (i = column, j = row, k = slice), so the same
array saved as NIfTI with `WrittenStudy.affine` is the same volume in the same place (the
reader's LPS -> RAS convention, as dcm2niix's). Variants:

- ``series``: one series per phase (AcquisitionTime per phase), classic single-frame MR;
- ``multiphase``: one series, TemporalPositionIdentifier + NumberOfTemporalPositions per
  instance;
- ``enhanced``: one enhanced multi-frame MR file, a frame per slice and phase, with per-frame
  positions, TemporalPositionIndex and FrameAcquisitionDateTime.

`extra` adds non-DCE series to the study: ``t2`` (another sequence on the same grid),
``localizer``, ``subtraction`` (ImageType DERIVED\\SUBTRACTION), ``dwi`` (a b-value).
`shuffle` gives every file a random name in random sub-folders. `dtype` (int16, uint16, uint8)
sets BitsAllocated and PixelRepresentation; `start` is phase 0's time of day in s.
`reencode` rewrites a file in another transfer syntax or without its preamble, `cd_export`
copies a study into a PACS-CD-like file set (DICOMDIR, upper-case names without extension).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
#: Row and column cosines (LPS) of an axial stack, and of an oblique one (20 deg about x).
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
OBLIQUE = (1.0, 0.0, 0.0, 0.0, round(float(_c), 6), round(float(_s), 6))


@dataclass
class WrittenStudy:
    """What `write_study` wrote.

    Attributes:
        study_uid: the Study Instance UID.
        affine: (4, 4) RAS affine of the (i, j, k) grid, as a NIfTI of the volume would carry.
        image: (T, i, j, k) the phases written (stored values).
        files: phase -> its files, slice order (one file for ``enhanced``).
        series_uids: phase -> its series UID.
        extra_files: non-DCE series' files.
    """

    study_uid: str
    affine: np.ndarray
    image: np.ndarray
    files: dict[int, list[Path]] = field(default_factory=dict)
    series_uids: dict[int, str] = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)

    @property
    def all_files(self) -> list[Path]:
        return [p for t in sorted(self.files) for p in self.files[t]] + self.extra_files


def grid_affine(orientation, spacing, step, origin) -> np.ndarray:
    """RAS affine of voxel (i=column, j=row, k=slice) for a DICOM stack."""
    o = np.asarray(orientation, float)
    row, col = o[:3], o[3:]
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _base(study_uid: str, series_uid: str, sop_class: str, number: int, desc: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.Modality = "MR"
    ds.PatientName = "DOE^JANE"  # identifying: the store must not keep it
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.StudyDate = "20240102"
    ds.StudyTime = "090000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC42"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = number
    ds.SeriesDescription = desc
    ds.Manufacturer = "test"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.EchoTime = 2.0
    ds.RepetitionTime = 5.0
    ds.FlipAngle = 10
    return ds


def _pixel_format(ds: Dataset, dtype) -> None:
    dtype = np.dtype(dtype)
    ds.BitsAllocated = ds.BitsStored = 8 * dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(dtype.kind == "i")


def _tm(seconds: float) -> str:
    t = datetime.datetime(2024, 1, 2) + datetime.timedelta(seconds=seconds)
    return t.strftime("%H%M%S.%f")


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


class _Namer:
    """File names: ordered ones, or random names in random sub-folders (`shuffle`)."""

    def __init__(self, root: Path, shuffle: bool, rng):
        self.root, self.shuffle, self.rng, self.n = root, shuffle, rng, 0

    def __call__(self, label: str) -> Path:
        self.n += 1
        if not self.shuffle:
            return self.root / label / f"IM{self.n:05d}.dcm"
        folder = f"d{int(self.rng.integers(0, 3))}/x{int(self.rng.integers(0, 2))}"
        return self.root / folder / f"{int(self.rng.integers(0, 1 << 40)):x}"


def write_study(
    root: Path,
    image: np.ndarray,
    *,
    variant: str = "series",
    orientation=AXIAL,
    spacing=(0.8, 0.7),
    step: float = 2.0,
    origin=(-20.0, -30.0, 10.0),
    times=None,
    extra: tuple[str, ...] = (),
    shuffle: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    study_uid: str | None = None,
    seed: int = 0,
    dtype=np.int16,
    start: float = 9 * 3600.0,
) -> WrittenStudy:
    """Writes one DCE study of `image` (T, i, j, k) int16 under `root` (see module docstring).

    `slope`/`intercept` are written as RescaleSlope/RescaleIntercept (the stored values stay
    `image`); `times` are the phases' acquisition times in s (default 0, 60, 120...).
    """
    rng = np.random.default_rng(seed)
    image = np.asarray(image, dtype=dtype)
    n_t, n_i, n_j, n_k = image.shape
    study_uid = study_uid or generate_uid()
    times = list(times) if times is not None else [60.0 * t for t in range(n_t)]
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    positions = [np.asarray(origin, float) + k * step * normal for k in range(n_k)]
    out = WrittenStudy(study_uid, grid_affine(orientation, spacing, step, origin), image)
    name = _Namer(Path(root), shuffle, rng)

    def slice_ds(ds: Dataset, t: int, k: int, pixels: np.ndarray) -> Dataset:
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = step
        ds.Rows, ds.Columns = n_j, n_i
        ds.AcquisitionTime = _tm(start + times[t])
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _pixel_format(ds, image.dtype)
        ds.PixelData = np.ascontiguousarray(pixels.T).tobytes()  # (i, j) -> (rows, cols)
        return ds

    if variant == "series":
        for t in range(n_t):
            series_uid = generate_uid()
            out.series_uids[t] = series_uid
            out.files[t] = [
                _save(
                    slice_ds(
                        _base(study_uid, series_uid, MR_IMAGE, 10 + t, f"dyn {t}"),
                        t,
                        k,
                        image[t, :, :, k],
                    ),
                    name(f"series{t}"),
                )
                for k in range(n_k)
            ]
    elif variant == "multiphase":
        series_uid = generate_uid()
        for t in range(n_t):
            out.series_uids[t] = series_uid
            files = []
            for k in range(n_k):
                ds = _base(study_uid, series_uid, MR_IMAGE, 10, "dynamic")
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = n_t
                ds = slice_ds(ds, t, k, image[t, :, :, k])
                ds.InstanceNumber = t * n_k + k + 1
                files.append(_save(ds, name("dynamic")))
            out.files[t] = files
    elif variant == "enhanced":
        series_uid = generate_uid()
        ds = _enhanced(
            study_uid,
            series_uid,
            image,
            orientation,
            spacing,
            step,
            positions,
            [start + x for x in times],
            slope,
            intercept,
        )
        path = _save(ds, name("enhanced"))
        for t in range(n_t):
            out.series_uids[t], out.files[t] = series_uid, [path]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    for number, kind in enumerate(extra, start=50):
        out.extra_files += _extra(
            kind, study_uid, number, image[0], orientation, spacing, step, positions, name
        )
    return out


def _enhanced(
    study_uid, series_uid, image, orientation, spacing, step, positions, times, slope, intercept
) -> Dataset:
    n_t, n_i, n_j, n_k = image.shape
    ds = _base(study_uid, series_uid, ENHANCED_MR, 10, "dynamic enhanced")
    del ds.EchoTime, ds.RepetitionTime, ds.FlipAngle  # in functional groups for enhanced MR
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = n_j, n_i
    ds.NumberOfFrames = n_t * n_k
    ds.ContentDate, ds.ContentTime = "20240102", "090000"
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = list(spacing)
    pm.SliceThickness = step
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = list(orientation)
    shared.PlaneOrientationSequence = Sequence([po])
    timing = Dataset()
    timing.RepetitionTime = 5.0
    timing.FlipAngle = 10
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = 2.0
    shared.MREchoSequence = Sequence([echo])
    if slope != 1.0 or intercept != 0.0:
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, intercept, "US"
        shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame, frames = [], []
    for t in range(n_t):
        for k in range(n_k):
            item = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
            item.PlanePositionSequence = Sequence([pp])
            fc = Dataset()
            fc.TemporalPositionIndex = t + 1
            fc.FrameAcquisitionDateTime = "20240102" + _tm(times[t])
            item.FrameContentSequence = Sequence([fc])
            per_frame.append(item)
            frames.append(np.ascontiguousarray(image[t, :, :, k].T))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _pixel_format(ds, image.dtype)
    ds.PixelData = np.stack(frames).tobytes()
    return ds


def _extra(kind, study_uid, number, vol, orientation, spacing, step, positions, name):
    """A non-DCE series of the study (see the module docstring)."""
    series_uid = generate_uid()
    files = []
    n_i, n_j, n_k = vol.shape
    for k in range(n_k if kind != "localizer" else 3):
        ds = _base(study_uid, series_uid, MR_IMAGE, number, kind)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = n_j, n_i
        ds.PixelSpacing = list(spacing)
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        ds.ImageOrientationPatient = list(orientation)
        ds.AcquisitionTime = _tm(8 * 3600.0 + number)
        if kind == "t2":
            ds.EchoTime, ds.RepetitionTime, ds.FlipAngle = 80.0, 3000.0, 90
        elif kind == "localizer":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.ImageOrientationPatient = list([AXIAL, (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)][k])
        elif kind == "subtraction":
            ds.ImageType = ["DERIVED", "SECONDARY", "SUBTRACTION"]
        elif kind == "dwi":
            ds.DiffusionBValue = 800
            ds.EchoTime, ds.RepetitionTime = 70.0, 4000.0
        else:
            raise ValueError(f"unknown extra series {kind!r}")
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
        files.append(_save(ds, name(kind)))
    return files


def edit(path: Path, **attrs) -> None:
    """Sets attributes of a written file (a defect, e.g. ``ImagePositionPatient=[...]``)."""
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)


def make_image(shape=(3, 12, 10, 8), seed: int = 0) -> np.ndarray:
    """(T, i, j, k) int16: a noisy background and a box that enhances phase by phase."""
    rng = np.random.default_rng(seed)
    t, ni, nj, nk = shape
    image = rng.normal(200, 20, shape)
    box = (slice(ni // 4, ni // 2 + 1), slice(nj // 4, nj // 2 + 1), slice(1, nk - 2))
    for p in range(1, t):
        image[(p, *box)] += 150 * p
    return image.astype(np.int16)


#: JPEG Lossless (process 14) and its selection value 1 form, what PACS exports most often
#: hold: GDCM's names for them.
_GDCM_SYNTAXES = {
    "1.2.840.10008.1.2.4.57": "JPEGLosslessProcess14",
    "1.2.840.10008.1.2.4.70": "JPEGLosslessProcess14_1",
}


def _gdcm_transcode(path: Path, syntax: str, name: str) -> None:
    """Compresses the file's pixels with GDCM, keeping pydicom's header as written (GDCM's
    writer would remake an enhanced file's functional groups)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, name)))
    change.SetInput(reader.GetImage())
    assert change.Change(), path
    writer = gdcm.ImageWriter()
    tmp = path.with_name(path.name + ".gdcm")
    writer.SetFileName(str(tmp))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), path
    compressed = pydicom.dcmread(tmp)
    tmp.unlink()
    ds = pydicom.dcmread(path)
    ds.PixelData = compressed.PixelData
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)


def reencode(path: Path, syntax: str | None = None, *, preamble: bool = True) -> None:
    """Rewrites a written file in transfer syntax `syntax` (implicit VR little endian, explicit
    VR big endian, deflated, JPEG lossless), or, with `preamble=False`, as a bare dataset in
    implicit VR little endian: no 128-byte preamble, no ``DICM``, no file meta group (old
    exports write these)."""
    if syntax in _GDCM_SYNTAXES:  # JPEG lossless: pydicom does not encode it, GDCM does
        _gdcm_transcode(path, syntax, _GDCM_SYNTAXES[syntax])
        return
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    out = Dataset()
    out.update(ds)  # a plain dataset: pydicom keeps a read file in its original encoding
    out.file_meta = ds.file_meta
    if not preamble:
        del out.file_meta
        pydicom.dcmwrite(path, out, implicit_vr=True, little_endian=True)
        return
    out.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        out.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    out.save_as(path, enforce_file_format=True)


def cd_export(study: WrittenStudy, root: Path) -> list[Path]:
    """Copies the study's files into `root` as a PACS CD holds them: a ``DICOMDIR`` at the root
    and ``PT000000/ST000000/SE000000/IM000000`` files (upper case, no extension); returns the
    copies."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for path in study.all_files:
        fs.add(path)
    fs.write(root)
    return [Path(root) / Path(*inst.ReferencedFileID) for inst in fs]
