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


# ---------------------------------------------------------------- stored configs, fitting checks

# A `ModelConfig` as the first release stored it (registered models, run folders): the tiny
# preset's fields without `ta_patch` and `attn_exact_tokens`, after a JSON round trip.
FIRST_RELEASE_FIELDS = {
    "channels": [8, 16, 32, 48],
    "tumor_aware": True,
    "ta_start": 1,
    "ta_dilations": [2, 2],
    "ta_reduction": 4,
    "attn_tokens": [4, 8, 8],
    "stt_head_dim": 32,
    "stt_mlp_ratio": 4,
    "max_phases": 8,
    "phases": [],
    "phase_embedding": False,
}
# sha256 (first 16 hex digits) of the float64 logits the first release's code (commit fbb6a37)
# gave for `_first_release_logits` on one thread; regenerate only from that commit's code.
FIRST_RELEASE_LOGITS = {
    "tsff": "780e42be9f82cd2e",
    "stt": "fee49b3afd8bac27",
    "tsff_bottleneck": "45586138125f876a",
}


def _first_release_logits(fusion: str, fields: dict) -> str:
    import hashlib

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)  # the sum order, and so the last bits, depend on the threads
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)  # the same seed builds the same weights as the first release did
        net = build_model("tiny", fusion, **fields).eval()
        x = torch.randn(1, 3, *PATCH)
        with torch.no_grad():
            y = net(x)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    return hashlib.sha256(y.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("fusion", sorted(FIRST_RELEASE_LOGITS))
def test_a_stored_config_without_the_new_fields_rebuilds_the_first_release_network(fusion):
    """`upgrade_config` fills `ta_patch` and `attn_exact_tokens` with `ADDED`'s values, which
    rebuild the first release's network bit for bit; today's defaults give another one."""
    from tsesnet.model import upgrade_config
    from tsesnet.model.config import ADDED

    upgraded = upgrade_config(dict(FIRST_RELEASE_FIELDS))
    assert {k: upgraded[k] for k in ADDED} == {"ta_patch": [], "attn_exact_tokens": 0}
    assert _first_release_logits(fusion, upgraded) == FIRST_RELEASE_LOGITS[fusion]
    # today's defaults: level 1 exact (not tsff_bottleneck's), TA fitted to the patch
    today = _first_release_logits(fusion, dict(FIRST_RELEASE_FIELDS, ta_patch=PATCH))
    assert today != FIRST_RELEASE_LOGITS[fusion]


@pytest.mark.parametrize(
    ("preset", "overrides", "patch", "cuda", "match"),
    [
        ("tiny", {}, (15, 32, 32), False, r"data.patch \(15, 32, 32\) .* multiples of 8"),
        # not fitted: the paper's bottleneck 3x6x6 leaves 50 taps of the 5x5x5 kernel dead
        ("paper", {}, (48, 96, 96), False, r"model.ta_dilations .* 50 taps .* is \(1, 2\)"),
        ("small", {}, (16, 32, 32), False, r"model.ta_dilations .*1x2x2.*none fits"),
        ("tiny", {"ta_patch": (32, 64, 64)}, (16, 32, 32), False, "model.ta_patch"),
        # a CPU step cannot afford exact attention above 8192 voxels: level 1's 55,296
        (
            "paper",
            {"ta_patch": (48, 96, 96), "attn_exact_tokens": 65536},
            (48, 96, 96),
            False,
            r"model.attn_exact_tokens 65536 .* 55296 voxels .* fits .* is 55295",
        ),
        (
            "small",
            {"ta_patch": (32, 64, 64), "attn_exact_tokens": 10**6},
            (32, 64, 64),
            False,
            r"model.attn_exact_tokens .* 16384 voxels .* is 16383",
        ),
    ],
)
def test_check_fits_names_the_key_and_the_largest_value_that_fits(
    preset, overrides, patch, cuda, match
):
    from tsesnet.model import check_fits, model_config

    with pytest.raises(ValueError, match=match):
        check_fits(model_config(preset, "tsff", **overrides), patch, cuda=cuda)


@pytest.mark.parametrize(
    ("preset", "fusion", "patch", "overrides", "cuda"),
    [
        ("paper", "tsff", (48, 96, 96), {}, False),
        ("paper", "stt", (48, 96, 96), {}, False),
        ("small", "tsff", (16, 32, 32), {}, False),
        ("tiny", "meanpool", (16, 32, 32), {"attn_exact_tokens": 10**6}, False),  # no attention
        ("paper", "tsff", (48, 96, 96), {"attn_exact_tokens": 65536}, True),  # fused on CUDA
    ],
)
def test_fitted_configs_fit(preset, fusion, patch, overrides, cuda):
    from tsesnet.model import check_fits, fit_to_patch, model_config

    config = fit_to_patch(model_config(preset, fusion, **overrides), patch)
    assert config.ta_patch == patch
    check_fits(config, patch, cuda=cuda)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"attn_exact_tokens": -1}, "model.attn_exact_tokens must be >= 0"),
        ({"ta_patch": (15, 32, 32)}, r"model.ta_patch must be \(\) or a patch .* multiples of 8"),
        ({"ta_patch": (16, 32)}, "model.ta_patch"),
    ],
)
def test_bad_new_fields_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model("tiny", **overrides)


def test_model_spec_fits_the_network_to_the_training_patch():
    from tsesnet.training.config import ModelSpec

    spec = ModelSpec(preset="small", attn_exact_tokens=1024)
    assert spec.config().ta_patch == () and spec.config().attn_exact_tokens == 1024
    fitted = spec.build(patch=(16, 32, 32))
    assert fitted.config.ta_patch == (16, 32, 32)
    bottleneck_5 = fitted.encoder.stages[-1][1].convs[0][0]
    assert bottleneck_5.kernel_size == (1, 3, 3) and bottleneck_5.dilation == (1, 1, 1)
    with pytest.raises(ValueError, match="data.patch"):
        spec.config(patch=(16, 30, 32))
