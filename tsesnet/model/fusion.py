"""Fusion of per-phase encoder features into one feature map per level (paper §3.4, §4.4).

Shape legend: B batch, T phases (phase 0 pre-contrast), C channels, Z Y X voxels at a level,
N = Z*Y*X voxels flattened, M pooled key/value tokens.

Every strategy is an `nn.Module` built as `Fusion(channels, config)` whose forward maps the
encoder's list of per-level features, each (B, T, C_l, Z_l, Y_l, X_l), to the list of fused
features, each (B, C_l, Z_l, Y_l, X_l). `FUSIONS` is the explicit registry sweeps choose from.

TSFF (Eq. 8-9) as written, with Q = f_0 W_q, K = f_0 W_k, V_i = f_i W_v (each N x d, d = C):

    W_i = Softmax(Q K^T / d) V_i                              (Eq. 8, an N x N attention)
    f^  = f_0 + sum_{i=1}^{T-1} W_i (.) f_i                   (Eq. 9, (.) element-wise)

Note the paper scales by 1/d, not by the usual 1/sqrt(d); we keep 1/d everywhere TSFF attends.
The attention matrix depends on f_0 only, so it is shared by all post-contrast phases.

Exact where it is affordable (`ModelConfig.attn_exact_tokens`). A level of N voxels attends
exactly, Eq. 8 as written, when N <= attn_exact_tokens. The exact product runs in one of two
layouts, chosen by N alone (so outputs and MAC counts do not depend on the device):

- shared softmax (N <= SHARED_SOFTMAX_TOKENS): one Softmax(Q K^T / d) for all post-contrast
  phases, their values stacked in V's width, (B, N, (T-1)d). It materialises the N x N matrix
  (256 MiB per item in fp32 at N = 8192) and costs T N^2 d multiply-accumulates. SDPA's fused
  kernels refuse a V wider than Q and K, so this runs on its math kernel.
- phases as heads (N > SHARED_SOFTMAX_TOKENS): each post-contrast phase is a head of width d,
  with Q and K repeated over the heads, so Q, K and V share a head size and SDPA can use its
  flash and memory-efficient kernels on CUDA (and its flash kernel on CPU): memory linear in N.
  A fused kernel cannot share one softmax across heads, so this costs 2(T-1) N^2 d, 1.67x the
  shared form at T = 6. (At the paper's level 2, 6,912 voxels, forward + backward on one CPU
  thread: 44 MiB against the shared form's 563 MiB, in about the same time.)

Departure (linear memory) above the bound. At the first level of a 48x96x96 patch N = 442,368,
the N x N matrix would need 780 GB in fp32 and even the fused kernels 31 T multiply-accumulates.
There keys and values are average-pooled to a grid of at most `attn_tokens` (default 4x8x8,
M <= 256 tokens) -- spatial-reduction attention as in PVT:

    W_i = Softmax(Q (P f_0 W_k)^T / d) (P f_i W_v)            (P: N -> M average pooling)

so memory and compute grow as N * M, linear in N. Queries stay at full resolution, so every voxel
still gets its own weights W_i. Where a level has no more voxels than the grid, P is the identity
and this is Eq. 8 too (with `attn_exact_tokens = 0`, the first release's rule, the only exact
levels). Pooling commutes with the bias-free projections, so we pool before projecting
(cheaper). Pooled and exact attention agree while attention is near uniform (at initialisation:
within 2 %) and part once it becomes selective (37-90 % apart in W_i, as a review measured),
which is why levels are exact by default wherever that is affordable.

The T-1 post-contrast sums of Eq. 9 are taken literally (not averaged), so the magnitude of the
fused map grows with T; the decoder's instance norms absorb that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsesnet.model.config import ModelConfig

# Exact levels with at most this many voxels use the shared-softmax layout (N x N matrix of
# 256 MiB per item in fp32); larger exact levels put the phases in heads (fused SDPA kernels).
SHARED_SOFTMAX_TOKENS = 8192


def pool_tokens(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Average-pool a feature map to at most `grid` voxels per axis (identity if it fits).

    Args:
        x: (B, C, Z, Y, X).
        grid: (z, y, x) caps.

    Returns:
        (B, C, min(Z, z), min(Y, y), min(X, x)).
    """
    size = tuple(min(s, g) for s, g in zip(x.shape[2:], grid, strict=True))
    if size == tuple(x.shape[2:]):
        return x
    return F.adaptive_avg_pool3d(x, size)


def attention_form(n: int, tokens: tuple[int, int, int], exact_tokens: int, size=None) -> str:
    """How a TSFF or STT level of `n` voxels attends: "shared", "heads" or "pooled".

    "shared" and "heads" are exact (Eq. 8); "pooled" pools keys and values to `tokens`. A
    level that fits `tokens` axis by axis (`size`, its (z, y, x)) is exact under any bound.
    """
    if n <= exact_tokens:
        return "heads" if n > SHARED_SOFTMAX_TOKENS else "shared"
    if size is not None and all(s <= g for s, g in zip(size, tokens, strict=True)):
        return "shared"
    return "pooled"


class TSFFLevel(nn.Module):
    """TSFF at one level: the weights W_i of Eq. 8 and the sum of Eq. 9.

    Args:
        channels: d = C at this level.
        tokens: key/value grid cap of levels attended in the pooled form (module docstring).
        exact_tokens: levels with at most this many voxels attend exactly.
    """

    def __init__(self, channels: int, tokens: tuple[int, int, int], exact_tokens: int = 0):
        super().__init__()
        self.q = nn.Conv3d(channels, channels, 1, bias=False)  # W_q
        self.k = nn.Conv3d(channels, channels, 1, bias=False)  # W_k
        self.v = nn.Conv3d(channels, channels, 1, bias=False)  # W_v
        self.tokens = tokens
        self.exact_tokens = exact_tokens

    def weights(self, f: Tensor) -> Tensor:
        """Eq. 8 for every post-contrast phase.

        Args:
            f: (B, T, C, Z, Y, X) features, phase 0 first.

        Returns:
            W: (B, T-1, C, Z, Y, X).
        """
        b, t, c, z, y, x = f.shape
        n = z * y * x
        if SHARED_SOFTMAX_TOKENS < n <= self.exact_tokens:
            return self._weights_as_heads(f)
        grid = self.tokens if n > self.exact_tokens else (z, y, x)  # (z, y, x): no pooling
        f0, fi = f[:, 0], f[:, 1:]  # (B, C, Z, Y, X), (B, T-1, C, Z, Y, X)
        q = self.q(f0).flatten(2).transpose(1, 2)  # (B, N, C)
        k = self.k(pool_tokens(f0, grid)).flatten(2).transpose(1, 2)  # (B, M, C)
        vp = self.v(pool_tokens(fi.reshape(b * (t - 1), c, z, y, x), grid))  # (B(T-1), C, m)
        m = k.shape[1]
        v = (
            vp.reshape(b, t - 1, c, m).permute(0, 3, 1, 2).reshape(b, m, (t - 1) * c)
        )  # (B, M, (T-1)C)
        # One attention for all phases: Softmax(Q K^T / d) is shared, phases stacked in V's width.
        w = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0 / c)
        w = w[:, 0].reshape(b, n, t - 1, c)  # (B, N, T-1, C)
        return w.permute(0, 2, 3, 1).reshape(b, t - 1, c, z, y, x)

    def _weights_as_heads(self, f: Tensor) -> Tensor:
        """Exact Eq. 8 with the phases as heads, Q, K, V of one head size (fused kernels)."""
        b, t, c, z, y, x = f.shape
        n = z * y * x
        f0, fi = f[:, 0], f[:, 1:]  # (B, C, Z, Y, X), (B, T-1, C, Z, Y, X)
        # Q and K repeated over the T-1 heads; Q, K, V contiguous with the head size last
        # (stride 1), or SDPA falls back to its math kernel and materialises T-1 N x N matrices
        q = self.q(f0).flatten(2).transpose(1, 2)[:, None].expand(b, t - 1, n, c).contiguous()
        k = self.k(f0).flatten(2).transpose(1, 2)[:, None].expand(b, t - 1, n, c).contiguous()
        v = self.v(fi.reshape(b * (t - 1), c, z, y, x))  # (B(T-1), C, Z, Y, X)
        v = v.reshape(b, t - 1, c, n).transpose(2, 3).contiguous()  # (B, T-1, N, C)
        w = F.scaled_dot_product_attention(q, k, v, scale=1.0 / c)  # (B, T-1, N, C)
        return w.transpose(2, 3).reshape(b, t - 1, c, z, y, x)

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, T, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        return f[:, 0] + (self.weights(f) * f[:, 1:]).sum(dim=1)  # Eq. 9


class TemporalConvLevel(nn.Module):
    """`cnn` fusion at one level: a learned temporal convolution scores each phase per voxel.

    h = LeakyReLU(Conv_t(f)) with a kernel of 3 phases (zero-padded, so any T works);
    a = Softmax_t(Conv_1x1(h)); output sum_t a_t f_t. "Adaptive temporal feature fusion" (§4.4).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.temporal = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, T, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        b, t, c, z, y, x = f.shape
        ft = f.reshape(b, t, c, -1).transpose(1, 2)  # (B, C, T, N)
        h = F.leaky_relu(self.temporal(ft), 0.01)  # (B, C, T, N)
        a = torch.softmax(self.score(h), dim=2)  # (B, 1, T, N)
        return (a * ft).sum(dim=2).reshape(b, c, z, y, x)


def phase_embedding(t: int, c: int, device, dtype) -> Tensor:
    """Sinusoidal embedding of the phase index, (T, C): defined for any T, no parameters."""
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    half = torch.arange(0, c, 2, device=device, dtype=torch.float32)  # (ceil(C/2),)
    freq = torch.exp(-math.log(10000.0) * half / c)
    pe = torch.zeros(t, c, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : c // 2]
    return pe.to(dtype)


class STTLevel(nn.Module):
    """`stt` fusion at one level: a spatial-temporal transformer block, then the mean over T.

    After ST-Tumor-Seg (Zhang et al., 2023): every voxel of every phase is a token. Pre-norm
    residual block: temporal self-attention across the T phases of each voxel (T x T, cheap),
    spatial self-attention across the voxels of each phase, exact at levels of at most
    `exact_tokens` voxels and with keys/values pooled to `tokens` above, and an MLP.
    Standard 1/sqrt(head_dim) scaling here: this is the peer's transformer, not TSFF.
    """

    def __init__(
        self,
        channels: int,
        tokens: tuple[int, int, int],
        head_dim: int,
        mlp_ratio: int,
        exact_tokens: int = 0,
    ):
        super().__init__()
        self.exact_tokens = exact_tokens
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ValueError(f"stt: {channels} channels do not split into {self.heads} heads")
        self.tokens = tokens
        self.norm_t = nn.LayerNorm(channels)
        self.qkv_t = nn.Linear(channels, 3 * channels)
        self.proj_t = nn.Linear(channels, channels)
        self.norm_s = nn.LayerNorm(channels)
        self.q_s = nn.Linear(channels, channels)
        self.kv_s = nn.Linear(channels, 2 * channels)
        self.proj_s = nn.Linear(channels, channels)
        self.norm_m = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels),
            nn.GELU(),
            nn.Linear(mlp_ratio * channels, channels),
        )

    def _split(self, x: Tensor) -> Tensor:
        """(S, L, C) -> (S, heads, L, C / heads)."""
        s, n, c = x.shape
        return x.reshape(s, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, T, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        b, t, c, z, y, x = f.shape
        n = z * y * x
        tok = f.reshape(b, t, c, n).transpose(2, 3)  # (B, T, N, C)
        tok = tok + phase_embedding(t, c, f.device, f.dtype)[None, :, None, :]
        # temporal attention: each voxel attends over its T phases
        h = self.norm_t(tok).transpose(1, 2).reshape(b * n, t, c)  # (BN, T, C)
        q, k, v = self.qkv_t(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        a = a.transpose(1, 2).reshape(b, n, t, c).transpose(1, 2)  # (B, T, N, C)
        tok = tok + self.proj_t(a)
        # spatial attention: each phase's voxels attend over pooled voxels of the same phase
        h = self.norm_s(tok).reshape(b * t, n, c)  # (BT, N, C)
        grid = self.tokens if n > self.exact_tokens else (z, y, x)  # (z, y, x): exact
        hp = pool_tokens(h.transpose(1, 2).reshape(b * t, c, z, y, x), grid)
        hp = hp.flatten(2).transpose(1, 2)  # (BT, M, C)
        k, v = self.kv_s(hp).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(
            self._split(self.q_s(h)), self._split(k), self._split(v)
        )  # (BT, heads, N, C/heads)
        tok = tok + self.proj_s(a.transpose(1, 2).reshape(b, t, n, c))
        tok = tok + self.mlp(self.norm_m(tok))
        return tok.mean(dim=1).transpose(1, 2).reshape(b, c, z, y, x)


class MeanPoolLevel(nn.Module):
    """`meanpool` fusion: average over phases (§4.4, 1), no parameters."""

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, T, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        return f.mean(dim=1)


class _PerLevel(nn.Module):
    """A fusion that applies one independent module per level."""

    def __init__(self, levels: list[nn.Module]):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of (B, T, C_l, ...) -> list of (B, C_l, ...)."""
        return [mod(f) for mod, f in zip(self.levels, features, strict=True)]


class TSFF(_PerLevel):
    """`tsff`: TSFF (Eq. 8-9) at every skip level and the bottleneck (the paper's model)."""

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__(
            [TSFFLevel(c, config.attn_tokens, config.attn_exact_tokens) for c in channels]
        )


class MeanPool(_PerLevel):
    """`meanpool`: temporal average at every level (Table 4, MeanPool)."""

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__([MeanPoolLevel() for _ in channels])


class TemporalCNN(_PerLevel):
    """`cnn`: learned temporal convolution + softmax phase weights at every level (Table 4)."""

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__([TemporalConvLevel(c) for c in channels])


class STT(_PerLevel):
    """`stt`: a spatial-temporal transformer block at every level (Table 4, after ST-Tumor-Seg)."""

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__(
            [
                STTLevel(
                    c,
                    config.attn_tokens,
                    config.stt_head_dim,
                    config.stt_mlp_ratio,
                    config.attn_exact_tokens,
                )
                for c in channels
            ]
        )


class TSFFBottleneck(nn.Module):
    """`tsff_bottleneck`: TSFF at the bottleneck only, its weights reused at the skips (§4.4, 3).

    The bottleneck's W_i (B, T-1, C_L, z, y, x) are mapped to each skip level's channels by a
    bias-free 1x1x1 convolution, upsampled trilinearly to the level's size, and used in Eq. 9
    there: f^_l = f_0^l + sum_i W_i^l (.) f_i^l.
    """

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__()
        self.tsff = TSFFLevel(channels[-1], config.attn_tokens, config.attn_exact_tokens)
        self.to_skip = nn.ModuleList(
            nn.Conv3d(channels[-1], c, 1, bias=False) for c in channels[:-1]
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of (B, T, C_l, ...) -> list of (B, C_l, ...)."""
        fb = features[-1]
        b, t, cb = fb.shape[:3]
        w = self.tsff.weights(fb)  # (B, T-1, C_L, z, y, x)
        out = []
        for proj, f in zip(self.to_skip, features[:-1], strict=True):
            wl = proj(w.reshape(b * (t - 1), cb, *w.shape[3:]))  # (B(T-1), C_l, z, y, x)
            wl = F.interpolate(wl, size=f.shape[3:], mode="trilinear", align_corners=False)
            wl = wl.reshape(b, t - 1, *wl.shape[1:])  # (B, T-1, C_l, Z_l, Y_l, X_l)
            out.append(f[:, 0] + (wl * f[:, 1:]).sum(dim=1))  # Eq. 9 with bottleneck weights
        out.append(fb[:, 0] + (w * fb[:, 1:]).sum(dim=1))  # Eq. 9 at the bottleneck
        return out


class EarlyFusion(nn.Module):
    """`early`: no feature fusion; the network stacks phases as input channels (see network.py).

    The encoder then sees one "phase" per case, so each level is just squeezed.
    """

    def __init__(self, channels: tuple[int, ...], config: ModelConfig):
        super().__init__()

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of (B, 1, C_l, ...) -> list of (B, C_l, ...)."""
        return [f[:, 0] for f in features]


FUSIONS: dict[str, type[nn.Module]] = {
    "tsff": TSFF,
    "meanpool": MeanPool,
    "cnn": TemporalCNN,
    "stt": STT,
    "tsff_bottleneck": TSFFBottleneck,
    "early": EarlyFusion,
}
