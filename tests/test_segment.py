"""`tsesnet.segment`: the one segment-and-score path, checked against what each caller did
before it shared it (sliding window + threshold + component filter + metrics), on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsesnet import metrics
from tsesnet.inference import sliding_window_inference
from tsesnet.postprocess import keep_components
from tsesnet.segment import score, segment

PATCH = (16, 32, 32)


@pytest.fixture(scope="module")
def case():
    from tsesnet.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1, (3, 16, 40, 36)).astype(np.float32)  # (T, Z, Y, X)
    gt = np.zeros(volume.shape[1:], bool)
    gt[4:10, 10:25, 8:20] = True
    return model, volume, gt


def test_logits_masks_and_scores_match_the_callers_former_code(case):
    model, volume, gt = case
    seg = segment(model, volume, patch=PATCH, overlap=0.5, batch_size=2)
    with torch.no_grad():
        logits = sliding_window_inference(
            model, torch.from_numpy(volume), patch=PATCH, overlap=0.5, batch_size=2
        )[0, 0]
    assert torch.equal(seg.logits, logits)
    # training (validation, science): logits > 0
    assert np.array_equal(seg.mask(), (logits > 0).numpy())
    # prediction: sigmoid > threshold, then the component filter
    prob = torch.sigmoid(logits).numpy()
    assert np.array_equal(seg.probability(), prob)
    for threshold, fraction in ((0.5, 0.0), (0.3, 0.2), (0.7, 1.0)):
        expected = keep_components(prob > threshold, fraction)
        assert np.array_equal(seg.mask(threshold, fraction), expected)
    pred = seg.mask(0.45)
    spacing = (2.0, 0.7, 0.8)
    s = score(pred.astype(np.uint8), gt, spacing)
    assert s.dice == pytest.approx(float(metrics.dice(pred, gt)))
    assert s.hd95_mm == pytest.approx(float(metrics.hd95(pred, gt, spacing)))
    assert s.sensitivity == pytest.approx(float(metrics.sensitivity(pred, gt)))
    assert (s.pred_voxels, s.gt_voxels) == (int(pred.sum()), int(gt.sum()))


def test_score_refuses_two_grids():
    with pytest.raises(ValueError, match="prediction shape"):
        score(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1.0, 1.0, 1.0))


def test_the_core_stays_free_of_ray_mlflow_and_zarr():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow', 'zarr', 'data_store'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tsesnet.segment\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
