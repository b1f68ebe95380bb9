"""Settings are resolved at the edge: below the CLI the process environment is not written (the
rule and its allow-list: `tests/test_architecture.py`, `ENVIRON_WRITES`); what Ray's workers
must see travels in the job's runtime env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONNECT = """
import json, os
before = dict(os.environ)
from tsesnet.common import cluster
ray = cluster.connect()

@ray.remote
def niceness():
    return os.nice(0)

@ray.remote
class Actor:
    def niceness(self):
        return os.nice(0)

actor = Actor.options(runtime_env={"env_vars": {"X": "1"}}).remote()
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({
    "task": ray.get(niceness.remote()),
    "actor": ray.get(actor.niceness.remote()),
    "changed": changed,
}))
cluster.disconnect()
"""


@pytest.mark.slow
def test_a_local_instance_runs_workers_at_niceness_0_without_touching_the_environment(tmp_path):
    """Before: `connect` set RAY_worker_niceness in the driver's own environment (and so in every
    process it started later); now the job's runtime env carries it to the workers only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", CONNECT], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # Ray's workers run at niceness 15 by default; an actor with its own env_vars keeps the 0.
    assert (seen["task"], seen["actor"]) == (0, 0)
    assert "RAY_worker_niceness" not in seen["changed"], seen["changed"]
