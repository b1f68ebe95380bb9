"""`tsesnet.tracking.runs`: where runs go, and a tracking database that cannot race."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path):
    """Reproduces 'two trainings started at once in a new directory: the second dies in MLflow's
    SQLite schema migration': without the lock, 6 of 6 such processes died here."""
    code = (
        "from tsesnet.tracking.runs import ensure_database, find_or_create_run\n"
        "e = ensure_database('race')\n"
        "print(e, find_or_create_run(e, 'same-name')[0])\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in outs]
    experiments = {out.split()[0] for out, _ in outs}
    assert len(experiments) == 1  # one experiment, whoever created it
    assert (tmp_path / "mlflow.db").is_file()


def test_search_values_are_quoted_safely():
    import pytest

    from tsesnet.tracking.runs import quote

    assert quote("it's") == '"it\'s"' and quote('a"b') == "'a\"b'"
    with pytest.raises(ValueError, match="both quote"):
        quote("a'b\"c")
