"""The Tumor-Aware (TA) module, paper §3.2, Eq. 1-5.

Shape legend: B batch, C channels, Z Y X voxels. Input and output (B, C, Z, Y, X).

    f'_1 = f                                     (Eq. 1, identity branch)
    f'_2 = Conv_1(f)                             (5x5x5 atrous)
    f'_3 = Conv_2(f + f'_2)                      (3x3x3 atrous)
    f'_4 = Conv_3(f + f'_3)                      (1x1x1)
    f'   = C[f'_1, f'_2, f'_3, f'_4]             (Eq. 2, 4C channels)
    g_s  = GAP(f')                               (Eq. 3, (B, 4C))
    w    = Sigmoid(W_f2 ReLU(W_f1 g_s))          (Eq. 4, (B, 4C), one weight per channel per scale)
    f^   = sum_i w_i * f'_i                      (Eq. 5, back to C channels)

Choices the paper leaves open, made here:
- Dilation rates (2, 2) for the 5x5x5 and 3x3x3 convolutions, so the three branches see effective
  kernels of 9, 5 and 1 voxels (a 1x1x1 convolution has no meaningful dilation). Configurable.
- Each Conv_i is Conv3d -> InstanceNorm -> LeakyReLU (the paper's Fig. 3 shows plain boxes).
- W_f1 reduces 4C to 4C / reduction (default 4) as in squeeze-and-excitation.
- Eq. 5 is read as the per-scale weighted sum (w split into four C-vectors). The concatenation of
  Eq. 2 and the pooling of Eq. 3 are computed per branch (GAP of a concatenation is the
  concatenation of GAPs), so the 4C-channel tensor is never materialised.

Where TA sits in the network is decided in `encoder.py` (one per encoder stage, after the
stage's first convolution).

Departure: kernels fitted to the feature map (`fit_taps`). A tap of a dilated kernel whose
offset reaches past the feature map on every output voxel reads only zero padding: it never
gets a gradient, keeps its random initial value, and would start reading voxels on a larger
input. At the paper preset's 3x6x6 bottleneck, 50 of the 125 taps of the 5x5x5 convolution at
rate 2 are such dead taps (29.5 M parameters); at the small preset's 1x2x2 bottleneck (16x32x32
patches) 124 of 125 are. Given the size of the map it runs on (`size`), each TA convolution
caps its rate per axis to the largest whose reach fits the map, and where even rate 1 does not
fit, crops the kernel along that axis to the taps that can land on it (2·size - 1), which
computes exactly what the full kernel's live taps did. At the paper's 48x96x96 patch only
the bottleneck changes: its 5x5x5 convolution runs at rates (1, 2, 2) and keeps all its
parameters. Without `size` (configs stored before this, `ModelConfig.ta_patch = ()`) the rates
apply everywhere as configured.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tsesnet.model.blocks import ConvNormAct

TA_KERNELS = (5, 3, 1)


def fit_taps(
    kernel: int, rate: int, size: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Per-axis (kernel, rate) of a cubic atrous kernel with every tap on a map of `size`.

    Along an axis of S voxels a tap at offset o reads a voxel for some output when |o| <= S - 1,
    so a kernel of half-width h = (kernel - 1) / 2 at rate r has no dead tap when r·h <= S - 1.
    The rate is capped to (S - 1) // h; where even rate 1 does not fit (S - 1 < h), the kernel
    is cropped to its 2(S - 1) + 1 central taps at rate 1.

    Returns:
        ((k_z, k_y, k_x), (r_z, r_y, r_x)).
    """
    half = (kernel - 1) // 2
    ks, rs = [], []
    for s in size:
        if half == 0:
            k, r = kernel, 1
        elif s - 1 >= half:
            k, r = kernel, min(rate, (s - 1) // half)
        else:
            k, r = 2 * (s - 1) + 1, 1
        ks.append(k)
        rs.append(r)
    return tuple(ks), tuple(rs)


class TumorAware(nn.Module):
    """Multi-scale atrous branches fused by scale attention (Eq. 1-5).

    Args:
        channels: C, input = output channels.
        dilations: atrous rates of the 5x5x5 and 3x3x3 convolutions.
        reduction: hidden size of the scale attention is 4C // reduction.
        series: normalise over all phases of a series (`blocks.SeriesNorm`; in the encoder).
        size: (z, y, x) of the feature map it runs on: rates and kernels are fitted to it
            (`fit_taps`, no dead taps); None applies `dilations` as they are.
    """

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, int] = (2, 2),
        reduction: int = 4,
        series: bool = False,
        size: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if len(dilations) != 2 or min(dilations) < 1:
            raise ValueError(f"ta dilations must be two rates >= 1, got {dilations}")
        rates = (*dilations, 1)
        geometry = [
            (k, d) if size is None else fit_taps(k, d, size)
            for k, d in zip(TA_KERNELS, rates, strict=True)
        ]
        self.convs = nn.ModuleList(
            ConvNormAct(channels, channels, k, dilation=d, series=series) for k, d in geometry
        )
        hidden = max(4 * channels // reduction, 4)
        self.fc1 = nn.Linear(4 * channels, hidden)  # W_f1
        self.fc2 = nn.Linear(hidden, 4 * channels)  # W_f2
        self.channels = channels

    def forward(self, f: Tensor) -> Tensor:
        """f: (B, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        branches = [f]  # Eq. 1, i = 1
        h = self.convs[0](f)  # Eq. 1, i = 2: Conv_1(f)
        branches.append(h)
        for conv in self.convs[1:]:
            h = conv(f + h)  # Eq. 1, i = 3, 4: Conv_i(f + f'_{i-1})
            branches.append(h)
        g = torch.cat([b.mean(dim=(2, 3, 4)) for b in branches], dim=1)  # Eq. 2-3: (B, 4C)
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(g))))  # Eq. 4: (B, 4C)
        w = w.view(w.shape[0], 4, self.channels, 1, 1, 1)  # (B, 4, C, 1, 1, 1)
        out = w[:, 0] * branches[0]
        for i in range(1, 4):
            out = out + w[:, i] * branches[i]  # Eq. 5
        return out
