"""`tsesnet store verify STORE [--deep] [--json] [--record] [--repair]`: is every case intact?

The cheap check (the default; what every reader runs once per case): the index against each
case's attributes, then per case the arrays present with the recorded shape, dtype and chunks
and every recorded chunk file present with its recorded size (`data_store.integrity`).
``--deep`` also reads every chunk file and compares its sha256, and decodes every array and
compares the checksum of its values.

Output: one line per damaged case (``case X: FILE: image chunk c/0/1/0/0 missing``, with the
number of further problems), notes (temporary entries, cases on disk but not indexed, a writer
holding the lock), and a summary. Exit status 0 when no case is damaged, 1 when any is, 2 when
the store cannot be opened at all (not a store, an unknown schema, a forged case ID).

Orphans: every entry below the store's root that its index does not list (the index is the
commit point: on object storage, where a case is copied into place object by object, a case is
read only once the index names it) is listed with what it is: a temporary entry of a writer
(running, or gone), a complete case an interrupted ingest did not index, or something that is
not a case at all (a copy cut short, a stray file). ``--repair`` removes them, under the
store's writer lock: temporary entries only when their writer is gone (`clean_leftovers`), the
rest whatever they are. A rerun of the interrupted ingest writes its cases again.

Cases stored before integrity records existed are listed as such: their files cannot be
checked against a record (a deleted chunk reads as zeros). ``--record`` adds a record to each
of them from what is there now (their arrays must decode, with the shapes their attributes
say), upgrades version-1 records (no attribute digest) whose files still match them, under the
store's writer lock, and rebuilds the index; the store's fingerprint changes with it. It never
blesses an edit: a case whose record was removed, or is not the one the index lists, or whose
files disagree with the record it would upgrade, is refused (one line, nothing written) unless
``--accept-current``, which records it as it is and says per case what it accepted.
Re-ingesting from the sources records them too, and checks them against the sources.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from data_store.cli_options import add_lock_options
from data_store.errors import InputError
from data_store.integrity import Problem, check_unrecorded, record_case
from data_store.location import StoreLocation, parse_entry
from data_store.lock import DEFAULT_WAIT_S

__all__ = ["VerifyReport", "add_arguments", "cli", "record_unrecorded", "verify_store"]

CHEAP = "cheap check: index, arrays, shapes, dtypes, chunk files and sizes"
DEEP = "deep check: also the sha256 of every chunk file and of every decoded array"


@dataclass
class VerifyReport:
    """What `verify_store` found.

    Attributes:
        store: the store's path or URL.
        deep: whether checksums were compared.
        cases: number of cases in the index.
        damaged: case ID -> its problems (each one line: case, file, problem).
        unrecorded: cases stored without an integrity record.
        notes: one line each: a held lock, orphans (entries the index does not list).
        recorded: cases given a record by ``--record``.
        repaired: orphans removed by ``--repair``.
    """

    store: str
    deep: bool
    cases: int = 0
    damaged: dict[str, list[Problem]] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def lines(self) -> list[str]:
        """The text report: one line per damaged case, the notes, then the summary."""
        out = []
        for cid in sorted(self.damaged):
            first, *rest = self.damaged[cid]
            out.append(str(first) + (f" (+{len(rest)} more)" if rest else ""))
        out += [f"note: {n}" for n in self.notes]
        out += self.accepted
        if self.recorded:
            n = len(self.recorded)
            out.append(f"recorded {n} case(s) that had no current integrity record")
        if self.repaired:
            out.append(f"removed {len(self.repaired)} orphan(s): {', '.join(self.repaired)}")
        intact = self.cases - len(self.damaged)
        out.append(
            f"{self.store}: {self.cases} cases, {len(self.damaged)} damaged, {intact} intact "
            f"({DEEP if self.deep else CHEAP})"
        )
        if self.unrecorded:
            out.append(
                f"{self.store}: {len(self.unrecorded)} case(s) have no integrity record (stored "
                "before records existed), so a deleted or damaged chunk of theirs cannot be "
                f"told from data: add one with `tsesnet store verify {self.store} --record` "
                "(records what is there now) or re-ingest them"
            )
        return out

    def to_json(self) -> dict:
        return {
            "store": self.store,
            "deep": self.deep,
            "cases": self.cases,
            "ok": self.ok,
            "damaged": [
                {
                    "case": cid,
                    "problems": [{"path": p.path, "problem": p.problem} for p in problems],
                }
                for cid, problems in sorted(self.damaged.items())
            ],
            "unrecorded": sorted(self.unrecorded),
            "notes": self.notes,
            "recorded": self.recorded,
            "repaired": self.repaired,
            "accepted": self.accepted,
        }


def verify_store(path: str, *, deep: bool = False) -> VerifyReport:
    """Checks every case of a store (see the module docstring).

    Raises:
        InputError: the store cannot be opened (not a store, unknown schema, a bad case ID).
    """
    from data_store.store import Store

    store = Store(path, strict=False)
    report = VerifyReport(store.path, deep, cases=len(store.index))
    for problem in store.index_problems:
        report.damaged.setdefault(problem.case_id, []).append(problem)
    for cid in store.case_ids:
        problems = store.case_problems(cid, deep=deep)
        if problems:
            report.damaged.setdefault(cid, []).extend(problems)
        if not store.has_record(cid):
            report.unrecorded.append(cid)
    report.notes = _notes(store.location, set(store.index))
    return report


def _notes(location: StoreLocation, indexed: set[str]) -> list[str]:
    """A held writer lock, then one line per orphan (`orphans`)."""
    from data_store.lock import read_holder

    notes = []
    exists, holder = read_holder(location)
    if exists:
        who = holder.describe() if holder else "an unreadable lock file"
        state = " (no longer running)" if holder is not None and holder.gone() else ""
        notes.append(f"the store's writer lock is held by {who}{state}")
    for name, what in orphans(location, indexed).items():
        notes.append(f"orphan {location.path(name)}: {what} (--repair removes it)")
    return notes


def orphans(location: StoreLocation, indexed: set[str]) -> dict[str, str]:
    """Every root entry the index does not list (but the root's own files) -> what it is."""
    from data_store.index import NOT_CASES, scan_cases

    found = {}
    complete = None
    for name in location.entries():
        if name == "zarr.json" or name in NOT_CASES or name.startswith(".lock.") or name in indexed:
            continue
        entry = parse_entry(name)
        if entry is not None:
            running = entry.owner.running() if entry.owner else False
            who = f"made by {entry.owner}" if entry.owner else "made before owners were recorded"
            state = {True: "still running", False: "gone", None: "on another host"}[running]
            found[name] = f"temporary entry, {who} ({state})"
            continue
        if complete is None:
            complete = set(scan_cases(location))
        found[name] = (
            "a complete case the index does not list (its ingest did not commit it)"
            if name in complete
            else "not a case of this store (an interrupted copy, or something else)"
        )
    return found


def repair_orphans(
    path: str, *, wait: float = DEFAULT_WAIT_S, break_lock: bool = False
) -> list[str]:
    """Removes the orphans of a store under its writer lock; returns what was removed.

    Temporary entries go only when their writer is gone (an ``.old-`` copy of a missing case is
    renamed back instead: `clean_leftovers`); every other orphan goes whatever it holds.

    Raises:
        InputError: the store cannot be opened, or another writer holds it longer than `wait`.
    """
    from data_store.index import load_index
    from data_store.lock import StoreLock
    from data_store.store_writer import clean_leftovers

    location = StoreLocation.parse(path)
    command = f"tsesnet store verify {path} --repair"
    with StoreLock(location, wait=wait, command=command, break_lock=break_lock):
        index = load_index(location, strict=False)
        # Every ID the index names, also those whose entry is damaged: those are cases to
        # repair by re-ingesting, never orphans to remove.
        indexed = set(index.entries) | {p.case_id for p in index.problems}
        gone = clean_leftovers(location).cleaned
        for name in orphans(location, indexed):
            if parse_entry(name) is None:
                location.remove(name)
                gone.append(name)
    return sorted(gone)


def record_unrecorded(
    path: str,
    *,
    wait: float = DEFAULT_WAIT_S,
    accept_current: bool = False,
    break_lock: bool = False,
) -> tuple[list[str], list[str]]:
    """Records every complete case without a current integrity record, then rebuilds the index.

    Runs under the store's writer lock, and decides for every case before it writes anything:
    a case without a record (a store from before records) is recorded if its arrays decode with
    the shapes its attributes say; a version-1 record is upgraded (attributes covered) if the
    case's files still match it (the deep check); a current record that is the one the index
    lists is kept as it is. A case whose data disagrees with its record, or whose record was
    removed or edited (it is not the one the index lists), is refused unless
    ``accept_current``: re-ingesting from its sources repairs it. Attribute values readers
    cannot use (NaN percentiles, an affine off the stored grid) are refused always.

    Returns:
        (case IDs recorded, one line per case accepted as it is now, saying what disagreed).

    Raises:
        InputError: the store is locked, or a case cannot be recorded (naming it and why).
    """
    import zarr

    from data_store.index import read_root, scan_cases, write_index
    from data_store.lock import StoreLock

    location = StoreLocation.parse(path)
    done, accepted = [], []
    command = f"tsesnet store verify {path} --record"
    with StoreLock(location, wait=wait, command=command, break_lock=break_lock):
        root = read_root(location)
        n_folds = int(root.get("n_folds", 0))
        index_edited = _index_edited(root)
        indexed = root.get("cases") if isinstance(root.get("cases"), dict) else {}
        plan = []
        for cid, attrs in sorted(scan_cases(location).items()):
            entry = indexed.get(cid) if isinstance(indexed.get(cid), dict) else {}
            action, why = _record_plan(location, cid, attrs, entry.get("integrity"), index_edited)
            if action == "keep":
                continue
            where = location.path(f"{cid}/zarr.json")
            if why is not None and not accept_current:
                raise InputError(
                    f"cannot record: {why}, so nothing vouches for its data: re-ingest it from "
                    "its sources to repair it (or rerun an ingest that stopped before its index "
                    "update), or pass {accept_current=True} to record what is there now",
                    case=cid,
                    path=where,
                    params=["accept_current"],
                )
            if why is not None:
                accepted.append(f"case {cid}: accepted as it is now, although {why}")
            plan.append((cid, attrs))
        for cid, attrs in plan:  # every case decided: now write
            group = zarr.open_group(location.zarr_target(cid), mode="r+")
            record = record_case(location, cid, cid, None, attrs)
            group.update_attributes({"integrity": record.to_attrs()})
            done.append(cid)
        write_index(location, n_folds)
    return done, accepted


def _index_edited(root: dict) -> bool:
    """Whether the root's stated fingerprint is not the one of the entries it lists."""
    from data_store.index import store_fingerprint

    try:
        n_folds, version = root.get("n_folds", 0), root.get("fingerprint_version", 1)
        computed = store_fingerprint(root.get("cases") or {}, n_folds, version)
    except (AttributeError, TypeError, KeyError, ValueError):
        return True
    return root.get("fingerprint") not in (None, computed)


def _record_plan(
    location: StoreLocation, cid: str, attrs: dict, indexed: str | None, index_edited: bool
) -> tuple[str, str | None]:
    """("keep" | "record", None) or ("record", why the case disagrees with its record).

    Raises:
        InputError: a case that cannot be recorded at all (values readers cannot use, arrays
            that do not decode with the shapes its attributes say).
    """
    import zarr

    from data_store.integrity import CaseRecord, check_recorded, check_values

    why = None
    if "integrity" not in attrs:
        if indexed is not None:
            why = "its integrity record was removed (the index lists one)"
        record = None
    else:
        try:
            record = CaseRecord.from_attrs(attrs["integrity"])
        except ValueError as err:
            record, why = None, f"integrity record malformed ({err})"
    if record is not None:
        if indexed is not None and index_edited:
            why = "the index was edited (its fingerprint is not the one of its cases)"
        elif indexed is not None and indexed != record.digest():
            why = "its integrity record is not the one the index lists (edited after ingest)"
        elif record.attributes is not None:
            return "keep", None  # current and the index's: nothing to write, nothing blessed
        else:  # a version-1 record is upgraded only over files that still match it
            problems = check_recorded(location, cid, record, attrs)
            why = problems[0].problem if problems else None
    refuse = check_values(location, cid, attrs)
    if why is not None or record is None:  # what is recorded must at least decode
        group = zarr.open_group(location.zarr_target(cid), mode="r")
        arrays = {name: group.get(name, None) for name in ("image", "mask", "foreground")}
        refuse += check_unrecorded(location, cid, attrs, arrays, decode=True)
    if refuse:
        raise InputError(
            f"cannot record: {refuse[0].problem}; re-ingest it from its sources",
            case=cid,
            path=refuse[0].path,
        )
    return "record", why


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsesnet store verify` (read by `cli`)."""
    parser.add_argument("store", metavar="STORE", help="a store written by ingest")
    parser.add_argument("--deep", action="store_true", help="also compare every checksum")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--record",
        action="store_true",
        help="first record cases without a current integrity record (refuses a case whose "
        "data disagrees with its record)",
    )
    parser.add_argument(
        "--accept-current",
        action="store_true",
        help="with --record: record what is there now also over a record it disagrees with",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="remove what the index does not list (orphans: temporary entries of writers that "
        "are gone, cases an interrupted ingest never committed, anything else)",
    )
    add_lock_options(
        parser,
        wait_help="for --record and --repair: lock wait",
        prefix="for --record and --repair: ",
    )


def cli(args: argparse.Namespace) -> int:
    """`tsesnet store verify STORE [--deep] [--json] [--record]`: 0 intact, 1 damaged, 2 the
    store cannot be opened."""
    recorded, accepted = [], []
    if args.record:
        recorded, accepted = record_unrecorded(
            args.store,
            wait=args.wait,
            accept_current=args.accept_current,
            break_lock=args.break_lock,
        )
    elif args.accept_current:
        raise InputError("--accept-current goes with --record")
    repaired = (
        repair_orphans(args.store, wait=args.wait, break_lock=args.break_lock)
        if args.repair
        else []
    )
    report = verify_store(args.store, deep=args.deep)
    report.recorded, report.accepted, report.repaired = recorded, accepted, repaired
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            print(line)
    sys.stdout.flush()
    return 0 if report.ok else 1
