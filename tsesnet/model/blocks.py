"""Convolutional building blocks shared by the encoder, the decoder and the TA module.

Shape legend: B batch, T phases, C channels, Z Y X voxels.
Every block takes and returns (B, C, Z, Y, X) float tensors.

Normalisation is instance norm (affine), the usual choice for 3D segmentation at batch 1 per GPU
(the paper trains with one volume per GPU, §4.1, where batch norm statistics are meaningless);
the activation is LeakyReLU(0.01) as in nnU-Net. The paper names neither.

In the weight-shared encoder every phase is its own item of the (B*T) batch, and a plain
instance norm would rescale each phase to zero mean and unit variance on its own: a tumour that
is twice as bright at 60 s as at 300 s would look the same in both, and the enhancement and
wash-out the time series is there to show would be normalised away at the first layer.
`SeriesNorm` takes its statistics over all phases of a series together (the encoder tells it T),
so the phases keep their intensities relative to each other. Measured on the synthetic cohort
(`tsesnet science`, small preset, the same budget): see the README's science table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SeriesNorm(nn.InstanceNorm3d):
    """Instance norm over all T phases of a series: (B*T, C, Z, Y, X), statistics per (B, C).

    `phases` (T) is set by the module that reshapes the series into the batch (the encoder)
    before each call; with T = 1 it is `nn.InstanceNorm3d` itself. Parameters and state-dict
    keys are those of `nn.InstanceNorm3d(C, affine=True)`.
    """

    phases: int = 1

    def __init__(self, channels: int):
        super().__init__(channels, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        t = self.phases
        if t == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % t:
            raise ValueError(f"SeriesNorm: batch {n} is not a multiple of T={t} phases")
        v = x.reshape(n // t, t, c, -1)  # (B, T, C, ZYX)
        var, mean = torch.var_mean(v, dim=(1, 3), keepdim=True, correction=0)  # (B, 1, C, 1)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, 1, c, 1)
        return ((v - mean) * scale + self.bias.view(1, 1, c, 1)).reshape(x.shape)


def live_taps(
    kernel: int, size: int, *, dilation: int = 1, stride: int = 1, padding: int | None = None
) -> int:
    """How many of a convolution's taps along one axis ever read a voxel of the input.

    Tap j reads input index ``o·stride + j·dilation - padding`` for output position o; it is
    live when that index lies in [0, size) for some o. A dead tap only ever reads the zero
    padding: its weight gets no gradient and has no effect on the output.

    Args:
        kernel: taps along the axis.
        size: input voxels along the axis.
        dilation: atrous rate.
        stride: convolution stride.
        padding: zero padding per side; None is 'same', ``dilation·(kernel-1)//2``.
    """
    pad = dilation * (kernel - 1) // 2 if padding is None else padding
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    last = (out - 1) * stride  # offset of the last output position
    return sum(
        1 for j in range(kernel) if j * dilation - pad + last >= 0 and j * dilation < size + pad
    )


def _triple(v) -> tuple[int, int, int]:
    return tuple(int(a) for a in v) if isinstance(v, tuple | list) else (int(v),) * 3


class ConvNormAct(nn.Sequential):
    """Conv3d -> InstanceNorm3d (or `SeriesNorm`) -> LeakyReLU, 'same' padding for odd kernels.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: kernel size (odd), cubic or per axis (z, y, x).
        stride: convolution stride (2 halves every spatial size).
        dilation: atrous rate, one or per axis (the TA module fits them to its feature map).
        series: normalise over all phases of a series (`SeriesNorm`, the shared encoder).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int] = 3,
        stride: int = 1,
        dilation: int | tuple[int, int, int] = 1,
        series: bool = False,
    ):
        if isinstance(kernel, int) and isinstance(dilation, int):
            pad = dilation * (kernel - 1) // 2  # the first release's modules, unchanged
        else:
            kernel, dilation = _triple(kernel), _triple(dilation)
            pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        super().__init__(
            nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
            SeriesNorm(cout) if series else nn.InstanceNorm3d(cout, affine=True),
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
