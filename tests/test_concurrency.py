"""One writer at a time: the store lock, owner-named temporary entries, kill -9 and two ingests.

The lock and clean-up tests run real processes (this one and short-lived subprocesses) against
real stores; the slow ones start real `tsesnet ingest` processes on the session's Ray (through
``RAY_ADDRESS``, as on a cluster) and kill one with SIGKILL mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nifti_factory import write_layout_cohort

from data_store.errors import InputError
from data_store.index import init_store
from data_store.ingest import ingest
from data_store.location import Owner, StoreLocation, parse_entry, this_host
from data_store.lock import LOCK_NAME, LockHolder, StoreLock, process_start
from data_store.store import open_store
from data_store.store_writer import clean_leftovers
from tsesnet.cli import main

TSESNET = str(Path(sys.executable).parent / "tsesnet")


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(store: Path, host: str, pid: int, started: int | None = None) -> LockHolder:
    holder = LockHolder(host, pid, started, time.time() - 3600, "tsesnet ingest old", "ab" * 16)
    (store / LOCK_NAME).write_bytes(holder.to_bytes())
    return holder


@pytest.fixture()
def empty_store(tmp_path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    init_store(StoreLocation.parse(store))
    return store


# ----------------------------------------------------------------------------- the lock


def test_second_writer_waits_then_fails_naming_the_holder(tmp_path, empty_store):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=1)
    with StoreLock(StoreLocation.parse(empty_store), command="tsesnet ingest first") as held:
        start = time.monotonic()
        proc = subprocess.run(
            [TSESNET, "ingest", str(tmp_path / "src"), str(empty_store), "--wait", "1"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert time.monotonic() - start >= 1.0
        assert held.held and (empty_store / LOCK_NAME).is_file()
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    me = f"pid {os.getpid()} on {this_host()}"
    assert err[0] == f"{empty_store}: waiting up to 1 s for {held.holder.describe()}"
    assert err[-1].startswith(f"error: {empty_store}: locked by another writer, {me} (since ")
    assert "`tsesnet ingest first`); waited 1 s (pass --wait SECONDS to wait longer" in err[-1]
    assert not (empty_store / LOCK_NAME).exists()  # released on leaving the block
    assert sorted(p.name for p in empty_store.iterdir()) == [".lock.guard", "zarr.json"]


def test_stale_lock_of_a_dead_process_is_taken_over_and_said(empty_store):
    location = StoreLocation.parse(empty_store)
    dead = _write_lock(empty_store, this_host(), _dead_pid())
    said: list[str] = []
    with StoreLock(location, wait=0, notify=said.append) as lock:
        assert lock.took_over == dead
        assert json.loads((empty_store / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said == [
        f"{empty_store}: took over the lock of {dead.describe()}, which is no longer running"
    ]
    # a reused pid: this very process, but the lock was taken by one that started earlier
    reused = _write_lock(empty_store, this_host(), os.getpid(), process_start(os.getpid()) - 1)
    with StoreLock(location, wait=0, notify=said.append) as lock:
        assert lock.took_over == reused
    # a live holder, and a holder on another host, are never taken over
    for host, pid in ((this_host(), os.getppid()), ("another-host", _dead_pid())):
        holder = _write_lock(empty_store, host, pid, process_start(pid))
        with pytest.raises(InputError) as info:
            StoreLock(location, wait=0).acquire()
        assert f"locked by another writer, {holder.describe()}; waited 0 s" in str(info.value)
        assert f"delete {empty_store / LOCK_NAME}" in str(info.value)


def test_a_reader_during_a_write_is_told_who_writes(tmp_path):
    """An ingest replacing a case leaves index and case apart until it ends: readers refuse,
    naming the writer, instead of reading a mix."""
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=2)
    from test_store import build_store

    build_store(tmp_path / "src", tmp_path / "store")
    root = tmp_path / "store" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["cases"]["case_001"]["checksums"][0][1] = "0" * 64  # the old sources
    root.write_text(json.dumps(doc))
    location = StoreLocation.parse(tmp_path / "store")
    with (
        StoreLock(location, command="tsesnet ingest new") as lock,
        pytest.raises(InputError) as info,
    ):
        open_store(tmp_path / "store")
    assert str(info.value).startswith("case case_001: ")
    assert str(info.value).endswith(
        f"; {lock.holder.describe()} holds the store's writer lock: retry when it is done"
    )


RACE = """
import sys, time
from collections.abc import Callable
from pathlib import Path
from data_store.errors import InputError
from data_store.location import StoreLocation
from data_store.lock import StoreLock
store, go = sys.argv[1], Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    with StoreLock(StoreLocation.parse(store), wait=0, notify=lambda line: None) as lock:
        print("won", lock.took_over is not None, flush=True)
        time.sleep(3)
except InputError as err:
    print("lost", err, flush=True)
"""


def test_processes_racing_for_one_stale_lock_take_it_once(tmp_path, empty_store):
    _write_lock(empty_store, this_host(), _dead_pid())
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RACE), str(empty_store), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(1.5)  # every one is started and waiting for the go
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    winners = [o for o in outs if o.startswith("won")]
    assert winners == ["won True"], outs
    winner = procs[outs.index("won True")].pid
    for out in outs:
        assert out.startswith("won") or f"locked by another writer, pid {winner} on" in out


def test_leftovers_of_running_or_foreign_writers_are_kept(empty_store):
    location = StoreLocation.parse(empty_store)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me, host = os.getpid(), this_host()
        names = {
            "running": f".tmp-case_a@{host}.{sleeper.pid}.0123456789ab",
            "dead": f".tmp-case_b@{host}.{_dead_pid()}.0123456789ab",
            "foreign": f".tmp-case_c@another-host.{me}.0123456789ab",
            "mine": f".tmp-case_d@{host}.{me}.0123456789ab",
            "old": f".old-case_e@{host}.{_dead_pid()}.0123456789ab",
        }
        for name in names.values():
            (empty_store / name).mkdir()
        found = clean_leftovers(location)
        assert found.removed == sorted([names["dead"], names["mine"]])
        assert found.restored == [names["old"]]  # case_e was missing: the old copy is back
        assert [k.split(":")[0] for k in found.kept] == sorted([names["running"], names["foreign"]])
        assert f"in use by pid {sleeper.pid} on {host}" in " ".join(found.kept)
        assert "another host (remove it by hand" in " ".join(found.kept)
        assert (empty_store / "case_e").is_dir() and (empty_store / names["running"]).is_dir()
        entry = parse_entry(names["foreign"])
        assert entry.case_id == "case_c" and entry.owner == Owner("another-host", me)
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- real ingests


def _ray_env(ray_session) -> dict[str, str]:
    """The environment of a `tsesnet` process that joins the session's Ray as a cluster."""
    return dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)


@pytest.mark.slow
def test_two_ingests_at_once_both_land_intact(tmp_path, ray_session, capsys):
    write_layout_cohort("nnunet", tmp_path / "a", n_cases=3, shape=(64, 64, 32))
    write_layout_cohort(
        "mamamia", tmp_path / "b", case_ids=("DUKE_001", "DUKE_002"), shape=(64, 64, 32)
    )
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [TSESNET, "ingest", str(tmp_path / src), str(store), "--wait", "300"],
            env=_ray_env(ray_session),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in ("a", "b")
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "rejected 0" in out
    waited = [err for _, err in results if ": waiting up to 300 s for pid " in err]
    assert len(waited) == 1  # one ran, the other waited for it and then ran
    assert open_store(store).case_ids == [
        "DUKE_001",
        "DUKE_002",
        "case_000",
        "case_001",
        "case_002",
    ]
    assert main(["store", "verify", str(store), "--deep"]) == 0
    assert "5 cases, 0 damaged, 5 intact" in capsys.readouterr().out


@pytest.mark.slow
def test_kill_9_during_ingest_then_a_rerun_repairs(tmp_path, ray_session, capsys):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=6, shape=(96, 96, 48))
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [TSESNET, "ingest", str(tmp_path / "src"), str(store), "--workers", "2"],
        env=_ray_env(ray_session),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    writing = _wait_for_temp_entries(store, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (store / LOCK_NAME).is_file()  # the killed run never released it
    owners = [parse_entry(name).owner for name in writing]
    _wait_until_gone([o.pid for o in owners])  # Ray ends a dead driver's tasks
    left = [n for n in os.listdir(store) if n.startswith(".tmp-")]  # unless they cleaned up
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "src"), str(store)]) == 0
    out, err = capsys.readouterr()
    assert f"took over the lock of pid {proc.pid} on {this_host()}" in err
    assert "which is no longer running" in err
    if left:
        assert f"removed {len(left)} leftover temporary entries of an interrupted run" in out
    assert open_store(store).case_ids == [f"case_{i:03d}" for i in range(6)]
    assert [p.name for p in store.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    assert main(["store", "verify", str(store), "--deep"]) == 0


def _wait_for_temp_entries(store: Path, proc: subprocess.Popen, timeout: float = 120) -> list:
    """The ``.tmp-`` entries of the first moment some exist (a case being written)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the ingest ended before it was seen writing"
        names = [n for n in os.listdir(store) if n.startswith(".tmp-")] if store.is_dir() else []
        if names:
            return names
        time.sleep(0.005)
    raise AssertionError("no case was seen being written")


def _wait_until_gone(pids: list[int], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        assert time.monotonic() < end, f"writers {pids} still running"
        time.sleep(0.1)


@pytest.mark.slow
def test_rerun_repairs_a_partial_case(tmp_path, ray_session, capsys):
    """The issue: a case indexed and marked complete without its image array. It must be one
    line on export (not KeyError), and a rerun must not call it unchanged but write it again."""
    import shutil

    write_layout_cohort("nnunet", tmp_path / "src", n_cases=3)
    ingest(tmp_path / "src", tmp_path / "store", progress=False)
    shutil.rmtree(tmp_path / "store" / "case_001" / "image")
    out = tmp_path / "out"
    assert main(["store", "export", str(tmp_path / "store"), "--case", "case_001", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: case case_001: {tmp_path / 'store' / 'case_001' / 'image'}: ")
    assert "image array missing" in err and "\n" not in err
    assert main(["ingest", str(tmp_path / "src"), str(tmp_path / "store")]) == 0
    printed = capsys.readouterr().out
    assert "stored 1, unchanged 2" in printed and "repaired 1 damaged case(s): case_001" in printed
    assert main(["store", "verify", str(tmp_path / "store"), "--deep"]) == 0
    assert main(["store", "export", str(tmp_path / "store"), "--case", "case_001", str(out)]) == 0


def test_lock_on_an_object_store(tmp_path):
    """fsspec URLs: the lock file is an exclusive create ("xb") there."""
    location = StoreLocation.parse(f"memory://tsesnet-lock-{tmp_path.name}/store")
    with StoreLock(location, command="tsesnet ingest a") as lock:
        with pytest.raises(InputError, match=r"locked by another writer, pid \d+ on"):
            StoreLock(location, wait=0).acquire()
        assert location.exists(LOCK_NAME) and lock.held
    assert not location.exists(LOCK_NAME)


# ------------------------------------------------------------- locks that fail closed


def _unknown_locks(store: Path, outside: Path) -> dict[str, Callable[[], None]]:
    """Lock files this code did not write, each planted by a function: all held by someone
    unknown."""
    real = LockHolder(this_host(), os.getppid(), None, time.time(), "x", "cd" * 16)
    (outside / "elsewhere.lock").write_bytes(real.to_bytes())
    return {
        "empty": lambda: (store / LOCK_NAME).write_bytes(b""),
        "garbage": lambda: (store / LOCK_NAME).write_bytes(b"\x00\xffnot json"),
        "foreign": lambda: (store / LOCK_NAME).write_text('{"owner": "someone"}'),
        "dangling symlink": lambda: (store / LOCK_NAME).symlink_to(outside / "missing"),
        "symlink": lambda: (store / LOCK_NAME).symlink_to(outside / "elsewhere.lock"),
    }


def test_an_unknown_lock_holds_the_store_until_broken(tmp_path, empty_store):
    """An empty, garbage, foreign or symlinked ``.lock`` is held by someone unknown: writers
    wait, then fail with one line naming the file and --break-lock; nothing is taken."""
    location = StoreLocation.parse(empty_store)
    lock = empty_store / LOCK_NAME
    for case, plant in _unknown_locks(empty_store, tmp_path).items():
        plant()
        said: list[str] = []
        start = time.monotonic()
        with pytest.raises(InputError) as info:
            StoreLock(location, wait=0.5, notify=said.append).acquire()
        assert time.monotonic() - start >= 0.5, case
        msg = str(info.value)
        assert msg.startswith(f"{empty_store}: locked by an unknown writer ({lock} is "), case
        assert "pass wait=SECONDS to wait longer" in msg, case  # the library's parameters
        assert "pass break_lock=True to remove the lock" in msg and "\n" not in msg, case
        assert said == [f"{empty_store}: waiting up to 0.5 s for an unknown writer ({lock})"]
        assert os.path.lexists(lock), case  # left as found
        # --break-lock takes it (never following a symlink: its target stays)
        broke: list[str] = []
        with StoreLock(location, wait=0, break_lock=True, notify=broke.append) as held:
            assert not lock.is_symlink() and json.loads(lock.read_text())["pid"] == os.getpid()
            assert held.held
        assert broke == [f"{empty_store}: broke the lock {lock} (--break-lock)"], case
        assert not os.path.lexists(lock)
    assert json.loads((tmp_path / "elsewhere.lock").read_text())["token"] == "cd" * 16


def test_break_lock_never_breaks_a_live_holder_here(empty_store):
    holder = _write_lock(empty_store, this_host(), os.getppid(), process_start(os.getppid()))
    with pytest.raises(InputError, match=r"locked by another writer, pid \d+ on"):
        StoreLock(StoreLocation.parse(empty_store), wait=0, break_lock=True).acquire()
    assert LockHolder.parse((empty_store / LOCK_NAME).read_bytes()) == holder


def test_two_writers_never_pass_an_unknown_lock_together(tmp_path, empty_store):
    """Before: an empty lock let both racers in at once."""
    (empty_store / LOCK_NAME).write_bytes(b"")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(empty_store), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=30)[0] for p in procs]
    assert all(o.startswith("lost ") and "break_lock=True" in o for o in outs), outs
    assert (empty_store / LOCK_NAME).read_bytes() == b""


def test_a_symlinked_guard_is_never_followed(tmp_path, empty_store):
    """``.lock.guard`` planted as a symlink: before, the flock opened (and created) its target
    outside the store."""
    target = tmp_path / "outside" / "created-by-the-lock"
    target.parent.mkdir()
    guard = empty_store / ".lock.guard"
    guard.symlink_to(target)
    with pytest.raises(InputError) as info:
        StoreLock(StoreLocation.parse(empty_store), wait=0).acquire()
    assert str(info.value) == (
        f"{empty_store}: {guard} is not a regular file (a symbolic link?): refusing to lock "
        "through it; remove it if no writer runs (or pass break_lock=True)"
    )
    assert info.value.naming({"break_lock": "--break-lock"}).endswith("(or pass --break-lock)")
    assert not target.exists() and not (empty_store / LOCK_NAME).exists()
    with StoreLock(StoreLocation.parse(empty_store), wait=0, break_lock=True, notify=print):
        assert not guard.is_symlink() and guard.is_file()
    assert not target.exists()


def test_unknown_lock_on_an_object_store(tmp_path):
    location = StoreLocation.parse(f"memory://tsesnet-lock-{tmp_path.name}-u/store")
    location.fs.pipe_file(f"{location.root}/{LOCK_NAME}", b"")
    with pytest.raises(InputError, match="locked by an unknown writer .*break_lock=True"):
        StoreLock(location, wait=0).acquire()
    with StoreLock(location, wait=0, break_lock=True, notify=lambda line: None):
        assert LockHolder.parse(location.read_bytes(LOCK_NAME)).pid == os.getpid()
    assert not location.exists(LOCK_NAME)


def test_ingest_cli_names_break_lock(tmp_path, empty_store):
    write_layout_cohort("nnunet", tmp_path / "src", n_cases=1)
    (empty_store / LOCK_NAME).write_bytes(b"")
    argv = [TSESNET, "ingest", str(tmp_path / "src"), str(empty_store), "--wait", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    lock = empty_store / LOCK_NAME
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {empty_store}: locked by an unknown writer ({lock} is empty)")
    assert last.endswith(  # the parameters' placeholders, shown by the command's flags
        "(pass --wait SECONDS to wait longer; if no writer runs on this store, pass --break-lock "
        "to remove the lock)"
    )
    assert sorted(p.name for p in empty_store.iterdir()) == [".lock", ".lock.guard", "zarr.json"]
    argv = [TSESNET, "store", "verify", str(empty_store), "--record", "--wait", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--break-lock" in proc.stderr
    proc = subprocess.run(argv + ["--break-lock"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not (empty_store / LOCK_NAME).exists()
