"""TSESNet (paper §3.1, Fig. 2a): shared encoder -> per-level fusion -> 3D U-Net decoder.

Shape legend: B batch, T phases (phase 0 pre-contrast), C channels, Z Y X voxels.

    x (B, T, Z, Y, X) -> (B*T, 1, Z, Y, X) -> Encoder -> per level (B, T, C_l, Z_l, Y_l, X_l)
      -> fusion (FUSIONS[config.fusion]) -> per level (B, C_l, Z_l, Y_l, X_l)
      -> Decoder -> logits (B, 1, Z, Y, X)

`early` fusion instead stacks the phases as input channels of a single encoder pass: the series
is zero-padded to `config.max_phases` channels and `max_phases` presence channels (1 for a real
phase, 0 for padding) are appended, so a fixed first convolution serves any T <= max_phases and
the network can tell a dark phase from a missing one.

With `config.phase_embedding` a learned (C_l,) vector per phase index is added to each phase's
features at every level before fusion, so TSFF, whose Eq. 9 sums over the post-contrast phases
and so cannot see their order, can tell them apart (mean pooling, linear, stays blind); the TSC
loss still sees the encoder's own features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tsesnet.model.config import ModelConfig
from tsesnet.model.decoder import Decoder
from tsesnet.model.encoder import Encoder
from tsesnet.model.fusion import FUSIONS


class TSESNet(nn.Module):
    """The segmentation network.

    Args:
        config: architecture; `config.fusion` must be a key of FUSIONS.

    Attributes:
        config: the ModelConfig it was built from.
        divisor: spatial sizes of the input must be multiples of this.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.fusion not in FUSIONS:
            raise ValueError(
                f"unknown fusion {config.fusion!r}; choose one of {', '.join(sorted(FUSIONS))}"
            )
        self.config = config
        self.divisor = config.divisor
        self.early = config.fusion == "early"
        self.encoder = Encoder(config, in_channels=2 * config.max_phases if self.early else 1)
        self.fusion = FUSIONS[config.fusion](config.channels, config)
        self.decoder = Decoder(config.channels)
        self.phase_embedding = None
        if config.phase_embedding and not self.early:
            self.phase_embedding = nn.ParameterList(
                nn.Parameter(torch.zeros(config.max_phases, c, 1, 1, 1)) for c in config.channels
            )

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError when x is not a (B, T, Z, Y, X) series the network can take."""
        if x.dim() != 5:
            raise ValueError(f"expected input (B, T, Z, Y, X), got shape {tuple(x.shape)}")
        t = x.shape[1]
        picked = self.config.phases
        if picked and max(picked) >= t:
            raise ValueError(
                f"the model reads phases {list(picked)} but the series has T={t} phases"
            )
        t = len(picked) or t
        if t < (1 if self.early else 2):
            raise ValueError(f"need T >= 2 phases (pre-contrast + post-contrast), got T={t}")
        if (self.early or self.phase_embedding is not None) and t > self.config.max_phases:
            what = "early fusion" if self.early else "phase_embedding"
            raise ValueError(
                f"{what} takes at most max_phases={self.config.max_phases} phases, got "
                f"T={t}; build the model with a larger max_phases"
            )
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            fix = tuple(-(-s // self.divisor) * self.divisor for s in x.shape[2:])
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.divisor} "
                f"({len(self.config.channels) - 1} downsamplings by 2): pad or crop the patch "
                f"to multiples of {self.divisor}, e.g. {fix}"
            )

    def _early_input(self, x: Tensor) -> Tensor:
        """(B, T, Z, Y, X) -> (B, 1, 2*max_phases, Z, Y, X): zero-padded phases + presence mask."""
        b, t = x.shape[:2]
        pad = x.new_zeros(b, self.config.max_phases - t, *x.shape[2:])
        present = x.new_zeros(b, self.config.max_phases, *x.shape[2:])
        present[:, :t] = 1
        return torch.cat([x, pad, present], dim=1)[:, None]

    def forward(self, x: Tensor, return_features: bool = False):
        """Segment a batch of DCE-MRI series.

        Args:
            x: (B, T, Z, Y, X) float, T >= 2, phase 0 pre-contrast, Z/Y/X multiples of divisor
                (`config.phases`, when set, picks the phases read).
            return_features: also return the per-level encoder features for the TSC loss.

        Returns:
            logits (B, 1, Z, Y, X); with return_features, (logits, features) where features is a
            list of (B, T, C_l, Z_l, Y_l, X_l), full resolution first (empty for `early`).
        """
        self.check_input(x)
        if self.config.phases:
            x = x[:, list(self.config.phases)]  # (B, T', Z, Y, X)
        if self.early:
            x = self._early_input(x)  # (B, 1, 2*max_phases, Z, Y, X)
        b, t = x.shape[:2]
        # [(B*T, C_l, Z_l, Y_l, X_l)], normalised over each series' T phases
        feats = self.encoder(x.reshape(b * t, -1, *x.shape[-3:]), phases=t)
        feats = [f.reshape(b, t, *f.shape[1:]) for f in feats]  # [(B, T, C_l, Z_l, Y_l, X_l)]
        to_fuse = feats
        if self.phase_embedding is not None:
            to_fuse = [f + e[:t] for f, e in zip(feats, self.phase_embedding, strict=True)]
        logits = self.decoder(self.fusion(to_fuse))  # (B, 1, Z, Y, X)
        if return_features:
            return logits, ([] if self.early else feats)
        return logits
