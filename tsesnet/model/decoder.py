"""The 3D U-Net decoder over fused features (paper §3.1, Fig. 2a).

Shape legend: B batch, C channels, Z Y X voxels.
From the fused bottleneck up: 2x transposed convolution, concatenation with the fused skip of
that level, double 3x3x3 convolution; a 1x1x1 head gives one logit per voxel.
"""

from __future__ import annotations

from torch import Tensor, nn

from tsesnet.model.blocks import UpBlock


class Decoder(nn.Module):
    """Fused features [(B, C_l, Z_l, Y_l, X_l)] (full resolution first) -> logits (B, 1, Z, Y, X).

    Args:
        channels: the encoder's channels per level; the decoder mirrors them.
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.ups = nn.ModuleList(
            UpBlock(channels[level + 1], channels[level], channels[level])
            for level in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv3d(channels[0], 1, 1)

    def forward(self, fused: list[Tensor]) -> Tensor:
        """fused: list of L maps, full resolution first -> (B, 1, Z, Y, X) logits."""
        x = fused[-1]
        for up, skip in zip(self.ups, reversed(fused[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)
