"""Cohort layouts on disk: detection and discovery of cases (no voxel data is read here).

Understood layouts, as the public breast DCE-MRI cohorts and tools ship them (nnU-Net raw, the
MAMA-MIA and BTS releases, dcm2niix's 4D files); ``.nii`` and ``.nii.gz`` are both accepted
everywhere, and hidden files (``.*``) are ignored:

- ``nnunet`` (nnU-Net raw): ``imagesTr/CASE_000t.nii.gz`` (``t`` = phase, ``_0000`` is
  pre-contrast), masks ``labelsTr/CASE.nii.gz``; optional ``imagesTs/`` (unlabelled, or
  labelled by ``labelsTs/``) and ``dataset.json`` (its ``channel_names``/``modality`` count sets
  the expected number of phases; a list ``acquisition_times_s`` or ``acquisition_times``, one
  number per channel, as `data_store.synth` writes, gives every case's times in s).
- ``mamamia`` (MAMA-MIA): ``images/CASE/CASE_000t.nii.gz``, masks
  ``segmentations/expert/CASE.nii.gz``, optional ``patient_info_files/CASE.json`` and
  ``train_test_splits.csv`` (the release's split: IDs in its ``test_split`` column are test
  cases, in ``train_split`` training cases; sets `CaseSource.subset`). File names
  match the folder name case-insensitively (the public release has ``DUKE_001/duke_001_0000``).
  Site = the dataset prefix of the ID (``DUKE_001`` -> ``DUKE``). Acquisition times (s) are taken
  from the first key named ``acquisition_times`` (a list of numbers, one per phase file) found
  anywhere in the case's JSON; absent, malformed or of the wrong length -> no times.
- ``bts`` (BTS): ``CENTER/CASE/P0.nii.gz .. P5.nii.gz``, masks ``CENTER_gt/CASE.nii.gz``,
  optional ``train.txt``/``test.txt`` (one ID per line; sets `CaseSource.subset`; listed IDs
  with no folder are ignored). Site = the ``CENTER`` folder name.
- ``nifti4d``: one 4D file per case directly in SRC, ``CASE.nii.gz`` with phases on axis 4
  (as dcm2niix writes a dynamic series), mask beside it as ``CASE_mask.nii.gz`` (or
  ``CASE_seg.nii.gz``). Any file whose name ends in ``_mask``/``_seg`` is a mask, never a case.
  SRC may also be a single 4D file.
- ``dicom``: DICOM files of DCE-MRI studies in any folder structure with any file names, one
  case per study; see `data_store.dicom` for what is read, skipped and refused.

Missing phases (BTS ``P2..P5``, a gap in nnU-Net channels) are recorded in
`CaseSource.phase_present`, indexed by nominal phase, and simply not loaded;
`CaseSource.phase_files` lists only the files present, in phase order. The nominal phases of a
cohort are 0..N-1: N is the number of channels ``dataset.json`` declares (nnU-Net), 6 for BTS
(P0..P5), else the phase count of the longest case numbered 0..k without a gap. A case with a
phase file beyond N (a stray ``GAP_0999.nii.gz``, ``P7``) is rejected naming that file, and
does not change any other case's phases. A file or folder with a NIfTI name that is not a
regular file (a directory, a broken link, a link loop) is kept in its case, so that loading
rejects the case naming it rather than storing it with a phase silently missing.

Problems that concern the whole source (unknown layout, no cases, duplicate case IDs, a broken
``dataset.json``) raise `InputError` here. Problems of one case (no pre-contrast file, two files
for one phase, a mask without an image, an unexpected file name) are recorded in
`CaseSource.problem` and raised by `data_store.source_reader.load_case`, so an ingest skips that
case and stores the others. Case IDs that differ only in letter case are duplicates (they would
collide on a case-insensitive file system).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_store.dicom import discover_dicom, has_dicom, is_dicom
from data_store.errors import InputError

__all__ = ["LAYOUTS", "CaseSource", "detect_layout", "discover", "nifti_stem"]

LAYOUTS: dict[str, str] = {
    "nnunet": "imagesTr/CASE_000t.nii.gz + labelsTr/CASE.nii.gz (+ imagesTs/, dataset.json)",
    "mamamia": "images/CASE/CASE_000t.nii.gz + segmentations/expert/CASE.nii.gz",
    "bts": "CENTER/CASE/P0..P5.nii.gz + CENTER_gt/CASE.nii.gz",
    "nifti4d": "CASE.nii.gz (4D, phases on axis 4) + CASE_mask.nii.gz beside it",
    "dicom": "DICOM files of DCE-MRI studies, any folders and names (+ a DICOM SEG or NIfTI mask)",
}
MASK_SUFFIXES = ("_mask", "_seg")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<t>\d{4})$")
_BTS_PHASE = re.compile(r"^[Pp](?P<t>\d+)$")
BTS_PHASES = 6  # P0 (pre-contrast) .. P5
MAMAMIA_SPLITS = "train_test_splits.csv"


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are; no data is read.

    Attributes:
        case_id: unique within the source.
        phase_files: the phase files present, in phase order (phase 0 = pre-contrast first);
            for the 4D layout a single file.
        mask_file: the tumour mask, or None for an unlabelled case.
        layout: "nnunet" | "mamamia" | "bts" | "nifti4d".
        site: BTS centre or MAMA-MIA dataset, when the layout gives one.
        times: acquisition times in s, one per phase file, when the layout gives them.
        phase_present: presence of each nominal phase (e.g. BTS with P2..P5 missing:
            ``(True, True, False, False, False, False)``); None until loaded for nifti4d.
        subset: "train" / "test" when the layout says (nnU-Net imagesTr/imagesTs, BTS lists).
        problem: a problem found during discovery; `load_case` raises it.
        problem_path: the file or folder the problem is about.
        notes: lines about what discovery left out on purpose (the DICOM layout's skipped
            non-DCE series), shown by ingest.
    """

    case_id: str
    phase_files: tuple[Path, ...]
    mask_file: Path | None
    layout: str
    site: str | None = None
    times: tuple[float, ...] | None = None
    phase_present: tuple[bool, ...] | None = None
    subset: str | None = None
    problem: str | None = None
    problem_path: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        """Whether the case has a mask file."""
        return self.mask_file is not None

    @property
    def files(self) -> tuple[Path, ...]:
        """All files of the case: phases, then the mask if any."""
        return self.phase_files + ((self.mask_file,) if self.mask_file else ())


def nifti_stem(path: Path) -> str | None:
    """``CASE_0000`` for ``CASE_0000.nii.gz`` / ``.nii``; None for other or hidden files."""
    name = path.name
    if name.startswith("."):
        return None
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _understood() -> str:
    return "; ".join(f"{name}: {pattern}" for name, pattern in LAYOUTS.items())


def detect_layout(src: Path) -> str:
    """Guesses the layout of a cohort folder (or a single 4D NIfTI file).

    Checked in order: nnunet (``imagesTr/`` or ``imagesTs/``), mamamia (``images/`` with case
    folders), bts (``CENTER/CASE/P0.nii*``), dicom (a DICOM file anywhere in SRC), nifti4d
    (NIfTI files directly in SRC).

    Raises:
        InputError: SRC missing, empty, or in none of the layouts (the message lists them).
    """
    src = Path(src)
    if not src.exists():
        raise InputError("source not found", path=str(src))
    if src.is_file():
        if nifti_stem(src) is not None:
            return "nifti4d"
        if is_dicom(src):
            return "dicom"
        raise InputError(
            f"not a NIfTI file or a cohort folder; understood layouts: {_understood()}",
            path=str(src),
        )
    entries = [p for p in src.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise InputError(f"empty source folder; understood layouts: {_understood()}", path=str(src))
    if (src / "imagesTr").is_dir() or (src / "imagesTs").is_dir():
        return "nnunet"
    images = src / "images"
    if images.is_dir() and any(p.is_dir() for p in images.iterdir()):
        return "mamamia"
    for centre in _dirs(src):
        if centre.name.endswith("_gt"):
            continue
        for case_dir in _dirs(centre):
            if any(_bts_phase(p) is not None for p in case_dir.iterdir()):
                return "bts"
    dicom_below = has_dicom(src)  # a study's NIfTI mask may lie in SRC above its folders
    if not dicom_below and any(p.is_file() and nifti_stem(p) is not None for p in entries):
        return "nifti4d"
    if dicom_below:
        return "dicom"
    raise InputError(f"unknown layout; understood layouts: {_understood()}", path=str(src))


def discover(src: Path, layout: str = "auto") -> list[CaseSource]:
    """Lists the cases of a cohort, sorted by case ID.

    Args:
        src: the cohort folder (or, for nifti4d, a single 4D file).
        layout: "auto" (see `detect_layout`) or one of `LAYOUTS`.

    Raises:
        InputError: unknown layout name, no cases, duplicate case IDs (naming both files),
            unreadable ``dataset.json``.
    """
    src = Path(src)
    if layout == "auto":
        layout = detect_layout(src)
    elif layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; understood layouts: {_understood()}")
    elif not src.exists():
        raise InputError("source not found", path=str(src))
    finder = {
        "nnunet": _nnunet,
        "mamamia": _mamamia,
        "bts": _bts,
        "nifti4d": _nifti4d,
        "dicom": _dicom,
    }[layout]
    cases = finder(src)
    if not cases:
        raise InputError(
            f"empty source: no cases in the {layout} layout ({LAYOUTS[layout]})", path=str(src)
        )
    seen: dict[str, CaseSource] = {}
    for case in cases:
        key = case.case_id.lower()
        if key in seen:
            first = seen[key]
            raise InputError(
                f"duplicate case ID: {_first_file(first)} and {_first_file(case)}",
                case=case.case_id,
                path=str(src),
            )
        seen[key] = case
    return sorted(cases, key=lambda c: c.case_id)


# ---------------------------------------------------------------- helpers shared by layouts


def _dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _niftis(folder: Path) -> list[Path]:
    """Entries with a NIfTI name: regular files, and anything else so named (a directory, a
    broken link, a link loop), which `read_nifti` rejects naming it."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if nifti_stem(p) is not None)


def _first_file(case: CaseSource) -> str:
    files = case.files or ((case.problem_path,) if case.problem_path else ())
    return str(files[0]) if files else case.case_id


def _bts_phase(path: Path) -> int | None:
    stem = nifti_stem(path)
    m = _BTS_PHASE.match(stem) if stem else None
    return int(m["t"]) if m else None


def _masks_by_id(folder: Path) -> dict[str, list[Path]]:
    """Mask files of a folder keyed by lower-cased stem."""
    out: dict[str, list[Path]] = defaultdict(list)
    for p in _niftis(folder):
        out[nifti_stem(p).lower()].append(p)
    return out


def _pop_mask(masks: dict[str, list[Path]], case_id: str) -> tuple[Path | None, str | None]:
    """The case's mask and a problem if there are several candidates."""
    found = masks.pop(case_id.lower(), [])
    if len(found) > 1:
        return found[0], f"two mask files for one case: {found[0].name} and {found[1].name}"
    return (found[0] if found else None), None


@dataclass(frozen=True)
class _PhaseRange:
    """A cohort's nominal phases, 0..n-1 (see the module docstring).

    Attributes:
        n: the number of nominal phases.
        why: where n comes from, for the message that rejects a phase beyond it.
    """

    n: int
    why: str


def _phase_range(
    phase_maps: list[dict[int, list[Path]]], declared: int | None = None, why: str = ""
) -> _PhaseRange:
    """The declared count, else the longest case numbered 0..k without a gap (else, when no
    case is, the largest index: nothing can be told apart)."""
    if declared:
        return _PhaseRange(declared, why)
    gap_free = [max(p) + 1 for p in phase_maps if p and sorted(p) == list(range(max(p) + 1))]
    if gap_free:
        n = max(gap_free)
        return _PhaseRange(n, f"the longest case numbered without a gap has {n}")
    return _PhaseRange(max((max(p) + 1 for p in phase_maps if p), default=0), "")


def _build(
    case_id: str,
    phases: dict[int, list[Path]],
    *,
    layout: str,
    nominal: _PhaseRange,
    mask: Path | None,
    folder: Path,
    expected0: str,
    site: str | None = None,
    times: tuple[float, ...] | None = None,
    subset: str | None = None,
    problem: tuple[str, Path] | None = None,
) -> CaseSource:
    """A CaseSource from a {phase index: files} map, recording the first per-case problem."""
    present = sorted(t for t in phases if t < nominal.n)
    files = tuple(phases[t][0] for t in present)
    for t in present:
        if problem is None and len(phases[t]) > 1:
            a, b = phases[t][:2]
            problem = (f"two files for phase {t}: {a.name} and {b.name}", a)
    if problem is None and 0 not in phases:
        problem = (f"no pre-contrast phase: {expected0} is missing", folder / expected0)
    beyond = sorted(t for t in phases if t >= nominal.n)
    if problem is None and beyond:
        problem = (
            f"phase {beyond[0]} is beyond the cohort's phases 0..{nominal.n - 1} ({nominal.why});"
            " phase numbers run 0..k, with missing phases only in between",
            phases[beyond[0]][0],
        )
    if times is not None and len(times) != len(files):
        times = None
    return CaseSource(
        case_id=case_id,
        phase_files=files,
        mask_file=mask,
        layout=layout,
        site=site,
        times=times,
        phase_present=tuple(t in phases for t in range(nominal.n)),
        subset=subset,
        problem=problem[0] if problem else None,
        problem_path=problem[1] if problem else None,
    )


def _orphan_masks(masks: dict[str, list[Path]], layout: str, where: str) -> list[CaseSource]:
    """Cases for masks that have no image: `load_case` rejects them with a clear message."""
    return [
        CaseSource(
            case_id=case_id,
            phase_files=(),
            mask_file=files[0],
            layout=layout,
            problem=f"mask has no image files (expected {where.format(case=case_id)})",
            problem_path=files[0],
        )
        for files in masks.values()
        for case_id in [_mask_case_id(files[0])]
    ]


def _mask_case_id(path: Path) -> str:
    """``CASE`` for ``CASE.nii.gz``, ``CASE_mask.nii.gz`` and ``CASE_seg.nii.gz``."""
    stem = nifti_stem(path)
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


# ---------------------------------------------------------------------------- the layouts


def _nnunet(src: Path) -> list[CaseSource]:
    declared, cohort_times = _dataset_json(src / "dataset.json")
    found = []  # (subset, images folder, {case: {t: files}}, masks)
    cases: list[CaseSource] = []
    for images_name, labels_name, subset in (
        ("imagesTr", "labelsTr", "train"),
        ("imagesTs", "labelsTs", "test"),
    ):
        folder = src / images_name
        by_case: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
        for p in _niftis(folder):
            m = _CHANNEL.match(nifti_stem(p))
            if m is None:
                cases.append(
                    CaseSource(
                        case_id=nifti_stem(p),
                        phase_files=(p,),
                        mask_file=None,
                        layout="nnunet",
                        subset=subset,
                        problem="file name lacks the 4-digit phase suffix (CASE_0000.nii.gz)",
                        problem_path=p,
                    )
                )
                continue
            by_case[m["case"]][int(m["t"])].append(p)
        found.append((subset, folder, by_case, _masks_by_id(src / labels_name)))
    maps = [phases for _, _, by_case, _ in found for phases in by_case.values()]
    nominal = _phase_range(maps, declared, f"dataset.json declares {declared} channels")
    for subset, folder, by_case, masks in found:
        for case_id, phases in by_case.items():
            mask, problem = _pop_mask(masks, case_id)
            cases.append(
                _build(
                    case_id,
                    phases,
                    layout="nnunet",
                    nominal=nominal,
                    mask=mask,
                    folder=folder,
                    expected0=f"{case_id}_0000.nii.gz",
                    times=_select(cohort_times, phases),
                    subset=subset,
                    problem=(problem, mask) if problem else None,
                )
            )
        cases.extend(_orphan_masks(masks, "nnunet", f"{folder.name}/{{case}}_0000.nii.gz"))
    return cases


def _dataset_json(meta: Path) -> tuple[int | None, tuple[float, ...] | None]:
    """(channels declared, acquisition times in s) from an nnU-Net ``dataset.json``, if any."""
    if not meta.is_file():
        return None, None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"unreadable dataset.json ({err})", path=str(meta)) from err
    if not isinstance(info, dict):
        return None, None
    channels = info.get("channel_names") or info.get("modality")
    times = _numbers(info.get("acquisition_times_s", info.get("acquisition_times")))
    return (len(channels) if isinstance(channels, dict) and channels else None), times


def _numbers(value: Any) -> tuple[float, ...] | None:
    """A list of numbers as floats, else None."""
    try:
        return tuple(float(v) for v in value) if isinstance(value, list) else None
    except (TypeError, ValueError):
        return None


def _select(times: tuple[float, ...] | None, phases: dict[int, list[Path]]) -> tuple | None:
    """The times of the phases present, from times indexed by nominal phase."""
    if times is None or not phases or max(phases) >= len(times):
        return None
    return tuple(times[t] for t in sorted(phases))


def _find_key(obj: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a JSON object (depth first)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = list(obj.values())
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for value in children:
        found = _find_key(value, key)
        if found is not None:
            return found
    return None


def _mamamia_times(info: Path | None) -> tuple[float, ...] | None:
    """Acquisition times from a MAMA-MIA patient JSON (see the module docstring)."""
    if info is None:
        return None
    try:
        return _numbers(_find_key(json.loads(info.read_text()), "acquisition_times"))
    except (OSError, ValueError):
        return None


def _mamamia(src: Path) -> list[CaseSource]:
    images = src / "images"
    masks = _masks_by_id(src / "segmentations" / "expert")
    info_dir = src / "patient_info_files"
    infos = {p.name.lower(): p for p in info_dir.iterdir()} if info_dir.is_dir() else {}
    train, test = _mamamia_splits(src / MAMAMIA_SPLITS)
    scanned = []  # (case folder, {t: files}, problem)
    for case_dir in _dirs(images) if images.is_dir() else []:
        phases: dict[int, list[Path]] = defaultdict(list)
        problem = None
        for p in _niftis(case_dir):
            m = _CHANNEL.match(nifti_stem(p))
            if m is None or m["case"].lower() != case_dir.name.lower():
                expected = f"{case_dir.name.lower()}_000t.nii.gz"
                problem = problem or (f"unexpected file name (expected {expected})", p)
                continue
            phases[int(m["t"])].append(p)
        scanned.append((case_dir, phases, problem))
    nominal = _phase_range([phases for _, phases, _ in scanned])
    cases = []
    for case_dir, phases, problem in scanned:
        case_id = case_dir.name
        mask, mask_problem = _pop_mask(masks, case_id)
        if problem is None and mask_problem:
            problem = (mask_problem, mask)
        cases.append(
            _build(
                case_id,
                phases,
                layout="mamamia",
                nominal=nominal,
                mask=mask,
                folder=case_dir,
                expected0=f"{case_id.lower()}_0000.nii.gz",
                site=case_id.split("_")[0],
                times=_mamamia_times(infos.get(f"{case_id.lower()}.json")),
                subset=_subset(case_id.lower(), train, test),
                problem=problem,
            )
        )
    cases.extend(_orphan_masks(masks, "mamamia", "images/{case}/{case}_0000.nii.gz"))
    return cases


def _mamamia_splits(path: Path) -> tuple[set[str], set[str]]:
    """(train IDs, test IDs), lower-cased, from MAMA-MIA's ``train_test_splits.csv``."""
    if not path.is_file():
        return set(), set()
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"unreadable {path.name} ({err})", path=str(path)) from err
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    if "test_split" not in columns:
        raise InputError(
            f"{path.name} has no test_split column (columns: {', '.join(columns) or 'none'})",
            path=str(path),
        )

    def ids(column: str | None) -> set[str]:
        return {r[column].strip().lower() for r in rows if column and (r.get(column) or "").strip()}

    return ids(columns.get("train_split")), ids(columns["test_split"])


def _subset(key: str, train: set[str], test: set[str]) -> str | None:
    return "test" if key in test else "train" if key in train else None


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _bts(src: Path) -> list[CaseSource]:
    train, test = _read_list(src / "train.txt"), _read_list(src / "test.txt")
    scanned = []  # (centre, case folder, {t: files}, problem)
    for centre in _dirs(src):
        if centre.name.endswith("_gt"):
            continue
        for case_dir in _dirs(centre):
            phases: dict[int, list[Path]] = defaultdict(list)
            problem = None
            for p in _niftis(case_dir):
                t = _bts_phase(p)
                if t is None:
                    expected = "expected P0.nii.gz .. P5.nii.gz"
                    problem = problem or (f"unexpected file name ({expected})", p)
                    continue
                phases[t].append(p)
            if phases or problem:  # other folders are not cases
                scanned.append((centre, case_dir, phases, problem))
    masks = {c.name: _masks_by_id(src / f"{c.name}_gt") for c in {s[0] for s in scanned}}
    nominal = _PhaseRange(BTS_PHASES, "BTS numbers its phases P0..P5")
    cases = []
    for centre, case_dir, phases, problem in scanned:
        case_id = case_dir.name
        mask, mask_problem = _pop_mask(masks[centre.name], case_id)
        if problem is None and mask_problem:
            problem = (mask_problem, mask)
        subset = _subset(case_id, train, test)
        cases.append(
            _build(
                case_id,
                phases,
                layout="bts",
                nominal=nominal,
                mask=mask,
                folder=case_dir,
                expected0="P0.nii.gz",
                site=centre.name,
                subset=subset,
                problem=problem,
            )
        )
    for centre_name, left in masks.items():
        cases.extend(_orphan_masks(left, "bts", f"{centre_name}/{{case}}/P0.nii.gz"))
    return cases


def _nifti4d(src: Path) -> list[CaseSource]:
    if src.is_file():  # a single case; its mask, if any, beside it
        stem = nifti_stem(src)
        beside = [
            src.with_name(f"{stem}{s}{e}") for s in MASK_SUFFIXES for e in (".nii.gz", ".nii")
        ]
        files = [src, *(p for p in beside if p.is_file())]
    else:
        files = _niftis(src)
    images: list[Path] = []
    masks: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        stem = nifti_stem(p)
        if _mask_case_id(p) != stem:
            masks[_mask_case_id(p).lower()].append(p)
        else:
            images.append(p)
    cases = []
    for image in images:  # CASE.nii next to CASE.nii.gz: a duplicate ID, raised by discover
        case_id = nifti_stem(image)
        mask, problem = _pop_mask(masks, case_id)
        cases.append(
            CaseSource(
                case_id=case_id,
                phase_files=(image,),
                mask_file=mask,
                layout="nifti4d",
                problem=problem,
                problem_path=mask if problem else None,
            )
        )
    cases.extend(_orphan_masks(masks, "nifti4d", "{case}.nii.gz beside the mask"))
    return cases


def _dicom(src: Path) -> list[CaseSource]:
    """DICOM studies (`data_store.dicom.discover_dicom`) as cases."""
    return [
        CaseSource(
            case_id=c.case_id,
            phase_files=c.files,
            mask_file=c.mask,
            layout="dicom",
            times=c.times,
            problem=c.problem,
            problem_path=c.problem_path,
            notes=c.notes,
        )
        for c in discover_dicom(src)
    ]
