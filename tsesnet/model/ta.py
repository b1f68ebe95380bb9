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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tsesnet.model.blocks import ConvNormAct

TA_KERNELS = (5, 3, 1)


class TumorAware(nn.Module):
    """Multi-scale atrous branches fused by scale attention (Eq. 1-5).

    Args:
        channels: C, input = output channels.
        dilations: atrous rates of the 5x5x5 and 3x3x3 convolutions.
        reduction: hidden size of the scale attention is 4C // reduction.
        series: normalise over all phases of a series (`blocks.SeriesNorm`; in the encoder).
    """

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, int] = (2, 2),
        reduction: int = 4,
        series: bool = False,
    ):
        super().__init__()
        if len(dilations) != 2 or min(dilations) < 1:
            raise ValueError(f"ta dilations must be two rates >= 1, got {dilations}")
        rates = (*dilations, 1)
        self.convs = nn.ModuleList(
            ConvNormAct(channels, channels, k, dilation=d, series=series)
            for k, d in zip(TA_KERNELS, rates, strict=True)
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
