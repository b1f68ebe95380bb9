"""DICOM DCE-MRI studies: discovery of cases and reading of their phases (the ``dicom`` layout).

Shape legend: T phases, i j k voxels in the DICOM grid's own order (i = column, j = row,
k = slice along the normal), n slices.

What is read (pydicom; any folder structure, any file names, linked folders followed, each real
file once; a file is DICOM when it has the ``DICM`` marker after its 128-byte preamble, or
opens as a bare dataset without preamble and file meta, as old exports write them; hidden files
and a ``DICOMDIR`` are not read, its files are):

- One case per study (``StudyInstanceUID``). Its ID is ``study-`` and the first 12 hex digits of
  the SHA-256 of the Study Instance UID: stable across exports, and no patient name, ID or date
  in it. The store keeps the UID itself (see `DicomPhases.refs`) to find the study again.
- The DCE phases, from the DICOM itself: one series whose instances carry several temporal
  positions (``TemporalPositionIdentifier``, or the enhanced MR ``TemporalPositionIndex``, else
  distinct ``AcquisitionTime``/``TriggerTime`` at repeated slice positions), or several
  single-time series of one sequence (same EchoTime, RepetitionTime, FlipAngle), one per phase,
  or both (a pre-contrast series of the same sequence on the same slices beside the multi-phase
  one is a phase too).
  Phases are ordered by acquisition time (``AcquisitionDateTime``/``AcquisitionTime``/
  ``FrameAcquisitionDateTime``, else ``TriggerTime``; series or temporal number when there is
  none; a study whose times of day span more than 12 h went through midnight); the times, in s
  after phase 0, become the case's phase times (none when two phases share one).
- An identical copy of a file (same SOP Instance UID, same bytes) is read once, one note.
- Skipped, one line each saying why (`CaseSource.notes`): series that are not MR images, derived
  or subtraction series (``ImageType`` DERIVED, SUBTRACTION, MIP...), localizers, diffusion
  series, series with no geometry, and series of another sequence than the dynamic one (T2...).
- Geometry: ``ImageOrientationPatient``, ``ImagePositionPatient`` and ``PixelSpacing``; slices are
  ordered by their position projected on the normal (row x column cosines); the slice spacing is
  the distance between those projections (``SliceThickness`` is not the spacing). The affine is
  LPS turned into NIfTI's RAS, as dcm2niix and nibabel do.
- Values: ``RescaleSlope``/``RescaleIntercept`` applied, per image (float32 when not the
  identity, else the stored integers, 8 or 16 bits, signed or not). MONOCHROME1 images are
  read as their values: it says how to display them, not what they measure. Classic
  single-frame MR and enhanced (or legacy converted enhanced) multi-frame MR are read; any
  transfer syntax pydicom decodes (natively: implicit/explicit VR little endian, big endian,
  deflated; with pyjpegls and Pillow, which install with highdicom: RLE, JPEG-LS, JPEG 2000
  lossless; with GDCM: JPEG Lossless).
- Mask: a DICOM SEG of the same study (its tumour segment, `_tumour_segment`, placed by its
  frames' positions), or one NIfTI file in the study's folder (the folder holding all its files,
  of that study alone), on the same grid.

Refused, one line naming study (case), series and file: files that are not DICOM but are named
``.dcm``, unreadable or truncated files, missing or duplicate slices, a phase with fewer slices
than phase 0, uneven slice spacing beyond `SPACING_TOL`, slices of one stack with different
orientations or sheared off the normal (a stack that cannot be placed on a grid), an image
without position, orientation or spacing (or a NaN in them) in a series whose others have them,
a PixelSpacing not positive, phases whose grids differ, images larger than
``ReadOptions.max_image_bytes``, compressed transfer syntaxes no installed decoder reads, two
different files with one SOP Instance UID, two multi-phase series of as many phases, a SEG of
several segments none or several of which is labelled the tumour, a SEG referencing no series
of the study or of a study without images, and a NIfTI beside several studies.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_store.errors import InputError
from data_store.geometry import Geometry
from data_store.nifti import ReadOptions

__all__ = [
    "MR_SOP_CLASSES",
    "SEG_SOP_CLASS",
    "DicomCase",
    "DicomPhases",
    "discover_dicom",
    "has_dicom",
    "is_dicom",
    "read_dicom_phases",
    "read_seg_mask",
    "study_case_id",
]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"  # classic images converted to multi-frame
MULTI_FRAME_MR = (ENHANCED_MR, LEGACY_ENHANCED_MR)
MR_SOP_CLASSES = (MR_IMAGE, *MULTI_FRAME_MR)
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Slice gaps may differ from the median gap by this fraction (DS strings round positions to
#: ~1e-4 mm; a missing slice doubles a gap).
SPACING_TOL = 0.01
#: Directions (cosines) of two stacks or slices are the same within this.
COSINE_TOL = 1e-4
#: Positions (mm) closer than this along the normal are the same slice.
SAME_SLICE_MM = 1e-3
#: A slice may sit off the stack's normal line by this much (mm) before it cannot be placed.
SHEAR_TOL_MM = 0.05
_SKIP_TYPES = ("DERIVED", "SUBTRACTION", "SUB", "MIP", "MPR", "PROJECTION IMAGE", "ADC", "MPR")
_DIFFUSION_WORDS = ("dwi", "diff", "adc", "trace", "ep_b")


def is_dicom(path: Path) -> bool:
    """Whether `path` is a regular file with the DICOM ``DICM`` marker at byte 128, or a bare
    dataset (`_bare_dataset`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return (len(head) == 132 and head[128:132] == b"DICM") or _bare_dataset(head)


def _bare_dataset(head: bytes) -> bool:
    """Whether `head` (a file's first bytes) opens a DICOM dataset written without the 128-byte
    preamble and ``DICM`` (old exports, some scanners' raw files): a little-endian element of
    group 0002 or 0008 followed by an explicit VR (two capital letters) or by a short implicit
    length. Other files (text, images, Thumbs.db) do not open so."""
    if len(head) < 8 or head[0:2] not in (b"\x02\x00", b"\x08\x00") or head[3] != 0:
        return False
    if head[4:6].isalpha() and head[4:6].isupper():
        return True
    return int.from_bytes(head[4:8], "little") < 1024


def has_dicom(src: Path, limit: int = 2000) -> bool:
    """Whether SRC (a file or a folder, searched to any depth) holds a DICOM file; at most
    `limit` files are looked at."""
    if src.is_file():
        return is_dicom(src)
    seen = 0
    for path in _walk(src):
        if _nifti(path):
            continue
        if is_dicom(path):
            return True
        seen += 1
        if seen >= limit:
            return False
    return False


def study_case_id(study_uid: str) -> str:
    """``study-`` + 12 hex digits of SHA-256(StudyInstanceUID): no identifying attribute."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def _walk(src: Path):
    """Regular files under `src`, hidden files and folders left out, in a stable order.

    Linked folders are followed (exports link studies in from elsewhere), each real folder and
    file once: a link loop ends, and a file reached by two links is one file.
    """
    folders: set[str] = set()
    seen: set[str] = set()
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in folders:
            dirs[:] = []
            continue
        folders.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or os.path.realpath(path) in seen:
                continue
            seen.add(os.path.realpath(path))
            yield path


# -------------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class _Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file (header only).

    Attributes:
        path: the file.
        frame: 0-based frame index in a multi-frame file; None for a single-frame file.
        sop_uid: the instance's SOP Instance UID.
        position: ImagePositionPatient (mm, LPS), or None.
        orientation: ImageOrientationPatient (row then column cosines), or None.
        spacing: PixelSpacing (between rows, between columns) in mm, or None.
        temporal: TemporalPositionIdentifier / TemporalPositionIndex, or None.
        time: acquisition time of day in s (or TriggerTime in s), or None.
        trigger: TriggerTime in s, or None (orders the phases of a series whose instances all
            carry the series' start as their acquisition time).
        slope: RescaleSlope.
        intercept: RescaleIntercept.
    """

    path: Path
    frame: int | None
    sop_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    temporal: int | None
    time: float | None
    trigger: float | None = None
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class _Series:
    """One series of a study, as its headers say."""

    uid: str
    number: int | None
    description: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    sequence: tuple  # (EchoTime, RepetitionTime, FlipAngle) rounded: which sequence it is
    rows: int
    columns: int
    bytes_per_frame: int
    diffusion: bool
    frame_of_reference: str
    frames: list[_Frame] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How a line names the series: its number, description and UID."""
        number = f"{self.number} " if self.number is not None else ""
        desc = f"{self.description!r} " if self.description else ""
        return f"series {number}{desc}({self.uid})"


def _num(value: Any, default: float | None = None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _tm_seconds(tm: Any) -> float | None:
    """``HHMMSS.ffffff`` (a TM, or the time part of a DT) as seconds of the day.

    A DT's UTC offset (``+0100``) is left out: the times of one study share it. The old
    ``HH:MM:SS`` form (ACR-NEMA, still written by some exports) is read too.
    """
    text = str(tm or "").strip().split("+")[0].split("-")[0].replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        hh = int(text[0:2])
        mm = int(text[2:4]) if len(text) >= 4 else 0
        ss = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def _time_of(ds: Any, frame_content: Any = None) -> float | None:
    """The acquisition time (s of day) of an image or a frame, else its TriggerTime in s: the
    first of these that holds a time (a DT may hold a date only)."""
    found = (
        frame_content.get("FrameAcquisitionDateTime") if frame_content is not None else None,
        ds.get("AcquisitionDateTime"),
    )
    for dt in found:
        seconds = _tm_seconds(str(dt)[8:]) if dt else None
        if seconds is not None:
            return seconds
    seconds = _tm_seconds(ds.get("AcquisitionTime"))
    if seconds is not None:
        return seconds
    trigger = _num(ds.get("TriggerTime"))
    return None if trigger is None else trigger / 1000.0


def _trigger(ds: Any) -> float | None:
    trigger = _num(ds.get("TriggerTime"))
    return None if trigger is None else trigger / 1000.0


def _group(ds: Any, i: int, name: str) -> Any:
    """Item of functional group `name` for frame `i` (per-frame, else shared), or None."""
    for seq, index in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(seq)
        if groups is not None and len(groups) > index:
            inner = groups[index].get(name)
            if inner is not None and len(inner):
                return inner[0]
    return None


def _frames_of(ds: Any, path: Path) -> list[_Frame]:
    """The 2D images of one file: itself, or each frame of an enhanced multi-frame image."""
    sop = str(ds.get("SOPInstanceUID", ""))
    if str(ds.get("SOPClassUID", "")) not in MULTI_FRAME_MR:
        temporal = ds.get("TemporalPositionIdentifier")
        return [
            _Frame(
                path=path,
                frame=None,
                sop_uid=sop,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                spacing=_floats(ds.get("PixelSpacing"), 2),
                temporal=None if temporal in (None, "") else int(temporal),
                time=_time_of(ds),
                trigger=_trigger(ds),
                slope=_num(ds.get("RescaleSlope"), 1.0),
                intercept=_num(ds.get("RescaleIntercept"), 0.0),
            )
        ]
    n = int(_num(ds.get("NumberOfFrames"), 1) or 1)
    per_frame = len(ds.get("PerFrameFunctionalGroupsSequence") or ())
    if n != per_frame:  # a header whose frame count is not what it describes
        raise InputError(
            f"enhanced MR image declares {n} frames but has {per_frame} per-frame groups",
            path=str(path),
        )
    frames = []
    for i in range(n):
        pos = _group(ds, i, "PlanePositionSequence")
        ori = _group(ds, i, "PlaneOrientationSequence")
        px = _group(ds, i, "PixelMeasuresSequence")
        content = _group(ds, i, "FrameContentSequence")
        scale = _group(ds, i, "PixelValueTransformationSequence")
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        frames.append(
            _Frame(
                path=path,
                frame=i,
                sop_uid=sop,
                position=_floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                orientation=_floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                spacing=_floats(px.get("PixelSpacing"), 2) if px else None,
                temporal=None if temporal in (None, "") else int(temporal),
                time=_time_of(ds, content),
                slope=_num(scale.get("RescaleSlope"), 1.0) if scale else 1.0,
                intercept=_num(scale.get("RescaleIntercept"), 0.0) if scale else 0.0,
            )
        )
    return frames


def _part10(path: Path) -> bool:
    """Whether the file has the preamble and ``DICM`` (else it is a bare dataset, which pydicom
    reads with ``force``)."""
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def _read_dataset(path: Path, **kwargs) -> Any:
    """The file's dataset, a bare one (no preamble, no file meta) included: its transfer syntax
    is then the encoding pydicom found, so that its pixels decode."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if _part10(path):
        return pydicom.dcmread(path, **kwargs)
    ds = pydicom.dcmread(path, force=True, **kwargs)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def _read_header(path: Path) -> Any:
    """The file's dataset without pixel data; raises InputError naming the problem."""
    from pydicom.errors import InvalidDicomError

    try:
        return _read_dataset(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise InputError("not a DICOM file (no DICM marker)", path=str(path)) from None
    except (OSError, EOFError) as err:
        raise InputError(f"unreadable DICOM file ({err})", path=str(path)) from None
    except Exception as err:  # pydicom raises many kinds on damaged headers
        text = " ".join(str(err).split())[:200]
        raise InputError(
            f"damaged DICOM header ({type(err).__name__}: {text})", path=str(path)
        ) from None


def _diffusion(ds: Any) -> bool:
    if _num(ds.get("DiffusionBValue"), 0.0) or ds.get("MRDiffusionSequence"):
        return True
    text = f"{ds.get('SeriesDescription', '')} {ds.get('SequenceName', '')}".lower()
    return any(w in text for w in _DIFFUSION_WORDS)


def _sequence_key(ds: Any) -> tuple:
    """(EchoTime, RepetitionTime, FlipAngle) rounded; enhanced MR keeps them in groups."""
    te = _num(ds.get("EchoTime"))
    if te is None:
        echo = _group(ds, 0, "MREchoSequence")
        te = _num(echo.get("EffectiveEchoTime")) if echo else None
    tr = _num(ds.get("RepetitionTime"))
    if tr is None:
        timing = _group(ds, 0, "MRTimingAndRelatedParametersSequence")
        tr = _num(timing.get("RepetitionTime")) if timing else None
    flip = _num(ds.get("FlipAngle"))
    if flip is None:
        timing = _group(ds, 0, "MRTimingAndRelatedParametersSequence")
        flip = _num(timing.get("FlipAngle")) if timing else None
    return tuple(None if v is None else round(v, 2) for v in (te, tr, flip))


@dataclass
class _Study:
    """A study's series, SEG files and unassigned problems, as discovery found them."""

    uid: str
    series: dict[str, _Series] = field(default_factory=dict)
    segs: list[Path] = field(default_factory=list)
    seg_refs: dict[Path, tuple[str, ...]] = field(default_factory=dict)  # referenced series
    folders: set[Path] = field(default_factory=set)
    problem: tuple[str, Path] | None = None
    instances: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID -> file
    notes: list[str] = field(default_factory=list)


def _add(studies: dict[str, _Study], path: Path, ds: Any) -> None:
    """Files one parsed header under its study and series; everything is read from the header
    before anything is filed, so a file refused half-way leaves no trace."""
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    if not study_uid:
        raise InputError("DICOM file without a StudyInstanceUID", path=str(path))
    sop_class = str(ds.get("SOPClassUID", ""))
    study = studies.get(study_uid) or _Study(study_uid)
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    first = study.instances.get(sop_uid) if sop_uid else None
    if first is not None:
        # Exports repeat files (the same image in two folders of a CD): an identical copy is
        # read once; another file under the same UID is two images claiming one identity.
        if filecmp.cmp(first, path, shallow=False):
            study.notes.append(f"ignored {path}: an identical copy of {first}")
        elif study.problem is None:
            study.problem = (
                f"the same SOPInstanceUID {sop_uid} in two different files: {first} and "
                f"{path.name}",
                path,
            )
        return
    if sop_class == SEG_SOP_CLASS:
        refs = tuple(
            str(item.get("SeriesInstanceUID", ""))
            for item in ds.get("ReferencedSeriesSequence") or ()
        )
        studies.setdefault(study_uid, study)
        study.instances[sop_uid] = path
        study.folders.add(path.parent)
        study.segs.append(path)
        study.seg_refs[path] = refs
        return
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    frames = _frames_of(ds, path)
    rows = int(_num(ds.get("Rows"), 0) or 0)
    columns = int(_num(ds.get("Columns"), 0) or 0)
    bits = int(_num(ds.get("BitsAllocated"), 16) or 16)
    number = _num(ds.get("SeriesNumber"))
    header = _Series(
        uid=series_uid,
        number=None if number is None else int(number),
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        sop_class=sop_class,
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        sequence=_sequence_key(ds),
        rows=rows,
        columns=columns,
        bytes_per_frame=rows
        * columns
        * max(1, bits // 8)
        * int(_num(ds.get("SamplesPerPixel"), 1) or 1),
        diffusion=_diffusion(ds),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
    )
    studies.setdefault(study_uid, study)
    if sop_uid:
        study.instances[sop_uid] = path
    series = study.series.setdefault(series_uid, header)
    study.folders.add(path.parent)
    series.files.append(path)
    series.frames.extend(frames)


def _scan(files: list[Path], strict_names: bool = True) -> tuple[dict[str, _Study], list]:
    """Parses every DICOM header in `files`: (studies by UID, [(problem, path)] of files that
    belong to no study: damaged files, and non-DICOM files named like DICOM files)."""
    studies: dict[str, _Study] = {}
    orphans: list[tuple[str, Path]] = []
    for path in files:
        if not is_dicom(path):
            if strict_names and path.suffix.lower() in (".dcm", ".dicom", ".ima"):
                orphans.append(("not a DICOM file (no DICM marker)", path))
            continue
        try:
            ds = _read_header(path)
            if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")).endswith(
                "1.3.10"
            ):
                continue  # a DICOMDIR: an index of the files, which are read themselves
            _add(studies, path, ds)
        except InputError as err:
            orphans.append((err.problem, path))
        except Exception as err:  # a header pydicom parsed but that makes no sense
            orphans.append((f"damaged DICOM header ({type(err).__name__})", path))
    return studies, orphans


# ----------------------------------------------------------------------- the study's plan


@dataclass
class _Plan:
    """A study's DCE phases: the frames of each phase in time order, and what was skipped."""

    series: list[_Series]  # the series the phases come from (one, or one per phase)
    phases: list[list[_Frame]]
    times: list[float] | None
    notes: list[str]


def _skip_reason(s: _Series) -> str | None:
    """Why a series cannot be a DCE phase, or None."""
    if s.modality and s.modality != "MR":
        return f"modality {s.modality}, not MR"
    if s.sop_class not in MR_SOP_CLASSES:
        return f"not an MR image (SOP class {s.sop_class})"
    kinds = [t for t in s.image_type if t in _SKIP_TYPES]
    if kinds:
        return f"derived or subtraction series (ImageType {'/'.join(s.image_type)})"
    if "LOCALIZER" in s.image_type:
        return "localizer"
    if s.diffusion:
        return "diffusion series"
    if all(f.position is None or f.orientation is None or f.spacing is None for f in s.frames):
        return "no geometry (ImagePositionPatient/ImageOrientationPatient/PixelSpacing missing)"
    # Some images with geometry and some without: a damaged series (below), not a skipped one.
    placed = [f for f in s.frames if f.orientation is not None]
    if not placed:
        return None
    counts: dict[tuple, int] = defaultdict(int)
    for f in placed:
        counts[tuple(np.round(f.orientation, 2))] += 1
    if max(counts.values()) < 0.75 * len(s.frames):  # one odd slice is a defect, not a scout
        return f"slices in {len(counts)} orientations (a localizer)"
    return None


def _temporal_groups(s: _Series) -> dict[Any, list[_Frame]]:
    """The series' frames grouped by temporal position: the temporal index when the instances
    carry one, else the acquisition time when slice positions repeat; one group otherwise."""
    if any(f.temporal is not None for f in s.frames):
        keys = {f.temporal for f in s.frames}
        if len(keys) > 1:
            out: dict[Any, list[_Frame]] = defaultdict(list)
            for f in s.frames:
                out[f.temporal].append(f)
            return dict(out)
    positions = {tuple(np.round(f.position, 3)) for f in s.frames}
    n = len(positions)
    if n < len(s.frames):
        # Several times per slice position. A phase's slices may carry slightly different
        # times (each slice's own), so the frames are walked in time order and a phase ends
        # where a position comes again: a phase short of slices stays a phase (and is refused
        # by the grid checks, naming its file) instead of shifting every later one. Some
        # scanners give every instance the series' start as its AcquisitionTime and the phase
        # in TriggerTime: then the trigger time orders them.
        for key in (lambda f: f.time, lambda f: f.trigger):
            times = {key(f) for f in s.frames}
            if None not in times and len(times) > 1:
                groups: dict[int, list[_Frame]] = {0: []}
                seen: set[tuple] = set()
                for f in sorted(s.frames, key=key):
                    where = tuple(np.round(f.position, 3))
                    if where in seen:
                        groups[len(groups)], seen = [], set()
                    groups[len(groups) - 1].append(f)
                    seen.add(where)
                if all(len({key(f) for f in g}) < len(times) for g in groups.values()):
                    return groups
    return {0: list(s.frames)}


def _phase_key(frames: list[_Frame], series: _Series, key: Any) -> tuple:
    """How phases sort: by acquisition time, then series number, then temporal position."""
    time = _phase_time(frames)
    return (time is None, time or 0.0, series.number or 0, key)


def _same_slices(s: _Series, best: _Series, groups: dict[Any, list[_Frame]]) -> bool:
    """Whether single-time series `s` is another phase of dynamic series `best`: the same
    sequence and image size, its slices where each of best's phases has them."""
    if s.sequence != best.sequence or (s.rows, s.columns) != (best.rows, best.columns):
        return False
    if len(_temporal_groups(s)) != 1:
        return False
    first = next(iter(groups.values()))
    where = sorted(tuple(np.round(f.position, 2)) for f in first)
    if sorted(tuple(np.round(f.position, 2)) for f in s.frames) != where:
        return False
    return np.allclose(s.frames[0].orientation, first[0].orientation, atol=COSINE_TOL)


def _phase_time(frames: list[_Frame]) -> float | None:
    """The phase's acquisition time: its first slice's."""
    times = [f.time for f in frames if f.time is not None]
    return min(times) if times else None


def plan_study(study: _Study) -> _Plan:
    """Finds a study's DCE phases (see the module docstring); raises InputError if none."""
    if study.problem:
        raise InputError(study.problem[0], path=str(study.problem[1]))
    if not study.series and study.segs:
        raise InputError(
            f"a DICOM SEG, but no images of its study (StudyInstanceUID {study.uid}) below "
            "SRC: the images it was drawn on are missing",
            path=str(study.segs[0]),
        )
    _unwrap_midnight(study)
    notes: list[str] = list(study.notes)
    candidates = _candidate_series(study, notes)
    dynamic = [(s, _temporal_groups(s)) for s in candidates]
    multi = [(s, g) for s, g in dynamic if len(g) > 1]
    singles: dict[tuple, list[_Series]] = defaultdict(list)
    for s, g in dynamic:
        if len(g) == 1:
            singles[s.sequence].append(s)
    most_singles = max((len(v) for v in singles.values()), default=0)
    # A series of repeated slices (two averages, a repeat) is not the dynamic when more series
    # of one sequence, one per phase, are.
    if multi and max(len(g) for _, g in multi) >= most_singles:
        return _plan_multiphase(multi, candidates, notes)
    for s, _ in multi:
        notes.append(f"skipped {s.name}: not the dynamic series (one series per phase is)")
    return _plan_series_per_phase(study, singles, notes)


def _candidate_series(study: _Study, notes: list[str]) -> list[_Series]:
    """The study's series that may be DCE phases, in series-number order; each other one gets
    a note saying why it is skipped."""
    candidates: list[_Series] = []
    for s in sorted(study.series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid)):
        why = _skip_reason(s)
        if why:
            notes.append(f"skipped {s.name}: {why}")
            continue
        for f in s.frames:
            if f.position is None or f.orientation is None or f.spacing is None:
                raise InputError(
                    f"{s.name}: ImagePositionPatient, ImageOrientationPatient or PixelSpacing "
                    "missing or not a finite number in this image (the others have them)",
                    path=str(f.path),
                )
        candidates.append(s)
    return candidates


def _plan_multiphase(multi: list, candidates: list[_Series], notes: list[str]) -> _Plan:
    """The phases of the series with the most temporal positions (`multi`: (series, groups)),
    with any phase written as a series of its own beside it."""
    best, groups = max(multi, key=lambda sg: len(sg[1]))
    tied = [s for s, g in multi if len(g) == len(groups) and s is not best]
    if tied:
        # Two series of as many phases: a bilateral acquisition written as two series (one
        # per breast) or a repeated dynamic. Either guess reads a wrong case.
        raise InputError(
            f"two dynamic series with {len(groups)} phases each, {best.name} and "
            f"{tied[0].name}: which is the case cannot be told (one breast each, or a "
            "repeat); keep one of them below SRC",
            path=str(tied[0].files[0]),
        )
    # (time is None, time, series number, temporal key) -> (frames, series) of each phase
    found = {_phase_key(groups[k], best, k): (groups[k], best) for k in groups}
    timed = found and next(iter(found))[0] is False
    for s in candidates:
        if s is best:
            continue
        if _same_slices(s, best, groups) and (_phase_time(s.frames) is not None) == timed:
            # A phase of its own series beside the multi-phase one (a protocol that writes
            # the pre-contrast, or a late phase, apart): the same sequence on the same slices.
            found[_phase_key(s.frames, s, 0)] = (list(s.frames), s)
        else:
            notes.append(f"skipped {s.name}: not the dynamic series ({best.name} holds the phases)")
    ordered = [found[key] for key in sorted(found)]
    phases = [frames for frames, _ in ordered]
    times = [_phase_time(p) for p in phases]
    if len(set(times)) == 1:  # one acquisition time for all: the trigger times tell them
        triggers = [
            min((f.trigger for f in p if f.trigger is not None), default=None) for p in phases
        ]
        if None not in triggers and len(set(triggers)) == len(phases):
            times = triggers
    return _Plan([s for _, s in ordered], phases, _relative(times), notes)


def _plan_series_per_phase(study: _Study, singles: dict, notes: list[str]) -> _Plan:
    """The phases as the most numerous group of single-phase series of one sequence
    (`singles`: sequence -> series), in acquisition order."""
    groups = sorted(singles.values(), key=lambda g: -len(g))
    if not groups or len(groups[0]) < 2:
        raise InputError(
            "no DCE series: need one series with several temporal positions, or several series "
            f"of one sequence (one per phase); {len(study.series)} series, none dynamic"
            + (f" ({notes[0]})" if notes else "")
        )
    chosen = groups[0]
    for s in sum(singles.values(), []):
        if s not in chosen:
            notes.append(
                f"skipped {s.name}: another sequence than the dynamic series "
                f"(TE/TR/flip {s.sequence} vs {chosen[0].sequence})"
            )
    chosen = sorted(
        chosen,
        key=lambda s: (_phase_time(s.frames) is None, _phase_time(s.frames) or 0, s.number or 0),
    )
    times = [_phase_time(s.frames) for s in chosen]
    return _Plan(chosen, [list(s.frames) for s in chosen], _relative(times), notes)


def _unwrap_midnight(study: _Study) -> None:
    """Puts times of day after midnight after those before it (235959 -> 000010), in place.

    A study takes less than 12 h: when its times of day span more, the clock went through
    midnight, and the times after the widest gap between them are the next day's.
    """
    times = sorted({f.time for s in study.series.values() for f in s.frames if f.time is not None})
    if len(times) < 2 or times[-1] - times[0] <= 43200:
        return
    gap = int(np.argmax(np.diff(times)))
    cut = times[gap + 1]  # the study's first time (its latest time of day)
    for s in study.series.values():
        s.frames = [
            dataclasses.replace(f, time=f.time + 86400.0)
            if f.time is not None and f.time < cut
            else f
            for f in s.frames
        ]


def _relative(times: list[float | None]) -> list[float] | None:
    """Times in s after the first; None when one is missing or two phases share one (a scanner
    that writes the series' start in every phase: the order came from elsewhere)."""
    if any(t is None for t in times) or len(set(times)) < len(times):
        return None
    out = [t - times[0] for t in times]
    return [t + 86400.0 if t < 0 else t for t in out]  # a study across midnight


# --------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class _Grid:
    """One phase's slices ordered along the normal, and its affine.

    Attributes:
        frames: the slices, k order.
        affine: (4, 4) RAS voxel (i=column, j=row, k=slice) -> mm.
        shape: (columns, rows, n).
    """

    frames: list[_Frame]
    affine: np.ndarray
    shape: tuple[int, int, int]


def _stack(frames: list[_Frame], series: _Series, what: str) -> _Grid:
    """Orders a phase's slices along the normal and checks they form a regular grid."""

    def fail(problem: str, frame: _Frame | None = None) -> InputError:
        path = (frame or frames[0]).path
        return InputError(f"{series.name}, {what}: {problem}", path=str(path))

    o0 = np.array(frames[0].orientation, dtype=np.float64)
    for f in frames:
        if np.abs(np.array(f.orientation) - o0).max() > COSINE_TOL:
            raise fail("slices have different orientations: the stack cannot be placed", f)
        if np.abs(np.array(f.spacing) - np.array(frames[0].spacing)).max() > 1e-4:
            raise fail("slices have different PixelSpacing", f)
        if min(f.spacing) <= 0:
            raise fail(f"PixelSpacing {list(f.spacing)} is not two positive distances (mm)", f)
    row, col = o0[:3], o0[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise fail(f"ImageOrientationPatient {o0.tolist()} is not two orthonormal directions")
    normal = np.cross(row, col)
    pos = np.array([f.position for f in frames], dtype=np.float64)  # (n, 3)
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    frames, pos, d = [frames[i] for i in order], pos[order], d[order]
    if len(frames) < 2:
        raise fail("a single slice: a 2D image, expected a 3D volume")
    gaps = np.diff(d)
    dup = np.flatnonzero(gaps < SAME_SLICE_MM)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise fail(
            f"duplicate slice at {d[dup[0]]:.3f} mm along the normal: "
            f"{a.path.name} and {b.path.name}",
            b,
        )
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > SPACING_TOL * step
    if off.any():
        i = int(np.flatnonzero(off)[0])
        ratio = gaps[i] / step
        if ratio > 4.5:  # more than a few slices: two slabs (a bilateral sagittal DCE...)
            problem = (
                f"the slices form separate stacks: a gap of {gaps[i]:.4g} mm ({ratio:.1f}x the "
                f"slice spacing) between {d[i]:.3f} and {d[i + 1]:.3f} mm along the normal "
                "(one slab per breast, or many slices missing): the stack cannot be placed on "
                "one grid"
            )
        elif ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            problem = (
                f"{round(ratio) - 1} missing slice(s) between {d[i]:.3f} and {d[i + 1]:.3f} mm "
                f"along the normal (slice spacing {step:.4g} mm)"
            )
        else:
            problem = (
                f"uneven slice spacing: a gap of {gaps[i]:.4g} mm between {d[i]:.3f} and "
                f"{d[i + 1]:.3f} mm, the others {step:.4g} mm (tolerance {SPACING_TOL:.0%})"
            )
        raise fail(problem, frames[i + 1])
    along = pos - pos[0]
    shear = along - np.outer(d - d[0], normal)
    worst = int(np.argmax(np.linalg.norm(shear, axis=1)))
    if np.linalg.norm(shear[worst]) > SHEAR_TOL_MM:
        raise fail(
            f"slices are shifted off the normal by {np.linalg.norm(shear[worst]):.3g} mm "
            "(a sheared or tilted stack): the stack cannot be placed on a grid",
            frames[worst],
        )
    dr, dc = frames[0].spacing  # between rows (along the column direction), between columns
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = col * dr
    lps[:3, 2] = (pos[-1] - pos[0]) / (len(frames) - 1)
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return _Grid(frames, ras, (series.columns, series.rows, len(frames)))


# ------------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class DicomCase:
    """One case the ``dicom`` layout found (`data_store.layouts` makes it a `CaseSource`).

    Attributes:
        case_id: `study_case_id` of the study, or ``file-...`` for a file of no study.
        files: the DCE phases' files (all the study's image files when it has a problem).
        mask: a DICOM SEG of the study or a NIfTI beside it, or None.
        times: s after phase 0, one per phase, or None.
        problem: why the case cannot be read, or None.
        problem_path: the file the problem is about.
        notes: one line per series skipped, saying why.
    """

    case_id: str
    files: tuple[Path, ...]
    mask: Path | None
    times: tuple[float, ...] | None = None
    problem: str | None = None
    problem_path: Path | None = None
    notes: tuple[str, ...] = ()


def _nifti(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith((".nii", ".nii.gz"))


def discover_dicom(src: Path) -> list[DicomCase]:
    """The ``dicom`` layout's cases: one per study (see the module docstring).

    A study whose phases cannot be found, and every file that belongs to no study (not DICOM
    though named so, a damaged header), is a case with a `problem`, which `load_case` raises:
    the cohort's other studies still ingest.
    """
    src = Path(src)
    files = [src] if src.is_file() else list(_walk(src))
    studies, orphans = _scan([p for p in files if not _nifti(p)])
    niftis = [p for p in files if _nifti(p)]
    tops = {uid: _top(study) for uid, study in studies.items()}
    cases = []
    for study in studies.values():
        cid = study_case_id(study.uid)
        all_files = sorted(p for s in study.series.values() for p in s.files)
        mask, problem, notes = None, None, []
        try:
            plan = plan_study(study)
            notes = plan.notes
            dce = sorted({f.path for frames in plan.phases for f in frames})
        except InputError as err:
            where = all_files[0] if all_files else (study.segs or [None])[0]
            where = Path(err.path) if err.path else where
            dce, problem = all_files, (err.problem, where)
            plan = None
        sharing = sum(top == tops[study.uid] for top in tops.values())
        mask, mask_problem = _find_mask(study, niftis, sharing)
        problem = problem or mask_problem
        cases.append(
            DicomCase(
                case_id=cid,
                files=tuple(dce),
                mask=mask,
                times=tuple(plan.times) if plan and plan.times else None,
                problem=problem[0] if problem else None,
                problem_path=problem[1] if problem else None,
                notes=tuple(notes),
            )
        )
    for problem, path in orphans:
        cases.append(
            DicomCase(
                case_id="file-" + hashlib.sha256(str(path).encode()).hexdigest()[:12],
                files=(),
                mask=None,
                problem=problem,
                problem_path=path,
            )
        )
    return cases


def _top(study: _Study) -> Path | None:
    """The folder holding all the study's files."""
    folders = study.folders
    return Path(os.path.commonpath([str(f) for f in folders])) if folders else None


def _find_mask(study: _Study, niftis: list[Path], sharing: int = 1):
    """(mask file or None, problem or None): a SEG of the study, or one NIfTI in its folder
    (the folder holding all its files, which `sharing` studies have as theirs)."""
    if len(study.segs) > 1:
        return study.segs[0], (
            f"two DICOM SEG files for one study: {study.segs[0].name} and {study.segs[1].name}",
            study.segs[1],
        )
    if study.segs:
        seg = study.segs[0]
        refs = [r for r in study.seg_refs.get(seg, ()) if r]
        if refs and not any(r in study.series for r in refs):
            return seg, (
                f"the DICOM SEG references series {', '.join(refs)}, which is not in the study "
                f"(its {len(study.series)} series are): not drawn on these images",
                seg,
            )
        return seg, None
    top = _top(study)
    beside = [p for p in niftis if top is not None and p.parent == top]
    if len(beside) > 1:
        return beside[0], (
            f"two NIfTI masks beside the study: {beside[0].name} and {beside[1].name}",
            beside[1],
        )
    if beside and sharing > 1:
        return beside[0], (
            f"NIfTI mask {beside[0].name} lies beside {sharing} studies (their files share the "
            "folder): whose mask it is cannot be told; put each study in a folder of its own",
            beside[0],
        )
    return (beside[0] if beside else None), None


# -------------------------------------------------------------------------------- loading


@dataclass
class DicomPhases:
    """A study's phases as read.

    Attributes:
        image: (T, i, j, k) in the DICOM grid's order (i column, j row, k slice).
        geometry: the grid (its affine in RAS mm).
        times: s after phase 0, one per phase, or None.
        refs: what the store keeps to write a DICOM SEG back (no identifying attribute):
            study, series, SOP class and instance UIDs, frame of reference, the grid.
        files: every file read.
    """

    image: np.ndarray
    geometry: Geometry
    times: list[float] | None
    refs: dict[str, Any]
    files: list[Path]


def read_dicom_phases(files: list[Path], case_id: str, options: ReadOptions) -> DicomPhases:
    """Reads a study's DCE phases from its files (`CaseSource.phase_files` of the layout).

    Raises:
        InputError: one line naming the case, the file and the problem (module docstring).
    """
    studies, orphans = _scan(list(files), strict_names=False)
    if orphans:
        problem, path = orphans[0]
        raise InputError(problem, case=case_id, path=str(path))
    if len(studies) != 1:
        raise InputError(f"the files hold {len(studies)} studies, expected 1", case=case_id)
    study = next(iter(studies.values()))
    try:
        plan = plan_study(study)
        return _read_plan(plan, study, options)
    except InputError as err:
        raise err.moved(case=case_id, path=err.path) from None


def _read_plan(plan: _Plan, study: _Study, options: ReadOptions) -> DicomPhases:
    grids = []
    for t, frames in enumerate(plan.phases):
        series = plan.series[min(t, len(plan.series) - 1)]
        grids.append(_stack(frames, series, f"phase {t}"))
    ref = grids[0]
    for t, g in enumerate(grids[1:], start=1):
        series = plan.series[min(t, len(plan.series) - 1)]
        if g.shape[2] != ref.shape[2]:
            raise InputError(
                f"{series.name}: phase {t} has {g.shape[2]} slices, phase 0 {ref.shape[2]} "
                "(a phase cut short, or slices missing at an end of the stack)",
                path=str(g.frames[-1].path),
            )
        if g.shape != ref.shape or np.abs(g.affine - ref.affine).max() > 0.01:
            raise InputError(
                f"{series.name}: phase {t}'s grid differs from phase 0's "
                f"(shape {g.shape} vs {ref.shape}, or its slices are elsewhere)",
                path=str(g.frames[0].path),
            )
    per_phase = [
        plan.series[min(t, len(plan.series) - 1)].bytes_per_frame * len(frames)
        for t, frames in enumerate(plan.phases)
    ]
    total, per_series = sum(per_phase), max(per_phase)
    if per_series > options.max_image_bytes or total > 4 * options.max_image_bytes:
        raise InputError(
            f"{plan.series[0].name}: {total / 2**30:.3g} GiB of voxels, above the limit of "
            f"{options.max_image_bytes / 2**30:.3g} GiB per image ({{max_image_bytes}})",
            path=str(plan.series[0].files[0]),
            params=["max_image_bytes"],
        )
    cache = _PixelCache(options)
    vols = []
    for t, g in enumerate(grids):
        series = plan.series[min(t, len(plan.series) - 1)]
        slices = [cache.frame(f, series) for f in g.frames]  # each (rows, cols)
        dtype = np.result_type(*slices)
        vol = np.stack([s.astype(dtype, copy=False) for s in slices], axis=-1)  # (rows, cols, n)
        vols.append(vol.transpose(1, 0, 2))  # (i=column, j=row, k)
    dtype = np.result_type(*vols)
    image = np.stack([v.astype(dtype, copy=False) for v in vols])  # (T, i, j, k)
    geometry = Geometry.from_affine(ref.affine, ref.shape)
    refs = {
        "study_instance_uid": study.uid,
        "frame_of_reference_uid": plan.series[0].frame_of_reference,
        "sop_class_uid": plan.series[0].sop_class,
        "rows": plan.series[0].rows,
        "columns": plan.series[0].columns,
        "pixel_spacing": list(ref.frames[0].spacing),
        "image_orientation": list(ref.frames[0].orientation),
        "phases": [
            {"series_instance_uid": plan.series[min(t, len(plan.series) - 1)].uid}
            for t in range(len(grids))
        ],
        # Phase 0's slices in k order: what a SEG of the prediction references.
        "series_instance_uid": plan.series[0].uid,
        "slices": [
            {
                "sop_instance_uid": f.sop_uid,
                "frame": None if f.frame is None else f.frame + 1,
                "position": list(f.position),
            }
            for f in ref.frames
        ],
    }
    if ref.frames[0].frame is not None:
        refs["frame_slices"] = _frame_slices(plan.series[0], ref)
    files = sorted({f.path for frames in plan.phases for f in frames})
    return DicomPhases(image, geometry, plan.times, refs, files)


def _frame_slices(series: _Series, ref: _Grid) -> list[int] | None:
    """For a multi-frame source in one file: the grid slice (k) of each of its frames, in
    frame order (-1: none), so that a SEG can describe the file's frames without it; None when
    phase 0 spans several files."""
    path = ref.frames[0].path
    if any(f.path != path for f in ref.frames):
        return None
    o = np.array(ref.frames[0].orientation)
    normal = np.cross(o[:3], o[3:])
    slice_d = np.array([np.array(f.position) @ normal for f in ref.frames])
    out = []
    for f in sorted((f for f in series.frames if f.path == path), key=lambda f: f.frame):
        k = int(np.argmin(np.abs(slice_d - np.array(f.position) @ normal)))
        out.append(k if abs(slice_d[k] - np.array(f.position) @ normal) < SAME_SLICE_MM else -1)
    return out


class _PixelCache:
    """Decodes each file once (a multi-frame file holds many slices)."""

    def __init__(self, options: ReadOptions):
        self.options = options
        self.path: Path | None = None
        self.pixels: np.ndarray | None = None

    def frame(self, f: _Frame, series: _Series) -> np.ndarray:
        if self.path != f.path:
            self.pixels, self.path = _decode(f.path, series), f.path
        px = self.pixels
        if f.frame is not None:
            if px.ndim != 3 or f.frame >= px.shape[0]:
                raise InputError(f"{series.name}: frame {f.frame + 1} missing", path=str(f.path))
            px = px[f.frame]
        if px.shape != (series.rows, series.columns):
            raise InputError(
                f"{series.name}: image is {px.shape}, expected {(series.rows, series.columns)} "
                "(one sample per pixel)",
                path=str(f.path),
            )
        if f.slope != 1.0 or f.intercept != 0.0:
            return px.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
        return px


def _decode(path: Path, series: _Series) -> np.ndarray:
    """The file's stored pixel values; one line when they cannot be decoded."""
    try:
        ds = _read_dataset(path)
    except Exception as err:
        raise InputError(
            f"{series.name}: unreadable DICOM file ({type(err).__name__})", path=str(path)
        ) from None
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if "PixelData" not in ds:
        raise InputError(f"{series.name}: no pixel data", path=str(path))
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:
        text = " ".join(str(err).split())[:160]
        compressed = ts is not None and getattr(ts, "is_compressed", False)
        if compressed:
            name = getattr(ts, "name", str(ts))
            problem = (
                f"compressed transfer syntax {name} ({ts}) cannot be decoded: no decoder "
                f"installed for it ({text})"
            )
        else:
            problem = f"pixel data cannot be read (truncated or damaged): {text}"
        raise InputError(f"{series.name}: {problem}", path=str(path)) from None


# ------------------------------------------------------------------------------ SEG masks


#: Segment labels (lower case) and SNOMED CT property types that say "the tumour".
_TUMOUR_WORDS = ("tumour", "tumor", "lesion", "cancer", "carcinoma", "malignan", "neoplasm", "mass")
_TUMOUR_CODES = (
    "108369006",
    "86049000",
    "254837009",
    "4147007",
)  # neoplasm, malignant, breast ca, mass


def _tumour_segment(ds: Any, path: Path) -> int:
    """The number of the SEG's tumour segment: its only segment, else the one segment whose
    label or property type says tumour (`_TUMOUR_WORDS`, `_TUMOUR_CODES`); one line else."""
    segments = list(ds.get("SegmentSequence") or ())
    if len(segments) <= 1:
        return int(segments[0].get("SegmentNumber", 1)) if segments else 1

    def says_tumour(item: Any) -> bool:
        label = str(item.get("SegmentLabel", "")).lower()
        codes = {
            str(c.get("CodeValue", "")) for c in item.get("SegmentedPropertyTypeCodeSequence") or ()
        }
        return any(w in label for w in _TUMOUR_WORDS) or bool(codes & set(_TUMOUR_CODES))

    tumours = [item for item in segments if says_tumour(item)]
    if len(tumours) == 1:
        return int(tumours[0].SegmentNumber)
    labels = ", ".join(repr(str(item.get("SegmentLabel", "?"))) for item in segments)
    which = "none" if not tumours else f"{len(tumours)}"
    raise InputError(
        f"DICOM SEG with {len(segments)} segments ({labels}), {which} labelled as the tumour "
        "(a label saying tumour/lesion/cancer, or SNOMED CT 108369006 Neoplasm): keep the "
        "tumour's segment only, or label it",
        path=str(path),
    )


def read_seg_mask(path: Path, refs: dict[str, Any], shape: tuple[int, int, int]) -> np.ndarray:
    """The tumour segment of a DICOM SEG as an (i, j, k) uint8 array on the study's grid.

    The tumour segment is the only one, else the one labelled so (`_tumour_segment`). Each SEG
    frame is placed by its ``ImagePositionPatient`` on the slice of the grid at that position
    (`refs["slices"]`); frames of other segments are left out. A FRACTIONAL SEG's voxels are
    the tumour from half its maximum value up.

    Raises:
        InputError: not a SEG, several segments none or several of which say tumour, another
            frame of reference or orientation, or a frame at a position that is no slice of the
            grid.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
            raise InputError("not a DICOM SEG", path=str(path))
        frames = np.asarray(ds.pixel_array)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"unreadable DICOM SEG ({type(err).__name__})", path=str(path)) from None
    if frames.ndim == 2:
        frames = frames[None]
    for_uid = str(ds.get("FrameOfReferenceUID", ""))
    if for_uid and refs.get("frame_of_reference_uid") and for_uid != refs["frame_of_reference_uid"]:
        raise InputError("the SEG is in another frame of reference than the study", path=str(path))
    if frames.shape[1:] != (refs["rows"], refs["columns"]):
        raise InputError(
            f"SEG frames are {frames.shape[1:]}, the study's images "
            f"{(refs['rows'], refs['columns'])}",
            path=str(path),
        )
    o = np.array(refs["image_orientation"])
    normal = np.cross(o[:3], o[3:])
    slice_d = np.array([np.array(s["position"]) @ normal for s in refs["slices"]])
    tumour = _tumour_segment(ds, path)
    fractional = str(ds.get("SegmentationType", "")).upper() == "FRACTIONAL"
    threshold = (_num(ds.get("MaximumFractionalValue"), 255.0) or 255.0) / 2 if fractional else 0
    out = np.zeros(shape, dtype=np.uint8)
    for i in range(frames.shape[0]):
        segment = _group(ds, i, "SegmentIdentificationSequence")
        number = int(segment.ReferencedSegmentNumber) if segment is not None else 1
        if number != tumour:
            continue
        pos = _group(ds, i, "PlanePositionSequence")
        ori = _group(ds, i, "PlaneOrientationSequence")
        if (
            ori is not None
            and np.abs(np.array(ori.ImageOrientationPatient, float) - o).max() > 1e-3
        ):
            raise InputError(
                f"SEG frame {i + 1} has another orientation than the study", path=str(path)
            )
        if pos is None:
            raise InputError(f"SEG frame {i + 1} has no position", path=str(path))
        d = np.array(pos.ImagePositionPatient, float) @ normal
        k = int(np.argmin(np.abs(slice_d - d)))
        if abs(slice_d[k] - d) > 0.01:
            raise InputError(
                f"SEG frame {i + 1} at {d:.3f} mm along the normal is on no slice of the study",
                path=str(path),
            )
        out[:, :, k] |= (frames[i] > threshold).T.astype(np.uint8)  # (rows, cols) -> (i, j)
    return out
