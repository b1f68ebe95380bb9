"""`tsesnet evaluate`: metrics per case from NIfTI headers, matching by ID, missing/extra cases."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from data_store.errors import InputError
from tsesnet import metrics
from tsesnet.cli import main
from tsesnet.serving.evaluate import evaluate_dirs, summarize

SHAPE = (12, 16, 16)  # file (i, j, k)
# 3 mm along i, 1 mm in-plane: HD95 must use this, not voxel units.
AFFINE = np.diag([3.0, 1.0, 1.0, 1.0])


def _cube(offset=0):
    m = np.zeros(SHAPE, np.uint8)
    m[4 + offset : 8 + offset, 5:11, 5:11] = 1
    return m


def _save(path, arr, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


@pytest.fixture()
def dirs(tmp_path):
    pred, labels = tmp_path / "pred", tmp_path / "labels"
    _save(labels / "a.nii.gz", _cube())
    _save(labels / "b.nii.gz", _cube())
    _save(labels / "c.nii.gz", _cube())
    _save(pred / "a.nii.gz", _cube())  # perfect
    _save(pred / "b.nii.gz", _cube(offset=1))  # shifted one 3 mm voxel along i
    _save(pred / "b_prob.nii.gz", _cube().astype(np.float32))  # probability map: skipped
    _save(pred / "d.nii.gz", _cube())  # no label
    return pred, labels


def test_metrics_per_case_and_missing_extra(dirs):
    report = evaluate_dirs(*dirs)
    assert [c.case_id for c in report.cases] == ["a", "b"]
    assert report.missing == ["c"]
    assert report.extra == ["d"]
    a, b = report.cases
    assert a.status == "ok" and a.dice == pytest.approx(1.0) and a.hd95_mm == pytest.approx(0.0)
    assert a.sensitivity == pytest.approx(1.0)
    assert b.dice == pytest.approx(0.75)
    # Spacing comes from the header: the shift is 3 mm, not 1 voxel.
    expected = metrics.hd95(_cube(1) > 0, _cube() > 0, (3.0, 1.0, 1.0))
    assert b.hd95_mm == pytest.approx(expected)
    assert b.hd95_mm != pytest.approx(metrics.hd95(_cube(1) > 0, _cube() > 0, (1.0, 1.0, 1.0)))


def test_cli_json_and_exit_status(dirs, capsys):
    pred, labels = dirs
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["missing"] == ["c"] and out["extra"] == ["d"]
    assert out["summary"]["n_ok"] == 2 and out["summary"]["dice"]["n"] == 2
    assert {c["case_id"] for c in out["cases"]} == {"a", "b"}


def test_cli_table_all_present_exits_zero(dirs, capsys):
    pred, labels = dirs
    (labels / "c.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels)]) == 0
    text = capsys.readouterr().out
    assert "DSC" in text and "HD95 (mm)" in text and "predictions without a label (1): d" in text


def test_empty_prediction_hd95_is_the_diagonal_and_counted(dirs, capsys):
    pred, labels = dirs
    _save(pred / "c.nii.gz", np.zeros(SHAPE, np.uint8))
    report = evaluate_dirs(pred, labels)
    c = report.cases[-1]
    assert c.case_id == "c" and c.dice == pytest.approx(0.0) and c.pred_voxels == 0
    diagonal = math.sqrt((12 * 3.0) ** 2 + 16**2 + 16**2)  # mm, from the header's spacing
    assert c.hd95_mm == pytest.approx(diagonal)
    s = report.summary["hd95_mm"]
    assert s["n"] == 3 and s["n_one_empty"] == 1 and s["n_infinite"] == 0
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels)]) == 0
    assert "1 with an empty prediction or label" in capsys.readouterr().out


def test_infinite_hd95_is_left_out_of_the_mean():
    rows = [
        {"case_id": "a", "status": "ok", "dice": 0.0, "hd95_mm": math.inf, "sensitivity": 0.0},
        {"case_id": "b", "status": "ok", "dice": 1.0, "hd95_mm": 2.0, "sensitivity": 1.0},
    ]
    s = summarize(rows)["hd95_mm"]
    assert s["mean"] == pytest.approx(2.0) and s["n"] == 1 and s["n_infinite"] == 1


def test_grid_mismatch_is_a_failed_case(dirs):
    pred, labels = dirs
    _save(pred / "c.nii.gz", np.zeros((12, 16, 15), np.uint8))
    _save(pred / "a.nii.gz", _cube(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    report = evaluate_dirs(pred, labels)
    failed = {c.case_id: c.error for c in report.cases if c.status == "error"}
    assert set(failed) == {"a", "c"}
    assert "affine" in failed["a"] and "shape" in failed["c"]
    assert report.summary["n_failed"] == 2


def test_no_match_is_an_input_error(tmp_path):
    _save(tmp_path / "labels" / "x.nii.gz", _cube())
    _save(tmp_path / "pred" / "y.nii.gz", _cube())
    with pytest.raises(InputError, match="no prediction matches"):
        evaluate_dirs(tmp_path / "pred", tmp_path / "labels")
    assert (
        main(["evaluate", "--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "nope")])
        == 2
    )


def test_summary_ignores_failed_rows_and_uses_sample_sd():
    rows = [
        {"case_id": "a", "status": "ok", "dice": 0.5, "hd95_mm": 1.0, "sensitivity": None},
        {"case_id": "b", "status": "ok", "dice": 1.0, "hd95_mm": 3.0, "sensitivity": 1.0},
        {"case_id": "c", "status": "error", "dice": None, "hd95_mm": None, "sensitivity": None},
    ]
    s = summarize(rows)
    assert s["n_failed"] == 1 and s["dice"]["mean"] == pytest.approx(0.75)
    assert s["dice"]["sd"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert s["sensitivity"]["n"] == 1 and s["sensitivity"]["sd"] is None
