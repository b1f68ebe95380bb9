"""The weight-shared 3D encoder (paper §3.1, Fig. 2a) with Tumor-Aware modules.

Shape legend: B batch, T phases, C channels, Z Y X voxels.

All phases go through the same weights in one batched call: (B, T, Z, Y, X) is reshaped to
(B*T, 1, Z, Y, X), so the parameter count does not depend on T and T may change between calls.
Normalisation statistics span the T phases of each series (`blocks.SeriesNorm`), so the phases
keep their intensities relative to each other.

Stage l (l = 0 .. L-1, level l has 2**l times fewer voxels per axis than the input):
    ConvNormAct 3x3x3 (stride 2 for l > 0: the downsampling) -> TA(C_l)      (tumor_aware)
    ConvNormAct 3x3x3 (stride 2 for l > 0)                 -> ConvNormAct    (plain ablation)
So the TA module takes the place of the second convolution of the usual 3D U-Net double
convolution: one TA per stage, on every stage from `ta_start` on (the paper: "the entire encoder
leverages the TA module"). `ta_start` > 0 skips the full-resolution stages where a 5x5x5
convolution is most expensive; the paper preset uses it to stay inside Table 2's FLOP budget.
With `config.ta_patch` set, each TA module is fitted to its level's map of that patch
(`ta.fit_taps`: no tap of a dilated kernel reads only padding).
"""

from __future__ import annotations

from torch import Tensor, nn

from tsesnet.model.blocks import ConvNormAct, SeriesNorm
from tsesnet.model.config import ModelConfig
from tsesnet.model.ta import TumorAware


class Encoder(nn.Module):
    """Shared encoder: (N, in_channels, Z, Y, X) -> per-level features [(N, C_l, Z_l, Y_l, X_l)].

    Args:
        config: the model config (channels, tumor_aware, ta_*).
        in_channels: 1 for the per-phase encoders; 2 * max_phases for `early` fusion.
    """

    def __init__(self, config: ModelConfig, in_channels: int = 1):
        super().__init__()
        stages = []
        cin = in_channels
        for level, c in enumerate(config.channels):
            first = ConvNormAct(cin, c, 3, stride=1 if level == 0 else 2, series=True)
            if config.tumor_aware and level >= config.ta_start:
                size = tuple(p // 2**level for p in config.ta_patch) or None  # (z, y, x)
                second = TumorAware(
                    c, config.ta_dilations, config.ta_reduction, series=True, size=size
                )
            else:
                second = ConvNormAct(c, c, 3, series=True)
            stages.append(nn.Sequential(first, second))
            cin = c
        self.stages = nn.ModuleList(stages)
        self._norms = [m for m in self.modules() if isinstance(m, SeriesNorm)]

    def forward(self, x: Tensor, phases: int = 1) -> list[Tensor]:
        """x: (N, in_channels, Z, Y, X) -> list of L features, level l (N, C_l, Z/2^l, ...).

        `phases` (T): x holds N / T series of T consecutive phases; the norms take their
        statistics over each series (`blocks.SeriesNorm`).
        """
        for norm in self._norms:
            norm.phases = phases
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
