"""`tsesnet train`: the config (paper recipe, strict YAML, typed overrides), run names, and a
one-epoch tiny training on Ray Train that is tracked in MLflow, registered, and resumed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest

from data_store.errors import InputError
from tsesnet.training.config import TrainConfig, default_run_name, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tsesnet" / "configs"
TINY = CONFIGS / "tiny.yaml"


def test_the_default_is_the_recommended_recipe_and_paper_yaml_the_paper():
    cfg = TrainConfig()
    assert dataclasses.asdict(load_config(CONFIGS / "recommended.yaml")) == dataclasses.asdict(cfg)
    # the paper's network, patch, optimiser and schedule ...
    assert cfg.optim.lr == 1e-4 and cfg.data.batch_size == 1 and cfg.optim.bf16
    assert cfg.schedule.epochs == 300 and cfg.schedule.early_stop_patience == 30
    assert tuple(cfg.data.patch) == (48, 96, 96) and cfg.model.preset == "paper"
    # ... with a loss whose terms balance at any tau, and a phase embedding
    assert (cfg.loss.tsc_scale, cfg.loss.bce, cfg.model.phase_embedding) == ("tau", 1.0, True)
    paper = load_config(CONFIGS / "paper.yaml")
    assert (paper.loss.alpha, paper.loss.beta, paper.loss.tau) == (0.7, 0.5, 1e-5)
    assert (paper.loss.tsc_scale, paper.loss.bce, paper.model.phase_embedding) == (
        "paper",
        0.0,
        False,
    )
    diff = {
        (s, k)
        for s in ("model", "loss", "data", "optim", "schedule", "run")
        for k, v in dataclasses.asdict(getattr(paper, s)).items()
        if dataclasses.asdict(getattr(cfg, s))[k] != v
    }
    assert diff == {("loss", k) for k in ("beta", "tau", "bce", "tsc_scale")} | {
        ("model", "phase_embedding")
    }


@pytest.mark.parametrize(
    "name", ["paper.yaml", "recommended.yaml", "small.yaml", "tiny.yaml", "science.yaml"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.preset in {"paper", "small", "tiny"}


def test_lr_decay():
    cfg = load_config(TINY, ["optim.lr=0.01"])
    assert cfg.optim.lr_decay == "none" and cfg.optim.lr_at(7, 10) == 0.01
    poly = load_config(TINY, ["optim.lr=0.01", "optim.lr_decay=poly"]).optim
    assert poly.lr_at(0, 10) == 0.01
    assert poly.lr_at(5, 10) == pytest.approx(0.01 * 0.5**0.9)
    assert 0 < poly.lr_at(9, 10) < poly.lr_at(8, 10)
    with pytest.raises(InputError):
        load_config(TINY, ["optim.lr_decay=cosine"])


def test_overrides_are_typed():
    cfg = load_config(
        TINY, ["loss.alpha=0.5", "run.workers=2", "model.fusion=early", "model.phases=[2]"]
    )
    assert cfg.loss.alpha == 0.5 and isinstance(cfg.loss.alpha, float)
    assert cfg.model.phases == (2,) and cfg.model.build().config.phases == (2,)
    assert cfg.run.workers == 2 and cfg.model.fusion == "early"
    ordered = load_config(TINY, ["model.phase_embedding=true"]).model.build()
    assert ordered.config.phase_embedding and ordered.phase_embedding is not None


@pytest.mark.parametrize(
    "override",
    ["loss.nope=1", "nope.alpha=1", "run.workers=two", "schedule.epochs=0", "loss.alpha"],
)
def test_bad_overrides_fail_with_the_key(override):
    with pytest.raises(InputError):
        load_config(TINY, [override])


def test_unknown_yaml_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(InputError, match="momentum"):
        load_config(bad)


def test_run_names_are_deterministic():
    a = load_config(TINY)
    b = load_config(TINY)
    c = load_config(TINY, ["loss.alpha=0.5"])
    name = default_run_name("/data/bts.zarr", a)
    assert name == default_run_name("/data/bts.zarr", b)
    assert name.startswith("bts-tiny-tsff-fold0-")
    assert name != default_run_name("/data/bts.zarr", c)
    # Where it runs and how many workers do not change the model: same name.
    d = load_config(TINY, ["run.workers=2"])
    assert name == default_run_name("/data/bts.zarr", d)


@pytest.mark.slow
def test_train_tracks_registers_and_resumes(tiny_store, ray_session, tmp_path, monkeypatch, capsys):
    """One epoch end to end with the defaults (SQLite and ray_results in the working directory),
    then the same name with two epochs continues from the checkpoint in the same MLflow run."""
    import mlflow

    from tsesnet.cli import main
    from tsesnet.tracking import registry
    from tsesnet.training.driver import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    assert main(["train", "--store", str(tiny_store), "--config", str(TINY), "--name", "e2e"]) == 0
    out = capsys.readouterr().out
    assert out.count("registered tsesnet version 1") == 1  # one registration line
    assert "(resuming" not in out
    assert "/#/models/tsesnet/versions/1?workflowType=machine_learning" in out
    assert (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "ray_results" / "e2e").is_dir()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tsesnet").experiment_id],
        filter_string="tags.`tsesnet.run_name` = 'e2e'",
    )
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    for key in (
        "train_total",
        "train_dice",
        "train_tsc",
        "val_dice",
        "val_hd95",
        "val_sensitivity",
        "lr",
        "patches_per_s",
        "val_dice_filtered",
        "val_min_component_fraction",
    ):
        assert key in m, key
    assert 0.0 <= m["val_dice"] <= 1.0 and m["patches_per_s"] > 0
    # filtering nothing is a candidate, so the chosen filter never scores below no filter
    assert m["val_dice_filtered"] >= m["val_dice"] - 1e-9
    assert p["loss.alpha"] == "0.7" and p["model.preset"] == "tiny"
    assert t["data.store_fingerprint"] and t["data.fold"] == "0" and t["code.git_commit"]
    assert t["sys.torch"] and t["tsesnet.model_version"] == "1"
    assert "tsesnet.model_alias" not in t  # aliases move: no run tag claims one
    assert run.info.status == "FINISHED"
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType" in out
    (data,) = run.inputs.dataset_inputs  # the runs table's "Dataset" column
    assert data.dataset.digest == t["data.store_fingerprint"] and data.dataset.name == "tiny.zarr"
    assert [(i.key, i.value) for i in data.tags] == [("mlflow.data.context", "fold 0")]
    mv = client.get_model_version("tsesnet", "1")
    assert mv.tags["store_fingerprint"] == t["data.store_fingerprint"]
    assert float(mv.tags["val_dice"]) == m["val_dice"]  # full precision
    for needle in ("validation DSC", "HD95", t["data.store_fingerprint"], "fold 0", "tiny/tsff"):
        assert needle in mv.description, needle
    assert t["code.git_commit"] in mv.description and "@champion" in mv.description
    assert "@champion" in client.get_registered_model("tsesnet").description
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/val_overlay.png"} <= artifacts
    # The first validation cases (tiny.yaml validates 1), drawn as `predict` draws a case.
    from data_store.store import open_store

    val_id = open_store(str(tiny_store)).split(0)[1][0]
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert pictures == [f"pictures/{val_id}.png"]
    png = Path(client.download_artifacts(run.info.run_id, pictures[0], str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == [
        "config/resolved.yaml"
    ]
    loaded = registry.load_model("models:/tsesnet@champion")
    assert loaded.patch == (16, 32, 32) and loaded.config["lineage"]["fold"] == 0
    seen = loaded.config["training_data"]
    assert seen["phases"] == [3, 3] and len(seen["spacing_mm_min"]) == 3 and seen["orientations"]
    assert loaded.config["min_component_fraction"] == m["val_min_component_fraction"]

    # The same name again, now for 2 epochs: resumes after epoch 1, same MLflow run.
    res = train(str(tiny_store), load_config(TINY, ["schedule.epochs=2"]), "e2e")
    assert res.run_id == run.info.run_id
    assert res.epochs_done == 2 and res.metrics["resumed_from_epoch"] == 0
    steps = [h.step for h in client.get_metric_history(res.run_id, "train_total")]
    assert steps == [1, 2]  # the epochs' numbers, as printed
    assert res.model_version == "2"
    configs = {a.path for a in client.list_artifacts(res.run_id, "config")}
    assert configs == {"config/resolved.yaml", "config/resumed_1.yaml"}
    # Once more: nothing left to train, the same checkpoint is never registered twice.
    again = train(str(tiny_store), load_config(TINY, ["schedule.epochs=2"]), "e2e")
    assert (again.model_version, again.epochs_done) == ("2", 2)
    assert len(client.search_model_versions("name = 'tsesnet'")) == 2


def test_a_run_resumes_only_with_its_own_model_and_store(tmp_path):
    from tsesnet.training.checkpoint import RUN_FILE, claim_run_folder

    model = dataclasses.asdict(load_config(TINY).model.build().config)
    claim_run_folder(str(tmp_path), "r", model, "fp1")  # first run: records model and store
    assert (tmp_path / "r" / RUN_FILE).is_file()
    claim_run_folder(str(tmp_path), "r", model, "fp1")  # same: resumes
    changed = {**model, "phase_embedding": True}
    with pytest.raises(InputError, match=r"run r cannot resume.*model.phase_embedding False"):
        claim_run_folder(str(tmp_path), "r", changed, "fp1")
    with pytest.raises(InputError, match=r"store fingerprint fp1 -> fp2") as err:
        claim_run_folder(str(tmp_path), "r", model, "fp2")
    assert str(err.value).startswith(str(tmp_path / "r")) and "\n" not in str(err.value)


# --- what was written before the restructure still reads the same ---------------------------

# tiny.yaml as it stood before the `data` section extended the sampler's settings, and its hash.
OLD_TINY = """
model: {preset: tiny, fusion: tsff, tumor_aware: true}
loss: {alpha: 0.7, beta: 0.5, tau: 1.0e-5, samples_per_class: 32}
data: {fold: 0, patch: [16, 32, 32], augment: true, patches_per_epoch: 2, batch_size: 1,
       cache_bytes: 67108864, val_overlap: 0.25, val_batch_size: 1, max_val_cases: 1}
optim: {lr: 1.0e-3}
schedule: {epochs: 1, early_stop_patience: 5, val_every: 1, checkpoint_every: 1}
run: {workers: 1, cpus_per_worker: 1.0, max_failures: 0}
"""


def test_default_run_names_of_earlier_runs_do_not_change(tmp_path):
    """A run started without --name resumes only if its default name is the same as before."""
    old = tmp_path / "old_tiny.yaml"
    old.write_text(OLD_TINY)
    # set as the first release trained (unscaled TSC, max-pooled labels, pooled attention)
    same = ["loss.tsc_scale=paper", "loss.tsc_labels=max", "model.attn_exact_tokens=0"]
    assert (
        default_run_name("/x/demo.zarr", load_config(old, same)) == "demo-tiny-tsff-fold0-48dc59d8"
    )
    # today's defaults train differently: a new name (and `claim_run_folder` refuses the old)
    assert default_run_name("/x/demo.zarr", load_config(old)) != "demo-tiny-tsff-fold0-48dc59d8"
    changed = load_config(old, [*same, "data.admit_after=4"])
    assert default_run_name("/x/demo.zarr", changed) != "demo-tiny-tsff-fold0-48dc59d8"
    # how the run goes (loader processes, memory format) never changes it
    runtime = load_config(old, [*same, "data.loader_workers=3", "model.channels_last=true"])
    assert default_run_name("/x/demo.zarr", runtime) == "demo-tiny-tsff-fold0-48dc59d8"


def test_two_readers_of_a_remote_checkpoint_never_share_its_files(tmp_path):
    """Two workers restoring on one node each read their own download. Ray's `as_directory`
    shares one folder per node, and the second reader downloaded again over the files the first
    was reading: a torn optim.pt after a lost node in the cluster rehearsal."""
    import fsspec
    import pyarrow.fs
    import torch
    from ray.train import Checkpoint

    from tsesnet.training import checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    (tmp_path / "ckpt").mkdir()
    checkpoint.save(tmp_path / "ckpt", net, opt, net.state_dict(), checkpoint.TrainState(epoch=4))
    remote = fsspec.filesystem("memory")
    remote.put(str(tmp_path / "ckpt"), "/bucket/ckpt", recursive=True)
    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(remote))
    ckpt = Checkpoint("/bucket/ckpt", filesystem=fs)
    with checkpoint.local_directory(ckpt) as first:
        before = os.stat(Path(first) / checkpoint.OPTIM_FILE)
        with checkpoint.local_directory(ckpt) as second:  # the same checkpoint, as every rank gets
            assert Path(second) != Path(first)
            assert checkpoint.read_state(second).epoch == 4
        after = os.stat(Path(first) / checkpoint.OPTIM_FILE)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        state, _ = checkpoint.restore(
            first, torch.nn.Linear(3, 2), torch.optim.Adam(net.parameters())
        )
        assert state.epoch == 4
    assert not Path(first).exists(), "the download is removed after the block"
    # a checkpoint on local disk is read where it is, not copied
    with checkpoint.local_directory(Checkpoint.from_directory(str(tmp_path / "ckpt"))) as here:
        assert Path(here) == tmp_path / "ckpt"


def test_checkpoint_state_and_run_file_of_earlier_runs_still_read(tmp_path):
    import json

    from tsesnet.training.checkpoint import RUN_FILE, TrainState, claim_run_folder

    # state.json as the loop wrote it before any validation improved (no filter keys yet)
    old = {"epoch": 3, "best_val_dice": -1.0, "best_epoch": -1, "history": [{"epoch": 0}]}
    state = TrainState.from_json(json.dumps({**old, "stopped_early": False, "phases": 3}))
    assert (state.epoch, state.phases, state.restarts, state.filtered_dice) == (3, 3, 0, -1.0)
    assert json.loads(state.to_json())["history"] == [{"epoch": 0}]
    with pytest.raises(InputError, match="not a training state"):
        TrainState.from_json("[1, 2]", "ckpt/state.json")
    # a run folder claimed when the field was still called input_phases
    model = dataclasses.asdict(load_config(TINY, ["model.phases=[0,2]"]).model.config())
    legacy = {("input_phases" if k == "phases" else k): v for k, v in model.items()}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / RUN_FILE).write_text(
        json.dumps({"model": json.loads(json.dumps(legacy)), "store_fingerprint": "fp"})
    )
    claim_run_folder(str(tmp_path), "r", model, "fp")  # resumes: no error


@pytest.mark.parametrize("name", ["../../x", ".hidden", "a/b", "it's", "", "x" * 200])
def test_run_names_are_names(name, tiny_store, tmp_path):
    from tsesnet.training.driver import plan_run

    cfg = load_config(TINY, [f"run.storage_path={tmp_path}"])
    with pytest.raises(InputError, match="not a valid name"):
        plan_run(str(tiny_store), cfg, name)
    assert list(tmp_path.iterdir()) == []


def _out_of_range(spec: str) -> float:
    """A value just outside an interval spec of `RANGES` (or NaN when it is unbounded)."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    if lo != float("-inf"):
        return lo - 1 if spec[0] == "[" else lo
    if hi != float("inf"):
        return hi + 1 if spec[-1] == "]" else hi
    return float("nan")


def _override(key: str, value, default) -> str:
    if isinstance(default, tuple | list):
        value = [value, *default[1:]] if default else [value]
        return f"{key}=[{', '.join(map(str, value))}]"
    if (default is None or isinstance(default, int)) and float(value).is_integer():
        value = int(value)
    return f"{key}={'.nan' if value != value else value}"


def test_every_numeric_setting_has_a_range_and_is_checked_before_ray_starts():
    """Walk every numeric key of TrainConfig: an out-of-range value is a one-line error naming
    the key, raised by load_config (which the CLI calls before it starts Ray)."""
    from tsesnet.training.config import RANGES, numeric_settings

    settings = numeric_settings(TrainConfig())
    assert set(settings) == set(RANGES), "every numeric setting needs a range in RANGES"
    for key, default in settings.items():
        item = _override(key, _out_of_range(RANGES[key]), default)
        with pytest.raises(InputError) as err:
            load_config(TINY, [item])
        assert key in str(err.value) and "\n" not in str(err.value), item


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.val_overlap=1.0", "data.val_overlap"),
        ("data.fg_fraction=5", "data.fg_fraction"),
        ("run.cpus_per_worker=0", "run.cpus_per_worker"),
        ("run.gpus_per_worker=1.5", "run.gpus_per_worker"),
        ("loss.tau=.inf", "loss.tau"),
    ],
)
def test_the_reported_crashes_are_config_errors(item, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        load_config(TINY, [item])


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_and_resuming_gives_the_uninterrupted_answer(
    tiny_store, ray_session, tmp_path
):
    """Ctrl-C (SIGINT) during `tsesnet train`: exit 130 and the MLflow run KILLED, not RUNNING
    forever, nothing registered. The same command again resumes from the last checkpoint into
    the same run, and its history (one value per epoch) is the history of a run never
    interrupted."""
    import os
    import signal
    import subprocess
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "mlartifacts"),
    }

    def cmd(name, epochs):
        return [sys.executable, "-m", "tsesnet.cli", "train", "--store", str(tiny_store),
                "--config", str(TINY), "--name", name, "--set", f"schedule.epochs={epochs}",
                "--set", f"run.storage_path={tmp_path / 'ray'}"]  # fmt: skip

    def run(name, epochs):
        out = subprocess.run(
            cmd(name, epochs), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    log = open(tmp_path / "train.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd("ctrl-c", 40), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    # once Ray Train has registered a checkpoint (what a rerun resumes from)
    while not (tmp_path / "ray" / "ctrl-c" / "checkpoint_manager_snapshot.json").exists():
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "train.log").read_text()[-3000:]
    log.close()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()

    def history(name):
        (r,) = client.search_runs(
            [client.get_experiment_by_name("tsesnet").experiment_id],
            filter_string=f"tags.`tsesnet.run_name` = '{name}'",
        )
        points = client.get_metric_history(r.info.run_id, "train_total")
        return r, [m.step for m in points], {m.step: m.value for m in points}

    run_, steps, _ = history("ctrl-c")
    assert run_.info.status == "KILLED"
    assert client.search_model_versions("name = 'tsesnet'") == []
    epochs = len(steps) + 2
    assert "(resuming from the latest)" in run("ctrl-c", epochs)
    resumed, steps, values = history("ctrl-c")
    assert resumed.info.run_id == run_.info.run_id and resumed.info.status == "FINISHED"
    assert steps == list(range(1, epochs + 1))  # one value per epoch (step = its number)
    run("straight", epochs)
    _, _, reference = history("straight")
    assert values == pytest.approx(reference, rel=1e-6)


def test_training_refuses_a_damaged_store_before_it_starts(tiny_store, tmp_path, capsys):
    """A store with a deleted chunk (Zarr would read zeros) stops `tsesnet train` in one line
    naming the case and the file, before Ray or MLflow start."""
    import shutil

    from tsesnet.cli import main

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store, damaged)
    chunk = next(p for p in sorted(damaged.glob("*/image/c/**/*")) if p.is_file())
    chunk.unlink()
    code = main(["train", "--store", str(damaged), "--config", str(TINY),
                 "--set", f"run.storage_path={tmp_path / 'ray'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    case = chunk.relative_to(damaged).parts[0]
    assert case in err and "image" in err and "missing" in err, err  # case, file, problem
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_training_refuses_nan_percentiles_edited_into_a_case(tiny_store, tmp_path, capsys):
    """The issue: NaN percentiles in one case's zarr.json trained and registered an all-NaN
    @champion. The attributes are checked (values and recorded digest) before Ray starts."""
    import json
    import shutil

    from tsesnet.cli import main

    edited = tmp_path / "edited.zarr"
    shutil.copytree(tiny_store, edited)
    meta_path = sorted(edited.glob("*/zarr.json"))[0]
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["percentiles"] = [float("nan"), float("nan")]
    meta_path.write_text(json.dumps(meta))
    code = main(["train", "--store", str(edited), "--config", str(TINY),
                 "--set", f"run.storage_path={tmp_path / 'ray'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert (
        err.startswith(f"error: case {meta_path.parent.name}: {meta_path}: ")
        and "percentiles" in err
    )
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")],
)
def test_a_run_always_ends_with_a_status(error, status, mlflow_uri):
    """Whatever ends the driver's block, the MLflow run is not left RUNNING."""
    import mlflow

    from tsesnet.training.driver import ended_as

    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("ends"))
    if error is None:
        with ended_as(run.info.run_id):
            pass
    else:
        with pytest.raises(error), ended_as(run.info.run_id):
            raise error("worker died")
    assert client.get_run(run.info.run_id).info.status == status


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (RuntimeError, "RUNNING"), (KeyboardInterrupt, "RUNNING")],
)
def test_a_run_whose_caller_ends_failures_is_only_ever_finished(error, status, mlflow_uri):
    """A sweep trial's training (`ends_failed=False`) writes FINISHED when it completes and
    nothing when it fails or is killed: the sweep ends that run."""
    import mlflow

    from tsesnet.training.driver import ended_as

    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("trial"))
    undone = []
    with (
        contextlib.suppress(error or ()),
        ended_as(run.info.run_id, undo=[lambda: undone.append(1)], ends_failed=False),
    ):
        if error:
            raise error("stopped")
    assert client.get_run(run.info.run_id).info.status == status
    assert undone == ([1] if error is KeyboardInterrupt else [])


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process under `root` (Linux /proc)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            procs[int(d.name)] = (int(stat[1]), cmd)
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in out:
                out[pid] = (ppid, cmd)
                todo.append(pid)
    return out


@pytest.mark.slow
def test_a_killed_loader_process_restarts_the_run_from_its_checkpoint(tiny_store, tmp_path):
    """kill -9 of a background loader process mid-run: the epoch ends with an error naming the
    case it was reading, Ray Train restarts the worker from the last checkpoint
    (`run.max_failures=1`), and the run finishes; never a hang."""
    import signal
    import subprocess
    import time

    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "tsesnet.cli", "train", "--store", str(tiny_store),
           "--config", str(TINY), "--name", "loader-kill",
           "--set", "schedule.epochs=8", "--set", "data.patches_per_epoch=8",
           "--set", "data.loader_workers=1", "--set", "run.cpus_per_worker=2",
           "--set", "run.max_failures=1",
           "--set", f"run.storage_path={tmp_path / 'ray'}"]  # fmt: skip
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    snapshot = tmp_path / "ray" / "loader-kill" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint, or no loader process, in time"
        tree = _descendants(proc.pid)
        loaders = [p for p, (pp, cmd) in tree.items() if "forkserver" in cmd
                   and "forkserver" in tree.get(pp, (0, ""))[1]]  # fmt: skip
        if snapshot.exists() and loaders:
            break
        time.sleep(0.3)
    os.kill(loaders[0], signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-4000:]
    log.close()
    text = (tmp_path / "train.log").read_text()
    # the console says the run resumed; why (the worker's error) is in the full log it names
    assert "resumed from the checkpoint after epoch" in text, text[-3000:]
    text += Path(re.search(r"full log in (\S+)", text).group(1)).read_text()
    assert "LoaderError" in text and re.search(r"case SYN_\d+: epoch \d+, patch \d+", text), text[
        -3000:
    ]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tsesnet").experiment_id],
        filter_string="tags.`tsesnet.run_name` = 'loader-kill'",
    )
    assert run.info.status == "FINISHED" and run.data.tags["tsesnet.restarts"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_total")]
    assert steps == list(range(1, 9))


def test_a_failed_training_is_reported_in_one_line():
    from ray.train import WorkerGroupError

    from data_store.errors import LoaderError
    from tsesnet.training.driver import _first_error_line

    dead = LoaderError("reading it failed in loader process 12: killed", case="SYN_001", epoch=2,
                       patch=3)  # fmt: skip
    err = WorkerGroupError("Training failed due to worker errors:\n[Rank 0]...\n", {1: dead})
    assert _first_error_line(err) == (
        "rank 1: LoaderError: case SYN_001: epoch 2, patch 3: reading it failed in loader "
        "process 12: killed"
    )


def test_mlflow_steps_are_epoch_numbers_and_old_runs_keep_theirs(mlflow_uri):
    """MLflow's step is the epoch's number as printed (from 1); a run logged before, from 0,
    goes on from 0 when resumed, so its charts stay one line."""
    import mlflow

    from tsesnet.training.epoch_log import STEP_TAG, log_epoch

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.create_experiment("steps")
    new, old = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.log_metric(old, "epoch_time_s", 1.0, step=0)  # epoch 1 of an old run
    for epoch in (0, 1):
        log_epoch(client, new, epoch, {"epoch": epoch, "epoch_time_s": 1.0, "train_total": 0.5})
    log_epoch(client, old, 1, {"epoch": 1, "epoch_time_s": 1.0})
    steps = {r: [m.step for m in client.get_metric_history(r, "epoch_time_s")] for r in (new, old)}
    assert steps == {new: [1, 2], old: [0, 1]}
    assert client.get_run(new).data.tags[STEP_TAG] == "epoch" and STEP_TAG not in (
        client.get_run(old).data.tags
    )


def test_an_error_leaves_a_ray_the_caller_started_running(
    ray_session, tiny_store, tmp_path, capsys
):
    """`tsesnet.cli.main` called from Python beside the caller's own Ray (a notebook's, this
    session's): a command that fails ends only a Ray it connected to itself, never the caller's
    (it used to shut the caller's down, and the next command started another)."""
    from tsesnet.cli import main

    bad = ["train", "--store", str(tiny_store), "--config", str(TINY), "--set", "run.workers=64"]
    assert main([*bad, "--set", f"run.storage_path={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert ray_session.is_initialized()
