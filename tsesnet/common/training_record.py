"""The training record: what a model's training cases looked like, and how a case differs.

One schema for the writer and the reader. Training describes its cases
(`tsesnet.training.driver.describe_training_cases`), the registry stores the record with the
model (`tsesnet.tracking.registry.log_and_register`), and prediction reads it back to warn about
scans unlike it (`TrainingRecord.from_model_config`, `TrainingRecord.unlike`). It is kept in
``model_config.json`` under `RECORD_KEY` (``"training_data"``, the key every release wrote)::

    {"phases": [lo, hi], "spacing_mm_min": [z, y, x], "spacing_mm_max": [z, y, x],
     "orientations": ["LPS", "RAS", ...], "obliquity_deg_max": d}

A case is unlike the training cases, and prediction warns (it still predicts), where the model
is likely wrong on it:

- its phase count T lies outside [lo, hi];
- its voxel spacing on an axis is below ``min / 1.5`` or above ``max * 1.5`` (mm, in the
  store's canonical axis order Z, Y, X, as `data_store.geometry.Geometry.spacing` gives it);
- its phase-0 file is more oblique than any training file by over `OBLIQUITY_MARGIN_DEG`
  (`Geometry.obliquity_deg`): the rotation that reorienting to the canonical order leaves.

Its orientation alone (``LPS``, ``RAS``...: axis swaps and flips) is no reason: every case is
reoriented to the canonical order before the model sees it, as in training (the synthetic demo
cohort draws a random orientation per case). Intensities are no reason either: each case is
normalised by its own percentiles (`data_store.normalize`), as in training.

Records written by earlier releases read unchanged. A model registered before the record was
kept has none: no warnings, and one note says so. A key missing from the record (records kept
before obliquity have no ``obliquity_deg_max``) skips that check; keys it does not know are left
alone (a later release may add some); a malformed record is reported like a missing one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import pydantic
from pydantic import AfterValidator, ConfigDict, Field

from data_store import schema
from data_store.errors import InputError

#: The record's key in a registered model's ``model_config.json``.
RECORD_KEY = "training_data"
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


@pydantic.with_config(ConfigDict(extra="ignore", allow_inf_nan=False))
@dataclass(frozen=True)
class TrainingRecord:
    """What the training cases looked like (None: not recorded, not checked).

    Attributes:
        phases: (lo, hi) phase counts seen in training.
        spacing_mm_min: smallest spacing per axis (Z, Y, X), mm.
        spacing_mm_max: largest spacing per axis (Z, Y, X), mm.
        orientations: the training files' orientations (axis codes; kept, not compared).
        obliquity_deg_max: the largest obliquity of a training file, degrees.
    """

    phases: Annotated[tuple[int, int], AfterValidator(_phase_range)] | None = None
    spacing_mm_min: tuple[_Mm, _Mm, _Mm] | None = None
    spacing_mm_max: tuple[_Mm, _Mm, _Mm] | None = None
    orientations: tuple[str, ...] | None = None
    obliquity_deg_max: Annotated[float, Field(ge=0, le=90)] | None = None

    def as_json(self) -> dict:
        """The record as stored (JSON: lists for tuples)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_model_config(cls, config: dict) -> tuple[TrainingRecord | None, str]:
        """A model's record (`model_config.json` as a dict) and a note to show once (`""` when
        there is a usable record)."""
        record = config.get(RECORD_KEY)
        if record is None:
            return None, NO_RECORD
        try:
            return schema.validate(cls, record, f"{RECORD_KEY}."), ""
        except InputError as err:
            return None, f"the model's training-data record is malformed ({err}): no warnings"

    def unlike(self, phases: int, spacing, obliquity_deg: float = 0.0) -> list[str]:
        """What about a case differs from the training cases; [] when nothing does.

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
            lo = self.spacing_mm_min[a] if self.spacing_mm_min else None
            hi = self.spacing_mm_max[a] if self.spacing_mm_max else None
            if (lo is not None and s < lo / SPACING_FACTOR) or (
                hi is not None and s > hi * SPACING_FACTOR
            ):
                trained = "-".join(f"{v:.3g}" for v in sorted({lo, hi} - {None}))
                found.append(f"{axis} spacing {s:.3g} mm (trained on {trained} mm)")
        if (
            self.obliquity_deg_max is not None
            and obliquity_deg > self.obliquity_deg_max + OBLIQUITY_MARGIN_DEG
        ):
            found.append(
                f"oblique by {obliquity_deg:.0f} degrees after reorienting (trained on at "
                f"most {self.obliquity_deg_max:.0f})"
            )
        return found
