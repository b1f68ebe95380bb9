"""Convolutional building blocks shared by the encoder, the decoder and the TA module.

Shape legend: B batch, T phases, C channels, Z Y X voxels.
Every block takes and returns (B, C, Z, Y, X) float tensors.

Normalisation is instance norm (affine), the usual choice for 3D segmentation at batch 1 per GPU
(the paper trains with one volume per GPU, §4.1, where batch norm statistics are meaningless);
the activation is LeakyReLU(0.01) as in nnU-Net. The paper names neither.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvNormAct(nn.Sequential):
    """Conv3d -> InstanceNorm3d -> LeakyReLU, 'same' padding for odd kernels.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: cubic kernel size (odd).
        stride: convolution stride (2 halves every spatial size).
        dilation: atrous rate (used by the TA module).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1):
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class ConvBlock(nn.Sequential):
    """The 3D U-Net double convolution: two 3x3x3 ConvNormAct, the first may stride by 2."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(ConvNormAct(cin, cout, 3, stride=stride), ConvNormAct(cout, cout, 3))


class UpBlock(nn.Module):
    """Decoder step: 2x transposed convolution, concatenation with the fused skip, ConvBlock.

    Args:
        cin: channels coming from the coarser level.
        cskip: channels of the fused skip feature at this level.
        cout: output channels.
    """

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2, bias=False)
        self.conv = ConvBlock(cout + cskip, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """x: (B, cin, z, y, x), skip: (B, cskip, 2z, 2y, 2x) -> (B, cout, 2z, 2y, 2x)."""
        x = self.up(x)  # (B, cout, 2z, 2y, 2x)
        return self.conv(torch.cat([x, skip], dim=1))
