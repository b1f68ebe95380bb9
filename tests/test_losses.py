"""Dice and TSC losses (paper Eq. 6, 7, 10) against literal references and their properties."""

import math

import numpy as np
import pytest
import torch

from tsesnet.losses import LossConfig, dice_loss, total_loss, tsc_loss


def _ref_tsc(features, mask, tau):
    """Eq. 6–7 written literally: every voxel, every phase an anchor; float64, plain exp."""
    total = 0.0
    for f in features:
        f = f.detach().double().numpy()  # (B, T, C, z, y, x)
        b, t_count, _, *size = f.shape
        m = mask.double().numpy()
        # max-pool the mask to the level's size (the level divides the input here)
        k = [s // z for s, z in zip(m.shape[1:], size, strict=True)]
        m = m.reshape(b, size[0], k[0], size[1], k[1], size[2], k[2]).max(axis=(2, 4, 6))
        losses = []
        for item in range(b):
            lab = m[item].reshape(-1) > 0.5
            if lab.all() or not lab.any():
                continue
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


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_tsc_matches_the_literal_equations(tau):
    torch.manual_seed(0)
    mask = _mask()
    feats = [torch.randn(2, 3, 5, 4, 4, 4), torch.randn(2, 3, 7, 2, 2, 2)]
    ours = tsc_loss(feats, mask, tau, samples_per_class=10_000)
    ref = _ref_tsc(feats, mask, tau)
    assert ours.item() == pytest.approx(ref, rel=1e-4)


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


def test_tsc_mask_is_max_pooled_so_small_tumours_survive():
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 3, 3, 3] = 1  # one voxel; the deep level is 2x2x2
    f = torch.randn(1, 2, 4, 2, 2, 2)
    assert tsc_loss([f], mask, 0.5).item() > 0


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
