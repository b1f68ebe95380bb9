"""DSC, HD95 (mm, anisotropic) and sensitivity on shapes with known answers."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from tsesnet.metrics import dice, hd95, sensitivity

SPACING = (1.5, 0.7, 0.7)  # (Z, Y, X) mm: the coarse axis is Z
SHAPE = (40, 48, 48)


def _sphere(center, radius_mm, shape=SHAPE, spacing=SPACING):
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[i] - center[i]) * spacing[i]) ** 2 for i in range(3))
    return d2 <= radius_mm**2


def _brute_hd95(p, g, spacing):
    """Surface voxels by 6-connected erosion, all pairwise distances in mm, 95th percentiles."""
    st = ndimage.generate_binary_structure(3, 1)
    sp = np.argwhere(p & ~ndimage.binary_erosion(p, st)) * spacing
    sg = np.argwhere(g & ~ndimage.binary_erosion(g, st)) * spacing
    d = cdist(sp, sg)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("axis,k", [(0, 1), (0, 3), (1, 2), (2, 5)])
def test_hd95_plates_offset_by_k_voxels(axis, k):
    """Two parallel one-voxel plates k voxels apart: every surface distance is k·spacing."""
    gt = np.zeros(SHAPE, bool)
    pred = np.zeros(SHAPE, bool)
    idx = [slice(5, 35), slice(5, 40), slice(5, 40)]
    idx[axis] = 10
    gt[tuple(idx)] = True
    idx[axis] = 10 + k
    pred[tuple(idx)] = True
    assert hd95(pred, gt, SPACING) == pytest.approx(k * SPACING[axis])
    assert hd95(gt, pred, SPACING) == pytest.approx(k * SPACING[axis])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_hd95_spheres_offset_along_the_coarse_axis(k):
    gt = _sphere((18, 24, 24), 9.0)
    pred = _sphere((18 + k, 24, 24), 9.0)
    got = hd95(pred, gt, SPACING)
    assert got == pytest.approx(_brute_hd95(pred, gt, np.array(SPACING)), rel=1e-9)
    # the Hausdorff distance (100th percentile) of a sphere shifted by k voxels is the shift
    assert hd95(pred, gt, SPACING, percentile=100) == pytest.approx(k * 1.5)
    assert 0 < got <= k * 1.5
    # the same shift in voxels along a fine axis is a smaller distance in mm
    assert hd95(_sphere((18, 24 + k, 24), 9.0), gt, SPACING, percentile=100) == pytest.approx(
        k * 0.7
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_agrees_with_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    gt = _sphere((18, 24, 24), 9.0)
    pred = ndimage.binary_dilation(_sphere((20, 22, 25), 7.0), iterations=1)
    pred &= rng.random(SHAPE) > 0.05
    ours = hd95(pred, gt, SPACING)
    theirs = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(gt)[None, None],
        percentile=95,
        spacing=SPACING,
    ).item()
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_hd95_identical_is_zero_and_border_touching_masks_work():
    gt = np.zeros(SHAPE, bool)
    gt[:10, :, :20] = True  # touches three image faces: the crop must not change surfaces
    assert hd95(gt, gt, SPACING) == 0.0
    pred = np.zeros(SHAPE, bool)
    pred[:12, :, :20] = True
    assert hd95(pred, gt, SPACING) == pytest.approx(_brute_hd95(pred, gt, np.array(SPACING)))


def test_hd95_empty_rules():
    empty = np.zeros(SHAPE, bool)
    blob = _sphere((18, 24, 24), 5.0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING, strict=True)))
    assert hd95(empty, empty, SPACING) == 0.0
    assert hd95(empty, blob, SPACING) == pytest.approx(diagonal)
    assert hd95(blob, empty, SPACING) == pytest.approx(diagonal)


def test_dice_and_sensitivity_known_values():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros_like(a)
    b[2:] = True
    half = np.zeros_like(a)
    half[:1] = True
    empty = np.zeros_like(a)
    assert dice(a, a) == 1.0
    assert dice(a, b) == 0.0
    assert dice(half, a) == pytest.approx(2 * 16 / (16 + 32))
    assert dice(empty, empty) == 1.0
    assert dice(empty, a) == 0.0
    assert sensitivity(half, a) == pytest.approx(0.5)
    assert sensitivity(a, half) == 1.0
    assert sensitivity(a, empty) == 1.0
    assert sensitivity(empty, a) == 0.0


def test_torch_and_integer_inputs_accepted_floats_refused():
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    assert dice(torch.from_numpy(a), a) == 1.0
    assert hd95(torch.from_numpy(a).bool(), a, (1, 1, 1)) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        dice(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="shape"):
        dice(a, a[:3])


@pytest.mark.parametrize("spacing", [(1, 1), (1, 0, 1), (1, -1, 1), (1, float("nan"), 1)])
def test_hd95_rejects_bad_spacing(spacing):
    a = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing)
