"""TA (Eq. 1-5) and TSFF (Eq. 8-9) against literal implementations of the paper's equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsesnet.model import ModelConfig, build_model, fusion
from tsesnet.model.blocks import live_taps
from tsesnet.model.fusion import (
    FUSIONS,
    MeanPool,
    STTLevel,
    TemporalConvLevel,
    TSFFBottleneck,
    TSFFLevel,
)
from tsesnet.model.ta import TumorAware, fit_taps
from tsesnet.programs.model_summary import _LiveBytes


@pytest.fixture(autouse=True)
def _float64():
    """Literal references agree with the modules to round-off only in float64."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _randomize(module):
    """Non-trivial norm affines and biases, so the references test them too."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


# ---------------------------------------------------------------- TA, Eq. 1-5


def ta_literal(ta: TumorAware, f: torch.Tensor) -> torch.Tensor:
    """Eq. 1-5 written out with functional ops and the module's weights."""

    def conv(i, x):  # Conv_i = atrous conv -> instance norm -> LeakyReLU
        c, n = ta.convs[i][0], ta.convs[i][1]
        y = F.conv3d(x, c.weight, None, padding=c.padding, dilation=c.dilation)
        return F.leaky_relu(F.instance_norm(y, weight=n.weight, bias=n.bias, eps=n.eps), 0.01)

    fp = {1: f, 2: conv(0, f)}  # Eq. 1, i = 1, 2
    for i in (3, 4):
        fp[i] = conv(i - 2, f + fp[i - 1])  # Eq. 1, 2 < i <= 4
    cat = torch.cat([fp[1], fp[2], fp[3], fp[4]], dim=1)  # Eq. 2
    d, h, w_ = cat.shape[2:]
    g = cat.sum(dim=(2, 3, 4)) / (w_ * h * d)  # Eq. 3
    w = torch.sigmoid(
        F.linear(F.relu(F.linear(g, ta.fc1.weight, ta.fc1.bias)), ta.fc2.weight, ta.fc2.bias)
    )  # Eq. 4
    c = f.shape[1]
    return sum(w[:, (i - 1) * c : i * c, None, None, None] * fp[i] for i in (1, 2, 3, 4))  # Eq. 5


@pytest.mark.parametrize("dilations", [(2, 2), (1, 3)])
def test_ta_matches_equations(dilations):
    ta = TumorAware(6, dilations=dilations, reduction=4)
    _randomize(ta)
    f = torch.randn(2, 6, 5, 7, 6)
    assert torch.allclose(ta(f), ta_literal(ta, f), atol=1e-10)


def test_ta_kernels_and_rates():
    ta = TumorAware(4, dilations=(2, 3))
    convs = [m[0] for m in ta.convs]
    assert [c.kernel_size[0] for c in convs] == [5, 3, 1]
    assert [c.dilation[0] for c in convs] == [2, 3, 1]
    with pytest.raises(ValueError, match="dilations"):
        TumorAware(4, dilations=(0, 2))


@pytest.mark.parametrize(
    ("kernel", "rate", "size", "expected"),
    [
        (5, 2, (3, 6, 6), ((5, 5, 5), (1, 2, 2))),  # the paper preset's bottleneck
        (3, 2, (3, 6, 6), ((3, 3, 3), (2, 2, 2))),
        (5, 2, (1, 2, 2), ((1, 3, 3), (1, 1, 1))),  # the small preset at 16x32x32
        (5, 2, (2, 4, 4), ((3, 5, 5), (1, 1, 1))),
        (5, 3, (24, 48, 48), ((5, 5, 5), (3, 3, 3))),  # fits: as configured
        (1, 1, (1, 1, 1), ((1, 1, 1), (1, 1, 1))),
    ],
)
def test_fit_taps_leaves_no_tap_off_the_map(kernel, rate, size, expected):
    ks, rs = fit_taps(kernel, rate, size)
    assert (ks, rs) == expected
    for k, r, n in zip(ks, rs, size, strict=True):
        assert live_taps(k, n, dilation=r) == k  # every tap reads a voxel


@pytest.mark.parametrize("size", [(1, 2, 2), (2, 4, 4), (3, 6, 6)])
def test_fitted_ta_trains_every_weight(size):
    """Unfitted, TA's dilated taps past the map get exactly zero gradient; fitted, none do."""
    f = torch.randn(2, 4, *size)
    for fitted, expect_dead in ((False, True), (True, False)):
        ta = TumorAware(4, dilations=(2, 2), size=size if fitted else None)
        ta(f).pow(2).sum().backward()
        dead = sum(int((c[0].weight.grad == 0).sum()) for c in ta.convs)
        assert (dead > 0) == expect_dead, (fitted, dead)
        assert torch.allclose(ta(f), ta_literal(ta, f), atol=1e-10)  # still Eq. 1-5


def test_cropped_ta_kernel_computes_what_the_full_kernels_live_taps_did():
    """At 1x2x2 a rate-1 5x5x5 kernel only ever uses its central 1x3x3 taps: the fitted TA,
    given those taps, gives the same output (cropping removes only weights that read padding)."""
    size = (1, 2, 2)
    full = TumorAware(4, dilations=(1, 1))
    fitted = TumorAware(4, dilations=(1, 1), size=size)
    _randomize(full)
    state = full.state_dict()
    for i in (0, 1):  # crop the 5x5x5 and 3x3x3 weights to the fitted kernels, centred
        w = state[f"convs.{i}.0.weight"]
        kz, ky, kx = fitted.convs[i][0].kernel_size
        cz, cy, cx = (s // 2 for s in w.shape[2:])
        state[f"convs.{i}.0.weight"] = w[
            :, :, cz - kz // 2 : cz + kz // 2 + 1, cy - ky // 2 : cy + ky // 2 + 1, cx - kx // 2 :
        ][:, :, :, :, :kx]
    fitted.load_state_dict(state)
    f = torch.randn(2, 4, *size)
    assert fitted.convs[0][0].kernel_size == (1, 3, 3)
    assert torch.allclose(fitted(f), full(f), atol=1e-12)


# ---------------------------------------------------------------- TSFF, Eq. 8-9


def _mat(conv) -> torch.Tensor:
    """The paper's right-multiplied W (C x C) of a bias-free 1x1x1 convolution: X W = conv(X)."""
    return conv.weight[:, :, 0, 0, 0].T


def tsff_literal(level: TSFFLevel, f: torch.Tensor, pool: torch.Tensor | None = None):
    """Eq. 8-9 with explicit matrices; `pool` (M x N) is P of the linear-memory form, else I."""
    b, t, c, z, y, x = f.shape
    out = []
    for bi in range(b):
        f0 = f[bi, 0].reshape(c, -1).T  # (N, d)
        p = torch.eye(f0.shape[0]) if pool is None else pool  # (M, N)
        q, k = f0 @ _mat(level.q), (p @ f0) @ _mat(level.k)  # (N, d), (M, d)
        a = torch.softmax(q @ k.T / c, dim=1)  # Eq. 8: divided by d, not sqrt(d)
        fused = f0.clone()
        for i in range(1, t):
            fi = f[bi, i].reshape(c, -1).T  # (N, d)
            w_i = a @ ((p @ fi) @ _mat(level.v))  # Eq. 8
            fused = fused + w_i * fi  # Eq. 9
        out.append(fused.T.reshape(c, z, y, x))
    return torch.stack(out)


@pytest.mark.parametrize("t", [2, 3, 5])
def test_tsff_is_eq8_when_level_fits_the_token_grid(t):
    level = TSFFLevel(6, tokens=(4, 8, 8))
    _randomize(level)
    f = torch.randn(2, t, 6, 3, 4, 5)  # N = 60 <= 256: exact N x N attention
    assert torch.allclose(level(f), tsff_literal(level, f), atol=1e-10)


@pytest.mark.parametrize("layout", ["shared", "heads"])
@pytest.mark.parametrize("t", [2, 4])
def test_tsff_exact_path_is_eq8_beyond_the_token_grid(layout, t, monkeypatch):
    """N = 60 voxels, more than the 2x2x2 grid (the first release pooled here), but within
    `exact_tokens`: Eq. 8 with its materialised N x N softmax, in either layout."""
    if layout == "heads":  # the phases-as-heads layout from this size up, for a small test
        monkeypatch.setattr(fusion, "SHARED_SOFTMAX_TOKENS", 16)
    level = TSFFLevel(6, tokens=(2, 2, 2), exact_tokens=60)
    _randomize(level)
    f = torch.randn(2, t, 6, 3, 4, 5)
    assert fusion.attention_form(60, (2, 2, 2), 60) == layout
    assert torch.allclose(level(f), tsff_literal(level, f), atol=1e-10)
    above = TSFFLevel(6, tokens=(2, 2, 2), exact_tokens=59)  # one voxel above: pooled
    above.load_state_dict(level.state_dict())
    assert fusion.attention_form(60, (2, 2, 2), 59) == "pooled"
    assert not torch.allclose(above(f), level(f), atol=1e-3)


def test_tsff_phases_as_heads_runs_a_fused_kernel_in_linear_memory(monkeypatch):
    """Q, K and V share a head size, so SDPA takes its flash kernel (on CPU here; flash or
    memory-efficient on CUDA) instead of materialising T-1 matrices of N x N."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    torch.set_default_dtype(torch.float32)
    monkeypatch.setattr(fusion, "SHARED_SOFTMAX_TOKENS", 256)
    level = TSFFLevel(8, tokens=(2, 2, 2), exact_tokens=10**6)
    peaks = []
    for z in (8, 16):  # N = 2048, 4096: an N x N float32 matrix is 16 / 64 MiB
        f = torch.randn(1, 3, 8, z, 16, 16)
        with torch.no_grad(), Ops() as ops, _LiveBytes() as tracker:
            level(f)
        assert any("flash_attention" in n for n in ops.names), ops.names
        assert not any("softmax" in n or "bmm" in n for n in ops.names)
        peaks.append(tracker.peak)
    assert peaks[1] < 4096**2 * 4 / 10, peaks  # a tenth of one N x N float32 matrix
    assert peaks[1] / peaks[0] < 2.2, peaks  # twice the voxels, about twice the memory


def pooling_matrix(shape, grid) -> torch.Tensor:
    """P (M x N): token m averages the voxels of its block (sizes divisible by the grid)."""
    zs, ys, xs = shape
    kz, ky, kx = (s // g for s, g in zip(shape, grid, strict=True))
    idx = torch.arange(zs * ys * xs)
    z, y, x = idx // (ys * xs), (idx // xs) % ys, idx % xs
    token = ((z // kz) * grid[1] + y // ky) * grid[2] + x // kx
    p = torch.zeros(grid[0] * grid[1] * grid[2], zs * ys * xs)
    p[token, idx] = 1.0 / (kz * ky * kx)
    return p


def test_tsff_linear_form_matches_its_literal_equation():
    grid = (2, 2, 3)
    level = TSFFLevel(5, tokens=grid)
    _randomize(level)
    f = torch.randn(2, 4, 5, 4, 6, 6)  # N = 144 > M = 12: keys and values pooled
    ours = level(f)
    assert torch.allclose(ours, tsff_literal(level, f, pooling_matrix((4, 6, 6), grid)), atol=1e-10)
    assert not torch.allclose(ours, tsff_literal(level, f), atol=1e-3)  # and it is a departure


def test_tsff_memory_is_linear_in_voxels():
    """At N = 131,072 voxels an N x N matrix would take 64 GiB; ours grows linearly in N."""
    torch.set_default_dtype(torch.float32)
    level = TSFFLevel(4, tokens=(4, 8, 8))
    peaks = []
    for z in (16, 32):
        f = torch.randn(1, 3, 4, z, 64, 64)
        with torch.no_grad(), _LiveBytes() as tracker:
            out = level(f)
        assert out.shape == (1, 4, z, 64, 64)
        peaks.append(tracker.peak)
    assert peaks[1] < 2**30, peaks
    assert peaks[1] / peaks[0] < 2.2, peaks  # twice the voxels, about twice the memory


@pytest.mark.parametrize(
    "overrides", [{"attn_tokens": (8, 8, 8)}, {"attn_tokens": (1, 1, 1), "attn_exact_tokens": 8}]
)
def test_tsff_bottleneck_reuses_bottleneck_weights_at_skips(overrides):
    """Exact at the 2x2x2 bottleneck through the grid (first release) or the bound (the same
    `TSFFLevel` code as `tsff`)."""
    cfg = ModelConfig(channels=(3, 4, 6), **overrides)
    fusion = TSFFBottleneck(cfg.channels, cfg)
    _randomize(fusion)
    feats = [
        torch.randn(1, 3, c, 8 // 2**i, 8 // 2**i, 8 // 2**i) for i, c in enumerate(cfg.channels)
    ]
    out = fusion(feats)
    fb = feats[-1]
    assert torch.allclose(out[-1], tsff_literal(fusion.tsff, fb), atol=1e-10)
    w = fusion.tsff.weights(fb)[0]  # (T-1, C_L, z, y, x)
    for level in range(2):
        f = feats[level][0]
        wl = F.interpolate(fusion.to_skip[level](w), size=f.shape[2:], mode="trilinear")
        assert torch.allclose(out[level][0], f[0] + (wl * f[1:]).sum(0), atol=1e-10)


# ---------------------------------------------------------------- the other strategies


def test_meanpool_is_the_temporal_mean():
    feats = [torch.randn(2, 4, 3, 2, 2, 2)]
    assert torch.allclose(MeanPool((3,), ModelConfig())(feats)[0], feats[0].mean(1))


def test_cnn_weights_are_a_convex_combination():
    level = TemporalConvLevel(3)
    _randomize(level)
    one = torch.randn(2, 1, 3, 2, 3, 4)
    assert torch.allclose(level(one.expand(2, 5, 3, 2, 3, 4)), one[:, 0], atol=1e-10)


def test_stt_attends_exactly_up_to_the_bound_and_pools_above():
    """Under the bound STT's spatial attention is the one a grid as large as the level gives
    (no pooling); one voxel above it, keys and values are pooled to the grid."""
    f = torch.randn(2, 3, 8, 4, 8, 8)  # N = 256
    exact = STTLevel(8, tokens=(2, 4, 4), head_dim=4, mlp_ratio=2, exact_tokens=256)
    _randomize(exact)
    whole = STTLevel(8, tokens=(4, 8, 8), head_dim=4, mlp_ratio=2)  # the grid holds the level
    whole.load_state_dict(exact.state_dict())
    pooled = STTLevel(8, tokens=(2, 4, 4), head_dim=4, mlp_ratio=2, exact_tokens=255)
    pooled.load_state_dict(exact.state_dict())
    assert torch.allclose(exact(f), whole(f), atol=1e-12)
    assert not torch.allclose(pooled(f), exact(f), atol=1e-3)


@pytest.mark.parametrize("spatial", [(2, 2, 2), (4, 8, 8)])
def test_stt_runs_exact_and_pooled(spatial):
    level = STTLevel(8, tokens=(2, 4, 4), head_dim=4, mlp_ratio=2)
    for t in (2, 6):
        out = level(torch.randn(2, t, 8, *spatial))
        assert out.shape == (2, 8, *spatial) and torch.isfinite(out).all()


def test_early_fusion_pads_phases_and_marks_presence():
    model = build_model("tiny", "early", max_phases=5)
    x = torch.randn(1, 3, 8, 8, 8)
    stacked = model._early_input(x)  # (1, 1, 10, Z, Y, X)
    assert stacked.shape == (1, 1, 10, 8, 8, 8)
    assert torch.equal(stacked[0, 0, :3], x[0])
    assert (stacked[0, 0, 3:5] == 0).all()
    assert (stacked[0, 0, 5:8] == 1).all() and (stacked[0, 0, 8:] == 0).all()


def test_each_fusion_name_builds_its_own_module_and_an_unknown_name_lists_the_known():
    """The name a user writes (`model.fusion`, a sweep's choice) decides the fusion module."""
    built = {name: type(build_model("tiny", name).fusion) for name in FUSIONS}
    assert len(set(built.values())) == len(FUSIONS)  # no two names share a module
    with pytest.raises(ValueError, match="unknown fusion 'transformer'") as err:
        build_model("tiny", "transformer")
    assert all(name in str(err.value) for name in FUSIONS)
