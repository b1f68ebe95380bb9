"""Champions that are comparable (issue 24) and registrations that end honestly (issue 26),
through `tsesnet train` as a user types it: the tiny preset on the session's Ray, an SQLite
MLflow under tmp_path.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_honest_runs import _client, _env, _run_of, _train_cmd  # tests/ is on sys.path

TSESNET = str(Path(sys.executable).parent / "tsesnet")


def _train(tiny_store, tmp_path, ray_session, name, *sets) -> str:
    out = subprocess.run(
        _train_cmd(tiny_store, tmp_path, name, "schedule.epochs=1", *sets),
        env=_env(tmp_path, ray_session), cwd=tmp_path, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_a_smoke_run_on_one_validation_case_never_takes_champion(tiny_store, ray_session, tmp_path):
    """Issue 24's scenario: a run validated on 1 case (`data.max_val_cases=1`) registered after
    a champion validated on the fold's 2. Before: the gate compared store and fold only, and the
    smoke run took @champion whenever its Dice on its one case was higher. Now it is
    @challenger, the reason names the difference, and `models show` lists both protocols."""
    first = _train(tiny_store, tmp_path, ray_session, "full", "data.max_val_cases=0")
    assert "registered tsesnet version 1 as @champion (no champion yet)" in first, first[-2000:]
    smoke = _train(tiny_store, tmp_path, ray_session, "smoke", "data.max_val_cases=1")
    line = next(x for x in smoke.splitlines() if x.startswith("registered tsesnet version 2"))
    assert line.startswith(
        "registered tsesnet version 2 as @challenger (champion v1 was validated under another "
        "protocol"
    ), line
    assert "validated on 1 case(s) vs 2 (other case IDs)" in line, line
    client = _client(tmp_path)
    assert str(client.get_model_version_by_alias("tsesnet", "champion").version) == "1"
    v1, v2 = (client.get_model_version("tsesnet", v) for v in ("1", "2"))
    assert (v1.tags["protocol.n_val_cases"], v2.tags["protocol.n_val_cases"]) == ("2", "1")
    assert v1.tags["protocol"] != v2.tags["protocol"]
    assert v1.tags["protocol.window"] == "16x32x32" and v1.tags["protocol.overlap"]
    shown = subprocess.run(
        [TSESNET, "models", "show", "tsesnet"], env=_env(tmp_path), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    ).stdout.splitlines()  # fmt: skip
    rows = {r.split()[0]: r.split() for r in shown[2:4]}
    assert rows["1"][1:4] == ["champion", v1.tags["protocol"][:8], "2"], shown
    assert rows["2"][1:4] == ["challenger", v2.tags["protocol"][:8], "1"], shown


@pytest.mark.slow
def test_a_signal_during_registration_leaves_no_version(tiny_store, ray_session, tmp_path):
    """SIGTERM the moment `tsesnet train` starts registering. Before: registration ran to its
    end with the signal deferred, so the run ended KILLED with a registered @champion. Now the
    version is withdrawn (deleted, its alias never kept) and the run ends KILLED, exit 143."""
    proc = subprocess.Popen(
        _train_cmd(tiny_store, tmp_path, "sig", "schedule.epochs=1"),
        env=_env(tmp_path, ray_session), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("registering the best weights"):
                proc.send_signal(signal.SIGTERM)
                break
        t0 = time.monotonic()
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert time.monotonic() - t0 < 120
    assert "registration of tsesnet version 1 withdrawn" in out, out[-3000:]
    client = _client(tmp_path)
    assert client.search_model_versions("name = 'tsesnet'") == []
    assert client.get_registered_model("tsesnet").aliases == {}
    run = _run_of(client, "sig")
    assert run.info.status == "KILLED"
    assert "tsesnet.model_version" not in run.data.tags
