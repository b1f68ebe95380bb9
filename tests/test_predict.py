"""`tsesnet predict`: Ray Data prediction from a registered tiny model onto the input's own grid.

The cohort: one 3-phase case (canonical 16x32x32) written in RAS, in LPS (i and j flipped) and
with an oblique affine (axes permuted and rotated 12 degrees), plus an unlabelled case and a case
whose phase-1 file is truncated. RAS, LPS and oblique hold the same voxels in canonical order, so
the (untrained) model's predictions must be the same array mapped back through each file's own
axis order, and every output must carry its phase-0 file's shape and affine exactly.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_store.errors import InputError
from tsesnet.common.training_record import TrainingRecord
from tsesnet.serving.case import PredictConfig
from tsesnet.serving.inputs import CaseReader
from tsesnet.serving.predict import CasePredictor, _plan_workers, predict

T = 3
CANON = (16, 32, 32)  # (Z, Y, X) = (S, A, R)
RAS = np.array(
    [[0.7, 0, 0, -10.0], [0, 0.7, 0, -12.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]], dtype=np.float64
)


def _canonical_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, Z, Y, X) int16 with an enhancing blob, and its (Z, Y, X) uint8 mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in CANON), indexing="ij")
    blob = ((z - 8) / 4) ** 2 + ((y - 14) / 7) ** 2 + ((x - 18) / 6) ** 2 <= 1
    image = rng.normal(200, 20, (T, *CANON))
    for t in range(1, T):
        image[t][blob] += 300 * t
    return image.astype(np.int16), blob.astype(np.uint8)


def _ras_file(vol_zyx: np.ndarray) -> np.ndarray:
    """(..., Z, Y, X) canonical -> (..., i=R, j=A, k=S) as a RAS file stores it."""
    return np.swapaxes(vol_zyx, -1, -3)


def _rotation(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r = np.eye(4)
    r[:2, :2] = [[c, -s], [s, c]]
    return r


# name -> (file array from RAS file array, affine from RAS affine), file shape (i, j, k)
ni, nj = CANON[2], CANON[1]
FLIP_IJ = np.array([[-1, 0, 0, ni - 1], [0, -1, 0, nj - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
PERM = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])  # (a,b,c)->(b,c,a)
ORIENTATIONS = {
    "ras": (lambda a: a, RAS),
    "lps": (lambda a: a[..., ::-1, ::-1, :], RAS @ FLIP_IJ),
    "oblique": (lambda a: np.moveaxis(a, -1, -3), _rotation(12) @ RAS @ PERM),
}


def _save(path, arr, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(path))


def write_orientation_cohort(root, *, broken: bool = True):
    """nnU-Net raw layout: imagesTr/CASE_000t.nii.gz, labelsTr/CASE.nii.gz."""
    image, mask = _canonical_case(0)
    for name, (to_file, affine) in ORIENTATIONS.items():
        img_file, mask_file = to_file(_ras_file(image)), to_file(_ras_file(mask))
        for t in range(T):
            _save(root / "imagesTr" / f"{name}_{t:04d}.nii.gz", img_file[t], affine)
        _save(root / "labelsTr" / f"{name}.nii.gz", mask_file, affine)
    unl, _ = _canonical_case(1)
    for t in range(T):
        _save(root / "imagesTr" / f"unlabelled_{t:04d}.nii.gz", _ras_file(unl)[t], RAS)
    if broken:
        for t in range(T):
            _save(root / "imagesTr" / f"broken_{t:04d}.nii.gz", _ras_file(unl)[t], RAS)
        p = root / "imagesTr" / "broken_0001.nii.gz"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return root


def _register_tiny(workdir, name: str = "tsesnet-predict-test", training_record=None) -> str:
    """An untrained tiny TSESNet registered in MLflow the way training registers its best model
    (with `training_record`, the record prediction compares scans with)."""
    import mlflow
    import torch

    from tsesnet.model import build_model
    from tsesnet.tracking.registry import log_and_register, model_config_dict
    from tsesnet.tracking.runs import ensure_database

    torch.manual_seed(0)
    model = build_model("tiny")
    experiment_id = ensure_database()
    with mlflow.start_run(experiment_id=experiment_id, run_name="predict-test") as run:
        pass
    reg = log_and_register(
        run_id=run.info.run_id,
        weights=model.state_dict(),
        model_config=model_config_dict(model),
        patch=(16, 32, 32),
        phases=T,
        val_dice=0.5,
        lineage={"store_fingerprint": "test", "fold": 0, "run_name": "predict-test"},
        name=name,
        training_record=training_record,
    )
    return f"models:/{name}/{reg.version}"


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    """One registration for the module (the `mlflow_uri` fixture is per test; this mirrors it)."""
    root = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
    yield _register_tiny(root)
    mp.undo()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_orientation_cohort(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def raw_console():
    """What `raw_run` printed on stdout (its lines, filled by `raw_run`)."""
    return []


@pytest.fixture(scope="module")
def raw_run(ray_session, model_uri, cohort, tmp_path_factory, raw_console):
    """`tsesnet predict` on the raw cohort, through the CLI, with probability maps."""
    from tsesnet.cli import main

    out = tmp_path_factory.mktemp("pred_raw")
    argv = ["predict", "--model", model_uri, "--input", str(cohort), "--output", str(out)]
    err, console = io.StringIO(), io.StringIO()
    # our lines go to sys.stdout and sys.stderr; Ray's to the file descriptors
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(console):
        status = main([*argv, "--workers", "2", "--probabilities"])
    raw_console.extend(console.getvalue().splitlines())
    return status, out, err.getvalue()


def _prob(out, case_id):
    return out / "probabilities" / f"{case_id}.nii.gz"


@pytest.mark.slow
def test_outputs_land_on_each_input_grid(raw_run, cohort):
    status, out, _ = raw_run
    for name in [*ORIENTATIONS, "unlabelled"]:
        src = nib.load(str(cohort / "imagesTr" / f"{name}_0000.nii.gz"))
        for path, dtype in (
            (out / f"{name}.nii.gz", np.uint8),
            (_prob(out, name), np.float32),
        ):
            pred = nib.load(str(path))
            assert pred.shape == src.shape, name
            assert np.array_equal(pred.affine, src.affine), name
            assert int(pred.header["sform_code"]) == int(src.header["sform_code"])
            assert int(pred.header["qform_code"]) == int(src.header["qform_code"])
            assert pred.get_data_dtype() == dtype
    # Same canonical voxels -> the same prediction, mapped back through each file's axes.
    ras_prob = nib.load(str(_prob(out, "ras"))).get_fdata(dtype=np.float32)
    ras_mask = np.asanyarray(nib.load(str(out / "ras.nii.gz")).dataobj)
    assert np.array_equal(ras_mask, (ras_prob > 0.5).astype(np.uint8))
    for name, (to_file, _) in ORIENTATIONS.items():
        prob = nib.load(str(_prob(out, name))).get_fdata(dtype=np.float32)
        mask = np.asanyarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
        np.testing.assert_allclose(prob, to_file(ras_prob), atol=1e-6, err_msg=name)
        assert np.array_equal(mask, to_file(ras_mask)), name


@pytest.mark.slow
def test_summary_metrics_unlabelled_and_broken_case_isolated(raw_run):
    status, out, _ = raw_run
    assert status == 1  # one case failed
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    assert set(rows) == {"ras", "lps", "oblique", "unlabelled", "broken"}
    assert rows["broken"]["status"] == "error"
    assert "broken_0001.nii.gz" in rows["broken"]["error"]
    assert not (out / "broken.nii.gz").exists()
    assert rows["unlabelled"]["status"] == "ok" and rows["unlabelled"]["dice"] == ""
    for name in ORIENTATIONS:
        assert rows[name]["status"] == "ok" and rows[name]["error"] == ""
        for k in ("dice", "hd95_mm", "sensitivity"):
            # spacing of the rotated affine differs from RAS's in float32's last digits only
            assert float(rows[name][k]) == pytest.approx(float(rows["ras"][k]), rel=1e-5), k
        assert 0.0 <= float(rows[name]["dice"]) <= 1.0


@pytest.mark.slow
def test_evaluate_on_the_written_masks_agrees_with_predict(raw_run, cohort):
    from tsesnet.serving.evaluate import evaluate_dirs

    _, out, _ = raw_run
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    report = evaluate_dirs(out, cohort / "labelsTr")
    assert report.extra == ["unlabelled"] and report.missing == []
    for c in report.cases:  # file order + header spacing vs canonical order + stored spacing
        assert c.dice == pytest.approx(float(rows[c.case_id]["dice"]))
        assert c.hd95_mm == pytest.approx(float(rows[c.case_id]["hd95_mm"]), rel=1e-5)


@pytest.mark.slow
def test_predict_names_the_model_first_and_records_it_beside_the_masks(
    raw_run, raw_console, model_uri, cohort
):
    import mlflow

    _, out, _ = raw_run
    name, version = model_uri.removeprefix("models:/").split("/")
    mv = mlflow.MlflowClient().get_model_version(name, version)
    # Before any case: which registered version runs, from which run, trained on what.
    assert raw_console[:4] == [
        f"model: {name} version {version}  [{model_uri}]",
        f"  run: {mv.run_id} (predict-test)",
        "  trained on store fingerprint: test",
        "  fold: 0",
    ]
    assert raw_console.index(next(ln for ln in raw_console if "cases predicted" in ln)) > 3
    assert {r["model_version"] for r in _rows(out).values()} == {version}  # the failed case too
    record = json.loads((out / "prediction.json").read_text())
    assert record["model"]["name"] == name and record["model"]["version"] == version
    assert record["model"]["run_id"] == mv.run_id and record["model"]["uri"] == model_uri
    assert record["input"] == str(cohort) and record["settings"]["probabilities"] is True
    cases = {c["case_id"]: c for c in record["cases"]}
    assert set(cases) == {"ras", "lps", "oblique", "unlabelled", "broken"}
    assert cases["broken"]["status"] == "error" and "broken_0001" in cases["broken"]["error"]
    assert cases["ras"] == {"case_id": "ras", "status": "ok", "error": "", "warnings": ""}
    import torch

    assert record["software"]["torch"] == torch.__version__ and record["software"]["tsesnet"]
    assert record["started_utc"] <= record["finished_utc"]


def test_an_alias_is_resolved_to_the_version_it_names_now(mlflow_uri):
    """`@champion` moves: what prediction records is the version it named when it ran."""
    import mlflow

    from tsesnet.serving.lineage import resolve_model

    _register_tiny(None, name="alias-test")
    _register_tiny(None, name="alias-test")
    client = mlflow.MlflowClient(mlflow_uri)
    client.set_registered_model_alias("alias-test", "champion", "2")
    info = resolve_model("models:/alias-test@champion")
    assert (info.version, info.alias, info.store_fingerprint) == ("2", "champion", "test")
    want = "model: alias-test version 2 (@champion)  [models:/alias-test@champion]"
    assert info.lines()[0] == want
    client.set_registered_model_alias("alias-test", "champion", "1")
    assert resolve_model("models:/alias-test@champion").version == "1"
    with pytest.raises(InputError, match="cannot load model models:/alias-test@nope"):
        resolve_model("models:/alias-test@nope")


@pytest.mark.slow
def test_evaluate_names_the_model_from_prediction_json(raw_run, cohort, capsys):
    from tsesnet.cli import main

    _, out, _ = raw_run
    record = json.loads((out / "prediction.json").read_text())["model"]
    argv = ["evaluate", "--pred", str(out), "--labels", str(cohort / "labelsTr")]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"model: {record['name']} version {record['version']}  [{record['uri']}]"
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == record


@pytest.mark.slow
def test_the_report_shows_every_case_with_its_picture_and_numbers(raw_run, raw_console, tmp_path):
    from test_report import CHROMIUM, check_report_page

    _, out, _ = raw_run
    rows = _rows(out)
    ok = sorted(c for c, r in rows.items() if r["status"] == "ok")
    assert sorted(p.name for p in (out / "report").iterdir()) == [f"{c}.png" for c in ok]
    for case_id in ok:
        r = rows[case_id]
        assert (out / "report" / f"{case_id}.png").read_bytes()[:4] == b"\x89PNG"
        assert float(r["volume_ml"]) >= 0 and float(r["diameter_mm"]) >= 0
        assert r["curve_type"] in {"persistent", "plateau", "wash-out", "n/a"}
        assert len(r["enhancement_pct"].split(";")) == (T if int(r["pred_voxels"]) else 1)
    assert rows["broken"]["volume_ml"] == rows["broken"]["curve_type"] == ""
    assert f"report: {out / 'report.html'}" in raw_console
    if CHROMIUM:  # the page opened from disk in a real browser: every case, every picture
        check_report_page(out / "report.html", list(rows), ok, tmp_path / "profile")


def test_a_report_folder_linking_outside_is_never_written_through(loaded, cohort, tmp_path):
    from tsesnet.serving.case import predict_case

    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "report").symlink_to(outside)
    reader = CaseReader.for_input(str(cohort))
    row = predict_case(loaded, reader, "ras", out, PredictConfig())
    assert row["status"] == "ok" and (out / "ras.nii.gz").is_file()  # the mask is not lost
    assert "outside the output folder" in row["picture_error"]
    assert not list(outside.iterdir())
    row = predict_case(loaded, reader, "ras", tmp_path / "plain", PredictConfig(report=False))
    assert not (tmp_path / "plain" / "report").exists() and row["curve_type"] == ""


def test_pictures_go_to_object_storage_through_the_same_helpers(loaded, cohort):
    """An `s3://`-style output: the actor writes `report/CASE.png` beside the mask there
    (fsspec's in-memory filesystem stands in for the bucket, in this process)."""
    import fsspec

    from tsesnet.serving.case import predict_case
    from tsesnet.serving.outputs import ObjectPath

    fs = fsspec.filesystem("memory")
    reader = CaseReader.for_input(str(cohort))
    row = predict_case(loaded, reader, "ras", ObjectPath("memory://pred-out"), PredictConfig())
    assert row["status"] == "ok" and row["picture_error"] == ""
    assert fs.cat_file("/pred-out/report/ras.png")[:4] == b"\x89PNG"
    assert fs.isfile("/pred-out/ras.nii.gz")
    fs.rm("/pred-out", recursive=True)


@pytest.fixture(scope="module")
def store(ray_session, cohort, tmp_path_factory):
    """The cohort ingested (the broken case is rejected)."""
    from data_store.ingest import ingest

    path = tmp_path_factory.mktemp("store") / "store.zarr"
    report = ingest(cohort, path, folds=2, progress=False)
    assert len(report.rejected) == 1 and "broken" in report.rejected[0]
    return path


@pytest.mark.slow
def test_store_and_raw_predictions_are_identical(raw_run, model_uri, store, tmp_path):
    _, raw_out, _ = raw_run
    out = tmp_path / "pred_store"
    config = PredictConfig(workers=2, probabilities=True)
    report = predict(model_uri, str(store), str(out), config, progress=False)
    assert not report.failed
    assert {r["case_id"] for r in report.rows} == {*ORIENTATIONS, "unlabelled"}
    for case_id in [*ORIENTATIONS, "unlabelled"]:
        a = nib.load(str(out / f"{case_id}.nii.gz"))
        b = nib.load(str(raw_out / f"{case_id}.nii.gz"))
        assert np.array_equal(a.affine, b.affine)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), case_id
        pa = nib.load(str(_prob(out, case_id))).get_fdata(dtype=np.float32)
        pb = nib.load(str(_prob(raw_out, case_id))).get_fdata(dtype=np.float32)
        assert np.array_equal(pa, pb), case_id
    # Folds select labelled cases of that fold only (unlabelled ones have none).
    reader = CaseReader.for_input(str(store))
    folds = [reader.case_ids(fold=k) for k in range(2)]
    assert sorted(folds[0] + folds[1]) == sorted(ORIENTATIONS)


def test_the_component_filter_stored_with_the_model_is_applied(model_uri, cohort, tmp_path):
    """`predict_case` filters with the model's `min_component_fraction` unless told otherwise;
    the probability map stays unfiltered."""
    from scipy import ndimage

    from tsesnet.registry import load_model
    from tsesnet.serving.case import predict_case

    loaded = load_model(model_uri)
    assert loaded.config["min_component_fraction"] == 0.0  # what `_register_tiny` stored
    reader = CaseReader.for_input(str(cohort))
    case = "ras"

    def mask(config, out):
        out.mkdir()
        assert predict_case(loaded, reader, case, out, config)["status"] == "ok"
        return np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) > 0

    predict_case(loaded, reader, case, tmp_path, PredictConfig(probabilities=True))
    prob = nib.load(str(_prob(tmp_path, case))).get_fdata(dtype=np.float32)
    t = float(np.quantile(prob, 0.7))  # an untrained net: a threshold that leaves many islands
    raw = mask(PredictConfig(threshold=t), tmp_path / "raw")
    n_raw = ndimage.label(raw, structure=np.ones((3, 3, 3)))[1]
    assert n_raw > 1
    loaded.config["min_component_fraction"] = 1.0
    largest = mask(PredictConfig(threshold=t), tmp_path / "largest")
    assert ndimage.label(largest, structure=np.ones((3, 3, 3)))[1] == 1
    assert (largest <= raw).all() and largest.sum() < raw.sum()
    overridden = mask(PredictConfig(threshold=t, min_component_fraction=0.0), tmp_path / "all")
    assert (overridden == raw).all()


def test_unknown_registered_model_fails_before_ray_starts(cohort, tmp_path, model_uri):
    # model_uri: a tracking database that exists and holds another model
    with pytest.raises(InputError, match="cannot load model models:/no-such-model@champion"):
        predict("models:/no-such-model@champion", str(cohort), str(tmp_path / "o"))


def test_actor_that_cannot_load_the_model_reports_it_per_case(cohort, tmp_path, mlflow_uri):
    # What a Ray Data actor does with a URI only it can check (runs:/, a path...).
    actor = CasePredictor(
        model_uri=str(tmp_path / "not-a-model"),
        reader=CaseReader.for_input(str(cohort)),
        out_dir=str(tmp_path),
        config=PredictConfig(),
        threads=1,
    )
    out = _merged(actor({"case_id": np.array(["ras", "lps"], dtype=object)}))
    assert out["status"] == ["model_error", "model_error"]
    assert "not-a-model" in out["error"][0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_actor_without_cuda_says_so(cohort, tmp_path):
    actor = CasePredictor(
        model_uri="unused",
        reader=CaseReader.for_input(str(cohort)),
        out_dir=str(tmp_path),
        config=PredictConfig(gpus_per_worker=1),
        threads=1,
    )
    out = _merged(actor({"case_id": np.array(["ras"], dtype=object)}))
    assert out["status"] == ["model_error"] and "no CUDA device" in out["error"][0]


def test_bad_inputs_fail_before_ray_starts(tmp_path, cohort):
    with pytest.raises(InputError, match="not found"):
        CaseReader.for_input(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="needs a store"):
        CaseReader.for_input(str(cohort)).case_ids(fold=0)
    reader = CaseReader.for_input(str(cohort))
    assert reader.case_ids() == sorted(["broken", "lps", "oblique", "ras", "unlabelled"])
    assert pickle.loads(pickle.dumps(reader))._index is None  # only the reference travels


def test_reader_paths_are_absolute_and_a_4d_file_is_a_cohort(cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(cohort.parent)
    assert CaseReader.for_input(cohort.name).path == str(cohort.resolve())  # actors' cwd differs
    image, _ = _canonical_case(0)
    path = tmp_path / "dyn.nii.gz"
    _save(path, np.moveaxis(_ras_file(image), 0, -1), RAS)  # (i, j, k, T) as dcm2niix writes
    reader = CaseReader.for_input(str(path))
    assert reader.case_ids() == ["dyn"]
    assert np.array_equal(reader.read("dyn").image, image)


def test_reader_gives_canonical_arrays_for_every_orientation(cohort):
    reader = CaseReader.for_input(str(cohort))
    ras = reader.read("ras")
    for name in ORIENTATIONS:
        case = reader.read(name)
        assert case.image.shape == (T, *CANON)
        assert np.array_equal(case.image, ras.image), name
        assert np.array_equal(case.mask, ras.mask), name
        assert case.percentiles == ras.percentiles
    assert reader.read("unlabelled").mask is None
    with pytest.raises(InputError, match="broken_0001"):
        reader.read("broken")


@pytest.mark.parametrize(
    ("config", "n_cases", "resources", "expected"),
    [
        (PredictConfig(), 5, {"CPU": 2}, (2, 1.0)),  # one actor per CPU
        (PredictConfig(), 1, {"CPU": 16}, (1, 16.0)),  # one case still uses every core
        (PredictConfig(workers=3), 10, {"CPU": 12}, (3, 4.0)),
        (PredictConfig(gpus_per_worker=1), 10, {"CPU": 16, "GPU": 4}, (4, 1.0)),
        (PredictConfig(gpus_per_worker=0.5), 3, {"CPU": 16, "GPU": 4}, (3, 1.0)),  # <= cases
    ],
)
def test_pool_size(config, n_cases, resources, expected):
    assert _plan_workers(config, n_cases, resources) == expected


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (PredictConfig(gpus_per_worker=1), "has 0 GPUs"),
        (PredictConfig(workers=0), "at least 1"),
    ],
)
def test_bad_pool_flags(config, match):
    with pytest.raises(InputError, match=match):
        _plan_workers(config, 4, {"CPU": 2})


# --------------------------------------------------------------------------------------------
# Hostile input: case IDs that name paths, links out of OUT, outputs that would lose data
# --------------------------------------------------------------------------------------------

OLD_COLUMNS = [  # summary.csv's columns before `warnings` was added: kept, in this order
    *("case_id", "status", "dice", "hd95_mm", "sensitivity", "pred_voxels", "gt_voxels"),
    *("seconds", "error"),
]
RECORD = {  # what the cohort's RAS cases look like: 3 phases, (Z, Y, X) = (2, 0.7, 0.7) mm
    "phases": [3, 3],
    "spacing_mm_min": [2.0, 0.7, 0.7],
    "spacing_mm_max": [2.0, 0.7, 0.7],
    "orientations": ["RAS"],
}


def _tree(root, skip) -> dict:
    """Every entry under `root` outside `skip`: kind and content (links: where they point)."""
    out = {}
    for folder, dirs, files in os.walk(root):  # does not follow links
        for name in dirs + files:
            p = Path(folder) / name
            if p == skip or skip in p.parents:
                continue
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_file():
                out[key] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[key] = ("dir",)
    return out


def _cli(argv, capsys) -> tuple[int, list[str], str]:
    """(exit status, the `error:` lines, all of stderr) of `tsesnet ARGV`."""
    from tsesnet.cli import main

    status = main(argv)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("error:")], err


def _rows(out) -> dict:
    return {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}


def _merged(batches) -> dict[str, list]:
    """The single-row batches a `CasePredictor` call yields, as one batch."""
    out: dict[str, list] = {}
    for batch in batches:
        for k, v in batch.items():
            out.setdefault(k, []).extend(v)
    return out


@pytest.fixture(scope="module")
def loaded(model_uri):
    from tsesnet.registry import load_model

    return load_model(model_uri)


@pytest.fixture(scope="module")
def record_uri(model_uri, tmp_path_factory):
    """A second model in the same registry, registered with a record of its training data."""
    return _register_tiny(
        None,
        name="tsesnet-predict-record",
        training_record=TrainingRecord.from_model_config({"training_data": RECORD})[0],
    )


def write_hostile_cohort(root):
    """nnU-Net layout: `A` and `A_prob` (labelled), cases unlike RECORD (orientation, phases,
    spacing) and two whose file names make unsafe case IDs (a name starting with `.` is a hidden
    file, never a case)."""
    image, mask = _canonical_case(0)
    other, other_mask = _canonical_case(2)
    coarse = RAS.copy()
    coarse[2, 2] = 4.0  # Z spacing 4 mm: beyond 1.5 x the 2 mm trained on
    lps_file, lps_affine = ORIENTATIONS["lps"]
    cases = [
        ("A", image, mask, RAS, lambda a: a, T),
        ("A_prob", other, other_mask, RAS, lambda a: a, T),
        ("lps", image, None, lps_affine, lps_file, T),
        ("two_phase", image, None, RAS, lambda a: a, 2),
        ("coarse", image, None, coarse, lambda a: a, T),
        ("a\\..\\..\\victim\\y", image, None, RAS, lambda a: a, T),
        ("__init__", image, None, RAS, lambda a: a, T),
    ]
    for name, img, msk, affine, to_file, phases in cases:
        for t in range(phases):
            _save(root / "imagesTr" / f"{name}_{t:04d}.nii.gz", to_file(_ras_file(img))[t], affine)
        if msk is not None:
            _save(root / "labelsTr" / f"{name}.nii.gz", to_file(_ras_file(msk)), affine)
    return root


@pytest.mark.slow
def test_a_model_without_a_training_record_is_noted_once(raw_run):
    _, out, err = raw_run
    assert err.count("note: the model has no record of its training data") == 1
    assert "warning:" not in err
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[: len(OLD_COLUMNS) + 1] == [*OLD_COLUMNS, "warnings"]
    assert all(r["warnings"] == "" for r in _rows(out).values())


@pytest.mark.slow
def test_a_forged_store_index_touches_nothing_outside_out(model_uri, store, tmp_path, capsys):
    """The index names cases `../../victim/x` and `/abs/.../victim/y`; real case groups and
    precious files wait where those names lead (read from, written to, unlinked by a run that
    followed them)."""
    root = tmp_path / "a" / "b"
    forged, victim, out = root / "store.zarr", tmp_path / "a" / "victim", root / "out"
    shutil.copytree(store, forged)
    meta = json.loads((forged / "zarr.json").read_text())
    cases = meta["attributes"]["cases"]
    cases["../../victim/x"] = cases.pop("lps")
    cases[str(victim / "y")] = cases.pop("oblique")
    (forged / "zarr.json").write_text(json.dumps(meta))
    for name, group in (("x", "lps"), ("y", "oblique")):
        shutil.copytree(store / group, victim / name)
        (victim / f"{name}.nii.gz").write_bytes(b"precious")
    before = _tree(tmp_path, out)

    argv = ["predict", "--model", model_uri, "--input", str(forged), "--workers", "2"]
    status, errors, err = _cli([*argv, "--output", str(out)], capsys)
    assert _tree(tmp_path, out) == before
    assert "Traceback" not in err
    if status == 2:  # data_store's open_store refusing forged indexes itself is fine too
        assert len(errors) == 1 and "victim" in errors[0]
    else:
        assert status == 1
        rows = _rows(out)
        assert set(rows) == {"ras", "unlabelled", "../../victim/x", str(victim / "y")}
        assert rows["ras"]["status"] == rows["unlabelled"]["status"] == "ok"
        for forged_id in ("../../victim/x", str(victim / "y")):
            assert rows[forged_id]["status"] == "error"
            assert rows[forged_id]["error"].startswith(f"unsafe case ID {forged_id!r}")
        assert sorted(p.name for p in out.iterdir()) == [
            "prediction.json",
            "ras.nii.gz",
            "report",
            "report.html",
            "summary.csv",
            "unlabelled.nii.gz",
        ]
        assert sorted(p.name for p in (out / "report").iterdir()) == ["ras.png", "unlabelled.png"]

    # An output inside the input store is refused before anything starts.
    argv = ["predict", "--model", model_uri, "--input", str(store), "--workers", "2"]
    status, errors, _ = _cli([*argv, "--output", str(store / "preds")], capsys)
    assert status == 2 and len(errors) == 1 and "inside the input store" in errors[0]
    assert not (store / "preds").exists()


def test_an_edited_case_attribute_fails_that_case_not_ok_on_a_wrong_grid(
    model_uri, store, tmp_path, capsys
):
    """The issue: an affine moved 500 mm in a case's zarr.json used to predict "ok", writing
    the mask on the wrong grid. The record vouches for the attributes: that case fails alone."""
    edited, out = tmp_path / "store.zarr", tmp_path / "out"
    shutil.copytree(store, edited)
    meta_path = edited / "lps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["geometry"]["affine"][0][3] -= 500.0
    meta_path.write_text(json.dumps(meta))
    argv = ["predict", "--model", model_uri, "--input", str(edited), "--workers", "2"]
    status, _, err = _cli([*argv, "--output", str(out)], capsys)
    assert "Traceback" not in err
    rows = _rows(out)
    assert status == 1 and rows["ras"]["status"] == "ok"
    assert rows["lps"]["status"] == "error"
    assert "case attributes differ from the integrity record" in rows["lps"]["error"]
    assert not (out / "lps.nii.gz").exists()


@pytest.fixture(scope="module")
def hostile_run(ray_session, record_uri, tmp_path_factory):
    """`tsesnet predict --probabilities` on the hostile cohort with the recorded model."""
    from tsesnet.cli import main

    root = tmp_path_factory.mktemp("hostile")
    cohort = write_hostile_cohort(root / "cohort")
    out = root / "out"
    before = _tree(root, out)
    argv = ["predict", "--model", record_uri, "--input", str(cohort), "--output", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([*argv, "--workers", "2", "--probabilities"])
    return status, cohort, out, err.getvalue(), before == _tree(root, out)


@pytest.mark.slow
def test_hostile_file_names_fail_alone_and_write_nothing_outside_out(hostile_run):
    status, _, out, err, untouched = hostile_run
    assert status == 1 and untouched
    rows = _rows(out)
    for bad in ("a\\..\\..\\victim\\y", "__init__"):
        assert rows[bad]["status"] == "error"
        assert rows[bad]["error"].startswith(f"unsafe case ID {bad!r}")
        assert f"error: case {bad}: unsafe case ID" in err
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {
        "A",
        "A_prob",
        "lps",
        "two_phase",
        "coarse",
    }
    assert not list(out.glob("*victim*")) and not list(out.glob("__init__*"))


@pytest.mark.slow
def test_probability_maps_never_collide_with_case_ids(hostile_run):
    from tsesnet.serving.evaluate import evaluate_dirs

    _, cohort, out, _, _ = hostile_run
    a_mask, a_prob = nib.load(str(out / "A.nii.gz")), nib.load(str(_prob(out, "A")))
    b_mask, b_prob = nib.load(str(out / "A_prob.nii.gz")), nib.load(str(_prob(out, "A_prob")))
    assert a_mask.get_data_dtype() == b_mask.get_data_dtype() == np.uint8
    assert a_prob.get_data_dtype() == b_prob.get_data_dtype() == np.float32
    assert not np.array_equal(a_prob.get_fdata(), b_prob.get_fdata())  # two cases, two maps
    # evaluate reads the same layout: both are cases, the probabilities/ folder is not read
    report = evaluate_dirs(out, cohort / "labelsTr")
    assert [(c.case_id, c.status) for c in report.cases] == [("A", "ok"), ("A_prob", "ok")]


@pytest.mark.slow
def test_cases_unlike_the_training_data_are_warned_about(hostile_run):
    _, _, out, err, _ = hostile_run
    rows = _rows(out)
    expected = {
        "A": "",
        "A_prob": "",
        "lps": "",  # reoriented like every case before the model sees it: no reason to warn
        "two_phase": "2 phases (trained on 3)",
        "coarse": "Z spacing 4 mm (trained on 2 mm)",
    }
    for case_id, text in expected.items():
        assert rows[case_id]["warnings"] == text, case_id
        if text:  # one line per case, not an error
            assert f"warning: case {case_id}: unlike the training data: {text}\n" in err
    assert err.count("warning:") == 2 and "note:" not in err


def test_unsafe_ids_are_refused_before_anything_is_read_or_removed(loaded, cohort, tmp_path):
    from tsesnet.serving.case import predict_case

    out, victim = tmp_path / "a" / "b" / "out", tmp_path / "a" / "victim"
    out.mkdir(parents=True)
    victim.mkdir()
    for name in ("x", "y"):
        (victim / f"{name}.nii.gz").write_bytes(b"precious")  # what an error clean-up unlinks
    before = _tree(tmp_path, out)
    reader = CaseReader.for_input(str(cohort))
    for case_id in [
        "../../victim/x",
        "..\\..\\victim\\x",
        str(victim / "y"),  # absolute: `OUT / ID` would discard OUT
        "../victim",
        ".hidden",
        "__x",
        "zarr.json",
        "a\nb",
        "",
    ]:
        row = predict_case(loaded, reader, case_id, out, PredictConfig(probabilities=True))
        assert row["status"] == "error"
        # "unsafe" and not "no such case": refused before the reader was asked
        assert row["error"].startswith(f"unsafe case ID {case_id!r}"), row["error"]
        assert "\n" not in row["error"]
    assert _tree(tmp_path, out) == before and not list(out.iterdir())


def test_links_out_of_the_output_folder_are_never_followed(loaded, cohort, tmp_path):
    from tsesnet.serving.case import predict_case

    out, outside = tmp_path / "out", tmp_path / "outside"
    (outside / "maps").mkdir(parents=True)
    for name in ("ras", "broken"):
        (outside / name).write_bytes(b"precious")
        (out / f"{name}.nii.gz").parent.mkdir(exist_ok=True)
        (out / f"{name}.nii.gz").symlink_to(outside / name)
    reader = CaseReader.for_input(str(cohort))
    before = _tree(tmp_path, out)
    for case_id in ("ras", "broken"):  # an ok case and one whose clean-up would unlink
        row = predict_case(loaded, reader, case_id, out, PredictConfig())
        assert row["status"] == "error" and "outside the output folder" in row["error"]
        assert (out / f"{case_id}.nii.gz").is_symlink()
    (out / "probabilities").symlink_to(outside / "maps")
    row = predict_case(loaded, reader, "lps", out, PredictConfig(probabilities=True))
    assert row["status"] == "error" and "outside the output folder" in row["error"]
    assert _tree(tmp_path, out) == before
    assert not (out / "lps.nii.gz").exists()  # refused before anything was written


def _four_d_cohort(folder):
    image, _ = _canonical_case(0)
    _save(folder / "dyn.nii.gz", np.moveaxis(_ras_file(image), 0, -1), RAS)  # (i, j, k, T)
    return folder


@pytest.mark.parametrize(
    "kind",
    ["file", "labels", "4d_input", "summary_dir", "probabilities_link", "under_a_file"],
)
def test_outputs_that_would_lose_data_exit_2_with_one_line(
    kind, model_uri, cohort, tmp_path, capsys
):
    src, extra = str(cohort), []
    if kind == "file":
        out = tmp_path / "out.txt"
        out.write_text("mine")
    elif kind == "labels":  # predictions would overwrite the ground truth
        out = cohort / "labelsTr"
    elif kind == "4d_input":  # CASE.nii.gz is both the scan and the mask's name
        out = _four_d_cohort(tmp_path / "dyn")
        src = str(out)
    elif kind == "summary_dir":
        out = tmp_path / "out"
        (out / "summary.csv").mkdir(parents=True)
    elif kind == "probabilities_link":
        out, extra = tmp_path / "out", ["--probabilities"]
        out.mkdir()
        (tmp_path / "elsewhere").mkdir()
        (out / "probabilities").symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / "f").write_text("mine")
        out = tmp_path / "f" / "out"
    before = _tree(tmp_path, tmp_path / "none") if kind != "labels" else _tree(cohort, cohort / "x")
    argv = ["predict", "--model", model_uri, "--input", src, "--output", str(out), *extra]
    status, errors, err = _cli(argv, capsys)
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    match = {
        "file": "must be a folder, but this is a file",
        "labels": "holds input files (lps.nii.gz and 2 more)",
        "4d_input": "holds input files (dyn.nii.gz)",
        "summary_dir": "summary.csv here is a folder",
        "probabilities_link": "probabilities here is not a folder of its own",
        "under_a_file": "cannot create the output folder",
    }[kind]
    assert match in errors[0]
    after = _tree(tmp_path, tmp_path / "none") if kind != "labels" else _tree(cohort, cohort / "x")
    assert after == before


def test_model_must_name_exactly_one_model(model_uri, cohort, tmp_path, capsys):
    import mlflow

    from tsesnet.serving.predict import check_model_uri

    models = tmp_path / "models"
    for name in ("a", "b"):
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(models / name))
    argv = ["predict", "--input", str(cohort), "--output", str(tmp_path / "out")]
    status, errors, _ = _cli([*argv, "--model", str(models)], capsys)
    assert status == 2 and len(errors) == 1
    assert "exactly one model" in errors[0] and "a/artifacts, b/artifacts" in errors[0]
    assert ": --model must name exactly one model" in errors[0]  # the parameter by its flag
    assert not (tmp_path / "out").exists()
    check_model_uri(str(models / "a"))  # one model: accepted
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a TSESNet model"):
        check_model_uri(str(tmp_path / "empty"))


def test_input_folders_inside_a_cohort(tmp_path, model_uri, capsys):
    from nifti_factory import write_mamamia, write_nnunet

    write_nnunet(tmp_path / "c", 2, test_cases=1)
    test = CaseReader.for_input(str(tmp_path / "c" / "imagesTs"))
    assert (test.path, test.case_ids()) == (str(tmp_path / "c"), ["case_002"])
    train = CaseReader.for_input(str(tmp_path / "c" / "imagesTr"))
    assert train.case_ids() == ["case_000", "case_001"]
    assert train.read("case_000").mask is not None  # labelsTr still pairs with it
    write_mamamia(tmp_path / "m")
    assert CaseReader.for_input(str(tmp_path / "m" / "images")).path == str(tmp_path / "m")

    shutil.copytree(tmp_path / "c" / "imagesTr", tmp_path / "loose")  # not in a cohort any more
    argv = ["predict", "--model", model_uri, "--output", str(tmp_path / "out")]
    for folder, match in (
        (
            tmp_path / "c" / "labelsTr",
            f"holds masks, not scans: pass the cohort folder above it ({tmp_path / 'c'})",
        ),
        (
            tmp_path / "loose",
            "one 3D file per phase, not one 4D file per case: pass the cohort folder above it",
        ),
    ):
        status, errors, _ = _cli([*argv, "--input", str(folder)], capsys)
        assert status == 2 and len(errors) == 1 and match in errors[0], errors


def _comparable(row: dict) -> dict:
    """A row without its timing, NaN as None (NaN != NaN)."""
    return {
        k: None if isinstance(v, float) and v != v else v for k, v in row.items() if k != "seconds"
    }


def test_prefetch_and_serial_give_the_same_rows_and_files(loaded, cohort, tmp_path):
    from tsesnet.serving.case import predict_cases

    reader = CaseReader.for_input(str(cohort))
    ids = reader.case_ids()  # "broken" among them: its error must not stop the next cases
    rows = {}
    for depth in (0, 1, 2):
        config = PredictConfig(probabilities=True, prefetch=depth)
        (tmp_path / str(depth)).mkdir()
        rows[depth] = list(predict_cases(loaded, reader, ids, tmp_path / str(depth), config))
    for depth in (1, 2):
        assert [r["case_id"] for r in rows[depth]] == ids
        for a, b in zip(rows[0], rows[depth], strict=True):
            assert _comparable(a) == _comparable(b)
        for case_id in ids:
            for path in (Path(f"{case_id}.nii.gz"), Path("probabilities") / f"{case_id}.nii.gz"):
                a, b = tmp_path / "0" / path, tmp_path / str(depth) / path
                assert a.exists() == b.exists() == (case_id != "broken")
                if a.exists():
                    assert np.array_equal(nib.load(str(a)).dataobj, nib.load(str(b)).dataobj)
    assert [r["status"] for r in rows[1]].count("error") == 1


def test_one_case_is_predicted_where_ray_cannot_be_imported(cohort, tmp_path):
    """`tsesnet.serving.case` is the Ray-free half of prediction: a case is read, segmented,
    written and scored in a process where `import ray` fails."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from tsesnet.model import build_model\n"
        "from tsesnet.serving.case import PredictConfig, predict_case\n"
        "from tsesnet.serving.inputs import CaseReader\n"
        "from tsesnet.tracking.registry import LoadedModel\n"
        "torch.manual_seed(0)\n"
        "model = LoadedModel(build_model('tiny').eval(), (16, 32, 32), {}, 'tiny')\n"
        "reader = CaseReader.for_input(sys.argv[1])\n"
        "row = predict_case(model, reader, 'ras', sys.argv[2], PredictConfig())\n"
        "print(row['status'], row['error'], row['picture_error'], 'ray' in sys.modules)\n"
    )
    argv = [sys.executable, "-c", code, str(cohort), str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "False"], out.stdout
    assert (tmp_path / "ras.nii.gz").is_file() and (tmp_path / "report" / "ras.png").is_file()


@pytest.mark.parametrize(
    ("n_cases", "workers", "prefetch", "expected"),
    [
        (16, 2, 1, 4),  # each actor gets 2 calls or more
        (100, 2, 1, 8),  # at most MAX_CASES_PER_CALL
        (3, 2, 1, 1),
        (5, 1, 1, 3),
        (16, 2, 0, 1),  # no read-ahead: one case per call, as before
    ],
)
def test_cases_per_call(n_cases, workers, prefetch, expected):
    from tsesnet.serving.predict import cases_per_call

    assert cases_per_call(n_cases, workers, prefetch) == expected


def test_training_record_rules():
    from tsesnet.common.training_record import NO_RECORD

    record, note = TrainingRecord.from_model_config({"training_data": RECORD})
    assert note == ""
    ok = (3, (2.0, 0.7, 0.7))
    assert record.unlike(*ok) == []
    # 1.5x either way is still alike; beyond it is not (per axis, Z Y X)
    assert record.unlike(3, (2.99, 0.47, 1.04)) == []
    assert record.unlike(3, (3.01, 0.46, 0.7)) == [
        "Z spacing 3.01 mm (trained on 2 mm)",
        "Y spacing 0.46 mm (trained on 0.7 mm)",
    ]
    # a record without obliquity (kept before it was) checks none; orientations are no reason
    assert record.unlike(6, (2.0, 0.7, 0.7), 40.0) == ["6 phases (trained on 3)"]
    oblique, _ = TrainingRecord.from_model_config(
        {"training_data": {**RECORD, "obliquity_deg_max": 6.0}}
    )
    assert oblique.unlike(3, (2.0, 0.7, 0.7), 15.9) == []  # within 10 degrees of training's
    assert oblique.unlike(3, (2.0, 0.7, 0.7), 30.0) == [
        "oblique by 30 degrees after reorienting (trained on at most 6)"
    ]
    wide, _ = TrainingRecord.from_model_config({"training_data": {"phases": [3, 6]}})
    assert wide.unlike(2, (9.0, 9.0, 9.0)) == ["2 phases (trained on 3-6)"]
    assert TrainingRecord.from_model_config({}) == (None, NO_RECORD)
    assert TrainingRecord.from_model_config({"training_data": None}) == (None, NO_RECORD)
    bad_records = ({"phases": [3]}, {"spacing_mm_min": [1, 2]}, {"orientations": "RAS"}, [])
    for bad in (*bad_records, {"obliquity_deg_max": -1}):
        record, note = TrainingRecord.from_model_config({"training_data": bad})
        assert record is None and "malformed" in note


def test_predicting_a_stores_test_split(ray_session, model_uri, tmp_path, capsys):
    """`tsesnet synth --test-cases` then `ingest`: the test cases are the store's test split, and
    `predict --split test` predicts those only (`--split` on a raw folder is one line, exit 2)."""
    from tsesnet.cli import main

    raw, store = tmp_path / "raw", tmp_path / "s.zarr"
    assert main(["synth", str(raw), "--cases", "3", "--test-cases", "1", "--shape", "16", "32",
                 "32", "--phases", str(T)]) == 0  # fmt: skip
    assert main(["ingest", str(raw), str(store), "--folds", "2"]) == 0
    test_ids = sorted(
        p.name.removesuffix("_0000.nii.gz") for p in (raw / "imagesTs").glob("*_0000*")
    )
    out = tmp_path / "out"
    argv = ["predict", "--model", model_uri, "--input", str(store), "--output", str(out)]
    assert main([*argv, "--split", "test", "--workers", "1"]) in (0, 1)
    assert sorted(_rows(out)) == test_ids
    capsys.readouterr()
    assert (
        main([*argv[:3], "--input", str(raw), "--output", str(tmp_path / "o2"), "--split", "test"])
        == 2
    )
    assert "--split needs a store input" in capsys.readouterr().err
