"""`tsesnet evaluate`: metrics per case from NIfTI headers, matching by ID, missing/extra cases,
and files that are not what they claim (probability maps, duplicates, unreadable files)."""

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
    # `tsesnet predict`'s probability maps live in a sub-folder: not read
    _save(pred / "probabilities" / "b.nii.gz", _cube().astype(np.float32) * 0.7)
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
    assert (
        main(
            ["evaluate", "--pred", str(pred), "--labels", str(labels), "--pred-unchecked", "--json"]
        )
        == 1
    )
    out = json.loads(capsys.readouterr().out)
    assert out["missing"] == ["c"] and out["extra"] == ["d"]
    assert out["summary"]["n_ok"] == 2 and out["summary"]["dice"]["n"] == 2
    assert {c["case_id"] for c in out["cases"]} == {"a", "b"}


def test_cli_table_all_present_exits_zero(dirs, capsys):
    pred, labels = dirs
    (labels / "c.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--pred-unchecked"]) == 0
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
    assert main(["evaluate", "--pred", str(pred), "--labels", str(labels), "--pred-unchecked"]) == 0
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
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--labels",
                str(tmp_path / "nope"),
                "--pred-unchecked",
            ]
        )
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


def _cli(pred, labels, capsys, *extra) -> tuple[int, str, list[str]]:
    status = main(
        ["evaluate", "--pred", str(pred), "--labels", str(labels), "--pred-unchecked", *extra]
    )
    captured = capsys.readouterr()
    return status, captured.out, [ln for ln in captured.err.splitlines() if ln.startswith("error:")]


def test_a_probability_map_saved_as_a_mask_fails_that_case(dirs, capsys):
    pred, labels = dirs
    rng = np.random.default_rng(0)
    prob = (_cube() * rng.uniform(0.5, 1.0, SHAPE) + rng.uniform(0, 0.01, SHAPE)).astype(np.float32)
    _save(pred / "a.nii.gz", prob)  # scored as if thresholded at 0 it would be DSC 1.0
    report = evaluate_dirs(pred, labels)
    a = report.cases[0]
    assert a.case_id == "a" and a.status == "error" and a.dice is None
    assert a.error.startswith(f"{pred / 'a.nii.gz'}: prediction is not a binary mask: values ")
    assert f"({np.unique(prob).size} distinct values) (a probability map?)" in a.error
    assert report.cases[1].status == "ok"  # b is still scored
    assert report.summary["n_failed"] == 1 and report.summary["dice"]["n"] == 1
    status, _, errors = _cli(pred, labels, capsys)
    assert status == 1 and len(errors) == 1 and errors[0].startswith("error: case a: ")


@pytest.mark.parametrize(
    ("pred_values", "label_values", "problem"),
    [
        ((0, 255), (0, 1), "prediction is not a binary mask: values 0, 255"),
        ((0, 1), (0, 1, 2), "label is not a binary mask: values 0, 1, 2"),
        ((0.0, 1.0, np.nan), (0, 1), "prediction is not a binary mask: values 0, 1, nan"),
        ((0.0, 1.0), (False, True), None),  # float or bool 0/1 masks are masks
    ],
)
def test_mask_values_must_be_0_and_1(tmp_path, pred_values, label_values, problem):
    def volume(values):
        dtype = np.asarray(values).dtype
        arr = np.full(SHAPE, values[0], dtype=np.int16 if dtype.kind == "i" else dtype)
        for i, v in enumerate(values[1:]):
            arr[i, :2, :2] = v  # the same voxels in prediction and label
        return arr.astype(np.uint8) if arr.dtype == bool else arr

    _save(tmp_path / "p" / "a.nii.gz", volume(pred_values))
    _save(tmp_path / "l" / "a.nii.gz", volume(label_values))
    (case,) = evaluate_dirs(tmp_path / "p", tmp_path / "l").cases
    if problem is None:
        assert case.status == "ok" and case.dice == pytest.approx(1.0)
    else:
        assert case.status == "error" and problem in case.error


def test_suffixes_in_any_letter_case_and_ids_ending_in_prob(tmp_path, capsys):
    pred, labels = tmp_path / "pred", tmp_path / "labels"
    for name in ("X.NII.GZ", "y.Nii", "A.nii.gz", "A_prob.nii.gz"):
        _save(pred / name, _cube())
    for name in ("X.nii.gz", "y.nii", "A.nii.gz", "A_prob.nii.gz"):
        _save(labels / name, _cube())
    _save(pred / ".hidden.nii.gz", _cube())  # hidden files are not cases
    report = evaluate_dirs(pred, labels)
    assert [(c.case_id, c.status) for c in report.cases] == [
        ("A", "ok"),
        ("A_prob", "ok"),  # a case like any other: prediction keeps its maps in probabilities/
        ("X", "ok"),
        ("y", "ok"),
    ]
    assert report.missing == [] and report.extra == []
    assert _cli(pred, labels, capsys)[0] == 0


def test_two_files_for_one_case_fail_that_case_only(dirs):
    pred, labels = dirs
    _save(pred / "a.nii", _cube())
    _save(labels / "b.NII.GZ", _cube())
    report = evaluate_dirs(pred, labels)
    failed = {c.case_id: c.error for c in report.cases if c.status == "error"}
    assert failed == {
        "a": f"{pred / 'a.nii'}: two prediction files for one case: a.nii and a.nii.gz",
        "b": f"{labels / 'b.NII.GZ'}: two label files for one case: b.NII.GZ and b.nii.gz",
    }


def test_unreadable_and_4d_files_are_failed_cases_with_one_line(dirs, capsys):
    pred, labels = dirs
    raw = (pred / "a.nii.gz").read_bytes()
    (pred / "a.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated
    _save(pred / "b.nii.gz", np.stack([_cube(), _cube()], axis=-1))
    report = evaluate_dirs(pred, labels)
    a, b = report.cases
    assert a.status == b.status == "error"
    assert a.error.startswith(f"{pred / 'a.nii.gz'}: unreadable") and "\n" not in a.error
    assert b.error == f"{pred / 'b.nii.gz'}: a mask must be 3D, this is 4D (12, 16, 16, 2)"
    status, _, errors = _cli(pred, labels, capsys)
    assert status == 1 and len(errors) == 2


def test_pred_and_labels_must_differ(dirs, capsys):
    _, labels = dirs
    status, _, errors = _cli(labels, labels, capsys)
    assert status == 2 and errors == [f"error: {labels}: --pred and --labels are the same folder"]
