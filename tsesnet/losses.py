"""Training losses: soft Dice on logits and the Temporal-Spatial Contrastive loss (§3.3, §3.5).

Shape legend: B batch, T phases, C channels, Z Y X voxels at input resolution, z y x voxels at
an encoder level, N sampled voxel positions.

The total loss is Eq. 10, ``L = α·L_Dice + β·L_TSC`` (plus ``γ·BCE`` when `LossConfig.bce` is
set; 0 by default, as in the paper), where ``L_TSC`` (Eq. 7) already sums over
the encoder levels. Eq. 10 writes a second sum over levels around ``L_TSC``; summing twice would
only rescale β by the number of levels, so the levels are summed once, here in ``tsc_loss``.

The scale of the TSC term (`LossConfig.tsc_scale`). Eq. 6 divides cosine similarities by τ, so
the gradient of ``L_TSC`` with respect to the similarities grows as 1/τ: at the paper's
τ = 1e-5 it is a zero-margin hinge, ``softplus((s⁻ - s⁺)/τ) ≈ max(0, s⁻ - s⁺)/τ``, multiplied
by 1e5, and its gradient on the shared encoder is millions of times the Dice term's
(`term_gradient_norms` measures it; the README's "The model" gives the numbers). "paper" uses
Eq. 7 as written. "tau" multiplies the term by τ/τ_base with τ_base = 1, the
supervised-contrastive convention (Khosla et al., 2020, scale their loss by τ/τ_base): then the
gradient per similarity is O(1) at any τ, the term tends to the hinge ``max(0, s⁻ - s⁺)`` as
τ → 0, and at τ = 1 the two rules agree. β then weighs a term of the same order as Dice at
every τ, so a sweep over τ no longer sweeps the effective weight of the term by five decades.

Labels at coarse levels (`LossConfig.tsc_labels`). The mask is reduced to each encoder level's
grid, one cell per level voxel (2^l input voxels per axis at level l). "max" marks a cell as
tumour when any of its voxels is (the first release's rule: at the deepest level of the paper
preset a 16³ cell of 4,096 voxels is "tumour" because of one voxel). "majority" marks it
tumour when at least half of its voxels are. "pure" keeps only cells that are all tumour or
all background and leaves mixed cells out of the loss. At full resolution all three are the
mask itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_ADDED",
    "LossConfig",
    "dice_loss",
    "level_labels",
    "term_gradient_norms",
    "total_loss",
    "tsc_loss",
]

TSC_SCALES = ("paper", "tau")
TSC_LABELS = ("max", "majority", "pure")
# `LossConfig` fields added since the first release, with the value that reproduces the first
# release's loss (what a resumed run that predates them trained with).
LOSS_ADDED: dict[str, object] = {"tsc_scale": "paper", "tsc_labels": "max"}


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


def level_labels(mask: Tensor, size: tuple[int, int, int], rule: str = "majority") -> Tensor:
    """The TSC class of every cell of an encoder level's grid (see the module docstring).

    Args:
        mask: (B, Z, Y, X) in {0, 1} at input resolution.
        size: (z, y, x) of the level.
        rule: "max", "majority" or "pure".

    Returns:
        (B, z, y, x) int8: 1 tumour, 0 background, -1 left out (mixed cells under "pure").
    """
    if rule not in TSC_LABELS:
        raise ValueError(f"tsc labels rule must be one of {TSC_LABELS}, got {rule!r}")
    m = mask.float().unsqueeze(1)  # (B, 1, Z, Y, X)
    if tuple(m.shape[2:]) == tuple(size):
        return (m.squeeze(1) > 0.5).to(torch.int8)
    if rule == "max":
        return (F.adaptive_max_pool3d(m, size).squeeze(1) > 0.5).to(torch.int8)
    frac = F.adaptive_avg_pool3d(m, size).squeeze(1)  # (B, z, y, x) tumour fraction per cell
    if rule == "majority":
        return (frac >= 0.5).to(torch.int8)
    out = torch.full(frac.shape, -1, dtype=torch.int8, device=frac.device)
    out[frac == 1.0] = 1  # a mean of 0/1 values is exactly 1 or 0 only for a pure cell
    out[frac == 0.0] = 0
    return out


def _sample_positions(
    labels: Tensor, samples_per_class: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor] | None:
    """Pick up to ``samples_per_class`` voxel indices per class from flat labels (N_all,).

    Labels are `level_labels`' 1 / 0 / -1; -1 is never picked. Returns (indices (N,), labels
    (N,) bool) or None when one class is absent. A class with no more voxels than
    ``samples_per_class`` is taken whole, in index order (no randomness).
    """
    picked = []
    for cls in (1, 0):
        idx = (labels == cls).nonzero().squeeze(1)
        if idx.numel() == 0:
            return None
        if idx.numel() > samples_per_class:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(idx.numel(), generator=generator, device=gen_device)
            idx = idx[perm[:samples_per_class].to(idx.device)]
        picked.append(idx)
    indices = torch.cat(picked)
    return indices, labels[indices] == 1


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
    labels: str = "majority",
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
        mask: (B, Z, Y, X) in {0, 1} at input resolution; reduced to each level's grid by
            `level_labels` with the rule `labels`.
        tau: temperature τ > 0 (the paper uses 1e-5).
        samples_per_class: cap on sampled positions per class, per item and level.
        generator: optional torch.Generator (on the CPU) for reproducible sampling.
        labels: "max", "majority" or "pure" (`LossConfig.tsc_labels`).

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
        cells = level_labels(mask.to(f.device), tuple(f.shape[3:]), labels).flatten(1)  # (B, zyx)
        flat = f.flatten(3)  # (B, T, C, z·y·x)
        level_sum, level_count = None, 0
        for item in range(b):
            picked = _sample_positions(cells[item], samples_per_class, generator)
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
        alpha: weight α of the Dice term.
        beta: weight β of the TSC term (Eq. 7, summed over levels).
        tau: TSC temperature τ > 0.
        samples_per_class: positions sampled per class, batch item and level for the TSC loss.
        bce: weight γ of a voxel-wise binary cross-entropy term added to Eq. 10 (nnU-Net's
            Dice + cross-entropy). 0, the paper's loss, by default. On short CPU budgets soft
            Dice alone on patches with a small or no tumour settles on predicting foreground
            everywhere; the cross-entropy term gives every voxel a gradient from the first step
            (measured on the synthetic cohort, see `tsesnet/configs/small.yaml`).
        tsc_scale: "paper" (Eq. 7 as written, the default) or "tau" (the term times τ/τ_base,
            τ_base = 1: the same order as Dice at any τ; see the module docstring).
        tsc_labels: how the mask is reduced to coarse levels: "majority" (default), "pure"
            (mixed cells left out) or "max" (the first release's rule).
    """

    alpha: float = 0.7
    beta: float = 0.5
    tau: float = 1e-5
    samples_per_class: int = 256
    bce: float = 0.0
    tsc_scale: Literal["paper", "tau"] = "paper"
    tsc_labels: Literal["max", "majority", "pure"] = "majority"

    def __post_init__(self) -> None:
        problems = [
            f"loss.{k} must be >= 0, got {getattr(self, k)}"
            for k in ("alpha", "beta", "bce")
            if not getattr(self, k) >= 0
        ]
        if not self.tau > 0:
            problems.append(f"loss.tau must be > 0 (the paper uses 1e-5), got {self.tau}")
        if self.samples_per_class < 1:
            problems.append(f"loss.samples_per_class must be >= 1, got {self.samples_per_class}")
        if self.tsc_scale not in TSC_SCALES:
            problems.append(f"loss.tsc_scale must be one of {TSC_SCALES}, got {self.tsc_scale!r}")
        if self.tsc_labels not in TSC_LABELS:
            problems.append(f"loss.tsc_labels must be one of {TSC_LABELS}, got {self.tsc_labels!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def tsc_weight(self) -> float:
        """The factor on ``L_TSC`` in Eq. 10: β, times τ/τ_base (τ_base = 1) under "tau"."""
        return self.beta * (self.tau if self.tsc_scale == "tau" else 1.0)


def loss_terms(
    logits: Tensor,
    features: list[Tensor],
    target: Tensor,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> dict[str, tuple[Tensor, float]]:
    """Each term of Eq. 10 (+ BCE) as (unweighted value, its weight in the total).

    Args: as `total_loss`.

    Returns:
        {"dice": (Dice, α), "tsc": (L_TSC, `config.tsc_weight`), "bce": (BCE, γ)}; a term of
        weight 0 is a plain zero, not computed.
    """
    mask = target[:, 0] if target.dim() == 5 else target  # (B, Z, Y, X)
    zero = torch.zeros((), device=logits.device)
    tsc = zero
    if config.tsc_weight != 0:
        tsc = tsc_loss(
            features, mask, config.tau, config.samples_per_class, generator, config.tsc_labels
        )
    bce = zero
    if config.bce != 0:
        bce = F.binary_cross_entropy_with_logits(
            logits.float(), mask.reshape(logits.shape).to(torch.float32)
        )
    return {
        "dice": (dice_loss(logits, mask), config.alpha),
        "tsc": (tsc, config.tsc_weight),
        "bce": (bce, config.bce),
    }


def total_loss(
    logits: Tensor,
    features: list[Tensor],
    target: Tensor,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 10: ``L = α·Dice + β·L_TSC`` (``L_TSC`` summed over levels by ``tsc_loss``), + γ·BCE.

    Under ``tsc_scale="tau"`` the TSC term's weight is β·τ (`LossConfig.tsc_weight`).

    Args:
        logits: (B, 1, Z, Y, X).
        features: per-level (B, T, C, z, y, x) encoder features (may be empty).
        target: (B, Z, Y, X) or (B, 1, Z, Y, X) in {0, 1}.
        config: the loss weights and TSC settings.
        generator: optional generator for the TSC sampling.

    Returns:
        (loss to backpropagate, {"dice", "tsc", "bce", "total"} as Python floats for logging;
        "dice", "tsc" and "bce" unweighted, "tsc" the value of Eq. 7 under either scale).
    """
    terms = loss_terms(logits, features, target, config, generator)
    loss = config.alpha * terms["dice"][0] + config.tsc_weight * terms["tsc"][0]
    if config.bce != 0:
        loss = loss + config.bce * terms["bce"][0]
    out = {k: float(v.detach()) for k, (v, _) in terms.items()}
    out["total"] = float(loss.detach())
    return loss, out


def shared_encoder(name: str) -> bool:
    """`term_gradient_norms`' default filter: the parameters of the weight-shared encoder."""
    return name.startswith("encoder.")


def term_gradient_norms(
    model: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    config: LossConfig,
    module_filter: Callable[[str], bool] = shared_encoder,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """L2 norm of the gradient each loss term puts on the shared encoder, weight included.

    Each norm is ``‖∂(w·L_term)/∂θ‖₂`` over the parameters θ that `module_filter` selects, with
    w the term's weight in the total (α, β or β·τ under ``tsc_scale="tau"``, γ): what the
    optimiser receives from that term. Where the norms differ by orders of magnitude one term
    steers the encoder. One forward pass and one backward pass per term of non-zero weight on
    this batch; ``.grad`` fields are left as they are (``torch.autograd.grad``), so call it
    between steps, e.g. once per epoch on the epoch's first batch.

    Args:
        model: a `TSESNet` (a DDP wrapper is unwrapped: no all-reduce, these are this rank's
            norms). Runs in float32 in the module's current mode.
        x: (B, T, Z, Y, X) patches; y: (B, Z, Y, X) masks in {0, 1}.
        config: the loss settings of the run.
        module_filter: picks parameters by their `named_parameters` name.
        generator: seeds the TSC sampling.

    Returns:
        {"grad_norm_dice", "grad_norm_tsc", "grad_norm_bce"} as floats; 0.0 for a term of
        weight 0 or one that does not reach the selected parameters (TSC under `early`).
    """
    model = getattr(model, "module", model)
    params = [p for n, p in model.named_parameters() if p.requires_grad and module_filter(n)]
    if not params:
        raise ValueError("term_gradient_norms: module_filter selects no trainable parameter")
    with torch.enable_grad():
        logits, feats = model(x, return_features=True)
        terms = loss_terms(logits, feats, y, config, generator)
        norms = {}
        for name, (value, weight) in terms.items():
            norm = 0.0
            if weight != 0 and value.requires_grad:
                grads = torch.autograd.grad(
                    weight * value, params, retain_graph=True, allow_unused=True
                )
                norm = sum(float(g.double().pow(2).sum()) for g in grads if g is not None) ** 0.5
            norms[f"grad_norm_{name}"] = norm
    return norms
