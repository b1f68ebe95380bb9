"""Sliding-window inference: agreement with MONAI's Gaussian mode, padding, odd sizes, batching."""

import numpy as np
import pytest
import torch
from torch import nn

from tsesnet.inference import predict_mask, sliding_window_inference, window_starts


class TinyNet(nn.Module):
    """A stand-in for TSESNet: (B, T, Z, Y, X) -> (B, 1, Z, Y, X), spatial sizes multiple of 4."""

    divisor = 4

    def __init__(self, phases=3, kernel=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv3d(phases, 4, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv3d(4, 1, 1)
        )

    def forward(self, x):
        return self.body(x)


def _volume(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "shape,overlap",
    [
        ((2, 3, 20, 37, 41), 0.5),  # odd sizes, two batch items
        ((3, 23, 16, 30), 0.25),  # (T, Z, Y, X), one axis exactly the window
        ((3, 10, 12, 9), 0.5),  # smaller than the window on every axis: pad, then crop
    ],
)
def test_matches_monai_gaussian(shape, overlap):
    inferers = pytest.importorskip("monai.inferers")
    model = TinyNet().eval()
    vol = _volume(shape)
    ours = sliding_window_inference(model, vol, patch=(16, 16, 16), overlap=overlap, batch_size=3)
    batched = vol if vol.dim() == 5 else vol[None]
    with torch.inference_mode():
        theirs = inferers.sliding_window_inference(
            batched, (16, 16, 16), 3, model, overlap=overlap, mode="gaussian", sigma_scale=0.125
        )
    assert ours.shape == (batched.shape[0], 1, *batched.shape[2:])
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert not ours.is_inference()  # callers may edit it in place
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def test_pointwise_model_is_reproduced_exactly():
    """Blending windows of a voxel-wise model must give that model's output everywhere."""
    model = TinyNet(kernel=1)
    vol = _volume((3, 21, 33, 18))
    with torch.no_grad():
        full = model(vol[None])
    out = sliding_window_inference(model, vol, patch=(8, 12, 8), overlap=0.3, batch_size=5)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_the_result():
    model = TinyNet()
    vol = _volume((3, 20, 20, 20))
    a = sliding_window_inference(model, vol, patch=(8, 8, 8), batch_size=1)
    b = sliding_window_inference(model, vol, patch=(8, 8, 8), batch_size=7)
    torch.testing.assert_close(a, b)


def test_whole_volume_window_pads_to_the_divisor_and_numpy_works():
    model = TinyNet(kernel=1)
    vol = _volume((3, 9, 10, 11)).numpy()
    out = sliding_window_inference(model, vol, patch=None)
    assert out.shape == (1, 1, 9, 10, 11)
    with torch.no_grad():
        torch.testing.assert_close(out, model(torch.from_numpy(vol)[None]), rtol=1e-5, atol=1e-6)


def test_mode_restored_and_bf16_autocast_close():
    model = TinyNet().train()
    vol = _volume((3, 16, 16, 16))
    ref = sliding_window_inference(model, vol, patch=(8, 8, 8))
    assert model.training
    bf16 = sliding_window_inference(model, vol, patch=(8, 8, 8), amp_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, ref, rtol=0.05, atol=0.05)


def test_predict_mask_shapes():
    model = TinyNet()
    vol = _volume((3, 12, 13, 14))
    mask = predict_mask(model, vol, patch=(8, 8, 8))
    assert mask.shape == (12, 13, 14) and mask.dtype == np.bool_
    logits = sliding_window_inference(model, vol, patch=(8, 8, 8))
    assert np.array_equal(mask, (torch.sigmoid(logits[0, 0]) > 0.5).numpy())
    assert predict_mask(model, vol[None], patch=(8, 8, 8)).shape == (1, 12, 13, 14)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"patch": (8, 10, 8)}, "divisor"),
        ({"overlap": 1.0}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"patch": (8, 8)}, "patch"),
    ],
)
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(TinyNet(), _volume((3, 8, 8, 8)), **kw)


def test_window_starts_cover_the_axis():
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    assert window_starts(37, 16, 0.5) == [0, 8, 16, 21]
    assert window_starts(20, 8, 0.0) == [0, 8, 12]
