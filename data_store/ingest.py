"""The ingestion driver: NIfTI or DICOM cohort -> Zarr store, one Ray task per case.

`tsesnet ingest SRC STORE [--layout L] [--workers N] [--folds K]`.

One writer at a time: the run holds the store's lock (`data_store.lock.StoreLock`) from
before it creates or cleans anything until after the index is written. A second ingest waits
up to ``--wait`` seconds, then fails naming the holder; the lock of a holder on this host that
no longer runs (killed) is taken over, and the run says so.

Each task checksums the case's source files. When the store holds the case with the same
checksums (by role: phase0, phase1, ..., image4d, mask), the case is loaded from its sources and
compared with what is stored (`data_store.store_writer.stored_differs`: attributes, integrity
record, every file's and decoded array's checksum): it is "unchanged" only if all agree, else it
is written again, with the reason (an edited attribute, a forged record, no record at all). A
case whose sources changed, or that is new, is validated and loaded
(`data_store.source_reader.load_case`) and written under a temporary name, read back, recorded and
renamed into place (`data_store.store_writer.write_case`). A stored case that is damaged (a
missing or truncated chunk, a missing array) is written again from its sources: a rerun repairs
it. A bad case is one line ``case X: FILE: problem``; it is skipped, the other cases are stored,
and the exit status is 1.
Folds are part of the store: a rerun without ``--folds`` keeps the store's number of folds; a
``--folds K`` that differs is refused (nothing changed) unless ``--refold`` is given, since it
moves cases between folds (the fingerprint covers the folds, so runs on "fold 0" before and
after are never compared as equals). At the end the root index (case list, folds, fingerprint)
is rebuilt from the complete case groups on disk and written in one update, so cases stored by
earlier runs (or by a run that crashed before its index update) are never lost. Leftover
temporary entries of a crashed run (on this host) are removed first; those of a writer that
still runs, or of another host, are left and listed.

Ray: an initialised session or ``RAY_ADDRESS`` is used as is; otherwise a local Ray starts with
its dashboard bound to 127.0.0.1 and stops at the end. On a cluster the store must be on
storage every node can reach (shared filesystem or an fsspec URL).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_store.cli_options import add_lock_options
from data_store.errors import InputError
from data_store.lock import DEFAULT_WAIT_S

if TYPE_CHECKING:  # annotations only; the modules are imported where they are used
    from data_store.layouts import CaseSource
    from data_store.location import StoreLocation
    from data_store.nifti import ReadOptions

__all__ = ["IngestReport", "add_arguments", "cli", "ingest"]


@dataclass
class IngestReport:
    """What an ingest run did.

    Attributes:
        store: the store path or URL.
        stored: case IDs written (new or with changed sources).
        skipped: case IDs already stored with the same source checksums.
        rejected: one line per bad case, ``case X: FILE: problem``.
        cleaned: leftover temporary entries removed (or restored) before the run.
        kept: temporary entries of other writers left alone, one line each saying why.
        repaired: stored cases that were damaged and were written again (also in `stored`).
        rewritten: ``case X: why`` for each stored case with unchanged sources that disagreed
            with them (data, attributes or record) or had no record, written again (its ID is
            also in `stored`).
        previous_fingerprint: the store's fingerprint before the run, when the run changed
            its version (`FINGERPRINT_VERSION`) and so the fingerprint itself.
        took_over: the stale lock holder this run took over from (`LockHolder.describe`).
        n_cases: cases in the store after the run.
        fingerprint: the store's fingerprint after the run.
        notes: what discovery left out on purpose, one line each (DICOM series that are not
            DCE phases, and why).
    """

    store: str
    stored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    previous_fingerprint: str | None = None
    took_over: str | None = None
    n_cases: int = 0
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected


def _ingest_one(
    source: Any,
    store_url: str,
    stored_checksums: list | None,
    options: ReadOptions,
    names: Mapping[str, str] | None = None,
) -> tuple[str, Any]:
    """One case (runs in a Ray task): ("skipped", id) | ("stored", id) | ("rejected", line) |
    ("rewritten", "case X: why"); a rejected line shows the parameters it names by `names`."""
    from data_store.source_reader import file_sha256, load_case
    from data_store.store_writer import source_roles, stored_differs, write_case

    try:
        if stored_checksums is not None and source.problem is None:
            try:
                current = [[r, file_sha256(p)] for r, p in source_roles(source)]
            except OSError:
                current = None  # unreadable: let load_case name the problem
            if current == stored_checksums:
                # Same sources: the stored case must still be what they give (module docstring).
                loaded = load_case(source, options)
                why = stored_differs(store_url, loaded)
                if why is None:
                    return "skipped", source.case_id
                write_case(store_url, loaded)
                return "rewritten", f"case {source.case_id}: {why}"
        loaded = load_case(source, options)
        write_case(store_url, loaded)
        return "stored", source.case_id
    except InputError as err:
        return "rejected", err.naming(names)
    except Exception as err:  # a bug or an I/O failure: still one line, the run goes on
        first = next(iter(source.files), None)
        return "rejected", str(
            InputError(f"unexpected {type(err).__name__}: {err}", case=source.case_id, path=first)
        )


def _connect_ray(workers: int | None):
    """Uses the current Ray session or RAY_ADDRESS; else starts a local one. Returns (ray, own)."""
    import ray

    from data_store.local_ray import connect

    own = not ray.is_initialized()
    return connect(log_to_driver=False, num_cpus=workers or None), own


def ingest(
    src: str | os.PathLike,
    store: str | os.PathLike,
    layout: str = "auto",
    workers: int | None = None,
    folds: int | None = None,
    *,
    refold: bool = False,
    progress: bool = True,
    wait: float = DEFAULT_WAIT_S,
    options: ReadOptions | None = None,
    break_lock: bool = False,
    names: Mapping[str, str] | None = None,
) -> IngestReport:
    """Validates a NIfTI cohort and stores its good cases as Zarr (see the module docstring).

    Args:
        src: the cohort folder (or one 4D NIfTI file for the nifti4d layout).
        store: the store's local path or fsspec URL (created if missing).
        layout: "auto", "nnunet", "mamamia", "bts" or "nifti4d".
        workers: the most cases processed at once (default: the cluster's CPUs).
        folds: number of patient-level folds (>= 2); None keeps the store's (5 for a new one).
        refold: allow ``folds`` to differ from the store's (cases move between folds).
        progress: show a tqdm progress bar on stderr.
        wait: seconds to wait for another writer's lock on the store.
        options: what source files may be (size limit, assumed spacing).
        break_lock: remove a lock held by someone unknown (`data_store.lock.StoreLock`).
        names: how a rejected case's line shows the parameters it names (e.g.
            ``max_image_bytes``), by parameter (`data_store.errors.InputError`): the command line
            passes its flags; None shows the Python names.

    Returns:
        An `IngestReport`; `report.rejected` lists the bad cases.

    Raises:
        InputError: bad arguments, an empty source, an unknown layout, duplicate case IDs, a
            store path that holds something else, or a store another writer holds longer
            than `wait`, or ``folds`` differs from the store's without ``refold``.
    """
    from data_store.index import init_store
    from data_store.lock import StoreLock
    from data_store.store_writer import clean_leftovers

    if folds is not None and folds < 2:
        raise InputError(f"must be at least 2, got {folds}", param="folds")
    if workers is not None and workers < 1:
        raise InputError(f"must be at least 1, got {workers}", param="workers")
    sources = _discover(src, layout)
    location = _target(store)
    with StoreLock(location, wait=wait, break_lock=break_lock) as lock:
        folds, previous = _keep_folds(location, folds, refold)
        init_store(location)
        leftovers = clean_leftovers(location)
        report = IngestReport(store=location.url, cleaned=leftovers.cleaned, kept=leftovers.kept)
        report.took_over = lock.took_over.describe() if lock.took_over else None
        report.notes = [f"case {s.case_id}: {note}" for s in sources for note in s.notes]
        existing, damaged = _stored_cases(location)
        ray, own = _connect_ray(workers)
        try:
            limit = workers or max(1, int(ray.available_resources().get("CPU", 1)))
            plan = _Plan(
                sources, location, existing, folds, limit, progress, options, damaged, names or {}
            )
            _run_tasks(ray, plan, report)
        finally:
            if own:
                ray.shutdown()
    if previous is not None and previous != report.fingerprint:
        report.previous_fingerprint = previous
    for names in (report.stored, report.skipped, report.rejected, report.repaired):
        names.sort()
    return report


@dataclass(frozen=True)
class _Plan:
    """What the task loop of one run needs.

    Attributes:
        sources: the cases (`CaseSource`), in discovery order.
        location: the store (`StoreLocation`).
        existing: case ID -> stored [[role, sha256], ...] of its sources, to skip unchanged cases.
        folds: number of folds of the index written at the end.
        limit: the most tasks running at once.
        progress: show a tqdm progress bar on stderr.
        options: how source files are read (`ReadOptions`).
        damaged: case ID -> why a stored case must be written again.
        names: display names of the parameters a rejected case's line names.
    """

    sources: list[CaseSource]
    location: StoreLocation
    existing: dict[str, list]
    folds: int
    limit: int
    progress: bool
    options: ReadOptions | None
    damaged: dict[str, str]
    names: Mapping[str, str]

    @property
    def target(self) -> str:
        """What each task opens: the root path of a local store, else its URL."""
        return self.location.root if self.location.local else self.location.url


def _discover(src: str | os.PathLike, layout: str) -> list[CaseSource]:
    """The source's cases, each with a case ID usable as a store name."""
    from data_store.layouts import discover
    from data_store.location import check_case_id

    sources = discover(Path(src).absolute(), layout)  # absolute: tasks may run elsewhere
    for s in sources:
        check_case_id(s.case_id)
    return sources


def _target(store: str | os.PathLike) -> StoreLocation:
    """The store's `StoreLocation`, its folder made if missing; refuses a folder that holds
    something else before a lock file is put in it."""
    from data_store.index import check_target
    from data_store.location import StoreLocation

    location = StoreLocation.parse(store)
    if location.local:
        os.makedirs(location.root, exist_ok=True)
    check_target(location)
    return location


def _keep_folds(location: StoreLocation, folds: int | None, refold: bool) -> tuple[int, str | None]:
    """(the number of folds this run writes, the store's version-1 fingerprint if it has one).

    Raises:
        InputError: ``folds`` differs from the store's without ``refold`` (nothing changed).
    """
    from data_store.index import check_target, read_root

    if check_target(location):
        return folds or 5, None  # a new store
    root = read_root(location)
    stored = root.get("n_folds", 0)
    stored = stored if isinstance(stored, int) and stored >= 2 else None
    old = root.get("fingerprint") if root.get("fingerprint_version", 1) == 1 else None
    if stored is None or folds is None or folds == stored or not root.get("cases"):
        return folds or stored or 5, old
    if not refold:
        raise InputError(
            f"the store has {stored} folds; {{folds={folds}}} would deal its cases into other "
            f"folds (a fold's runs before and after would not be comparable): leave {{folds}} "
            f"out to keep {stored}, or pass {{refold=True}} to re-deal them (the fingerprint "
            "changes)",
            path=location.url,
            params=["folds", "refold"],
        )
    return folds, old


def _stored_cases(location: StoreLocation) -> tuple[dict[str, list], dict[str, str]]:
    """(case ID -> [[role, sha256], ...] of every intact stored case, case ID -> the first
    problem of every damaged one): a damaged case is never skipped as unchanged."""
    from data_store.index import scan_cases
    from data_store.integrity import check_stored

    intact, damaged = {}, {}
    for cid, attrs in scan_cases(location).items():
        problems = check_stored(location, cid, attrs)
        if problems:
            damaged[cid] = str(problems[0])
        else:
            intact[cid] = [[s["role"], s["sha256"]] for s in attrs["sources"]]
    return intact, damaged


def _run_tasks(ray, plan: _Plan, report: IngestReport) -> None:
    """Runs one task per case, at most `plan.limit` at once, and tallies them in `report`.

    The root index is written at the end, also when interrupted: cases stored so far are
    indexed, and tasks still running are cancelled first so that none writes after it.
    """
    from tqdm import tqdm

    from data_store.index import write_index

    task = ray.remote(num_cpus=1, max_retries=0)(_ingest_one)
    pending: dict = {}  # ObjectRef -> CaseSource
    queue = list(plan.sources)
    bar = tqdm(total=len(plan.sources), desc="ingest", unit="case", disable=not plan.progress)
    try:
        while queue or pending:
            while queue and len(pending) < plan.limit:
                s = queue.pop(0)
                stored = plan.existing.get(s.case_id)
                pending[task.remote(s, plan.target, stored, plan.options, plan.names)] = s
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            source = pending.pop(ref)
            status, what = _outcome(ray, ref, source)
            if status == "stored" and what in plan.damaged:
                report.repaired.append(what)
            if status == "rewritten":
                report.rewritten.append(what)
                status, what = "stored", source.case_id
            _tally(report, bar, status, what)
    finally:
        bar.close()
        for ref in pending:  # interrupted: let no task keep writing after we index
            ray.cancel(ref, force=True)
        index = write_index(plan.location, plan.folds)  # always: cases stored so far are indexed
        report.n_cases = len(index["cases"])
        report.fingerprint = index["fingerprint"]


def _outcome(ray, ref, source: CaseSource) -> tuple[str, str]:
    """A finished task's (status, what); a task whose worker died is one rejected line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:  # the worker died (e.g. out of memory)
        return "rejected", str(
            InputError(
                f"ingest task failed ({type(err).__name__}); its temporary copy is "
                "removed by the next run",
                case=source.case_id,
                path=str(next(iter(source.files), "")) or None,
            )
        )


def _tally(report: IngestReport, bar, status: str, what: str) -> None:
    """Adds one task's outcome to the report and the progress bar."""
    {"stored": report.stored, "skipped": report.skipped}.get(status, report.rejected).append(what)
    bar.set_postfix(
        stored=len(report.stored),
        unchanged=len(report.skipped),
        rejected=len(report.rejected),
        refresh=False,
    )
    bar.update(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet ingest` (read by `cli`)."""
    parser.add_argument("src", metavar="SRC", help="the cohort folder (NIfTI or DICOM)")
    parser.add_argument(
        "store", metavar="STORE", help="the Zarr store to write (path or s3:// URL)"
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "nnunet", "mamamia", "bts", "nifti4d", "dicom"],
        help="how SRC is organised (auto: detected)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray tasks reading cases in parallel (default: the cluster's CPUs)",
    )
    parser.add_argument(
        "--folds", type=int, default=None, metavar="K", help="patient-level folds (new store: 5)"
    )
    parser.add_argument("--refold", action="store_true", help="let --folds re-deal a store's cases")
    add_lock_options(
        parser, wait_help=f"wait this long for another writer's lock on STORE ({DEFAULT_WAIT_S:g})"
    )
    parser.add_argument(
        "--assume-spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="voxel size in mm for files that have none (no sform, zero pixdim); recorded",
    )
    parser.add_argument(
        "--max-image-gib",
        type=float,
        default=None,
        metavar="G",
        help="largest decoded voxel data one file may declare, GiB (4)",
    )


#: The command line's flags for the read options a rejected case's line names.
_FLAGS = {"max_image_bytes": "--max-image-gib", "assume_spacing": "--assume-spacing"}


def cli(args: argparse.Namespace) -> int:
    """`tsesnet ingest SRC STORE [--layout] [--workers] [--folds]`: 0 if all cases are good, 1 if
    any case was rejected (the good ones are stored), 2 for bad arguments or an unusable source.
    """
    from data_store.nifti import DEFAULT_MAX_IMAGE_BYTES, ReadOptions

    max_gib = args.max_image_gib
    if max_gib is not None and not (math.isfinite(max_gib) and int(max_gib * 2**30) > 0):
        raise InputError(f"--max-image-gib must be a positive number of GiB, got {max_gib:g}")
    options = ReadOptions(
        max_image_bytes=int(max_gib * 2**30) if max_gib else DEFAULT_MAX_IMAGE_BYTES,
        assume_spacing=args.assume_spacing,
    )
    report = ingest(
        args.src,
        args.store,
        layout=args.layout,
        workers=args.workers,
        folds=args.folds,
        refold=args.refold,
        wait=args.wait,
        options=options,
        break_lock=args.break_lock,
        names=_FLAGS,
    )
    print(
        f"{report.store}: stored {len(report.stored)}, unchanged {len(report.skipped)}, "
        f"rejected {len(report.rejected)}; {report.n_cases} cases in the store, "
        f"fingerprint {report.fingerprint}"
    )
    if report.repaired:
        print(f"repaired {len(report.repaired)} damaged case(s): {', '.join(report.repaired)}")
    if report.rewritten:
        print(f"rewrote {len(report.rewritten)} case(s) that disagreed with their sources:")
        for line in sorted(report.rewritten):
            print(f"  {line}")
    if report.previous_fingerprint:
        print(
            f"the fingerprint was {report.previous_fingerprint} (version 1, before it covered "
            f"folds and case attributes): runs and registered models validated on it are "
            f"compared with this store as another store"
        )
    if report.cleaned:
        print(f"removed {len(report.cleaned)} leftover temporary entries of an interrupted run")
    for line in report.notes:
        print(line)
    for line in report.kept:
        print(f"left alone: {line}", file=sys.stderr)
    if report.rejected:
        print(f"{len(report.rejected)} case(s) rejected:", file=sys.stderr)
        for line in report.rejected:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
