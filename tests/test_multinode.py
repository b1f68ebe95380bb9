"""Multi-node training and worker failure, on a 2-node Ray cluster simulated on this machine.

`ray.cluster_utils.Cluster` starts a head and a second node (1 CPU each) as separate raylets.
It runs in a subprocess so it never meets the session's Ray. The script trains the tiny preset
with 2 workers (one per node), then trains again with `max_failures=1` and SIGKILLs a training
worker as soon as the first checkpoint is on storage; the run must restart from that checkpoint
and finish. The recovery time is printed (pytest -s) and written to the JSON the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

store, out_dir = sys.argv[1], Path(sys.argv[2])
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
dashboard_port = s.getsockname()[1]
s.close()
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                    "dashboard_port": dashboard_port},
)
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2

from tsesnet.training.config import load_config
from tsesnet.training.driver import train

tiny = Path(sys.argv[3])
common = [f"run.storage_path={out_dir / 'ray_results'}", "run.register=false",
          "run.workers=2", "run.cpus_per_worker=1"]
report = {}

# 1. Two workers, one per node: both train and stay in sync.
t0 = time.time()
res = train(store, load_config(tiny, common), "two-nodes")
report["multinode"] = {"metrics": res.metrics, "seconds": time.time() - t0}

# 2. Kill a worker after the first checkpoint; max_failures=1 restarts from it.
name = "fault"
run_dir = out_dir / "ray_results" / name
events = {}

def registered():
    # checkpoints the controller has registered (its snapshot), not just files on disk
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        d = json.loads(snap.read_text())
    except (OSError, ValueError):
        return []
    return [(r["checkpoint_dir_name"], r["metrics"].get("epoch")) for r in d["checkpoint_results"]]

def killer():
    from ray.util.state import list_actors
    while not registered():
        time.sleep(0.05)
    first = registered()
    events["first_checkpoint"] = time.time()
    events["first_checkpoint_epoch"] = first[-1][1]
    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    pid = sorted(a.pid for a in actors)[-1]
    os.kill(pid, signal.SIGKILL)
    events["kill"] = time.time()
    events["killed_pid"] = pid
    names = {n for n, _ in first}
    while True:  # the first checkpoint registered after the restart
        new = [(n, e) for n, e in registered() if n not in names]
        if new:
            events["next_checkpoint"] = time.time()
            events["next_checkpoint_epoch"] = new[0][1]
            return
        time.sleep(0.05)

th = threading.Thread(target=killer, daemon=True)
th.start()
cfg = load_config(tiny, common + ["run.max_failures=1", "schedule.epochs=4",
                                  "data.patches_per_epoch=8"])
t0 = time.time()
res = train(store, cfg, name)
total = time.time() - t0
th.join(timeout=60)
hist = res.metrics
report["fault"] = {
    "metrics": hist, "seconds": total, "events": events,
    "recovery_s": events.get("next_checkpoint", float("nan")) - events.get("kill", float("nan")),
}
(out_dir / "report.json").write_text(json.dumps(report, default=str))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_two_nodes_and_worker_failure(tiny_store, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tiny_store),
            str(tmp_path),
            str(ROOT / "platform" / "configs" / "tiny.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())

    mn = report["multinode"]["metrics"]
    assert mn["nodes"] == 2, "the two workers ran on two nodes"
    assert mn["ranks_trained"] == 2
    assert mn["weights_max_diff"] == 0.0, "DDP kept the ranks' weights identical"

    fault = report["fault"]
    assert "kill" in fault["events"], "no worker was killed"
    m = fault["metrics"]
    assert m["epoch"] == 3, "the run finished all epochs after the failure"
    ev = fault["events"]
    assert m["resumed_from_epoch"] >= ev["first_checkpoint_epoch"], (
        "the restarted workers loaded the checkpoint",
        fault,
    )
    assert ev["next_checkpoint_epoch"] == m["resumed_from_epoch"] + 1, fault
    print(
        f"\nmultinode: {report['multinode']['seconds']:.1f} s; fault run {fault['seconds']:.1f} s, "
        f"recovery (kill -> next checkpoint) {fault['recovery_s']:.1f} s "
        f"(one epoch takes {m['epoch_time_s']:.1f} s), "
        f"resumed from epoch {m['resumed_from_epoch']}"
    )
