"""Connected-component filtering (`tsesnet.postprocess`) and its choice on validation."""

import numpy as np
import pytest
from scipy import ndimage

from tsesnet.metrics import dice
from tsesnet.postprocess import CANDIDATES, choose_fraction, component_dices, keep_components


def _blobs() -> np.ndarray:
    m = np.zeros((12, 12, 12), bool)
    m[1:4, 1:4, 1:4] = True  # 27 voxels
    m[8:10, 8:10, 8:10] = True  # 8 voxels
    m[6, 11, 0] = True  # 1 voxel
    return m


def test_keep_components_by_fraction_of_the_largest():
    m = _blobs()
    assert (keep_components(m, 0.0) == m).all()
    assert keep_components(m, 0.2).sum() == 27 + 8  # 8 >= 0.2 * 27, the single voxel is not
    assert keep_components(m, 0.5).sum() == 27
    assert keep_components(m, 1.0).sum() == 27
    assert not keep_components(np.zeros((4, 4, 4), bool), 1.0).any()
    with pytest.raises(ValueError, match="min_fraction"):
        keep_components(m, 1.5)


def test_diagonal_neighbours_are_one_component():
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True  # corner-touching: 26-connectivity joins them
    m[3, 3, 0] = True
    assert keep_components(m, 1.0).sum() == 3


@pytest.mark.parametrize("seed", range(5))
def test_component_dices_match_filtering_then_scoring(seed):
    rng = np.random.default_rng(seed)
    pred = ndimage.binary_opening(rng.random((16, 20, 20)) > 0.7)
    gt = ndimage.binary_dilation(rng.random((16, 20, 20)) > 0.995, iterations=2)
    got = component_dices(pred, gt)
    assert set(got) == set(CANDIDATES)
    for f, d in got.items():
        assert d == pytest.approx(dice(keep_components(pred, f), gt), abs=1e-12)


def test_empty_prediction_and_label_score_one():
    z = np.zeros((4, 4, 4), bool)
    assert set(component_dices(z, z).values()) == {1.0}


def test_choose_fraction_picks_the_best_mean_and_the_smallest_on_ties():
    flat = {f: 0.5 for f in CANDIDATES}
    assert choose_fraction([flat, flat]) == (0.0, 0.5)
    helps = {f: 0.5 + 0.1 * (f == 0.3) for f in CANDIDATES}
    assert choose_fraction([helps, flat]) == (0.3, pytest.approx(0.55))
    f, d = choose_fraction([])
    assert f == 0.0 and np.isnan(d)


def test_filtering_removes_false_positive_islands_from_a_noisy_prediction():
    gt = np.zeros((16, 32, 32), bool)
    gt[4:10, 10:20, 10:20] = True
    pred = gt.copy()
    pred[1, 1, 1] = pred[14, 30, 2] = pred[12, 3, 28] = True
    pred[2:4, 25:27, 25:27] = True
    (best, score) = choose_fraction([component_dices(pred, gt)])
    assert dice(pred, gt) < 1.0
    assert best > 0.0 and score == 1.0
