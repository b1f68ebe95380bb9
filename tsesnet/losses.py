"""Training losses: soft Dice on logits and the Temporal-Spatial Contrastive loss (§3.3, §3.5).

Shape legend: B batch, T phases, C channels, Z Y X voxels at input resolution, z y x voxels at
an encoder level, N sampled voxel positions.

The total loss is Eq. 10, ``L = α·L_Dice + β·L_TSC`` (plus ``γ·BCE`` when `LossConfig.bce` is
set; 0 by default, as in the paper), where ``L_TSC`` (Eq. 7) already sums over
the encoder levels. Eq. 10 writes a second sum over levels around ``L_TSC``; summing twice would
only rescale β by the number of levels, so the levels are summed once, here in ``tsc_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossConfig", "dice_loss", "tsc_loss", "total_loss"]


def dice_loss(
    logits: Tensor, target: Tensor, *, smooth: float = 1.0, batch: bool = False
) -> Tensor:
    """Soft Dice on logits: ``1 - (2·Σ p·g + s) / (Σ p + Σ g + s)``, ``p = sigmoid(logits)``.

    Args:
        logits: (B, 1, Z, Y, X) or (B, Z, Y, X) raw network outputs, any float dtype.
        target: the same shape (or (B, Z, Y, X) for (B, 1, Z, Y, X) logits), values in {0, 1}.
        smooth: added to numerator and denominator. With the default 1.0 a patch without tumour
            gives ``Σp / (Σp + 1)``: false positives are penalised and there is no 0/0.
        batch: False (default) computes Dice per batch item and averages the items, so every
            patch counts equally whatever its tumour size; True pools all voxels of the batch
            into one Dice (nnU-Net's "batch dice"), which is steadier when most patches are empty.

    Returns:
        A scalar float32 tensor in [0, 1].
    """
    if logits.dim() == target.dim() + 1 and logits.shape[1] == 1:
        target = target.unsqueeze(1)
    if logits.shape != target.shape:
        raise ValueError(f"dice_loss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    p = torch.sigmoid(logits.float()).flatten(1)  # (B, N)
    g = target.float().flatten(1)  # (B, N)
    if batch:
        p, g = p.reshape(1, -1), g.reshape(1, -1)
    inter = (p * g).sum(1)
    denom = p.sum(1) + g.sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def _resize_mask(mask: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Resize a binary (B, Z, Y, X) mask to (B, z, y, x) by max-pooling.

    Max-pooling marks a level voxel as tumour if any input voxel it covers is tumour, so small
    tumours survive at the deepest levels (nearest-neighbour resizing can drop a tumour of a few
    voxels entirely, leaving that level without foreground anchors). At the input resolution it
    is the identity.
    """
    m = mask.float().unsqueeze(1)  # (B, 1, Z, Y, X)
    if tuple(m.shape[2:]) != tuple(size):
        m = F.adaptive_max_pool3d(m, size)
    return m.squeeze(1) > 0.5  # (B, z, y, x) bool


def _sample_positions(
    labels: Tensor, samples_per_class: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor] | None:
    """Pick up to ``samples_per_class`` voxel indices per class from flat bool labels (N_all,).

    Returns (indices (N,), labels (N,) bool) or None when one class is absent. A class with no
    more voxels than ``samples_per_class`` is taken whole, in index order (no randomness).
    """
    picked = []
    for cls in (True, False):
        idx = (labels == cls).nonzero().squeeze(1)
        if idx.numel() == 0:
            return None
        if idx.numel() > samples_per_class:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(idx.numel(), generator=generator, device=gen_device)
            idx = idx[perm[:samples_per_class].to(idx.device)]
        picked.append(idx)
    indices = torch.cat(picked)
    return indices, labels[indices]


def _tsc_item(z: Tensor, y: Tensor, tau: float) -> tuple[Tensor, int]:
    """Eq. 6–7 for one batch item at one level, summed (not yet averaged) over anchors.

    Args:
        z: (T, N, C) L2-normalised features of N sampled positions at every phase.
        y: (N,) bool class of each position.
        tau: temperature.

    Returns:
        (sum over anchors of the per-anchor loss, number of anchors).

    Every (phase t, position i) is an anchor. Its positives Ω⁺ are the same-class positions
    j ≠ i at phase t (spatial) and the same position at the other phases t' ≠ t (temporal);
    its negatives Ω⁻ are the other-class positions at phase t. For one pair (anchor, positive),
    Eq. 6 is ``-log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ_{Ω⁻} e^{s⁻/τ})) = softplus(LSE_{Ω⁻}(s⁻/τ) - s⁺/τ)``,
    computed with log-sum-exp and softplus so it stays finite at τ = 1e-5 where e^{1/τ} overflows.
    """
    t_count, n, _ = z.shape
    sim = torch.matmul(z, z.transpose(1, 2)) / tau  # (T, N, N) spatial similarities / τ
    same = y[:, None] == y[None, :]  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    # log Σ_{Ω⁻} e^{s/τ} per anchor: the denominator's negative part in Eq. 6
    neg_lse = torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=2)  # (T, N)

    spatial_pos = same & ~eye  # (N, N)
    spatial = F.softplus(neg_lse[:, :, None] - sim)  # (T, N, N): Eq. 6 for each spatial pair
    spatial_sum = (spatial * spatial_pos).sum(2)  # (T, N)

    tsim = torch.einsum("tnc,unc->ntu", z, z) / tau  # (N, T, T) same voxel, phases t and u
    other_phase = ~torch.eye(t_count, dtype=torch.bool, device=z.device)  # (T, T)
    temporal = F.softplus(neg_lse.t()[:, :, None] - tsim)  # (N, T, T): Eq. 6 per temporal pair
    temporal_sum = (temporal * other_phase).sum(2).t()  # (T, N)

    # 1/|Ω⁺| Σ_{Ω⁺} (Eq. 7), per anchor; anchors without any positive are left out
    n_pos = spatial_pos.sum(1)[None, :] + (t_count - 1)  # (1, N)
    n_pos = n_pos.expand(t_count, n)
    valid = n_pos > 0
    per_anchor = (spatial_sum + temporal_sum)[valid] / n_pos[valid]
    return per_anchor.sum(), int(valid.sum())


def tsc_loss(
    features: list[Tensor],
    mask: Tensor,
    tau: float,
    samples_per_class: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Temporal-Spatial Contrastive loss, Eq. 6–7, summed over encoder levels.

    Per level and batch item, up to ``samples_per_class`` tumour and as many background voxel
    positions are drawn (without replacement; a class with fewer voxels is taken whole, so a
    large enough ``samples_per_class`` uses every voxel exactly as Eq. 7 does). The same
    positions are used at every phase, so the temporal positives are in the sample. Memory per
    item is O(T·N² + N·T²) with N ≤ 2·samples_per_class, independent of the patch size.
    The loss of a level is the mean of the per-anchor losses over every sampled anchor
    (position × phase) of every batch item in which both classes are present (Eq. 7's 1/|Z|).

    Empty cases: a batch item whose mask at a level has no tumour or no background has no
    negatives (or positives) to contrast and is skipped at that level; a level where every item
    is skipped contributes 0. When nothing is left at any level the result is a zero that still
    carries a grad_fn through the features (so backward and DDP see every parameter used).
    An empty ``features`` list (fusion "early" has no per-phase features) gives a plain 0.

    Similarities are computed in float32 whatever the feature dtype: under bf16 autocast
    ``s/τ`` at τ = 1e-5 would have no significant digits left.

    Args:
        features: per encoder level, (B, T, C, z, y, x) features; T ≥ 2 for temporal positives.
        mask: (B, Z, Y, X) in {0, 1} at input resolution; max-pooled to each level's size.
        tau: temperature τ > 0 (the paper uses 1e-5).
        samples_per_class: cap on sampled positions per class, per item and level.
        generator: optional torch.Generator (on the CPU) for reproducible sampling.

    Returns:
        Scalar float32 tensor.
    """
    if tau <= 0:
        raise ValueError(f"tsc_loss: tau must be > 0, got {tau}")
    if samples_per_class < 1:
        raise ValueError(f"tsc_loss: samples_per_class must be >= 1, got {samples_per_class}")
    if not features:
        return torch.zeros((), device=mask.device)
    if mask.dim() == 5 and mask.shape[1] == 1:
        mask = mask[:, 0]
    total = None
    for level, f in enumerate(features):
        if f.dim() != 6 or f.shape[0] != mask.shape[0]:
            raise ValueError(
                f"tsc_loss: level {level} features {tuple(f.shape)} are not (B, T, C, z, y, x) "
                f"for a mask of batch {mask.shape[0]}"
            )
        b, t, c = f.shape[:3]
        labels = _resize_mask(mask.to(f.device), tuple(f.shape[3:])).flatten(1)  # (B, z·y·x)
        flat = f.flatten(3)  # (B, T, C, z·y·x)
        level_sum, level_count = None, 0
        for item in range(b):
            picked = _sample_positions(labels[item], samples_per_class, generator)
            if picked is None:
                continue
            idx, y = picked
            z = flat[item][:, :, idx].float().transpose(1, 2)  # (T, N, C)
            # float32 even under autocast, which would run the matmuls in bf16
            with torch.autocast(z.device.type, enabled=False):
                z = F.normalize(z, dim=2)  # cosine similarity = dot product of unit vectors
                s, count = _tsc_item(z, y, tau)
            level_sum = s if level_sum is None else level_sum + s
            level_count += count
        if level_sum is not None and level_count > 0:
            term = level_sum / level_count  # Eq. 7: 1/|Z| Σ_z
            total = term if total is None else total + term  # Eq. 7: Σ over levels
    if total is None:
        # No level had both classes: a zero tied to the graph, with zero gradients.
        return sum(f.float().sum() * 0.0 for f in features)
    return total


@dataclass(kw_only=True)
class LossConfig:
    """Weights of Eq. 10 and the TSC settings (§3.5 defaults: α = 0.7, β = 0.5, τ = 1e-5).

    Attributes:
        bce: weight γ of a voxel-wise binary cross-entropy term added to Eq. 10 (nnU-Net's
            Dice + cross-entropy). 0, the paper's loss, by default. On short CPU budgets soft
            Dice alone on patches with a small or no tumour settles on predicting foreground
            everywhere; the cross-entropy term gives every voxel a gradient from the first step
            (measured on the synthetic cohort, see `platform/configs/small.yaml`).
    """

    alpha: float = 0.7
    beta: float = 0.5
    tau: float = 1e-5
    samples_per_class: int = 256
    bce: float = 0.0


def total_loss(
    logits: Tensor,
    features: list[Tensor],
    target: Tensor,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 10: ``L = α·Dice + β·L_TSC`` (``L_TSC`` summed over levels by ``tsc_loss``), + γ·BCE.

    Args:
        logits: (B, 1, Z, Y, X).
        features: per-level (B, T, C, z, y, x) encoder features (may be empty).
        target: (B, Z, Y, X) or (B, 1, Z, Y, X) in {0, 1}.
        config: the loss weights and TSC settings.
        generator: optional generator for the TSC sampling.

    Returns:
        (loss to backpropagate, {"dice", "tsc", "bce", "total"} as Python floats for logging).
    """
    mask = target[:, 0] if target.dim() == 5 else target  # (B, Z, Y, X)
    dice = dice_loss(logits, mask)
    if config.beta != 0:
        tsc = tsc_loss(features, mask, config.tau, config.samples_per_class, generator)
    else:
        tsc = torch.zeros((), device=logits.device)
    loss = config.alpha * dice + config.beta * tsc
    bce = torch.zeros((), device=logits.device)
    if config.bce != 0:
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), mask.reshape(logits.shape).to(torch.float32)
        )
        loss = loss + config.bce * bce
    terms = {
        "dice": float(dice.detach()),
        "tsc": float(tsc.detach()),
        "bce": float(bce.detach()),
        "total": float(loss.detach()),
    }
    return loss, terms
