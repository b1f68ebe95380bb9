"""Where prediction's cases come from: a Zarr store, or a raw NIfTI cohort read directly.

Shape legend: T phases, Z Y X voxels in the store's canonical order (Z=S, Y=A, X=R).

`CaseReader.for_input` decides what `--input` is. A path or URL holding a Zarr root
(`zarr.json`) is a store; anything else is a NIfTI cohort in a layout ingest understands
(`data_store.layouts.discover`). A folder *inside* a cohort is taken for what it is:

- nnU-Net's `imagesTr/` or `imagesTs/` predicts that folder's cases of the parent cohort (with
  `labelsTr/` or `labelsTs/` as ground truth when present); MAMA-MIA's `images/` is the parent
  cohort;
- a folder of masks (`labelsTr/`, `labelsTs/`, `segmentations/`, BTS's `CENTER_gt/`) and a folder
  of one 3D file per phase that is not part of a cohort (`CASE_0000.nii.gz`, `P0.nii.gz`, which
  would otherwise be read as 4D files holding one phase each) are refused with one line saying
  to pass the parent folder.

Only the reference travels to Ray actors; each opens the input itself, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_store.errors import InputError

if TYPE_CHECKING:
    from data_store.geometry import Geometry

# nnU-Net's image folders -> the `CaseSource.subset` discover gives their cases.
_NNUNET_IMAGES = {"imagesTr": "train", "imagesTs": "test"}
_MASK_FOLDERS = ("labelsTr", "labelsTs", "segmentations", "expert")
# One file per phase, as multi-file layouts name them (nnU-Net/MAMA-MIA `_000t`, BTS `Pt`):
# a heuristic for the hint only, so a local pattern rather than the layouts' own.
_PHASE_FILE = re.compile(r"(_\d{4}|^[Pp]\d)$")


@dataclass
class InputCase:
    """One case ready for inference."""

    case_id: str
    image: np.ndarray  # (T, Z, Y, X) as stored / as scanned
    mask: np.ndarray | None  # (Z, Y, X) uint8, None when unlabelled
    geometry: Geometry  # the phase-0 file's grid, to write outputs back on
    percentiles: tuple[float, float]
    dicom: dict | None = None  # a DICOM study's references (`data_store.dicom`), else None
    source_paths: list[str] = field(default_factory=list)  # the files it was read from


@dataclass
class CaseReader:
    """A picklable reference to the input; opens it lazily, once per process.

    Attributes:
        kind: "store" or "nifti".
        path: the store path/URL or the cohort folder.
        layout: for "nifti", the layout passed to `discover` ("auto" detects it).
        subset: for "nifti", only the cases of this `CaseSource.subset` (nnU-Net's imagesTr/
            "train", imagesTs/ "test"); None: all.
    """

    kind: str
    path: str
    layout: str = "auto"
    subset: str | None = None
    _index: object = field(default=None, repr=False, compare=False)

    @classmethod
    def for_input(cls, path: str, layout: str = "auto") -> CaseReader:
        """A store if `path` is a URL or holds a Zarr root (`zarr.json`), else a NIfTI cohort.

        Local paths are made absolute: actors do not share the driver's working directory.

        Raises:
            InputError: nothing at `path`, or a folder that is not a cohort (see module doc).
        """
        from data_store.layouts import nifti_stem

        if "://" in str(path):
            return cls("store", str(path))
        p = Path(path).resolve()
        if (p / "zarr.json").is_file():
            return cls("store", str(p))
        if not p.exists():
            raise InputError("input not found (expected a store or a NIfTI folder)", path=path)
        if not p.is_dir():
            if nifti_stem(p) is None:  # a single 4D NIfTI file is a cohort too
                raise InputError(
                    "input must be a store, a NIfTI folder or a 4D NIfTI file", path=path
                )
            return cls("nifti", str(p), layout)
        if layout == "auto":
            return _cohort_reader(cls, p)
        return cls("nifti", str(p), layout)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = None  # reopened where it is used
        return state

    def _open(self):
        if self._index is None:
            if self.kind == "store":
                from data_store.store import open_store

                self._index = open_store(self.path)
            else:
                from data_store.layouts import discover

                sources = discover(Path(self.path), self.layout)
                self._index = {s.case_id: s for s in sources if self.subset in (None, s.subset)}
        return self._index

    def case_ids(self, fold: int | None = None, split: str | None = None) -> list[str]:
        """The input's case IDs, sorted; with `fold`, only that fold's; with `split` ("train" or
        "test"), only that split's (stores only: folds and splits are assigned at ingest)."""
        index = self._open()
        if self.kind == "store":
            ids = list(index.case_ids)
            if split is not None:
                if split not in ("train", "test"):
                    raise InputError(f"must be train or test, got {split!r}", param="split")
                ids = index.case_ids_in(split)
                if not ids:
                    raise InputError(f"the store has no cases in split {split!r}", path=self.path)
            if fold is not None:
                if not 0 <= fold < index.n_folds:
                    raise InputError(
                        f"{fold} out of range: the store has {index.n_folds} folds "
                        f"(0..{index.n_folds - 1})",
                        path=self.path,
                        param="fold",
                    )
                ids = [c for c in ids if index.fold_of(c) == fold]
            return sorted(ids)
        if fold is not None or split is not None:
            param = "fold" if fold is not None else "split"
            raise InputError(
                "needs a store input (folds and splits are assigned at ingest)",
                path=self.path,
                param=param,
            )
        return sorted(index)

    def source_files(self) -> list[Path]:
        """Every file a NIfTI input's cases are read from (scans and masks); [] for a store."""
        if self.kind == "store":
            return []
        return [Path(f) for s in self._open().values() for f in s.files]

    def read(self, case_id: str) -> InputCase:
        """Reads one case; raises InputError (naming case and file) on a bad one."""
        index = self._open()
        if self.kind == "store":
            case = index.read_case(case_id)
            lo, hi = case.percentiles
            paths = [src["path"] for src in case.attrs.get("sources", ())]
            dicom = case.attrs.get("dicom")
            return InputCase(case_id, case.image, case.mask, case.geometry, (lo, hi), dicom, paths)
        from data_store.normalize import intensity_percentiles
        from data_store.source_reader import load_case

        loaded = load_case(index[case_id])
        lo, hi = intensity_percentiles(loaded.image)  # as ingest computes them
        paths = [str(p) for p in loaded.source.phase_files]
        return InputCase(
            case_id, loaded.image, loaded.mask, loaded.geometry, (lo, hi), loaded.dicom, paths
        )


def _cohort_reader(cls, folder: Path) -> CaseReader:
    """The reader for a folder given with `--layout auto`: the cohort, or the cohort above it."""
    from data_store.layouts import detect_layout

    parent = folder.parent
    if folder.name in _NNUNET_IMAGES and _layout_of(parent) == "nnunet":
        return cls("nifti", str(parent), "nnunet", subset=_NNUNET_IMAGES[folder.name])
    if folder.name == "images" and _layout_of(parent) == "mamamia":
        return cls("nifti", str(parent), "mamamia")
    if folder.name in _MASK_FOLDERS or (
        folder.name.endswith("_gt") and _layout_of(parent) == "bts"
    ):
        raise InputError(
            f"this folder holds masks, not scans: pass the cohort folder above it ({parent})",
            path=str(folder),
        )
    if detect_layout(folder) == "nifti4d" and _one_phase_per_file(folder):
        raise InputError(
            "this folder holds one 3D file per phase, not one 4D file per case: pass the cohort "
            f"folder above it ({parent}; nnU-Net: the folder holding imagesTr/ or imagesTs/)",
            path=str(folder),
        )
    return cls("nifti", str(folder), "auto")


def _layout_of(folder: Path) -> str | None:
    """The layout `detect_layout` finds in `folder`, or None when it finds none."""
    from data_store.layouts import detect_layout

    try:
        return detect_layout(folder)
    except InputError:
        return None


def _one_phase_per_file(folder: Path) -> bool:
    """Whether every NIfTI file in `folder` is named like a phase file and the first one is 3D
    (read from its header only)."""
    import nibabel as nib

    from data_store.layouts import nifti_stem

    files = sorted(p for p in folder.iterdir() if p.is_file() and nifti_stem(p) is not None)
    if not files or not all(_PHASE_FILE.search(nifti_stem(p)) for p in files):
        return False
    try:
        shape = nib.load(str(files[0])).shape
    except Exception:  # unreadable: the per-case error will name it
        return False
    return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
