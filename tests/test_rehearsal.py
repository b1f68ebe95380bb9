"""The cluster rehearsal: the commands users type, on several Ray nodes, S3 and an MLflow server.

One rehearsal cluster (`platform/rehearsal.py`, what `platform/rehearsal.sh up` starts) serves
the whole module: a Ray head with no CPUs and worker nodes of 1 CPU each, moto's S3 API and
`platform/mlflow_server.sh` (basic auth, artifacts on S3), each server behind a proxy that can
make it unreachable. Everything goes through the `tsesnet` command with the environment the
rehearsal prints, as a user would; the store, Ray Train's `storage_path`, the sweep and the
prediction output are on S3. The raylets know nothing of S3 or MLflow: what the workers need
reaches them from the driver's environment (`tsesnet submit`'s runtime env, or the job a driver
starts with `RAY_ADDRESS`).

The user's journey comes first (its training is the uninterrupted reference), then the faults,
each with a bound on its time: a node lost mid-epoch (with and without a place to restart), the
S3 API unreachable mid-ingest and mid-training, the MLflow server down mid-training (inside the
journey's training), a node lost mid-prediction.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import rehearsal_cluster  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TSESNET = str(Path(sys.executable).parent / "tsesnet")
BUCKET = "s3://tsesnet"
STORE = f"{BUCKET}/rehearsal/store.zarr"
RESULTS = f"{BUCKET}/rehearsal/ray_results"
# Long enough that a fault lands mid-training: faults strike at the first registered checkpoint
# (epoch 1), and the 2 epochs left take 10-20 s here, longer than a lost node takes to be noticed.
EPOCHS = 3


def train(config: str = str(ROOT / "tsesnet" / "configs" / "tiny.yaml")) -> list[str]:
    """Every training here: the tiny preset, EPOCHS epochs, 2 workers, checkpoints on S3
    (`config` relative to the repository for a job, whose cwd is its copy of it)."""
    return [
        "train", "--store", STORE, "--config", config, "--workers", "2",
        "--set", f"schedule.epochs={EPOCHS}", "--set", "data.patches_per_epoch=4",
        "--set", f"run.storage_path={RESULTS}",
    ]  # fmt: skip


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    """The rehearsal cluster: head + 2 worker nodes (1 CPU each), S3 and MLflow; stopped after."""
    rh = rehearsal_cluster.load()
    folder = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths
    r = rh.Rehearsal(str(folder))
    t0 = time.monotonic()
    try:
        r.up(nodes=2, cpus_per_node=1)
        print(f"\nrehearsal cluster up in {time.monotonic() - t0:.0f} s", flush=True)
        yield r
    finally:
        r.down()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def work(cluster, tmp_path_factory):
    """A working folder with a 4-case labelled cohort (cwd of every command)."""
    d = tmp_path_factory.mktemp("rehearsal")
    done = tsesnet(cluster, d, "synth", "cohort", "--cases", "4", "--shape", "16", "32", "32",
                   "--phases", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return d


def user_env(cluster, **extra) -> dict[str, str]:
    """This environment with the rehearsal's exports (what `eval "$(rehearsal.sh env)"` gives)."""
    rh = rehearsal_cluster.load()
    env = {k: v for k, v in os.environ.items() if k not in rh.DROPPED}
    env.update(cluster.env, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def tsesnet(cluster, cwd, *args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TSESNET, *args], cwd=cwd, env=env or user_env(cluster), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def start(cluster, cwd, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [TSESNET, *args], cwd=cwd, env=env or user_env(cluster), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def own_traceback(stderr: str) -> bool:
    """A traceback of the command itself (Ray's forwarded worker logs carry a "(pid=" prefix)."""
    return any(line.startswith("Traceback (most recent call last)") for line in stderr.splitlines())


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def s3(cluster):
    """An s3fs filesystem on the rehearsal's S3 API (listing cache off)."""
    import s3fs

    e = cluster.env
    return s3fs.S3FileSystem(
        endpoint_url=e["AWS_ENDPOINT_URL"], key=e["AWS_ACCESS_KEY_ID"],
        secret=e["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False,
    )  # fmt: skip


def keys(cluster, prefix: str) -> list[str]:
    """Every object key below `prefix` (an s3:// URL)."""
    fs = s3(cluster)
    try:
        return sorted(fs.find(prefix.removeprefix("s3://")))
    except FileNotFoundError:
        return []


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {err[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout} s")


def checkpoints(cluster, name: str) -> list[str]:
    """The checkpoints of run `name` that Ray Train's controller has registered (its snapshot
    on S3): what a restart resumes from. A checkpoint folder alone may not be registered yet."""
    fs = s3(cluster)
    try:
        snap = json.loads(fs.cat_file(f"{RESULTS}/{name}/checkpoint_manager_snapshot.json"))
    except (FileNotFoundError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])]


@contextlib.contextmanager
def mlflow_client(cluster):
    import mlflow

    with mock.patch.dict(os.environ, {k: v for k, v in cluster.env.items() if "MLFLOW" in k}):
        yield mlflow.MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])


METRICS = ("val_dice", "train_total", "nodes", "resumed_from_epoch", "weights_max_diff",
           "ranks_trained")  # fmt: skip


def mlflow_run(cluster, name: str):
    """The MLflow run named `name`: (status, {metric: [values by step]}, params)."""
    with mlflow_client(cluster) as client:
        exp = client.get_experiment_by_name("tsesnet")
        (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
        history = {
            key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda m: m.step)]
            for key in METRICS
        }  # fmt: skip
        return run.info.status, history, run.data.params


def alive_nodes(cluster) -> list[str]:
    return [n for n in cluster.nodes if any(p.alive() for p in cluster.node_procs(n))]


def replace_lost_nodes(cluster, want: int = 2) -> None:
    """Start worker nodes until `want` are alive (after a test killed one)."""
    for _ in range(want - len(alive_nodes(cluster))):
        cluster.add_node(1)


def kill_mid_training(cluster, work, name: str, *settings: str, env=None, then=None):
    """Start a training, SIGKILL a worker node once its first checkpoint is on S3, call
    `then()`; returns (rc, stdout, stderr, seconds from the kill to the command's end)."""
    replace_lost_nodes(cluster)
    args = [*train(), "--name", name, "--set", "run.register=false"]
    for item in settings:
        args += ["--set", item]
    proc = start(cluster, work, *args, env=env)
    wait_for(lambda: checkpoints(cluster, name), "first checkpoint", 600, proc)
    cluster.kill_node(alive_nodes(cluster)[-1])
    killed = time.monotonic()
    if then is not None:
        then()
    rc, out, err = finish(proc, 900)
    return rc, out, err, time.monotonic() - killed


# --------------------------------------------------------------------------- the journey


def test_user_journey_on_the_cluster(cluster, work):
    """ingest into S3, store info/verify, a 2-worker training submitted as a job (the MLflow
    server down for 60 s in the middle of it), a 2-trial sweep, predict S3 to S3, evaluate."""
    t0 = time.monotonic()
    # An empty store on S3 (its only case is damaged): info and verify answer, no traceback.
    bad = work / "bad"
    assert tsesnet(cluster, work, "synth", str(bad), "--cases", "1", "--shape", "8", "32", "32",
                   "--phases", "2").returncode == 0  # fmt: skip
    (victim,) = sorted(bad.glob("imagesTr/*_0000.nii.gz"))
    victim.write_bytes(b"not a NIfTI file")
    done = tsesnet(cluster, work, "ingest", str(bad), f"{BUCKET}/rehearsal/empty.zarr")
    assert done.returncode == 1 and victim.name in done.stdout + done.stderr, done.stderr[-2000:]
    for sub in (["info"], ["verify"]):
        done = tsesnet(cluster, work, "store", *sub, f"{BUCKET}/rehearsal/empty.zarr")
        assert done.returncode == 0 and not own_traceback(done.stderr), done.stderr[-2000:]
        assert "0 cases" in done.stdout, done.stdout

    # Ingest on the cluster (its tasks run on the worker nodes), then info and a deep verify.
    done = tsesnet(cluster, work, "ingest", "cohort", STORE, "--folds", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    info = json.loads(tsesnet(cluster, work, "store", "info", STORE, "--json").stdout)
    assert len(info["cases"]) == 4, info
    done = tsesnet(cluster, work, "store", "verify", STORE, "--deep")
    assert done.returncode == 0 and "orphan" not in done.stdout, done.stdout

    # Training as a job; the MLflow server unreachable for 60 s once the first checkpoint is on
    # S3: the MLflow client retries through it, the run completes with every epoch's metrics.
    proc = start(cluster, work, "submit", "--", "tsesnet", *train("tsesnet/configs/tiny.yaml"),
                 "--name", "journey")  # fmt: skip
    wait_for(lambda: checkpoints(cluster, "journey"), "first checkpoint", 600, proc)
    outage = time.monotonic()
    with cluster.outage("mlflow"):
        time.sleep(60)
    print(f"\nMLflow server unreachable for {time.monotonic() - outage:.0f} s mid-training")
    rc, out, err = finish(proc, 900)
    assert rc == 0 and "SUCCEEDED" in out, out[-3000:] + err[-3000:]
    status, history, _ = mlflow_run(cluster, "journey")
    assert status == "FINISHED"
    assert len(history["val_dice"]) == EPOCHS and len(history["train_total"]) == EPOCHS, history
    assert history["nodes"] == [2.0] * EPOCHS, "the two workers ran on two different nodes"
    assert history["ranks_trained"] == [2.0] * EPOCHS, "both ranks trained every epoch"
    assert set(history["weights_max_diff"]) == {0.0}, "DDP kept the ranks' weights identical"
    assert checkpoints(cluster, "journey"), "checkpoints are on S3"
    assert any("/artifacts/" in k for k in keys(cluster, f"{BUCKET}/mlartifacts")), (
        "the run's artifacts went to S3 through the MLflow server"
    )
    assert "registered tsesnet version 1 as @champion" in out, out[-2000:]

    # A 2-trial sweep on the nodes, its Tune experiment on S3.
    done = tsesnet(cluster, work, "submit", "--", "tsesnet", "sweep", "--store", STORE,
                   "--config", "tsesnet/configs/sweep_tiny.yaml", "--trials", "2",
                   "--name", "rehearsal-sweep", "--set", f"run.storage_path={RESULTS}",
                   timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert keys(cluster, f"{RESULTS}/rehearsal-sweep"), "the sweep's experiment is on S3"

    # Predict the store from the registry to S3, then evaluate the S3 folder.
    out_url = f"{BUCKET}/rehearsal/pred"
    done = tsesnet(cluster, work, "predict", "--model", "models:/tsesnet@champion",
                   "--input", STORE, "--output", out_url)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    names = {k.rsplit("/", 1)[-1] for k in keys(cluster, out_url)}
    wanted = {f"SYN_00{i}.nii.gz" for i in range(4)} | {f"SYN_00{i}.png" for i in range(4)}
    wanted |= {"summary.csv", "prediction.json", "report.html"}  # the report on S3 too
    assert wanted <= names, names
    assert not (work / "s3:").exists(), "nothing written to a local folder named s3:"
    done = tsesnet(cluster, work, "evaluate", "--pred", out_url, "--labels", "cohort/labelsTr")
    assert done.returncode == 0 and "(n=4)" in done.stdout, done.stdout + done.stderr
    print(f"journey: {time.monotonic() - t0:.0f} s")


def test_unreachable_s3_endpoint_is_one_line(cluster):
    """A store on an S3 endpoint nobody listens on: one line, a non-zero exit, soon."""
    env = user_env(cluster, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    t0 = time.monotonic()
    done = tsesnet(cluster, ROOT, "store", "info", STORE, env=env, timeout=120)
    assert done.returncode != 0 and not own_traceback(done.stderr), done.stderr[-2000:]
    assert last_line(done.stderr).startswith("error: "), done.stderr[-2000:]
    assert time.monotonic() - t0 < 90


# --------------------------------------------------------------------------- faults


def test_node_lost_without_retries_fails_in_one_line(cluster, work):
    """run.max_failures=0: one line naming the lost node, the run FAILED, no hang."""
    rc, out, err, seconds = kill_mid_training(cluster, work, "lost-node")
    line = last_line(err)
    assert rc == 1 and not own_traceback(err), err[-3000:]
    assert line.startswith("error: training failed: ") and " node " in line, line
    assert "died" in line and "gloo" not in line, line
    assert mlflow_run(cluster, "lost-node")[0] == "FAILED"
    assert seconds < 120, f"{seconds:.0f} s from the node's loss to the end"
    print(f"\nnode lost, max_failures=0: failed in {seconds:.0f} s: {line}")


def test_node_lost_with_a_replacement_resumes_to_the_same_metrics(cluster, work):
    """run.max_failures=1, a new node joins: the run resumes from its S3 checkpoint and ends
    with the uninterrupted run's (the journey's training) metrics, epoch for epoch."""
    rc, out, err, seconds = kill_mid_training(
        cluster, work, "lost-node-resumed", "run.max_failures=1",
        then=lambda: cluster.add_node(1),
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    status, history, _ = mlflow_run(cluster, "lost-node-resumed")
    _, reference, _ = mlflow_run(cluster, "journey")
    assert status == "FINISHED"
    assert max(history["resumed_from_epoch"]) >= 0, "the restart loaded the checkpoint"
    assert history["val_dice"] == pytest.approx(reference["val_dice"], abs=1e-6), (
        history["val_dice"],
        reference["val_dice"],
    )
    print(f"\nnode lost, max_failures=1 + a new node: finished {seconds:.0f} s after the loss")


def test_node_lost_with_no_room_fails_within_the_wait(cluster, work):
    """run.max_failures=1 but no node can take the lost worker: the run fails after
    run.resource_wait_s (here 20 s, in start-ups of 10 s) instead of waiting for ever."""
    env = user_env(cluster, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    rc, out, err, seconds = kill_mid_training(
        cluster, work, "lost-node-no-room", "run.max_failures=1", "run.resource_wait_s=20", env=env
    )
    line = last_line(err)
    assert rc == 1 and not own_traceback(err), err[-3000:]
    assert line.startswith("error: training failed: no room") and "=20 s" in line, line
    assert seconds < 20 + 90, f"{seconds:.0f} s from the node's loss to the end"
    print(f"\nnode lost, no room: failed {seconds:.0f} s after the loss: {line}")


def test_s3_outage_mid_ingest_leaves_a_consistent_store_that_a_rerun_completes(cluster, work):
    """S3 unreachable for 30 s from the moment ingest writes its fourth case (the proxy cuts the
    request that names it, so the fault lands mid-ingest however fast the cases go): every
    failure is one line, the store stays consistent (verify passes; what the index does not
    list is named an orphan and --repair removes it) and a rerun stores every case."""
    store = f"{BUCKET}/rehearsal/outage.zarr"
    cohort = work / "outage-cohort"
    done = tsesnet(cluster, work, "synth", str(cohort), "--cases", "8", "--shape", "24", "48",
                   "48", "--phases", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cluster.outage_when("s3", b"/rehearsal/outage.zarr/.tmp-SYN_003")
    try:
        proc = start(cluster, work, "ingest", str(cohort), store, "--folds", "2")
        wait_for(lambda: cluster.outage_on("s3"), "the fourth case's first write", 300, proc)
        t0 = time.monotonic()
        time.sleep(30)
    finally:
        cluster.end_outage("s3")
    rc, out, err = finish(proc, 300)
    print(f"\ningest with S3 unreachable for 30 s: rc {rc} after {time.monotonic() - t0:.0f} s; "
          f"{last_line(out)} / {last_line(err)}")  # fmt: skip
    assert not own_traceback(err), err[-3000:]
    assert rc in (0, 1), out[-2000:] + err[-3000:]  # 1: cases failed, each named in one line
    # Consistent: whatever is indexed is intact; what is not indexed is an orphan, repaired.
    done = tsesnet(cluster, work, "store", "verify", store, "--deep")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = tsesnet(cluster, work, "store", "verify", store, "--repair")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = tsesnet(cluster, work, "store", "verify", store)
    assert after.returncode == 0 and "orphan" not in after.stdout, after.stdout
    done = tsesnet(cluster, work, "ingest", str(cohort), store, "--folds", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads(tsesnet(cluster, work, "store", "info", store, "--json").stdout)
    assert len(info["cases"]) == 8
    done = tsesnet(cluster, work, "store", "verify", store, "--deep")
    assert done.returncode == 0 and "orphan" not in done.stdout, done.stdout


def test_s3_outage_mid_training_ends_in_one_line_or_completes(cluster, work):
    """S3 unreachable for 30 s after the first checkpoint: the run either rides it out (every
    epoch's metrics in MLflow) or fails with one line; never a traceback or a hang."""
    replace_lost_nodes(cluster)
    name = "s3-outage"
    proc = start(cluster, work, *train(), "--name", name, "--set", "run.register=false")
    wait_for(lambda: checkpoints(cluster, name), "first checkpoint", 600, proc)
    t0 = time.monotonic()
    with cluster.outage("s3"):
        time.sleep(30)
    rc, out, err = finish(proc, 600)
    seconds = time.monotonic() - t0
    status, history, _ = mlflow_run(cluster, name)
    print(f"\ntraining with S3 unreachable for 30 s: rc {rc}, {status}, {seconds:.0f} s; "
          f"{last_line(err)}")  # fmt: skip
    assert not own_traceback(err), err[-3000:]
    if rc == 0:
        assert status == "FINISHED" and len(history["val_dice"]) == EPOCHS, history
    else:
        assert status == "FAILED" and last_line(err).startswith("error: "), err[-3000:]
    assert seconds < 300


def test_node_lost_mid_prediction_the_other_node_finishes_every_case(cluster, work):
    """Two actors, one per node; a node is killed after the first mask is written: every case
    is predicted, once, by the node that is left."""
    replace_lost_nodes(cluster)
    out_url = f"{BUCKET}/rehearsal/pred-node-lost"
    proc = start(cluster, work, "predict", "--model", "models:/tsesnet@champion", "--input",
                 STORE, "--output", out_url, "--workers", "2")  # fmt: skip
    wait_for(lambda: [k for k in keys(cluster, out_url) if k.endswith(".nii.gz")],
             "first mask", 600, proc)  # fmt: skip
    cluster.kill_node(alive_nodes(cluster)[-1])
    t0 = time.monotonic()
    rc, out, err = finish(proc, 600)
    assert rc == 0 and not own_traceback(err), out[-2000:] + err[-3000:]
    fs = s3(cluster)
    rows = fs.cat_file(f"{out_url}/summary.csv".removeprefix("s3://")).decode().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    assert sorted(ids) == [f"SYN_00{i}" for i in range(4)], ids
    masks = [k for k in keys(cluster, out_url) if k.endswith(".nii.gz")]
    assert len(masks) == 4, masks
    print(f"\nnode lost mid-prediction: finished {time.monotonic() - t0:.0f} s after the loss")
