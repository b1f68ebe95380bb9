"""Prediction as a DICOM SEG (``tsesnet predict --output-format dicom-seg``), written by highdicom.

Shape legend: Z Y X voxels in the store's canonical order; i j k the DICOM grid's (column, row,
slice along the normal); n slices.

    OUT/CASE.dcm    a binary DICOM SEG (SOP class 1.2.840.10008.5.1.4.1.1.66.4), one segment
                    "Tumour" (category SCT 49755003 Morphologically abnormal structure, type
                    SCT 108369006 Neoplasm, algorithm AUTOMATIC, TSESNet), one frame per source
                    slice that holds tumour, referencing phase 0's images (the pre-contrast
                    series the prediction was computed on, with the other phases)

The source images are described to highdicom from what the store keeps (`data_store.dicom`
`DicomPhases.refs`: UIDs, the grid, each slice's position), never from patient attributes the
store does not hold. When the source files the case was ingested from are still readable at
their stored paths, the patient and study identification (name, ID, birth date, sex, study
date/time/ID, accession number) is copied from them into the SEG, so that a PACS files it with
the study; otherwise those attributes are empty (type 2) and the SEG is matched to its study by
the Study Instance UID and its references.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from data_store.errors import InputError

__all__ = ["SEG_SUFFIX", "seg_path", "write_seg"]

SEG_SUFFIX = ".dcm"
# Copied from the source files when they can be read at predict time (never stored).
_IDENTIFICATION = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def seg_path(mask_path: Path) -> Path:
    """``OUT/CASE.dcm`` beside where the NIfTI mask ``OUT/CASE.nii.gz`` would go (that path is
    checked to lie inside OUT by `tsesnet.serving.outputs.output_paths`)."""
    from tsesnet.serving.outputs import ObjectPath

    name = mask_path.name[: -len(".nii.gz")] + SEG_SUFFIX
    path = mask_path.with_name(name)
    if isinstance(mask_path, ObjectPath):  # no links on object storage: the name is the rule
        return path
    out = mask_path.parent.resolve()
    target = path.resolve()
    if not target.is_relative_to(out):
        raise InputError(f"{path} links to {target}, outside the output folder: not written")
    return path


def _stubs(refs: dict[str, Any], identification: dict[str, Any]) -> list:
    """One header-only dataset per source slice of phase 0, k order: what highdicom needs to
    reference them (UIDs, grid) and nothing identifying beyond `identification`."""
    from pydicom.dataset import Dataset

    stubs = []
    step = _step(refs)
    for n, s in enumerate(refs["slices"]):
        ds = Dataset()
        ds.SOPClassUID = refs["sop_class_uid"]
        ds.SOPInstanceUID = s["sop_instance_uid"]
        ds.StudyInstanceUID = refs["study_instance_uid"]
        ds.SeriesInstanceUID = refs["series_instance_uid"]
        ds.FrameOfReferenceUID = refs["frame_of_reference_uid"]
        ds.Modality = "MR"
        ds.InstanceNumber = n + 1
        ds.Rows, ds.Columns = refs["rows"], refs["columns"]
        ds.PixelSpacing = [float(v) for v in refs["pixel_spacing"]]
        ds.ImageOrientationPatient = [float(v) for v in refs["image_orientation"]]
        ds.ImagePositionPatient = [float(v) for v in s["position"]]
        ds.SliceThickness = step
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for key in _IDENTIFICATION:
            setattr(ds, key, identification.get(key, ""))
        stubs.append(ds)
    return stubs


def _multi_frame_stub(refs: dict[str, Any], identification: dict[str, Any]) -> list:
    """The one multi-frame source image (enhanced MR) as a header-only dataset: every frame's
    position from `refs["frame_slices"]`, so that highdicom references the frames at each
    slice's position."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    (ds,) = _stubs({**refs, "slices": refs["slices"][:1]}, identification)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness
    ds.NumberOfFrames = len(refs["frame_slices"])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in refs["pixel_spacing"]]
    measures.SliceThickness = _step(refs)
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in refs["image_orientation"]]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in refs["frame_slices"]:
        item, position = Dataset(), Dataset()
        # A frame on no slice of the grid (-1) cannot happen for a grid read from this file;
        # it is given slice 0's position, which highdicom never matches before slice 0 itself.
        position.ImagePositionPatient = [float(v) for v in refs["slices"][max(k, 0)]["position"]]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return [ds]


def _step(refs: dict[str, Any]) -> float:
    """The slice spacing (mm) from the first two slices' positions."""
    if len(refs["slices"]) < 2:
        return 0.0
    a, b = (np.array(refs["slices"][i]["position"]) for i in (0, 1))
    return float(np.linalg.norm(b - a))


def _identification(refs: dict[str, Any], source_paths: list[str]) -> dict[str, Any]:
    """Patient/study identification from the first readable source file of the same study."""
    import pydicom

    for path in source_paths[:3]:
        if not os.path.isfile(path):
            continue
        try:  # force: a bare dataset (no preamble, as ingest reads them) is read too
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # moved, replaced or unreadable: the SEG goes without it
            continue
        if str(ds.get("StudyInstanceUID", "")) == refs["study_instance_uid"]:
            return {k: ds.get(k, "") for k in _IDENTIFICATION}
    return {}


def write_seg(
    path: Path,
    mask_zyx: np.ndarray,
    geometry: Any,
    refs: dict[str, Any] | None,
    *,
    model_uri: str,
    source_paths: list[str] = (),
):
    """Writes a (Z, Y, X) binary prediction as a DICOM SEG on the source grid (atomically);
    returns the file's `tsesnet.serving.outputs.Written` (size, sha256).

    Args:
        path: where (from `seg_path`).
        mask_zyx: (Z, Y, X) uint8 in {0, 1}, canonical order.
        geometry: the case's `Geometry` (the DICOM grid, from ingest).
        refs: the case's stored ``dicom`` attribute; None for a case not ingested from DICOM.
        model_uri: recorded as the algorithm's version.
        source_paths: the case's source files, for the identification (module docstring).

    Raises:
        InputError: the case has no DICOM source, or its phase 0 spans several multi-frame
            files (not referenced here).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from tsesnet.serving.outputs import atomic_write

    if not refs:
        raise InputError(
            "--output-format dicom-seg needs a DICOM source: this case was ingested from NIfTI"
        )
    multi_frame = any(s.get("frame") is not None for s in refs["slices"])
    if multi_frame and not refs.get("frame_slices"):
        raise InputError(
            "--output-format dicom-seg: the source's pre-contrast slices span several "
            "multi-frame files, which this SEG writer does not reference; use the NIfTI output"
        )
    sources, positions = _sources(refs, list(source_paths), multi_frame)
    ijk = geometry.to_original(np.asarray(mask_zyx, dtype=np.uint8))  # (i, j, k)
    frames = np.ascontiguousarray(ijk.transpose(2, 1, 0)).astype(bool)  # (n, rows, cols)
    study = refs["study_instance_uid"]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        plane_positions=positions,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_tumour_segment(model_uri)],
        # Same study and model: the same UIDs, so a rerun replaces the SEG in a PACS.
        series_instance_uid=generate_uid(entropy_srcs=[study, str(model_uri), "series"]),
        series_number=9901,
        sop_instance_uid=generate_uid(entropy_srcs=[study, str(model_uri), "instance"]),
        instance_number=1,
        manufacturer="TSESNet",
        manufacturer_model_name="TSESNet",
        software_versions="tsesnet",
        device_serial_number="0",
        series_description="TSESNet tumour segmentation",
        content_label="TUMOUR",
        omit_empty_frames=False,  # an empty prediction is still a SEG the viewer can show
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: seg.save_as(tmp))


def _sources(refs: dict[str, Any], source_paths: list[str], multi_frame: bool) -> tuple:
    """(source image stubs, plane positions or None) for highdicom: one stub per slice, or the
    multi-frame stub and each slice's position (highdicom then references the frame there)."""
    import highdicom as hd

    identification = _identification(refs, source_paths)
    if not multi_frame:
        return _stubs(refs, identification), None
    positions = [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, s["position"])
        for s in refs["slices"]
    ]
    return _multi_frame_stub(refs, identification), positions


def _tumour_segment(model_uri: str):
    """Segment 1: the tumour, coded (SCT Morphologically abnormal structure / Neoplasm)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="TSESNet",
            family=codes.cid7162.ArtificialIntelligence,
            version=str(model_uri)[:64],
        ),
    )
