"""A picture and a few numbers per case: what `tsesnet predict` writes beside each mask
(`tsesnet.serving.report`) and what training logs to MLflow for a few validation cases
(`tsesnet.training.validation`), so both are drawn alike.

Shape legend: T phases, Z Y X voxels in the store's canonical order (Z=S, Y=A, X=R); spacing in mm
in the same order.

Pure numpy + matplotlib on arrays:

- the picture (`overlay_png`): the three orthogonal planes (axial, coronal, sagittal) through the
  centre of the largest connected component of the mask, top row the peak-enhancement phase with
  the mask's outline, bottom row the subtraction image (peak − pre-contrast), and the lesion's
  kinetic curve beside them;
- the numbers (`lesion_numbers`): tumour volume in mL (the whole mask), the largest diameter in
  mm (of the largest component, between voxel centres), and the kinetic curve: the mean signal
  in the mask per phase relative to the pre-contrast phase (phase 0), in percent, read the way
  radiologists read DCE-MRI (the BI-RADS curve types): from the early post-contrast phase
  (phase 1) to the late one (the last), a rise of more than +10 % is *persistent* (type I), a
  fall of more than 10 % is *wash-out* (type III), anything between is *plateau* (type II).
  Two phases have no late phase: the curve type is then "n/a", as it is for an empty mask.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

#: Relative change from the early to the late post-contrast phase that separates the curve types.
CURVE_THRESHOLD = 0.10
CURVE_TYPES = ("persistent", "plateau", "wash-out")


@dataclass(frozen=True)
class LesionNumbers:
    """What the report says about one case's mask.

    Attributes:
        volume_ml: volume of the whole mask, mL.
        diameter_mm: largest distance between two voxel centres of the largest component, mm.
        enhancement_pct: per phase, mean signal in the mask relative to phase 0, percent
            (phase 0 is 0); empty for an empty mask.
        curve_type: "persistent", "plateau", "wash-out", or "n/a" (empty mask, or no late phase).
        peak_phase: the phase with the highest mean signal in the mask (1 for an empty mask).
    """

    volume_ml: float
    diameter_mm: float
    enhancement_pct: tuple[float, ...]
    curve_type: str
    peak_phase: int


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (Z, Y, X) as bool; all False if empty."""
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def largest_diameter_mm(component: np.ndarray, spacing) -> float:
    """Largest distance (mm) between two voxel centres of `component` (Z, Y, X) bool.

    The two farthest voxels lie on the boundary; of more than 4000 boundary voxels an evenly
    spaced subset is compared (all pairs of 4000: 8 M distances, under a second).
    """
    from scipy import ndimage
    from scipy.spatial.distance import pdist

    if not component.any():
        return 0.0
    boundary = component & ~ndimage.binary_erosion(component)
    points = np.argwhere(boundary) * np.asarray(spacing, np.float64)  # (N, 3) mm
    if len(points) < 2:
        return 0.0
    if len(points) > 4000:
        points = points[np.linspace(0, len(points) - 1, 4000).astype(int)]
    return float(pdist(points).max())


def kinetic_curve(image: np.ndarray, mask: np.ndarray) -> tuple[float, ...]:
    """Mean signal in `mask` per phase relative to phase 0, percent; () for an empty mask.

    Args:
        image: (T, Z, Y, X) as scanned (not normalised: the ratio is the scanner's).
        mask: (Z, Y, X), nonzero inside.
    """
    inside = mask > 0
    if not inside.any():
        return ()
    means = np.array([float(image[t][inside].mean()) for t in range(image.shape[0])])
    base = means[0] if means[0] != 0 else float("nan")
    return tuple(float(100.0 * (m - means[0]) / abs(base)) for m in means)


def curve_type(enhancement_pct) -> str:
    """The BI-RADS kinetic curve type from phase 1 (early) to the last phase (late).

    Persistent: late more than `CURVE_THRESHOLD` above early; wash-out: more than that below;
    plateau: in between. "n/a" with fewer than three phases, an empty mask or no signal.
    """
    if len(enhancement_pct) < 3:
        return "n/a"
    early, late = 1.0 + enhancement_pct[1] / 100.0, 1.0 + enhancement_pct[-1] / 100.0
    if not (math.isfinite(early) and math.isfinite(late)) or early <= 0:
        return "n/a"
    change = (late - early) / early
    if change > CURVE_THRESHOLD:
        return "persistent"
    if change < -CURVE_THRESHOLD:
        return "wash-out"
    return "plateau"


def lesion_numbers(image: np.ndarray, mask: np.ndarray, spacing) -> LesionNumbers:
    """Volume, diameter and kinetic curve of `mask` (Z, Y, X) on `image` (T, Z, Y, X)."""
    voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    curve = kinetic_curve(image, mask)
    peak = int(np.argmax(curve[1:])) + 1 if len(curve) > 1 else min(1, image.shape[0] - 1)
    return LesionNumbers(
        volume_ml=float((mask > 0).sum()) * voxel_ml,
        diameter_mm=largest_diameter_mm(largest_component(mask), spacing),
        enhancement_pct=curve,
        curve_type=curve_type(curve),
        peak_phase=peak,
    )


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre voxel of the largest component (of the volume if the mask is empty)."""
    comp = largest_component(mask)
    if not comp.any():
        return tuple(n // 2 for n in mask.shape)
    return tuple(int(round(c)) for c in np.argwhere(comp).mean(axis=0))


def _planes(vol: np.ndarray, centre, spacing):
    """(title, 2-D plane, aspect) for the axial, coronal and sagittal planes through `centre`.

    Canonical (Z=S, Y=A, X=R); shown with S up and A up, R to the right (no radiological flip:
    the axes are labelled instead).
    """
    z, y, x = centre
    sz, sy, sx = spacing
    return [
        (f"axial z={z}", vol[z], sy / sx),  # (Y, X)
        (f"coronal y={y}", vol[:, y, :], sz / sx),  # (Z, X)
        (f"sagittal x={x}", vol[:, :, x], sz / sy),  # (Z, Y)
    ]


def overlay_png(
    image: np.ndarray, mask: np.ndarray, spacing, numbers: LesionNumbers, title: str
) -> bytes:
    """The case's picture as PNG bytes: the peak phase with the mask outline and the
    subtraction image (peak − pre-contrast) in three planes, and the kinetic curve.

    Args:
        image: (T, Z, Y, X) as scanned; T >= 2.
        mask: (Z, Y, X) predicted mask.
        spacing: (Z, Y, X) mm.
        numbers: `lesion_numbers` of the same arrays.
        title: the figure's title (the case ID).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; also set before pyplot is imported anywhere here
    from matplotlib.figure import Figure

    image = image.astype(np.float32)
    peak = image[numbers.peak_phase]
    sub = peak - image[0]
    centre = _centre(mask)
    fig = Figure(figsize=(13, 6.4), dpi=80, layout="constrained")
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.15])
    rows = [
        (f"phase {numbers.peak_phase} (peak)", peak, "gray"),
        (f"subtraction {numbers.peak_phase} − 0", sub, "inferno"),
    ]
    for r, (label, vol, cmap) in enumerate(rows):
        lo, hi = np.percentile(vol, [1, 99.5])
        for c, ((name, plane, aspect), (_, mplane, _)) in enumerate(
            zip(_planes(vol, centre, spacing), _planes(mask, centre, spacing), strict=True)
        ):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(plane, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, origin="lower")
            if r == 0 and mplane.any():
                ax.contour(mplane > 0, levels=[0.5], colors="lime", linewidths=1.2)
            ax.set_title(f"{label}\n{name}" if c == 0 else name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(grid[:, 3])
    curve = numbers.enhancement_pct
    if curve:
        ax.plot(range(len(curve)), curve, "o-", color="tab:red")
        ax.set_xticks(range(len(curve)))
        ax.axhline(0, color="gray", lw=0.8)
    else:
        ax.text(0.5, 0.5, "empty mask: no curve", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("phase")
    ax.set_ylabel("mean signal in mask vs phase 0 (%)")
    ax.set_title(f"kinetic curve: {numbers.curve_type}", fontsize=10)
    fig.suptitle(
        f"{title}: {numbers.volume_ml:.2f} mL, largest diameter {numbers.diameter_mm:.1f} mm",
        fontsize=12,
    )
    buf = io.BytesIO()
    # No timestamp or software tag in the file: the same case gives the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def enhancement_text(curve) -> str:
    """`0;52.1;61.3`: the curve as one CSV cell."""
    return ";".join(f"{v:.1f}" for v in curve)
