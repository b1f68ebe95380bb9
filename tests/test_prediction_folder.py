"""A prediction folder cannot destroy inputs or mislead (issue 26, item 5).

`tsesnet predict` refuses an `--output` holding files it did not write (the store's own source
`labelsTr/`, another cohort's masks, a non-empty folder without `--overwrite`), and a run is
complete or visibly not: `prediction.json` is written first marked incomplete and last as the
manifest of every file, which `tsesnet evaluate` checks (`--pred-unchecked` skips that; a
folder without one, masks made elsewhere, is scored with a notice). Everything through the
`tsesnet` command, as typed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_predict import _register_tiny, write_orientation_cohort

TSESNET = str(Path(sys.executable).parent / "tsesnet")


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_session):
    """The environment of a `tsesnet` process: the module's MLflow, the session's Ray."""
    root = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
    uri = _register_tiny(root, name="tsesnet-folder-test")
    yield dict(
        os.environ,
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
        MODEL=uri,
    )
    mp.undo()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_orientation_cohort(tmp_path_factory.mktemp("raw"), broken=False)


@pytest.fixture(scope="module")
def store(ray_session, cohort, tmp_path_factory):
    from data_store.ingest import ingest

    path = tmp_path_factory.mktemp("store") / "store.zarr"
    ingest(cohort, path, folds=2, progress=False)
    return path


def _run(env, *argv, check=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [TSESNET, *argv], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def _predict(env, src, out, *extra, check=None):
    return _run(
        env,
        "predict",
        "--model",
        env["MODEL"],
        "--input",
        str(src),
        "--output",
        str(out),
        "--workers",
        "1",
        *extra,
        check=check,
    )


def _error_line(proc) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


# --------------------------------------------------------------------------------------------
# predict: which folders it writes into
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "extra"),
    [
        # the store's own ground truth: re-ingest would make predictions its labels
        ("labelsTr", ()),
        ("labelsTr", ("--overwrite",)),
        ("labelsTr/pred", ("--overwrite",)),
        ("imagesTr", ("--overwrite",)),
    ],
)
def test_a_stores_source_folders_are_refused(env, store, cohort, where, extra):
    before = _tree(cohort)
    line = _error_line(_predict(env, store, cohort / where, *extra))
    folder = cohort / where.split("/")[0]
    assert line == (
        f"error: {cohort / where}: --output lies in {folder}, a folder of the input's source "
        "files (a re-ingest would read predictions as scans or labels); choose a folder "
        "outside it"
    )
    assert _tree(cohort) == before  # nothing written, nothing created


def test_another_cohorts_masks_are_refused_even_with_overwrite(env, store, tmp_path):
    other = write_orientation_cohort(tmp_path / "other", broken=False)
    before = _tree(other)
    for extra in ((), ("--overwrite",)):
        line = _error_line(_predict(env, store, other / "labelsTr", *extra))
        assert "holds lps.nii.gz and 2 more that tsesnet predict did not write" in line
        assert "never replaces them" in line
    assert _tree(other) == before


def test_a_non_empty_folder_needs_overwrite(env, store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _error_line(_predict(env, store, out))
    assert f"error: {out}: --output is not empty: it holds notes.txt" in line
    assert "pass --overwrite" in line
    assert _tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


# --------------------------------------------------------------------------------------------
# a run is complete or visibly not; evaluate checks which
# --------------------------------------------------------------------------------------------


def _manifest(out: Path) -> dict:
    return json.loads((out / "prediction.json").read_text())


def test_manifest_lists_every_file_and_evaluate_refuses_a_changed_folder(
    env, store, cohort, tmp_path
):
    out = tmp_path / "pred"
    _predict(env, store, out, "--probabilities", check=0)
    record = _manifest(out)
    assert record["complete"] is True
    listed = {f["path"]: f for f in record["files"]}
    on_disk = {k for k, v in _tree(out).items() if v and k != "prediction.json"}
    assert set(listed) == on_disk
    for name, f in listed.items():
        data = (out / name).read_bytes()
        assert (f["size"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    labels = cohort / "labelsTr"
    assert _run(env, "evaluate", "--pred", str(out), "--labels", str(labels)).returncode == 0

    # a mask of another run mixed in
    shutil.copy(out / "ras.nii.gz", out / "lps_copy.nii.gz")
    line = _error_line(_run(env, "evaluate", "--pred", str(out), "--labels", str(labels)))
    assert "holds lps_copy.nii.gz that its prediction.json does not list" in line
    # the hint's parameters by the flags: evaluate's own, and predict's --overwrite
    assert line.endswith(
        "rerun predict with --overwrite into an empty folder, or pass --pred-unchecked to score "
        "its masks as found"
    )
    (out / "lps_copy.nii.gz").unlink()
    # a mask replaced by another one
    good = (out / "lps.nii.gz").read_bytes()
    shutil.copy(out / "oblique.nii.gz", out / "lps.nii.gz")
    line = _error_line(_run(env, "evaluate", "--pred", str(out), "--labels", str(labels)))
    assert "lps.nii.gz is not the size" in line or "lps.nii.gz does not have the sha256" in line
    (out / "lps.nii.gz").write_bytes(good)
    # a stale summary.csv
    head, *rows = (out / "summary.csv").read_bytes().splitlines(keepends=True)
    (out / "summary.csv").write_bytes(head + b"".join(reversed(rows)))  # same size
    line = _error_line(_run(env, "evaluate", "--pred", str(out), "--labels", str(labels)))
    assert "summary.csv does not have the sha256 prediction.json records" in line
    # --pred-unchecked scores what is there
    unchecked = _run(
        env,
        "evaluate",
        "--pred",
        str(out),
        "--labels",
        str(labels),
        "--pred-unchecked",
        "--json",
        check=0,
    )
    assert json.loads(unchecked.stdout)["summary"]["n_ok"] == 3


def test_a_plain_folder_of_masks_is_scored_with_a_notice(env, cohort, tmp_path):
    """Masks made elsewhere (no prediction.json) are scored as found, saying so; a folder of ours
    that lost its manifest's promise is refused (the other tests)."""
    plain = tmp_path / "theirs"
    shutil.copytree(cohort / "labelsTr", plain)
    labels = cohort / "labelsTr"
    ok = _run(env, "evaluate", "--pred", str(plain), "--labels", str(labels), check=0)
    assert "DSC" in ok.stdout
    assert f"{plain}: no prediction.json (not written by tsesnet predict)" in ok.stderr


def _wait_for(cond, proc, timeout=240.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "predict ended before it was seen writing"
        assert time.monotonic() < end, "predict was never seen writing"
        time.sleep(0.005)


def _incomplete(out: Path) -> bool:
    try:
        return _manifest(out).get("complete") is False
    except (OSError, ValueError):
        return False


def _new_mask(out: Path, since_ns: int) -> bool:
    """Whether a mask written since `since_ns` is there (the second run is writing)."""
    found = []
    for p in out.glob("*.nii.gz"):
        with contextlib.suppress(OSError):  # replaced or removed meanwhile
            found.append(p.stat().st_mtime_ns >= since_ns)
    return any(found)


@pytest.mark.slow
def test_kill_9_mid_run_then_evaluate_refuses_and_overwrite_completes(env, store, cohort, tmp_path):
    out, labels = tmp_path / "pred", cohort / "labelsTr"
    _predict(env, store, out, check=0)  # a first, complete run
    first = _manifest(out)
    since = time.time_ns()
    proc = subprocess.Popen(
        [
            TSESNET,
            "predict",
            "--model",
            env["MODEL"],
            "--input",
            str(cohort),
            "--output",
            str(out),
            "--workers",
            "1",
            "--min-component-fraction",
            "0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _new_mask(out, since), proc)  # mid-run: its first mask is there
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    line = _error_line(_run(env, "evaluate", "--pred", str(out), "--labels", str(labels)))
    assert line == (
        f"error: {out}: its prediction.json says complete: false (the run was interrupted, or "
        "is still running); rerun predict with --overwrite, or pass --pred-unchecked to score "
        "its masks as found"
    )
    assert _incomplete(out) and _manifest(out)["started_utc"] >= first["started_utc"]
    line = _error_line(_predict(env, cohort, out))
    assert "holds an interrupted prediction" in line and "pass --overwrite" in line

    _predict(env, cohort, out, "--overwrite", check=0)
    assert _manifest(out)["complete"] is True
    done = _run(env, "evaluate", "--pred", str(out), "--labels", str(labels), "--json", check=0)
    assert json.loads(done.stdout)["summary"]["n_ok"] == 3


@pytest.mark.slow
def test_a_complete_prediction_of_ours_is_replaced_without_overwrite(env, store, cohort, tmp_path):
    out = tmp_path / "pred"
    _predict(env, store, out, "--probabilities", check=0)
    assert (out / "probabilities" / "ras.nii.gz").is_file()
    _predict(env, store, out, "--fold", "0", "--no-report", check=0)
    record = _manifest(out)
    names = {f["path"] for f in record["files"]}
    # the first run's files are gone, not mixed with the second's
    assert {k for k, v in _tree(out).items() if v} == names | {"prediction.json"}
    assert not (out / "probabilities" / "ras.nii.gz").exists()
    scored = _run(env, "evaluate", "--pred", str(out), "--labels", str(cohort / "labelsTr"))
    assert scored.returncode == 1 and "missing predictions (" in scored.stdout  # not fold 0's


# --------------------------------------------------------------------------------------------
# the same rules on object storage (fsspec's memory://, in this process)
# --------------------------------------------------------------------------------------------


def test_object_storage_manifest_and_refusals(tmp_path):
    from data_store.errors import InputError
    from tsesnet.serving import manifest
    from tsesnet.serving.outputs import ObjectPath, write_bytes

    out = ObjectPath(f"memory://tsesnet-folder-{tmp_path.name}/pred")
    foreign = ObjectPath(f"memory://tsesnet-folder-{tmp_path.name}/labels")
    write_bytes(foreign / "a.nii.gz", b"a label")
    with pytest.raises(InputError, match="holds a.nii.gz that tsesnet predict did not write"):
        manifest.check_output_folder(foreign, overwrite=True)

    manifest.check_output_folder(out, overwrite=False)  # nothing there yet
    planned = manifest.planned_names(
        ["a"], output_format="nifti", probabilities=False, report=False
    )
    manifest.begin(out, planned, {"model": None})
    files = {"a.nii.gz": write_bytes(out / "a.nii.gz", b"mask")}
    with pytest.raises(InputError, match="says complete: false"):
        manifest.check_prediction_folder(out.url)
    with pytest.raises(InputError, match="holds an interrupted prediction"):
        manifest.check_output_folder(out, overwrite=False)
    manifest.check_output_folder(out, overwrite=True)
    files["summary.csv"] = write_bytes(out / "summary.csv", b"case_id\na\n")
    manifest.finish(out, {"model": None}, files)
    assert manifest.check_prediction_folder(out.url)["complete"] is True
    manifest.check_output_folder(out, overwrite=False)  # a complete run of ours: replaced
    write_bytes(out / "summary.csv", b"case_id\nb\n")
    with pytest.raises(InputError, match="summary.csv does not have the sha256"):
        manifest.check_prediction_folder(out.url)
    write_bytes(out / "b.nii.gz", b"other")
    with pytest.raises(InputError, match="holds b.nii.gz that tsesnet predict did not write"):
        manifest.check_output_folder(out, overwrite=True)


def test_a_forged_manifest_never_removes_files_outside_out(tmp_path):
    from tsesnet.serving import manifest

    out, victim = tmp_path / "out", tmp_path / "victim.nii.gz"
    out.mkdir()
    victim.write_bytes(b"keep")
    forged = {"complete": True, "files": [{"path": "../victim.nii.gz"}, {"path": "/etc/x"}]}
    (out / "prediction.json").write_text(json.dumps(forged))
    manifest.begin(out, ["a.nii.gz"], {})
    assert victim.read_bytes() == b"keep"
    assert _manifest(out)["writes"] == ["a.nii.gz"]


def test_the_rules_on_s3(monkeypatch):
    """The same on an S3 API (moto's server, in this process): listing, sizes, removal."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from data_store.errors import InputError
    from tsesnet.serving import manifest
    from tsesnet.serving.outputs import ObjectPath, write_bytes

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in (
        ("AWS_ENDPOINT_URL", f"http://{host}:{port}"),
        ("AWS_ACCESS_KEY_ID", "k"),
        ("AWS_SECRET_ACCESS_KEY", "s"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("bucket")
        out = ObjectPath("s3://bucket/pred")
        planned = ["a.nii.gz", "probabilities/a.nii.gz", "summary.csv"]
        manifest.begin(out, planned, {"model": None})
        files = {name: write_bytes(out / name, name.encode()) for name in planned[:2]}
        with pytest.raises(InputError, match="says complete: false"):
            manifest.check_prediction_folder(out.url)
        files["summary.csv"] = write_bytes(out / "summary.csv", b"case_id\n")
        manifest.finish(out, {"model": None}, files)
        assert manifest.check_prediction_folder(out.url)["complete"] is True
        write_bytes(out / "probabilities" / "a.nii.gz", b"another map")
        with pytest.raises(InputError, match="probabilities/a.nii.gz is not the size"):
            manifest.check_prediction_folder(out.url)
        manifest.begin(out, ["b.nii.gz"], {})  # the previous run's files go first
        assert s3fs.S3FileSystem().find("bucket/pred") == ["bucket/pred/prediction.json"]
        write_bytes(ObjectPath("s3://bucket/labels") / "x.nii.gz", b"label")
        with pytest.raises(InputError, match="holds x.nii.gz that tsesnet predict did not"):
            manifest.check_output_folder(ObjectPath("s3://bucket/labels"), overwrite=True)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
