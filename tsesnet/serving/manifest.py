"""A prediction folder is complete or visibly not: `OUT/prediction.json` is its manifest.

`tsesnet predict` writes the manifest twice. Before the first case it writes it with
``"complete": false`` and ``"writes"``, every name the run may leave in OUT (its own planned
files and the previous run's, which it then removes); after the last file it writes it again,
last of all, with ``"complete": true`` and ``"files"``, each file written with its size and
sha256. A run killed at any moment therefore leaves a folder that says it is incomplete, and the
previous run's masks are gone before the first new one is written, so two runs never mix.

Which folders `predict` writes into (`check_output_folder`), the rule:

- never one holding mask files it did not write: NIfTI (``.nii``, ``.nii.gz``) or DICOM
  (``.dcm``) files directly in OUT or in ``OUT/probabilities/`` that no manifest there lists
  (a cohort's ``labelsTr/``, someone's masks), whatever the flags;
- never one equal to or inside a folder holding a source file of the input (the paths a store
  records per case, or a raw cohort's files): re-ingest would read predictions as labels;
- an empty folder, a missing one, or a previous *complete* prediction of ours (its files all
  listed by its manifest): written, the previous run's files replaced;
- anything else (other files, or an interrupted prediction: ``"complete": false``) only with
  ``--overwrite``; files we did not write are then left where they are, never removed.

`tsesnet evaluate` scores a prediction folder only when its manifest is complete and every file
it lists is there with its size (and, for the files directly in OUT: masks, ``summary.csv``,
``report.html``, its sha256) and no other mask lies beside them (`check_prediction_folder`);
a folder with no ``prediction.json`` at all (masks made elsewhere) is scored as found, with a line
saying so; ``--pred-unchecked`` scores a folder of ours whose manifest does not vouch for it.

The names in a manifest are read, never trusted: only names of the forms predict writes
(``CASE.nii.gz``, ``CASE.dcm``, ``probabilities/CASE.nii.gz``, ``report/CASE.png``,
``summary.csv``, ``report.html``) with a safe case ID, inside OUT, are ever removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from data_store.errors import InputError
from tsesnet.serving.lineage import PREDICTION_FILE
from tsesnet.serving.outputs import (
    PROBABILITIES_DIR,
    REPORT_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
    ObjectPath,
    Written,
    is_url,
    write_bytes,
)

if TYPE_CHECKING:
    from tsesnet.serving.inputs import CaseReader

MANIFEST_FORMAT = "tsesnet-prediction"
_MASK_SUFFIXES = (".nii.gz", ".nii", ".dcm")
#: The way past `check_prediction_folder` (a placeholder, `data_store.errors.InputError`).
_UNCHECKED = "pass {pred_unchecked=True} to score its masks as found"
_PRED_PARAMS = ("overwrite", "pred_unchecked")


def planned_names(case_ids, *, output_format: str, probabilities: bool, report: bool) -> list[str]:
    """Every name (relative to OUT) a run over `case_ids` may write."""
    suffix = ".dcm" if output_format == "dicom-seg" else ".nii.gz"
    names = [SUMMARY_FILE, *(f"{c}{suffix}" for c in case_ids)]
    if probabilities:
        names += [f"{PROBABILITIES_DIR}/{c}.nii.gz" for c in case_ids]
    if report:
        names += [REPORT_FILE, *(f"{REPORT_DIR}/{c}.png" for c in case_ids)]
    return sorted(names)


def relative_name(out_dir, path) -> str:
    """`path`'s name relative to OUT, with `/` separators."""
    if isinstance(path, ObjectPath) or is_url(out_dir):
        return str(path)[len(str(out_dir).rstrip("/")) + 1 :]
    return Path(path).relative_to(Path(out_dir)).as_posix()


# --------------------------------------------------------------------------------------------
# Reading OUT
# --------------------------------------------------------------------------------------------


def _listing(out) -> dict[str, int] | None:
    """Name (relative to OUT, `/` separators) -> size of every file directly in OUT and in
    its `probabilities/` and `report/`; other sub-folders as ``NAME/``; None when OUT is absent."""
    if is_url(out):
        fs, root = ObjectPath(str(out)).fs
        root = root.rstrip("/")
        try:
            if not fs.isdir(root):
                return None
            found = {}
            for entry in fs.ls(root, detail=True):
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                if entry["type"] == "directory":
                    if name in (PROBABILITIES_DIR, REPORT_DIR):
                        for sub in fs.ls(f"{root}/{name}", detail=True):
                            leaf = sub["name"].rstrip("/").rsplit("/", 1)[-1]
                            found[f"{name}/{leaf}"] = int(sub.get("size") or 0)
                    else:
                        found[f"{name}/"] = 0
                else:
                    found[name] = int(entry.get("size") or 0)
            return found
        except FileNotFoundError:
            return None
    out = Path(out)
    if not out.is_dir():
        return None
    found = {}
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink():
            if path.name in (PROBABILITIES_DIR, REPORT_DIR):
                for sub in path.iterdir():
                    found[f"{path.name}/{sub.name}"] = _size(sub)
            else:
                found[f"{path.name}/"] = 0
        else:
            found[path.name] = _size(path)
    return found


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return -1


def _is_mask_name(name: str) -> bool:
    """A NIfTI or DICOM file directly in OUT or in `probabilities/` (not hidden)."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] != PROBABILITIES_DIR:
        return False
    leaf = parts[-1]
    return len(parts) <= 2 and not leaf.startswith(".") and leaf.lower().endswith(_MASK_SUFFIXES)


def read_manifest(out) -> dict | None:
    """OUT's `prediction.json` when it is one of ours (a JSON object), else None."""
    from tsesnet.serving.lineage import read_prediction_record

    record = read_prediction_record(out)
    if record is None or not ("complete" in record or "cases" in record):
        return None
    return record


def ours(record: dict | None) -> set[str]:
    """The names a manifest says its run wrote or may have written (safe names only)."""
    if record is None:
        return set()
    if record.get("complete") is True:
        names = [f.get("path") for f in record.get("files") or () if isinstance(f, dict)]
    elif "complete" in record:
        names = list(record.get("writes") or ())
    else:  # an older version's record: no file list, its cases name its files
        ids = [c.get("case_id") for c in record.get("cases") or () if isinstance(c, dict)]
        ids = [c for c in ids if isinstance(c, str)]
        settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
        names = planned_names(
            ids,
            output_format=settings.get("output_format", "nifti"),
            probabilities=bool(settings.get("probabilities", True)),
            report=True,
        )
    return {n for n in names if isinstance(n, str) and _safe_name(n)}


def _safe_name(name: str) -> bool:
    """Whether `name` has one of the forms predict writes, with a safe case ID."""
    from tsesnet.serving.outputs import check_safe_id

    parts = name.split("/")
    if parts in ([SUMMARY_FILE], [REPORT_FILE]):
        return True
    if len(parts) == 1:
        stem, ok = _stem(parts[0], (".nii.gz", ".dcm"))
    elif len(parts) == 2 and parts[0] == PROBABILITIES_DIR:
        stem, ok = _stem(parts[1], (".nii.gz",))
    elif len(parts) == 2 and parts[0] == REPORT_DIR:
        stem, ok = _stem(parts[1], (".png",))
    else:
        return False
    if not ok:
        return False
    try:
        check_safe_id(stem)
    except InputError:
        return False
    return True


def _stem(leaf: str, suffixes) -> tuple[str, bool]:
    for suffix in suffixes:
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            return leaf[: -len(suffix)], True
    return leaf, False


# --------------------------------------------------------------------------------------------
# predict: which folder, then the manifest before and after
# --------------------------------------------------------------------------------------------


def check_output_folder(out, overwrite: bool, source_files=()) -> None:
    """Refuses an output folder holding files `predict` did not write (rule: module docstring).

    Args:
        out: OUT, resolved (a `Path`), or an object-store URL / `ObjectPath`.
        overwrite: `--overwrite` given.
        source_files: the input's source files (local paths; others are ignored).

    Raises:
        InputError: one line naming OUT, the files and what to do.
    """
    if not is_url(out):
        _refuse_source_folder(Path(out), source_files)
    listing = _listing(out)
    if not listing:
        return
    record = read_manifest(out)
    mine = ours(record) | ({PREDICTION_FILE} if record is not None else set())
    foreign = sorted(n for n in listing if n not in mine and not n.split("/")[-1].startswith("."))
    masks = [n for n in foreign if _is_mask_name(n)]
    if masks:
        raise InputError(
            f"{{output}} holds {_some(masks)} that tsesnet predict did not write (masks or "
            "labels of someone else's); predict never replaces them: choose another folder",
            path=str(out),
            params=["output"],
        )
    if overwrite:
        return
    if foreign:
        raise InputError(
            f"{{output}} is not empty: it holds {_some(foreign)} that tsesnet predict did not "
            "write; pass {overwrite=True} to write beside them, or choose an empty folder",
            path=str(out),
            params=["output", "overwrite"],
        )
    if record is not None and record.get("complete") is False:
        raise InputError(
            "{output} holds an interrupted prediction (its prediction.json says complete: "
            "false); pass {overwrite=True} to replace it",
            path=str(out),
            params=["output", "overwrite"],
        )


def _refuse_source_folder(out: Path, source_files) -> None:
    """Refuses OUT equal to or inside a folder holding one of the input's source files."""
    folders = set()
    for f in source_files:
        with contextlib.suppress(OSError, ValueError):
            if "://" not in str(f):
                folders.add(Path(os.path.abspath(f)).parent.resolve())
    for folder in sorted(folders):
        if out == folder or folder in out.parents:
            raise InputError(
                f"{{output}} lies in {folder}, a folder of the input's source files (a "
                "re-ingest would read predictions as scans or labels); choose a folder outside it",
                path=str(out),
                params=["output"],
            )


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def begin(out, planned: list[str], record: dict) -> None:
    """Marks OUT incomplete, then removes the previous run's files (ours, listed by its
    manifest), so no file of it can be taken for this run's.

    Args:
        out: OUT (a resolved `Path` or an `ObjectPath`).
        planned: `planned_names` of this run.
        record: what the manifest says about the run so far (model, input, settings...).
    """
    previous = ours(read_manifest(out))
    writes = sorted(set(planned) | previous)
    text = json.dumps({**record, "complete": False, "writes": writes}, indent=1)
    write_bytes(out / PREDICTION_FILE, (text + "\n").encode())
    for name in sorted(previous):
        _remove(out, name)


def _remove(out, name: str) -> None:
    """Removes OUT/name (a safe name) if it is a file inside OUT; anything else is left."""
    if isinstance(out, ObjectPath):
        fs, key = (out / name).fs
        with contextlib.suppress(OSError):
            if fs.isfile(key):
                fs.rm_file(key)
        return
    path = out / name
    with contextlib.suppress(OSError):
        if path.parent.resolve().is_relative_to(out) and path.is_file() and not path.is_symlink():
            path.unlink()


def finish(out, record: dict, files: dict[str, Written]) -> None:
    """Writes the complete manifest, last: `record` plus every file written with its size and
    sha256."""
    listed = [
        {"path": name, "size": w.size, "sha256": w.sha256} for name, w in sorted(files.items())
    ]
    text = json.dumps({**record, "complete": True, "files": listed}, indent=1, allow_nan=False)
    write_bytes(out / PREDICTION_FILE, (text + "\n").encode())


# --------------------------------------------------------------------------------------------
# evaluate: is this a whole prediction?
# --------------------------------------------------------------------------------------------


def check_prediction_folder(pred) -> dict | None:
    """The manifest of the prediction folder `pred`, checked against the folder.

    Returns:
        The manifest (`prediction.json`); None for a folder without one (masks made elsewhere).

    Raises:
        InputError: one line: an incomplete manifest, a listed file missing or changed,
            or a mask beside them that it does not list; each says `--pred-unchecked`.
    """
    listing = _listing(pred)
    if listing is None:
        raise InputError("not a directory", path=str(pred))
    record = read_manifest(pred)
    if record is None:
        return None  # masks made elsewhere: nothing to check them against (the caller says so)
    if record.get("complete") is not True:
        why = (
            "says complete: false (the run was interrupted, or is still running); rerun "
            "predict with {overwrite=True}"
            if "complete" in record
            else "lists no files (written by an older tsesnet); rerun predict"
        )
        raise InputError(
            f"its prediction.json {why}, or {_UNCHECKED}", path=str(pred), params=_PRED_PARAMS
        )
    listed = {
        f.get("path"): f for f in record.get("files") or () if isinstance(f, dict) and f.get("path")
    }
    for name, entry in sorted(listed.items()):
        problem = _differs(pred, name, entry, listing)
        if problem:
            raise InputError(
                f"{name} {problem} (another run's file?): rerun predict with "
                f"{{overwrite=True}}, or {_UNCHECKED}",
                path=str(pred),
                params=_PRED_PARAMS,
            )
    extra = sorted(n for n in listing if _is_mask_name(n) and n not in listed)
    if extra:
        raise InputError(
            f"holds {_some(extra)} that its prediction.json does not list (masks of another "
            f"run mixed in?): rerun predict with {{overwrite=True}} into an empty folder, or "
            f"{_UNCHECKED}",
            path=str(pred),
            params=_PRED_PARAMS,
        )
    return record


def _differs(pred, name: str, entry: dict, listing: dict[str, int]) -> str | None:
    """How OUT/name differs from what the manifest lists for it, or None."""
    if name not in listing:
        return "is listed in prediction.json but missing"
    if listing[name] != entry.get("size"):
        return "is not the size prediction.json records"
    if "/" in name:
        return None  # pictures and probability maps: their size is checked, not their bytes
    if file_sha256(pred, name) != entry.get("sha256"):
        return "does not have the sha256 prediction.json records"
    return None


def file_sha256(out, name: str) -> str:
    """sha256 of OUT/name, read in chunks (an object store's file streamed)."""
    digest = hashlib.sha256()
    if is_url(out):
        fs, key = (ObjectPath(str(out)) / name).fs
        opener = fs.open(key, "rb")
    else:
        opener = open(Path(out) / name, "rb")  # noqa: SIM115 (closed by the with below)
    with opener as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_output_dir(
    output: str | os.PathLike, reader: CaseReader, probabilities: bool, overwrite: bool = False
) -> Path:
    """Creates OUT (and `probabilities/`) after refusing outputs that would lose data.

    Args:
        output: `--output`.
        reader: the input.
        probabilities: `--probabilities` given.
        overwrite: `--overwrite` given (`tsesnet.serving.manifest.check_output_folder`).

    Returns:
        OUT, resolved.

    Raises:
        InputError: OUT is a file or cannot be created, lies inside the input store, holds input
            files, its `summary.csv`/`probabilities` is not what prediction writes there, or it
            holds files prediction did not write (`check_output_folder`).
    """
    if is_url(output):
        out = _prepare_object_dir(ObjectPath(str(output).rstrip("/")), reader)
        check_output_folder(out, overwrite)
        return out
    given = Path(output)
    if given.exists() and not given.is_dir():
        raise InputError("must be a folder, but this is a file", path=str(output), param="output")
    out = given.resolve()
    _refuse_input_overlap(out, reader)
    if (out / SUMMARY_FILE).is_dir():
        raise InputError(
            f"{SUMMARY_FILE} here is a folder; choose another {{output}}",
            path=str(out),
            params=["output"],
        )
    folder = out / PROBABILITIES_DIR
    if probabilities and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
        raise InputError(
            f"{PROBABILITIES_DIR} here is not a folder of its own (a file or a link); "
            "choose another {output}",
            path=str(out),
            params=["output"],
        )
    check_output_folder(out, overwrite, _source_files(reader))
    _mkdir(out, output)
    if probabilities:
        _mkdir(folder, folder)
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError("the output folder is not writable", path=str(out))
    return out


def _source_files(reader: CaseReader) -> list[str]:
    """The files the input's cases were read from: a raw cohort's, or the source paths a store
    records per case (as ingest saw them; a store ingested elsewhere names paths not here)."""
    if reader.kind != "store":
        return [str(f) for f in reader.source_files()]
    return reader._open().source_paths()


def _prepare_object_dir(out: ObjectPath, reader: CaseReader) -> ObjectPath:
    """Checks an object-store output before any work: its filesystem installed, not inside the
    input store, not an object of its own, and writable (a probe object is written and removed).

    Raises:
        InputError: one line saying which of these failed.
    """
    fs, root = out.fs
    if reader.kind == "store" and is_url(reader.path):
        store = reader.path.rstrip("/")
        if out.url == store or out.url.startswith(store + "/"):
            raise InputError(
                f"{{output}} lies inside the input store {store}; choose a prefix outside it",
                path=out.url,
                params=["output"],
            )
    probe = f"{root}/.tsesnet-write-probe-{uuid.uuid4().hex[:12]}"
    try:
        if fs.isfile(root):
            raise InputError(
                "must be a folder (prefix), but this is an object", path=out.url, param="output"
            )
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except InputError:
        raise
    except Exception as err:  # no bucket, no permission, no endpoint: botocore's many errors
        text = " ".join(str(err).split()) or type(err).__name__
        raise InputError(
            f"cannot write to the output ({type(err).__name__}: {text})", path=out.url
        ) from None
    return out


def _mkdir(folder: Path, shown) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"cannot create the output folder ({err.strerror})", path=str(shown)
        ) from None


def _refuse_input_overlap(out: Path, reader: CaseReader) -> None:
    """Refuses an OUT inside a local input store, or one holding the input's NIfTI files."""
    if reader.kind == "store":
        if "://" not in reader.path:
            store = Path(reader.path).resolve()
            if out == store or store in out.parents:
                raise InputError(
                    f"{{output}} lies inside the input store {store}; choose a folder outside it",
                    path=str(out),
                    params=["output"],
                )
        return
    inside = sorted(f.name for f in reader.source_files() if f.resolve().parent == out)
    if inside:
        more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
        raise InputError(
            f"{{output}} holds input files ({inside[0]}{more}) that prediction would "
            "overwrite; choose another folder",
            path=str(out),
            params=["output"],
        )
