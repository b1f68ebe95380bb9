"""What prediction writes, and the rules that keep it inside the output folder.

    OUT/CASE.nii.gz                  uint8 mask on the grid of the case's phase-0 file
    OUT/probabilities/CASE.nii.gz    with --probabilities: float32 probability, same grid
    OUT/summary.csv                  one row per case (`SUMMARY_COLUMNS`)
    OUT/prediction.json              the model, input, settings, cases, software and time
    OUT/report/CASE.png              the case's picture (`tsesnet.serving.report`)
    OUT/report.html                  every case's numbers and picture, for people

Probability maps have a folder of their own, so no case ID can collide with another case's map
(cases `A` and `A_prob` both exist in real cohorts), and `tsesnet evaluate`, which reads the
NIfTI files directly in a folder, never mistakes one for a mask.

Safety, whatever the input says: every output name is built from a case ID checked with the
rule ingest applies to case IDs (`data_store.store.check_case_id`: no `/` or `\\`, not starting
with `.` or `__`), plus no control characters; and every path is resolved (symbolic links
followed) and refused unless it lies inside OUT, before anything is written or removed. Files are
written under a fresh temporary name in their folder and renamed into place, so a crash never
leaves half a file and a link planted at the final name is replaced, never written through.
`tsesnet.serving.manifest.prepare_output_dir` refuses, before any work starts, an output that is
a file, lies inside the input store, holds input scans or masks (they would be overwritten), or
holds files prediction did not write (the rule, and the manifest that says a run is complete).
Every writer here returns the file's size and sha256 (`Written`), computed on the bytes written,
for that manifest.

OUT may be an object-store URL (``s3://bucket/prefix``, any fsspec filesystem): the same names
below it (`ObjectPath`), each file uploaded in one PUT after it was written whole on local disk,
so a reader never sees half a file there either; links do not exist there. Actors on any node
write there directly.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from data_store.errors import InputError

PROBABILITIES_DIR = "probabilities"
REPORT_DIR = "report"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = (
    "case_id",
    "status",
    "dice",
    "hd95_mm",
    "sensitivity",
    "pred_voxels",
    "gt_voxels",
    "seconds",
    "error",
    "warnings",
    # later additions go after the older columns, so readers by position still work
    "model_version",
    "volume_ml",
    "diameter_mm",
    "curve_type",
    "enhancement_pct",
)


@dataclass(frozen=True)
class Written:
    """A file as written: its size in bytes and the sha256 of its bytes."""

    size: int
    sha256: str

    @classmethod
    def of_bytes(cls, data: bytes) -> Written:
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def of_file(cls, path) -> Written:
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
        return cls(size, digest.hexdigest())


@dataclass(frozen=True)
class ObjectPath:
    """A file or folder on an fsspec filesystem (``s3://bucket/key``): the few `Path`
    operations prediction's outputs need."""

    url: str

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url.rstrip('/')}/{name}")

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rstrip("/").rsplit("/", 1)[0])

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self):
        """(filesystem, path) for this URL.

        Raises:
            InputError: no filesystem for its scheme is installed (s3:// needs s3fs).
        """
        return object_fs(self.url)


def object_fs(url: str):
    """`fsspec.core.url_to_fs(url)`, with a missing protocol package as one line.

    Raises:
        InputError: the URL's filesystem is not installed or not known.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise InputError(
            f"{url.split('://')[0]}:// needs a package that is not installed ({err}); "
            "install the object-storage extra: pip install 'tsesnet-platform[s3]'"
        ) from None
    except ValueError as err:
        raise InputError(f"cannot open {url}: {err}") from None


def is_url(path) -> bool:
    return isinstance(path, ObjectPath) or "://" in str(path)


def check_safe_id(case_id: str) -> None:
    """Raises InputError unless `case_id` can name a file in the output folder.

    The rule is ingest's (`data_store.store.check_case_id`: no path separators, control
    characters or hidden names).
    """
    from data_store.location import check_case_id

    try:
        check_case_id(case_id)
    except InputError as err:
        raise InputError(
            f"unsafe case ID {case_id!r}: {err.problem}; not read, nothing written"
        ) from None


def output_paths(out_dir: str | os.PathLike, case_id: str) -> tuple[Path, Path]:
    """`(OUT/CASE.nii.gz, OUT/probabilities/CASE.nii.gz)`, checked to lie inside OUT.

    Raises:
        InputError: an unsafe case ID, or a path that resolves outside OUT (a symbolic link).
    """
    check_safe_id(case_id)
    name = f"{case_id}.nii.gz"
    if is_url(out_dir):  # no links on object storage: the names are the rule
        out = out_dir if isinstance(out_dir, ObjectPath) else ObjectPath(str(out_dir))
        return out / name, out / PROBABILITIES_DIR / name
    out = Path(out_dir).resolve()
    paths = (out / name, out / PROBABILITIES_DIR / name)
    for path in paths:
        target = path.resolve()  # follows links, of the file and of `probabilities/`
        if not target.is_relative_to(out):
            raise InputError(f"{path} links to {target}, outside the output folder: not written")
    return paths


def report_image_path(out_dir, case_id: str):
    """`OUT/report/CASE.png`, checked like `output_paths` (safe ID, inside OUT).

    Raises:
        InputError: an unsafe case ID, or a path that resolves outside OUT (a symbolic link).
    """
    check_safe_id(case_id)
    name = f"{case_id}.png"
    if is_url(out_dir):
        out = out_dir if isinstance(out_dir, ObjectPath) else ObjectPath(str(out_dir))
        return out / REPORT_DIR / name
    out = Path(out_dir).resolve()
    path = out / REPORT_DIR / name
    target = path.resolve()
    if not target.is_relative_to(out):
        raise InputError(f"{path} links to {target}, outside the output folder: not written")
    return path


def atomic_write(path: Path, write) -> Written:
    """Calls `write(tmp)` on a new file beside `path`, then renames it to `path`.

    The temporary file is created exclusively (never an existing file or link) with the usual
    permissions (0666 minus the umask); it is removed if `write` fails.

    Returns:
        The file's size and sha256, read back before the rename.
    """
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        written = Written.of_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def write_mask(path: Path, vol_zyx, geometry, dtype) -> Written:
    """A (Z, Y, X) volume as NIfTI on `geometry`'s original grid, atomically (its folder is
    created if missing: `path` comes from `output_paths`, checked to lie inside OUT)."""
    from data_store.nifti import write_nifti

    if isinstance(path, ObjectPath):
        return upload(path, lambda tmp: write_nifti(tmp, vol_zyx, geometry, dtype=dtype), ".nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: write_nifti(tmp, vol_zyx, geometry, dtype=dtype))


def upload(path: ObjectPath, write, suffix: str) -> Written:
    """Calls `write(tmp)` on a local temporary file, then uploads it to `path` in one PUT."""
    import tempfile

    fs, key = path.fs
    with tempfile.TemporaryDirectory(prefix="tsesnet-out-") as folder:
        tmp = Path(folder) / f"out{suffix}"
        write(tmp)
        written = Written.of_file(tmp)
        fs.put_file(str(tmp), key)
    return written


def write_bytes(path, data: bytes) -> Written:
    """`data` as the file `path` (a `Path` inside OUT or an `ObjectPath`), whole or not at all;
    a local file's folder is created if missing."""
    if isinstance(path, ObjectPath):
        fs, key = path.fs
        fs.pipe_file(key, data)
        return Written.of_bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def remove_stale(*paths: Path) -> None:
    """Removes earlier runs' outputs of a case that failed now (paths from `output_paths`)."""
    for path in paths:
        with contextlib.suppress(OSError):  # a folder of that name: nothing of ours to remove
            if isinstance(path, ObjectPath):
                fs, key = path.fs
                if fs.isfile(key):
                    fs.rm_file(key)
            else:
                path.unlink(missing_ok=True)


def write_summary_csv(path: Path, rows: list[dict]) -> Written:
    """One row per case, `SUMMARY_COLUMNS`; empty cells where a metric does not apply."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in SUMMARY_COLUMNS})
    return write_bytes(path, buf.getvalue().encode())
