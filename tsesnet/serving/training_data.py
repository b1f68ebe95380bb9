"""Warnings for scans unlike the ones a model was trained on.

What the training cases looked like is stored with the registered model (`model_config.json`'s
`training_data`, written by `tsesnet.tracking.registry.log_and_register`)::

    {"phases": [lo, hi], "spacing_mm_min": [z, y, x], "spacing_mm_max": [z, y, x],
     "orientations": ["RAS", "LPS", ...]}

A case is unlike the training data, and prediction warns (it still predicts), when

- its phase count T lies outside [lo, hi];
- its voxel spacing on an axis is below ``min / 1.5`` or above ``max * 1.5`` (mm, in the
  store's canonical axis order Z, Y, X, as `data_store.geometry.Geometry.spacing` gives it);
- its phase-0 file's orientation (nibabel's axis codes of its affine, e.g. ``LPS``; see
  `Geometry.orientation`) is not among the training orientations.

A model registered before the record was kept has none: no warnings, and one note says so. A key
missing from the record skips that check; a malformed record is reported like a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass

SPACING_FACTOR = 1.5
AXES = ("Z", "Y", "X")
NO_RECORD = (
    "the model has no record of its training data (registered before it was kept): "
    "no warnings about scans unlike it"
)


@dataclass(frozen=True)
class TrainingData:
    """The ranges prediction compares each case with (None: not recorded, not checked).

    Attributes:
        phases: (lo, hi) phase counts seen in training.
        spacing_min: smallest spacing per axis (Z, Y, X), mm.
        spacing_max: largest spacing per axis (Z, Y, X), mm.
        orientations: the training files' orientations (axis codes).
    """

    phases: tuple[int, int] | None = None
    spacing_min: tuple[float, float, float] | None = None
    spacing_max: tuple[float, float, float] | None = None
    orientations: tuple[str, ...] | None = None

    @classmethod
    def from_model_config(cls, config: dict) -> tuple[TrainingData | None, str]:
        """The model's record and a note to show once (`""` when there is a usable record)."""
        record = config.get("training_data")
        if record is None:
            return None, NO_RECORD
        try:
            return cls._parse(record), ""
        except (TypeError, ValueError, AttributeError) as err:
            return None, f"the model's training-data record is malformed ({err}): no warnings"

    @classmethod
    def _parse(cls, record: dict) -> TrainingData:
        phases = record.get("phases")
        if phases is not None:
            lo, hi = (int(v) for v in phases)
            if not 2 <= lo <= hi:
                raise ValueError(f"phases {phases}")
            phases = (lo, hi)
        spacing = []
        for key in ("spacing_mm_min", "spacing_mm_max"):
            value = record.get(key)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3 or not all(v > 0 for v in value):
                    raise ValueError(f"{key} {record[key]}")
            spacing.append(value)
        orientations = record.get("orientations")
        if orientations is not None:
            if isinstance(orientations, str) or not all(isinstance(o, str) for o in orientations):
                raise ValueError(f"orientations {orientations}")
            orientations = tuple(orientations)
        return cls(phases, spacing[0], spacing[1], orientations)

    def unlike(self, phases: int, spacing, orientation: str) -> list[str]:
        """What about a case differs from the training data; [] when nothing does.

        Args:
            phases: the case's phase count T.
            spacing: its voxel size in mm, (Z, Y, X).
            orientation: its phase-0 file's axis codes (`Geometry.orientation`).
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
        if self.orientations is not None and orientation not in self.orientations:
            found.append(f"orientation {orientation} (trained on {', '.join(self.orientations)})")
        return found
