"""Dice and TSC losses (paper Eq. 6, 7, 10) against literal references and their properties."""

import math

import numpy as np
import pytest
import torch

from tsesnet.losses import (
    LOSS_ADDED,
    LossConfig,
    dice_loss,
    level_labels,
    term_gradient_norms,
    total_loss,
    tsc_loss,
)
from tsesnet.model import build_model


def _ref_labels(mask: np.ndarray, size, rule: str) -> np.ndarray:
    """Cells of a level (the level divides the input): 1 tumour, 0 background, -1 left out."""
    b = mask.shape[0]
    k = [s // z for s, z in zip(mask.shape[1:], size, strict=True)]
    cells = mask.reshape(b, size[0], k[0], size[1], k[1], size[2], k[2])
    frac = cells.mean(axis=(2, 4, 6))
    if rule == "max":
        return (cells.max(axis=(2, 4, 6)) > 0.5).astype(int)
    if rule == "majority":
        return (frac >= 0.5).astype(int)
    return np.where(frac == 1.0, 1, np.where(frac == 0.0, 0, -1))  # "pure"


def _ref_tsc(features, mask, tau, rule="max"):
    """Eq. 6–7 written literally: every voxel, every phase an anchor; float64, plain exp."""
    total = 0.0
    for f in features:
        f = f.detach().double().numpy()  # (B, T, C, z, y, x)
        b, t_count, _, *size = f.shape
        cells = _ref_labels(mask.double().numpy(), size, rule)
        losses = []
        for item in range(b):
            kept = cells[item].reshape(-1)
            if not (kept == 1).any() or not (kept == 0).any():
                continue
            lab = kept[kept >= 0] == 1  # mixed cells ("pure") are not positions at all
            z = f[item].reshape(t_count, f.shape[2], -1)[:, :, kept >= 0]  # (T, C, N)
            z = f[item].reshape(t_count, f.shape[2], -1)  # (T, C, N)
            z = z / np.linalg.norm(z, axis=1, keepdims=True)

            def sim(t1, p1, t2, p2, z=z):
                return float(z[t1, :, p1] @ z[t2, :, p2])

            n = lab.size
            for t in range(t_count):
                for p in range(n):
                    negatives = [q for q in range(n) if lab[q] != lab[p]]
                    positives = [(t, q) for q in range(n) if lab[q] == lab[p] and q != p]
                    positives += [(u, p) for u in range(t_count) if u != t]
                    neg = sum(math.exp(sim(t, p, t, q) / tau) for q in negatives)
                    pair = []
                    for u, q in positives:
                        e = math.exp(sim(t, p, u, q) / tau)
                        pair.append(-math.log(e / (e + neg)))  # Eq. 6
                    losses.append(sum(pair) / len(pair))  # 1/|Ω⁺| Σ (Eq. 7)
        if losses:
            total += sum(losses) / len(losses)  # 1/|Z| Σ_z, then Σ over levels (Eq. 7)
    return total


def _mask(b=2, size=(4, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(b, *size)
    for i in range(b):
        m[i, : size[0] // 2, 1:3, 1 + i : 3 + i] = 1
    # a few random extra voxels so the classes are not box-shaped
    m = torch.maximum(m, (torch.rand(b, *size, generator=g) > 0.9).float())
    return m


@pytest.mark.parametrize("rule", ["max", "majority", "pure"])
@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_tsc_matches_the_literal_equations(tau, rule):
    torch.manual_seed(0)
    mask = _mask()
    feats = [torch.randn(2, 3, 5, 4, 4, 4), torch.randn(2, 3, 7, 2, 2, 2)]
    ours = tsc_loss(feats, mask, tau, samples_per_class=10_000, labels=rule)
    ref = _ref_tsc(feats, mask, tau, rule)
    assert ours.item() == pytest.approx(ref, rel=1e-4)


def _cell_mask(counts: list[int]) -> torch.Tensor:
    """(1, 2, 4, 4) mask whose 2x2x2 cells hold the given numbers of tumour voxels."""
    m = torch.zeros(1, 2, 4, 4)
    for cell, count in enumerate(counts):
        y, x = 2 * (cell // 2), 2 * (cell % 2)
        block = torch.zeros(8)
        block[:count] = 1
        m[0, :, y : y + 2, x : x + 2] = block.reshape(2, 2, 2)
    return m


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # cells with 0, 1, 4 and 8 of their 8 voxels tumour
        ("max", [0, 1, 1, 1]),
        ("majority", [0, 0, 1, 1]),
        ("pure", [0, -1, -1, 1]),
    ],
)
def test_level_labels_of_mixed_cells(rule, expected):
    mask = _cell_mask([0, 1, 4, 8])
    cells = level_labels(mask, (1, 2, 2), rule)
    assert cells.dtype == torch.int8 and cells.flatten().tolist() == expected
    # at full resolution every rule is the mask itself
    assert torch.equal(level_labels(mask, (2, 4, 4), rule), mask.to(torch.int8))
    with pytest.raises(ValueError, match="labels rule"):
        level_labels(mask, (1, 2, 2), "min")


def test_tsc_class_separated_features_score_lower_than_random():
    torch.manual_seed(0)
    mask = _mask(size=(4, 8, 8))
    rand = torch.randn(2, 3, 8, 4, 8, 8)
    proto = torch.randn(2, 8)
    sep = proto[mask.long()]  # (B, Z, Y, X, C): one prototype per class
    sep = sep.permute(0, 4, 1, 2, 3)[:, None].expand(2, 3, 8, 4, 8, 8)
    sep = sep + 0.05 * torch.randn_like(sep)
    for tau in (0.1, 1e-5):
        assert tsc_loss([sep], mask, tau) < tsc_loss([rand], mask, tau)


def test_tsc_features_constant_across_phases_score_lower():
    torch.manual_seed(0)
    mask = _mask(size=(4, 8, 8))
    base = torch.randn(2, 1, 8, 4, 8, 8)
    same = base.expand(2, 4, 8, 4, 8, 8)
    differ = base + torch.randn(2, 4, 8, 4, 8, 8)
    assert tsc_loss([same], mask, 0.1) < tsc_loss([differ], mask, 0.1)


def test_tsc_finite_with_finite_gradients_at_paper_tau():
    torch.manual_seed(0)
    mask = _mask(size=(4, 8, 8))
    f1 = torch.randn(2, 3, 8, 4, 8, 8, requires_grad=True)
    f2 = torch.zeros(2, 3, 8, 2, 4, 4)
    f2[:, :, :, 0] = torch.randn(2, 3, 8, 4, 4)  # half the vectors are exactly zero (ReLU)
    f2.requires_grad_(True)
    loss = tsc_loss([f1, f2], mask, 1e-5, samples_per_class=16)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(f1.grad).all() and torch.isfinite(f2.grad).all()
    assert f1.grad.abs().sum() > 0


def test_tsc_deterministic_with_a_generator_and_bounded_sampling():
    mask = _mask(size=(8, 16, 16))
    feats = [torch.randn(2, 3, 4, 8, 16, 16)]
    a = tsc_loss(feats, mask, 0.1, samples_per_class=8, generator=torch.Generator().manual_seed(3))
    b = tsc_loss(feats, mask, 0.1, samples_per_class=8, generator=torch.Generator().manual_seed(3))
    c = tsc_loss(feats, mask, 0.1, samples_per_class=8, generator=torch.Generator().manual_seed(4))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_tsc_skips_items_without_both_classes():
    feats = [torch.randn(2, 2, 4, 4, 4, 4)]
    mask = _mask()
    mask[1] = 0  # second item has no tumour: only the first counts
    both = tsc_loss(feats, mask, 0.5, samples_per_class=1000)
    first = tsc_loss([feats[0][:1]], mask[:1], 0.5, samples_per_class=1000)
    assert both.item() == pytest.approx(first.item(), rel=1e-6)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_tsc_all_empty_is_a_zero_with_a_grad_fn(fill):
    f = torch.randn(2, 2, 4, 4, 4, 4, requires_grad=True)
    loss = tsc_loss([f], torch.full((2, 4, 4, 4), fill), 1e-5)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    assert tsc_loss([], torch.ones(2, 4, 4, 4), 1e-5).item() == 0.0


def test_one_tumour_voxel_makes_a_coarse_cell_tumour_only_under_max():
    """The first release's max-pooling called a 64-voxel cell tumour for one voxel; majority and
    pure labels leave that level without tumour, so it is skipped (contributes 0)."""
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 3, 3, 3] = 1  # one voxel; the deep level is 2x2x2 (cells of 4x4x4)
    f = torch.randn(1, 2, 4, 2, 2, 2, requires_grad=True)
    assert tsc_loss([f], mask, 0.5, labels="max").item() > 0
    for rule in ("majority", "pure"):
        assert tsc_loss([f], mask, 0.5, labels=rule).item() == 0.0
    mask[0, :2, :4, :4] = 1  # half the voxels of one cell: tumour by majority, mixed if pure
    assert tsc_loss([f], mask, 0.5, labels="majority").item() > 0
    assert tsc_loss([f], mask, 0.5, labels="pure").item() == 0.0


@pytest.mark.parametrize("bad", [{"tau": 0.0}, {"samples_per_class": 0}])
def test_tsc_rejects_bad_settings(bad):
    kw = {"tau": 0.1, "samples_per_class": 4} | bad
    with pytest.raises(ValueError):
        tsc_loss([torch.randn(1, 2, 3, 2, 2, 2)], torch.ones(1, 2, 2, 2), **kw)


def test_dice_loss_known_values():
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, :2] = 1
    perfect = (target * 2 - 1) * 50.0  # sigmoid ~ target
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, target).item() == pytest.approx(1 - 1 / 65, abs=1e-5)
    # (B, Z, Y, X) targets are accepted for (B, 1, Z, Y, X) logits
    assert dice_loss(perfect, target[:, 0]).item() == pytest.approx(0.0, abs=1e-6)
    # an empty target with an empty prediction costs nothing; a full prediction costs ~1
    empty = torch.zeros(1, 1, 4, 4, 4)
    assert dice_loss(torch.full_like(empty, -50.0), empty).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss(torch.full_like(empty, 50.0), empty).item() == pytest.approx(64 / 65)


def test_dice_loss_per_item_vs_batch():
    target = torch.zeros(2, 1, 2, 2, 2)
    target[0] = 1
    logits = torch.full_like(target, 50.0)  # predicts everything
    # per item: item 0 perfect (0), item 1 empty target with 8 false voxels (8/9)
    assert dice_loss(logits, target).item() == pytest.approx((0 + 8 / 9) / 2)
    assert dice_loss(logits, target, batch=True).item() == pytest.approx(1 - 17 / 25)


def test_total_loss_is_eq_10():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    target = _mask()
    feats = [torch.randn(2, 2, 4, 4, 4, 4, requires_grad=True)]
    cfg = LossConfig(tau=0.1)
    loss, terms = total_loss(logits, feats, target, cfg, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"dice", "tsc", "bce", "total"}
    assert terms["total"] == pytest.approx(0.7 * terms["dice"] + 0.5 * terms["tsc"], rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(feats[0].grad).all()
    with pytest.raises(TypeError):
        LossConfig(0.5)  # keyword-only
    _, no_tsc = total_loss(logits, [], target, LossConfig())
    assert no_tsc["tsc"] == 0.0 and no_tsc["total"] == pytest.approx(0.7 * no_tsc["dice"])


def test_bce_term_is_added_with_its_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, 4)
    target = _mask()
    _, plain = total_loss(logits, [], target, LossConfig(beta=0.0))
    _, with_bce = total_loss(logits, [], target, LossConfig(beta=0.0, bce=2.0))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    assert plain["bce"] == 0.0
    assert with_bce["bce"] == pytest.approx(expected.item(), rel=1e-6)
    assert with_bce["total"] == pytest.approx(plain["total"] + 2.0 * expected.item(), rel=1e-6)


def test_tsc_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    mask = _mask(size=(4, 8, 8))
    f = torch.randn(2, 3, 8, 4, 8, 8)
    ref = tsc_loss([f], mask, 1e-3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = tsc_loss([f.bfloat16()], mask, 1e-3, generator=torch.Generator().manual_seed(0))
    assert amp.dtype == torch.float32
    # only the bf16 rounding of the features themselves remains
    assert amp.item() == pytest.approx(ref.item(), rel=2e-2)


# ---------------------------------------------------------------- the TSC scale (loss.tsc_scale)


def _tsc_grad_norm(tau: float, scale: str) -> float:
    """‖∂(w·L_TSC)/∂features‖ for the weight w that `tsc_scale` gives (β = 1)."""
    torch.manual_seed(0)
    mask = _mask(size=(4, 8, 8))
    f = torch.randn(2, 3, 8, 4, 8, 8, requires_grad=True)
    cfg = LossConfig(alpha=0.0, beta=1.0, tau=tau, tsc_scale=scale)
    loss, _ = total_loss(torch.zeros(2, 1, 4, 8, 8), [f], mask, cfg)
    loss.backward()
    return float(f.grad.norm())


def test_tau_scale_keeps_the_tsc_gradient_of_one_order_at_any_temperature():
    """Eq. 6 divides similarities by τ, so "paper" grows as 1/τ (about 1e4x from τ = 1 to
    τ = 1e-5 here); "tau" (×τ/τ_base, τ_base = 1) stays within a small factor of τ = 1."""
    base = _tsc_grad_norm(1.0, "paper")
    assert _tsc_grad_norm(1.0, "tau") == pytest.approx(base, rel=1e-6)  # the rules agree at 1
    paper = {tau: _tsc_grad_norm(tau, "paper") / base for tau in (1e-3, 1e-5)}
    scaled = {tau: _tsc_grad_norm(tau, "tau") / base for tau in (1e-3, 1e-5)}
    assert paper[1e-5] > 1e3 and paper[1e-5] > 10 * paper[1e-3], paper
    assert all(0.1 < r < 10 for r in scaled.values()), scaled


def test_tau_scale_weights_tsc_by_beta_times_tau():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 4, 4, 4), _mask()
    feats = [torch.randn(2, 2, 4, 4, 4, 4)]
    g = torch.Generator
    cfg = LossConfig(tau=0.1, tsc_scale="tau")
    _, t = total_loss(logits, feats, target, cfg, generator=g().manual_seed(0))
    _, p = total_loss(logits, feats, target, LossConfig(tau=0.1), generator=g().manual_seed(0))
    assert t["tsc"] == p["tsc"]  # the logged term is Eq. 7's value under either rule
    assert t["total"] == pytest.approx(0.7 * t["dice"] + 0.5 * 0.1 * t["tsc"], rel=1e-6)
    assert cfg.tsc_weight == pytest.approx(0.05) and LossConfig(tau=0.1).tsc_weight == 0.5


def test_loss_added_values_are_the_first_release_loss():
    """What a run started before `tsc_scale` and `tsc_labels` existed trained with: Eq. 7 as
    written and max-pooled coarse labels (the literal reference above, rule "max")."""
    assert LOSS_ADDED == {"tsc_scale": "paper", "tsc_labels": "max"}
    torch.manual_seed(0)
    mask, feats = _mask(), [torch.randn(2, 3, 5, 4, 4, 4), torch.randn(2, 3, 7, 2, 2, 2)]
    cfg = LossConfig(tau=0.5, samples_per_class=10_000, **LOSS_ADDED)
    _, terms = total_loss(torch.zeros(2, 1, 4, 4, 4), feats, mask, cfg)
    assert terms["tsc"] == pytest.approx(_ref_tsc(feats, mask, 0.5, "max"), rel=1e-4)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"tau": 0.0}, "loss.tau must be > 0"),
        ({"tau": -1e-5}, "loss.tau must be > 0"),
        ({"samples_per_class": 0}, "loss.samples_per_class must be >= 1"),
        ({"alpha": -0.1}, "loss.alpha must be >= 0"),
        ({"beta": float("nan")}, "loss.beta must be >= 0"),
        ({"bce": -1.0}, "loss.bce must be >= 0"),
        ({"tsc_scale": "log"}, "loss.tsc_scale must be one of .'paper', 'tau'."),
        ({"tsc_labels": "min"}, "loss.tsc_labels must be one of .'max', 'majority', 'pure'."),
    ],
)
def test_bad_loss_config_names_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**bad)


# ---------------------------------------------------------------- term_gradient_norms


def _term(name, model, x, y, cfg, seed):
    """One weighted term of Eq. 10 (+ BCE), written out from the loss functions."""
    logits, feats = model(x, return_features=True)
    if name == "dice":
        return cfg.alpha * dice_loss(logits, y)
    if name == "bce":
        return cfg.bce * torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y)
    gen = torch.Generator().manual_seed(seed)
    tsc = tsc_loss(feats, y, cfg.tau, cfg.samples_per_class, gen, cfg.tsc_labels)
    return cfg.beta * (cfg.tau if cfg.tsc_scale == "tau" else 1.0) * tsc


def _norms_by_hand(model, x, y, cfg, seed):
    """Each weighted term backpropagated on its own into the encoder's `.grad` (the literal)."""
    out = {}
    for name in ("dice", "tsc", "bce"):
        model.zero_grad(set_to_none=True)
        _term(name, model, x, y, cfg, seed).backward()
        grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
        out[f"grad_norm_{name}"] = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("scale", ["paper", "tau"])
def test_term_gradient_norms_are_each_weighted_terms_gradient_on_the_encoder(scale):
    torch.manual_seed(0)
    model = build_model("tiny", "tsff")
    x, y = torch.randn(2, 3, 8, 16, 16), _mask(size=(8, 16, 16))
    cfg = LossConfig(alpha=0.7, beta=0.5, tau=0.1, bce=1.0, samples_per_class=32, tsc_scale=scale)
    ours = term_gradient_norms(model, x, y, cfg, generator=torch.Generator().manual_seed(3))
    assert all(p.grad is None for p in model.parameters())  # `.grad` left as it was
    ref = _norms_by_hand(model, x, y, cfg, seed=3)
    assert set(ours) == {"grad_norm_dice", "grad_norm_tsc", "grad_norm_bce"}
    for k, v in ref.items():
        assert v > 0 and ours[k] == pytest.approx(v, rel=1e-5), k
    # the weight is included: doubling α doubles the Dice norm
    cfg2 = LossConfig(alpha=1.4, beta=0.5, tau=0.1, bce=1.0, samples_per_class=32, tsc_scale=scale)
    twice = term_gradient_norms(model, x, y, cfg2, generator=torch.Generator().manual_seed(3))
    assert twice["grad_norm_dice"] == pytest.approx(2 * ours["grad_norm_dice"], rel=1e-6)


def test_term_gradient_norms_of_absent_terms_and_a_filter_that_selects_nothing():
    torch.manual_seed(0)
    x, y = torch.randn(1, 3, 8, 16, 16), _mask(b=1, size=(8, 16, 16))
    early = term_gradient_norms(build_model("tiny", "early"), x, y, LossConfig(tau=0.1))
    assert early["grad_norm_tsc"] == 0.0 and early["grad_norm_bce"] == 0.0  # no features, γ = 0
    assert early["grad_norm_dice"] > 0
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        term_gradient_norms(build_model("tiny"), x, y, LossConfig(), module_filter=lambda n: False)
