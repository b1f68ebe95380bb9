"""Warnings for scans unlike the ones a model was trained on.

What the training cases looked like is stored with the registered model (`model_config.json`'s
`training_data`, written by `tsesnet.tracking.registry.log_and_register`)::

    {"phases": [lo, hi], "spacing_mm_min": [z, y, x], "spacing_mm_max": [z, y, x],
     "orientations": ["RAS", "LPS", ...], "obliquity_deg_max": d}

A case is unlike the training data, and prediction warns (it still predicts), where the model is
likely wrong on it:

- its phase count T lies outside [lo, hi];
- its voxel spacing on an axis is below ``min / 1.5`` or above ``max * 1.5`` (mm, in the
  store's canonical axis order Z, Y, X, as `data_store.geometry.Geometry.spacing` gives it);
- its phase-0 file is more oblique than any training file by over `OBLIQUITY_MARGIN_DEG`
  (`Geometry.obliquity_deg`): the rotation that reorienting to the canonical order leaves.

Its orientation alone (``LPS``, ``RAS``...: axis swaps and flips) is no reason: every case is
reoriented to the canonical order before the model sees it, as in training (the synthetic demo
cohort draws a random orientation per case). Intensities are no reason either: each case is
normalised by its own percentiles (`data_store.normalize`), as in training.

A model registered before the record was kept has none: no warnings, and one note says so. A key
missing from the record skips that check; a malformed record is reported like a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pydantic
from pydantic import AfterValidator, ConfigDict, Field

from data_store import schema
from data_store.errors import InputError

SPACING_FACTOR = 1.5
#: How much more oblique than the most oblique training file a case may be before it is warned
#: about (degrees of rotation left after reorienting).
OBLIQUITY_MARGIN_DEG = 10.0
AXES = ("Z", "Y", "X")
NO_RECORD = (
    "the model has no record of its training data (registered before it was kept): "
    "no warnings about scans unlike it"
)


def _phase_range(phases: tuple[int, int]) -> tuple[int, int]:
    if not 2 <= phases[0] <= phases[1]:
        raise ValueError(f"{list(phases)} is not lo <= hi phases, lo >= 2")
    return phases


_Mm = Annotated[float, Field(gt=0)]


# The record as stored (JSON keys), checked by `data_store.schema`; keys it does not know are
# left alone (a later release may add some).
@pydantic.with_config(ConfigDict(extra="ignore", allow_inf_nan=False))
@dataclass(frozen=True)
class _Record:
    phases: Annotated[tuple[int, int], AfterValidator(_phase_range)] | None = None
    spacing_mm_min: tuple[_Mm, _Mm, _Mm] | None = None
    spacing_mm_max: tuple[_Mm, _Mm, _Mm] | None = None
    orientations: tuple[str, ...] | None = None
    obliquity_deg_max: Annotated[float, Field(ge=0, le=90)] | None = None


@dataclass(frozen=True)
class TrainingData:
    """The ranges prediction compares each case with (None: not recorded, not checked).

    Attributes:
        phases: (lo, hi) phase counts seen in training.
        spacing_min: smallest spacing per axis (Z, Y, X), mm.
        spacing_max: largest spacing per axis (Z, Y, X), mm.
        orientations: the training files' orientations (axis codes; kept, not compared).
        obliquity_max: the largest obliquity of a training file, degrees (records kept before
            it have none: not checked).
    """

    phases: tuple[int, int] | None = None
    spacing_min: tuple[float, float, float] | None = None
    spacing_max: tuple[float, float, float] | None = None
    orientations: tuple[str, ...] | None = None
    obliquity_max: float | None = None

    @classmethod
    def from_model_config(cls, config: dict) -> tuple[TrainingData | None, str]:
        """The model's record and a note to show once (`""` when there is a usable record)."""
        record = config.get("training_data")
        if record is None:
            return None, NO_RECORD
        try:
            r = schema.validate(_Record, record, "training_data.")
        except InputError as err:
            return None, f"the model's training-data record is malformed ({err}): no warnings"
        return cls(
            r.phases, r.spacing_mm_min, r.spacing_mm_max, r.orientations, r.obliquity_deg_max
        ), ""

    def unlike(self, phases: int, spacing, obliquity_deg: float = 0.0) -> list[str]:
        """What about a case differs from the training data; [] when nothing does.

        Args:
            phases: the case's phase count T.
            spacing: its voxel size in mm, (Z, Y, X).
            obliquity_deg: its phase-0 file's obliquity (`Geometry.obliquity_deg`).
        """
        found = []
        if self.phases is not None and not self.phases[0] <= phases <= self.phases[1]:
            lo, hi = self.phases
            found.append(f"{phases} phases (trained on {lo if lo == hi else f'{lo}-{hi}'})")
        for a, axis in enumerate(AXES):
            s = float(spacing[a])
            lo = self.spacing_min[a] if self.spacing_min else None
            hi = self.spacing_max[a] if self.spacing_max else None
            if (lo is not None and s < lo / SPACING_FACTOR) or (
                hi is not None and s > hi * SPACING_FACTOR
            ):
                trained = "-".join(f"{v:.3g}" for v in sorted({lo, hi} - {None}))
                found.append(f"{axis} spacing {s:.3g} mm (trained on {trained} mm)")
        if (
            self.obliquity_max is not None
            and obliquity_deg > self.obliquity_max + OBLIQUITY_MARGIN_DEG
        ):
            found.append(
                f"oblique by {obliquity_deg:.0f} degrees after reorienting (trained on at "
                f"most {self.obliquity_max:.0f})"
            )
        return found
