"""TSESNet end to end on the tiny preset: shapes, T handling, parameters, determinism, bad args."""

from __future__ import annotations

import pytest
import torch

from tsesnet.model import FUSIONS, PRESETS, ModelConfig, TSESNet, build_model
from tsesnet.model.ta import TumorAware

PATCH = (16, 32, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_shapes_for_every_fusion_and_phase_count(fusion):
    model = build_model("tiny", fusion).eval()
    for t in (2, 4, 6):  # one model, T changing between calls
        x = torch.randn(2, t, *PATCH)
        with torch.no_grad():
            logits, feats = model(x, return_features=True)
            if t == 2:
                assert torch.equal(logits, model(x))
        assert logits.shape == (2, 1, *PATCH)
        if fusion == "early":
            assert feats == []
            continue
        assert len(feats) == len(model.config.channels)
        for level, (f, c) in enumerate(zip(feats, model.config.channels, strict=True)):
            assert f.shape == (2, t, c, *(s // 2**level for s in PATCH))


def test_encoder_parameters_do_not_depend_on_phase_count():
    model = build_model("tiny", "tsff")
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    for t in (2, 3, 6, 9):
        model(torch.randn(1, t, *PATCH))
        assert sum(p.numel() for p in model.encoder.parameters()) == n_enc
        assert sum(p.numel() for p in model.parameters()) == n_all
    # the same shared encoder whichever fusion (early stacks phases as input channels instead)
    for fusion in ("meanpool", "cnn", "stt", "tsff_bottleneck"):
        other = build_model("tiny", fusion)
        assert sum(p.numel() for p in other.encoder.parameters()) == n_enc


def test_presets_sizes():
    assert sum(p.numel() for p in build_model("tiny").parameters()) < 1_000_000
    assert set(PRESETS) >= {"tiny", "small", "paper"}
    assert build_model("tiny").divisor == 2 ** (len(PRESETS["tiny"].channels) - 1)


def test_tumor_aware_switch():
    with_ta = build_model("tiny", "tsff")
    plain = build_model("tiny", "tsff", tumor_aware=False)
    assert any(isinstance(m, TumorAware) for m in with_ta.modules())
    assert not any(isinstance(m, TumorAware) for m in plain.modules())
    assert plain(torch.randn(1, 3, *PATCH)).shape == (1, 1, *PATCH)


def test_backward_reaches_every_parameter():
    model = build_model("tiny", "tsff")
    logits, feats = model(torch.randn(1, 3, *PATCH), return_features=True)
    (logits.mean() + sum(f.mean() for f in feats)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_cpu_determinism():
    x = torch.randn(1, 4, *PATCH)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("tiny", "tsff")
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


def test_build_from_config_and_overrides():
    model = TSESNet(ModelConfig(fusion="meanpool", channels=(4, 8, 8)))
    assert model.divisor == 4
    assert model(torch.randn(1, 2, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    assert build_model("tiny", "cnn", channels=(4, 8)).config.channels == (4, 8)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 1, *PATCH), "T >= 2"),
        ((1, 0, *PATCH), "T >= 2"),
        ((1, 3, 16, 30, 32), "multiple of 8"),
        ((1, 3, 12, 32, 32), "pad or crop"),
        ((3, *PATCH), r"\(B, T, Z, Y, X\)"),
    ],
)
def test_bad_inputs_raise(shape, match):
    model = build_model("tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_early_fusion_phase_limit():
    model = build_model("tiny", "early", max_phases=4)
    with pytest.raises(ValueError, match="max_phases"):
        model(torch.randn(1, 5, *PATCH))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "huge"}, "unknown preset.*paper.*small.*tiny"),
        ({"preset": "tiny", "fusion": "lstm"}, "unknown fusion.*cnn.*early.*meanpool.*stt.*tsff"),
        ({"preset": "tiny", "widht": 3}, "unknown model config field"),
        ({"preset": "tiny", "channels": (8,)}, "channels"),
        ({"preset": "tiny", "attn_tokens": (4, 4)}, "attn_tokens"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_unknown_fusion_in_config_raises():
    with pytest.raises(ValueError, match="unknown fusion"):
        TSESNet(ModelConfig(fusion="nope"))


def test_phases_pick_the_phases_the_network_reads():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16, 32, 32)
    single = build_model("tiny", "early", phases=(2,)).eval()
    with torch.no_grad():
        # only phase 2 matters: changing the others leaves the output as it is
        y = single(x)
        x2 = x.clone()
        x2[:, [0, 1, 3, 4, 5]] = torch.randn(1, 5, 16, 32, 32)
        assert torch.equal(y, single(x2))
        # the same weights without a selection, given phase 2 alone (T=1 is valid for early)
        plain = build_model("tiny", "early").eval()
        plain.load_state_dict(single.state_dict())
        assert torch.equal(y, plain(x[:, 2:3]))
    pair = build_model("tiny", "tsff", phases=(0, 2))
    _, feats = pair(x, return_features=True)
    assert feats[0].shape[1] == 2
    with pytest.raises(ValueError, match="reads phases"):
        pair(x[:, :2])
    with pytest.raises(ValueError, match="needs >= 2 phases"):
        build_model("tiny", "tsff", phases=(2,))
    with pytest.raises(ValueError, match="distinct"):
        build_model("tiny", "early", phases=(1, 1))


def test_series_norm_keeps_the_phases_relative_intensities():
    """A phase twice as bright must not look the same as the others after the encoder's norms
    (per-phase instance norm would erase it); with T = 1 SeriesNorm is InstanceNorm3d."""
    from torch import nn

    from tsesnet.model.blocks import SeriesNorm

    torch.manual_seed(0)
    norm = SeriesNorm(4)
    x = torch.randn(3, 4, 4, 6, 6)  # one series of T=3 phases
    x[1] = x[0] * 2.0  # phase 1 = phase 0, twice as bright
    norm.phases = 3
    y = norm(x)
    assert not torch.allclose(y[0], y[1])
    # statistics are per series: two series in one batch do not mix
    z = norm(torch.cat([x, 5 * x]))
    assert torch.allclose(z[:3], z[3:], atol=1e-5) and torch.allclose(z[:3], y, atol=1e-5)
    norm.phases = 1
    ref = nn.InstanceNorm3d(4, affine=True)
    assert torch.allclose(norm(x), ref(x), atol=1e-6)

    net = build_model("tiny", "tsff").eval()
    s = torch.rand(1, 3, 16, 32, 32)
    brighter = s.clone()
    brighter[:, 2] *= 2.0
    with torch.no_grad():
        assert not torch.allclose(net(s), net(brighter), atol=1e-4)


@pytest.mark.parametrize("fusion", ["tsff", "tsff_bottleneck"])
def test_phase_embedding_lets_tsff_see_the_order_of_the_phases(fusion):
    """Eq. 9 sums over the post-contrast phases, so the paper's TSFF gives the same mask for a
    wash-out curve and its time reversal; a phase embedding breaks that symmetry."""
    x = torch.randn(1, 5, *PATCH)
    reordered = x[:, [0, 4, 3, 2, 1]]  # post-contrast phases in reverse order
    paper = build_model("tiny", fusion).eval()
    with torch.no_grad():
        assert torch.allclose(paper(x), paper(reordered), atol=1e-5)
    ordered = build_model("tiny", fusion, phase_embedding=True, max_phases=5).eval()
    missing = ordered.load_state_dict(paper.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("phase_embedding.") for k in missing)
    with torch.no_grad():
        # zero at initialisation: the paper's network until training moves it
        assert torch.allclose(ordered(x), paper(x), atol=1e-6)
        for e in ordered.phase_embedding:
            e.normal_(std=0.5)
        assert not torch.allclose(ordered(x), ordered(reordered), atol=1e-3)
        with pytest.raises(ValueError, match="phase_embedding takes at most max_phases=5"):
            ordered(torch.randn(1, 6, *PATCH))
