"""`tsesnet predict`: Ray Data prediction from a registered tiny model onto the input's own grid.

The cohort: one 3-phase case (canonical 16x32x32) written in RAS, in LPS (i and j flipped) and
with an oblique affine (axes permuted and rotated 12 degrees), plus an unlabelled case and a case
whose phase-1 file is truncated. RAS, LPS and oblique hold the same voxels in canonical order, so
the (untrained) model's predictions must be the same array mapped back through each file's own
axis order, and every output must carry its phase-0 file's shape and affine exactly.
"""

from __future__ import annotations

import csv
import pickle

import nibabel as nib
import numpy as np
import pytest

from data_store.errors import InputError
from tsesnet.serving.predict import CasePredictor, CaseReader, PredictConfig, _plan_workers, predict

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


def write_cohort(root, *, broken: bool = True):
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


def _register_tiny(workdir) -> str:
    """An untrained tiny TSESNet registered in MLflow the way training registers its best model."""
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
        name="tsesnet-predict-test",
    )
    return f"models:/tsesnet-predict-test/{reg.version}"


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
    return write_cohort(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def raw_run(ray_session, model_uri, cohort, tmp_path_factory):
    """`tsesnet predict` on the raw cohort, through the CLI, with probability maps."""
    from tsesnet.cli import main

    out = tmp_path_factory.mktemp("pred_raw")
    argv = [
        "predict",
        "--model",
        model_uri,
        "--input",
        str(cohort),
        "--output",
        str(out),
        "--workers",
        "2",
        "--probabilities",
    ]
    return main(argv), out


@pytest.mark.slow
def test_outputs_land_on_each_input_grid(raw_run, cohort):
    status, out = raw_run
    for name in [*ORIENTATIONS, "unlabelled"]:
        src = nib.load(str(cohort / "imagesTr" / f"{name}_0000.nii.gz"))
        for path, dtype in (
            (out / f"{name}.nii.gz", np.uint8),
            (out / f"{name}_prob.nii.gz", np.float32),
        ):
            pred = nib.load(str(path))
            assert pred.shape == src.shape, name
            assert np.array_equal(pred.affine, src.affine), name
            assert int(pred.header["sform_code"]) == int(src.header["sform_code"])
            assert int(pred.header["qform_code"]) == int(src.header["qform_code"])
            assert pred.get_data_dtype() == dtype
    # Same canonical voxels -> the same prediction, mapped back through each file's axes.
    ras_prob = nib.load(str(out / "ras_prob.nii.gz")).get_fdata(dtype=np.float32)
    ras_mask = np.asanyarray(nib.load(str(out / "ras.nii.gz")).dataobj)
    assert np.array_equal(ras_mask, (ras_prob > 0.5).astype(np.uint8))
    for name, (to_file, _) in ORIENTATIONS.items():
        prob = nib.load(str(out / f"{name}_prob.nii.gz")).get_fdata(dtype=np.float32)
        mask = np.asanyarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
        np.testing.assert_allclose(prob, to_file(ras_prob), atol=1e-6, err_msg=name)
        assert np.array_equal(mask, to_file(ras_mask)), name


@pytest.mark.slow
def test_summary_metrics_unlabelled_and_broken_case_isolated(raw_run):
    status, out = raw_run
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

    _, out = raw_run
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    report = evaluate_dirs(out, cohort / "labelsTr")
    assert report.extra == ["unlabelled"] and report.missing == []
    for c in report.cases:  # file order + header spacing vs canonical order + stored spacing
        assert c.dice == pytest.approx(float(rows[c.case_id]["dice"]))
        assert c.hd95_mm == pytest.approx(float(rows[c.case_id]["hd95_mm"]), rel=1e-5)


@pytest.mark.slow
def test_store_and_raw_predictions_are_identical(raw_run, model_uri, cohort, tmp_path):
    from data_store.ingest import ingest

    _, raw_out = raw_run
    store = tmp_path / "store.zarr"
    report = ingest(cohort, store, folds=2, progress=False)  # the broken case is rejected
    assert len(report.rejected) == 1 and "broken" in report.rejected[0]
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
        pa = nib.load(str(out / f"{case_id}_prob.nii.gz")).get_fdata(dtype=np.float32)
        pb = nib.load(str(raw_out / f"{case_id}_prob.nii.gz")).get_fdata(dtype=np.float32)
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
    from tsesnet.serving.predict import predict_case

    loaded = load_model(model_uri)
    assert loaded.config["min_component_fraction"] == 0.0  # what `_register_tiny` stored
    reader = CaseReader.for_input(str(cohort))
    case = "ras"

    def mask(config, out):
        out.mkdir()
        assert predict_case(loaded, reader, case, out, config)["status"] == "ok"
        return np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) > 0

    predict_case(loaded, reader, case, tmp_path, PredictConfig(probabilities=True))
    prob = nib.load(str(tmp_path / f"{case}_prob.nii.gz")).get_fdata(dtype=np.float32)
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
        env={},
        threads=1,
    )
    out = actor({"case_id": np.array(["ras", "lps"], dtype=object)})
    assert out["status"] == ["model_error", "model_error"]
    assert "not-a-model" in out["error"][0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_actor_without_cuda_says_so(cohort, tmp_path):
    actor = CasePredictor(
        model_uri="unused",
        reader=CaseReader.for_input(str(cohort)),
        out_dir=str(tmp_path),
        config=PredictConfig(gpus_per_worker=1),
        env={},
        threads=1,
    )
    out = actor({"case_id": np.array(["ras"], dtype=object)})
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
