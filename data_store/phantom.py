"""The synthetic breast DCE-MRI phantom, one case in which the time axis matters.

The cohort writer (`tsesnet synth`) is `data_store.synth`.

Each case is a 4D scan, phase 0 pre-contrast and phases 1..T-1 post-contrast, of two
half-ellipsoid breasts on a chest wall, with air around them. Every voxel belongs to one tissue
and follows that tissue's kinetic curve (signal against acquisition time, T = 6 phases at
0, 60, ..., 300 s by default):

    S(t) = S0 * (1 + A * (1 - exp(-t' / tau)) * exp(-k * t' / 60)),   t' = max(t - t0, 0)   (K1)

with baseline S0, relative enhancement amplitude A, wash-in time constant tau (s), wash-out rate
k (per minute; k < 0 keeps rising) and bolus arrival t0 (8-20 s).

Defaults (`SynthConfig`; S0 before the case's gain, ranges drawn per lesion or per case):

| tissue             | label | S0  | A         | tau (s) | k (/min)    | curve                    |
|--------------------|-------|-----|-----------|---------|-------------|--------------------------|
| fat (fat-sat)      | no    | 100 | 0.05-0.15 | 90-150  | 0           | dark, barely enhances    |
| fibroglandular     | no    | 280 | 0.3-1.6   | 90-300  | -0.03-0     | slow, persistent         |
| vessels            | no    | 220 | 2.2-3.2   | 8-15    | 0.04-0.10   | early, strong, declining |
| benign foci        | no    | 290 | 1.0-2.4   | 20-45   | -0.04-0     | fast-ish, persistent     |
| malignant tumours  | yes   | 300 | 1.0-2.4   | 15-35   | 0.06-0.16   | fast wash-in, wash-out   |
| heart (blood pool) | no    | 250 | 3.5-4.5   | 5-10    | 0.05-0.10   | brightest structure      |
| skin/muscle/thorax | no    | 180-280 | 0.2-0.6 | 30-120 | 0-0.04    | mild                     |

Lesion baselines and amplitudes vary per lesion and inside a lesion, and a smooth bias field and
a per-case scanner gain multiply everything, so at the tumours' peak phase tumour, benign-focus,
vessel and FGT intensities overlap: no threshold on one phase finds the tumours, while the shape
of the curve (wash-out, e.g. late minus peak) separates tumours from benign foci. Measured on
6 default cases normalised per case (0.1/99.9 percentiles), the best single threshold separating
tumour from benign-focus voxels reaches 0.57-0.73 balanced accuracy depending on the phase (0.69
at the peak, 120 s), late minus peak 0.99 (`tests/test_synth.py`). Vessels wash out too; they
are told apart by shape (thin tubes), not by kinetics.

Arrays: `image` (T, Z, Y, X) int16 and `mask` (Z, Y, X) uint8 are on the grid of the written
NIfTI files: the file's data array (i, j, k) is `vol.transpose(2, 1, 0)`, i along R/L, j along
A/P, k along S/I, each possibly reversed (LPS, LAS, ... orientations), and `affine` maps (i, j, k)
to scanner mm with a small random rotation and offset. Its column norms are the spacing
(X, Y, Z); the header zooms match. Spacing in this module is in (Z, Y, X) order, in mm.

Everything is deterministic by seed: case `n` of cohort seed `s` is drawn from
`numpy.random.default_rng([s, n])`, so the same seed gives byte-identical files and a case does not
depend on how many cases are written.

Shape legend: T phases, Z Y X voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_store.errors import InputError

CASE_PREFIX = "SYN"
MIN_SHAPE = (8, 32, 32)  # (Z, Y, X): below this the breasts cannot hold a tumour of a few voxels

# Tissue codes of `SynthCase.tissues`: an explicit registry, painted in this order.
TISSUES = {
    "air": 0,
    "thorax": 1,
    "muscle": 2,
    "skin": 3,
    "fat": 4,
    "fgt": 5,
    "vessel": 6,
    "benign": 7,
    "tumour": 8,
    "heart": 9,
}


@dataclass(frozen=True, kw_only=True)
class Kinetics:
    """The kinetic curve (K1) of one tissue; ranges are (low, high), drawn uniformly.

    Lesions and vessels draw their own values each; diffuse tissues one set per case.

    Attributes:
        baseline: mean pre-contrast signal S0 (arbitrary units before the case's gain).
        baseline_cv: spread of S0 between lesions (sd of log S0).
        amplitude: relative enhancement A (1.0 = +100 % at the plateau).
        wash_in_s: wash-in time constant tau in seconds.
        washout_per_min: wash-out rate k per minute; negative values keep rising.
        heterogeneity: smooth within-lesion variation of A (fraction, sd).
    """

    baseline: float
    baseline_cv: float = 0.0
    amplitude: tuple[float, float]
    wash_in_s: tuple[float, float]
    washout_per_min: tuple[float, float] = (0.0, 0.0)
    heterogeneity: float = 0.0


@dataclass(kw_only=True)
class SynthConfig:
    """Every parameter of the synthetic cohort. Lengths in mm, times in s, axes (Z, Y, X).

    Attributes:
        shape: volume shape (Z, Y, X) in voxels; at least `MIN_SHAPE`.
        spacing: voxel size (Z, Y, X) in mm; None derives it as `fov_mm / shape`, so a larger
            shape is a finer scan of the same anatomy. Default shape gives 3.0 x 1.75 x 1.75 mm.
        fov_mm: field of view (Z, Y, X) used when `spacing` is None.
        phases: number of phases T >= 2 (phase 0 pre-contrast).
        times_s: acquisition times of the T phases; None: 0 then T-1 post-contrast phases evenly
            from `first_post_s` to `last_post_s` (T = 6: 0, 60, 120, 180, 240, 300 s).
        first_post_s: time of the first post-contrast phase.
        last_post_s: time of the last post-contrast phase.
        bolus_arrival_s: contrast arrival t0 range in (K1).
        fat, fgt, vessel, benign, tumour, skin, muscle, thorax, heart: kinetic curves per
            tissue. The heart's blood pool is the brightest post-contrast structure, as in real
            scans, so the 99.9th percentile used to normalise lies above the tumours.
        breast_halfwidth: breast radius along X as a fraction of the X field of view (range).
        breast_depth: breast protrusion along Y (anterior) as a fraction of the Y FOV (range).
        breast_height: breast radius along Z as a fraction of the Z FOV (range).
        breast_offset: breast centre distance from the midline, fraction of the X FOV (range).
        chest_wall: chest-wall position from the posterior edge, fraction of the Y FOV (range).
        chest_wall_curvature: how much further back the chest wall lies at the sides (at the X
            edge of the FOV), fraction of the Y FOV.
        body_halfwidth: half width of the thorax, fraction of the X FOV.
        heart_centre: centre of the heart's blood pool (Z, Y, X), fractions of the FOV from
            (the centre, the posterior edge, the centre).
        heart_radii: its radii (Z, Y, X), fractions of the FOV.
        skin_mm: skin thickness.
        muscle_mm: pectoral muscle thickness.
        fgt_fraction: fraction of breast volume that is fibroglandular (range, per case).
        fgt_scale_mm: smoothness (Gaussian sigma) of the noise that FGT blobs are cut from.
        vessels_per_breast: number of vessels per breast (inclusive range).
        vessel_radius_mm: vessel radius (range).
        benign_count: number of benign enhancing foci per case (inclusive range).
        benign_diameter_mm: benign focus diameter (range).
        tumour_count: number of labelled malignant tumours per case (inclusive range).
        tumour_diameter_mm: tumour diameter, drawn log-uniformly (range; see below for the floor).
        tumour_irregularity: amplitude of the low-order radius modulation (lobulation).
        min_lesion_voxels_across: lesions are at least this many in-plane voxels across, so that
            a coarse or tiny grid still shows every tumour: tumour diameters are drawn from
            [max(low, this x in-plane spacing), high], 10-30 mm by default: the primary
            tumours of public DCE-MRI segmentation cohorts are mostly 1-3 cm, usually one per
            case. (Down to 3 mm, the per-case Dice of a perfect detector is dominated by the
            boundary voxels of lesions a few voxels across.)
        min_lesion_voxels: a tumour with fewer voxels than this is grown by 25 % steps.
        gain: per-case scanner gain multiplying all signal (range).
        noise_sd: noise sd per channel of the complex signal (Rician magnitude), before gain.
        bias_strength: sd of the coefficients of the smooth log bias field (quadratic).
        psf_sigma_vox: Gaussian point-spread blur of the noise-free signal, in voxels.
        orientations: file orientations drawn per case (nibabel axis codes, flips only).
        max_rotation_deg: largest rotation of the affine about a random axis.
        max_offset_mm: largest shift of the volume centre from the scanner origin, per axis.
    """

    shape: tuple[int, int, int] = (32, 96, 96)
    spacing: tuple[float, float, float] | None = None
    fov_mm: tuple[float, float, float] = (96.0, 168.0, 168.0)
    phases: int = 6
    times_s: tuple[float, ...] | None = None
    first_post_s: float = 60.0
    last_post_s: float = 300.0
    bolus_arrival_s: tuple[float, float] = (8.0, 20.0)

    fat: Kinetics = Kinetics(baseline=100.0, amplitude=(0.05, 0.15), wash_in_s=(90.0, 150.0))
    fgt: Kinetics = Kinetics(
        baseline=280.0,
        amplitude=(0.3, 1.6),
        wash_in_s=(90.0, 300.0),
        washout_per_min=(-0.03, 0.0),
        heterogeneity=0.2,
    )
    vessel: Kinetics = Kinetics(
        baseline=220.0,
        baseline_cv=0.1,
        amplitude=(2.2, 3.2),
        wash_in_s=(8.0, 15.0),
        washout_per_min=(0.04, 0.10),
    )
    benign: Kinetics = Kinetics(
        baseline=290.0,
        baseline_cv=0.15,
        amplitude=(1.0, 2.4),
        wash_in_s=(20.0, 45.0),
        washout_per_min=(-0.04, 0.0),
        heterogeneity=0.1,
    )
    tumour: Kinetics = Kinetics(
        baseline=300.0,
        baseline_cv=0.15,
        amplitude=(1.0, 2.4),
        wash_in_s=(15.0, 35.0),
        washout_per_min=(0.06, 0.16),
        heterogeneity=0.15,
    )
    skin: Kinetics = Kinetics(baseline=280.0, amplitude=(0.3, 0.6), wash_in_s=(60.0, 120.0))
    muscle: Kinetics = Kinetics(baseline=250.0, amplitude=(0.2, 0.4), wash_in_s=(40.0, 80.0))
    thorax: Kinetics = Kinetics(
        baseline=180.0, amplitude=(0.2, 0.5), wash_in_s=(30.0, 60.0), washout_per_min=(0.0, 0.04)
    )
    heart: Kinetics = Kinetics(
        baseline=250.0, amplitude=(3.5, 4.5), wash_in_s=(5.0, 10.0), washout_per_min=(0.05, 0.10)
    )

    breast_halfwidth: tuple[float, float] = (0.17, 0.21)
    breast_depth: tuple[float, float] = (0.38, 0.52)
    breast_height: tuple[float, float] = (0.36, 0.44)
    breast_offset: tuple[float, float] = (0.21, 0.25)
    chest_wall: tuple[float, float] = (0.34, 0.40)
    chest_wall_curvature: float = 0.08
    body_halfwidth: float = 0.47
    heart_centre: tuple[float, float, float] = (-0.45, 0.12, 0.04)
    heart_radii: tuple[float, float, float] = (0.45, 0.16, 0.22)
    skin_mm: float = 2.0
    muscle_mm: float = 8.0
    fgt_fraction: tuple[float, float] = (0.15, 0.45)
    fgt_scale_mm: float = 5.0
    vessels_per_breast: tuple[int, int] = (2, 4)
    vessel_radius_mm: tuple[float, float] = (0.8, 1.6)
    benign_count: tuple[int, int] = (1, 3)
    benign_diameter_mm: tuple[float, float] = (5.0, 20.0)
    tumour_count: tuple[int, int] = (1, 2)
    tumour_diameter_mm: tuple[float, float] = (10.0, 30.0)
    tumour_irregularity: float = 0.25
    min_lesion_voxels_across: float = 3.0
    min_lesion_voxels: int = 8

    gain: tuple[float, float] = (0.8, 1.6)
    noise_sd: float = 10.0
    bias_strength: float = 0.12
    psf_sigma_vox: float = 0.5
    orientations: tuple[str, ...] = ("LPS", "RAS", "LAS", "LPI", "RPS")
    max_rotation_deg: float = 6.0
    max_offset_mm: float = 30.0

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or any(s < m for s, m in zip(self.shape, MIN_SHAPE, strict=True)):
            raise InputError(
                f"{' '.join(map(str, self.shape))} is too small: need at least "
                f"Z Y X = {' '.join(map(str, MIN_SHAPE))}",
                param="shape",
            )
        if self.phases < 2:
            raise InputError(
                f"{self.phases}: need at least 2 (pre-contrast and one post-contrast)",
                param="phases",
            )
        if self.times_s is not None and len(self.times_s) != self.phases:
            raise InputError(f"times_s has {len(self.times_s)} entries for {self.phases} phases")
        for code in self.orientations:
            if len(code) != 3 or not all(
                c in pair for c, pair in zip(code, ("LR", "AP", "SI"), strict=True)
            ):
                raise InputError(f"orientation {code!r}: expected e.g. 'LPS' (flips only)")
        lo, hi = self.tumour_count
        if not 1 <= lo <= hi:
            raise InputError(f"tumour_count {self.tumour_count}: need 1 <= low <= high")

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """Spacing (Z, Y, X) in mm: `spacing`, or `fov_mm / shape`."""
        if self.spacing is not None:
            return tuple(float(s) for s in self.spacing)
        return tuple(f / n for f, n in zip(self.fov_mm, self.shape, strict=True))

    @property
    def acquisition_times(self) -> tuple[float, ...]:
        """Acquisition time of each phase in s (phase 0 pre-contrast at 0 s)."""
        if self.times_s is not None:
            return tuple(float(t) for t in self.times_s)
        post = np.linspace(self.first_post_s, self.last_post_s, self.phases - 1)
        return (0.0, *(float(t) for t in post))


@dataclass
class SynthCase:
    """One synthetic case with the ground truth behind it.

    Attributes:
        image: (T, Z, Y, X) int16 on the file's grid.
        mask: (Z, Y, X) uint8 tumour labels {0, 1}.
        affine: (4, 4) float64 mapping file voxel (i, j, k) = (X, Y, Z) to mm.
        tissues: (Z, Y, X) uint8 tissue codes (`TISSUES`).
        spacing: (Z, Y, X) mm.
        times_s: acquisition times of the T phases.
        tumour_diameters_mm: nominal diameter of each labelled tumour.
        orientation: the file's axis codes, e.g. 'LPS'.
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    tissues: np.ndarray
    spacing: tuple[float, float, float]
    times_s: tuple[float, ...]
    tumour_diameters_mm: list[float]
    orientation: str


# ---------------------------------------------------------------------------------------------
# Small random helpers


def _uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(pair[0], pair[1]))


def _smooth_noise(rng, shape, sigma_vox) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean, unit sd. (Z, Y, X) float32."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    n -= n.mean()
    return n / max(float(n.std()), 1e-6)


def _draw_curve(rng, kin: Kinetics) -> tuple[float, float, float, float]:
    """(S0, A, tau, k) of one lesion, vessel or diffuse tissue."""
    s0 = kin.baseline * math.exp(kin.baseline_cv * float(rng.standard_normal()))
    return (
        s0,
        _uniform(rng, kin.amplitude),
        _uniform(rng, kin.wash_in_s),
        _uniform(rng, kin.washout_per_min),
    )


def _heterogeneity(rng, shape, sp, amount) -> np.ndarray:
    """Smooth within-lesion factor on A: 1 + amount * noise (2 mm scale), kept in [0.5, 1.5]."""
    if amount <= 0 or min(shape) == 0:
        return np.ones(shape, np.float32)
    noise = _smooth_noise(rng, shape, [2.0 / s for s in sp])
    return np.clip(1.0 + amount * noise, 0.5, 1.5)


def _largest_component(vol: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a bool volume (empty stays empty)."""
    from scipy.ndimage import label

    lab, n = label(vol, np.ones((3, 3, 3), bool))
    if n <= 1:
        return vol
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def _min_diameter_mm(cfg: SynthConfig, sp) -> float:
    return cfg.min_lesion_voxels_across * max(sp[1], sp[2])


# ---------------------------------------------------------------------------------------------
# Anatomy in the canonical RAS grid: Z to superior, Y to anterior, X to the patient's right


class _Painter:
    """Per-voxel curve parameters (S0, A, tau, k) and tissue codes, painted layer by layer."""

    def __init__(self, shape):
        self.tissues = np.zeros(shape, np.uint8)
        self.s0 = np.zeros(shape, np.float32)
        self.amp = np.zeros(shape, np.float32)
        self.tau = np.ones(shape, np.float32)
        self.k = np.zeros(shape, np.float32)

    def paint(self, where, tissue, curve, amp_scale=None, box=(slice(None),) * 3):
        """Give voxels `where` (within `box`, if given) the tissue and curve (S0, A, tau, k)."""
        s0, a, tau, k = curve
        where = np.broadcast_to(where, self.tissues[box].shape)
        self.tissues[box][where] = TISSUES[tissue]
        self.s0[box][where] = s0
        self.amp[box][where] = a if amp_scale is None else a * amp_scale[where]
        self.tau[box][where] = tau
        self.k[box][where] = k


def _lesion(rng, grid, sp, centre, radius_mm, irregularity, axes=(1.0, 1.0, 1.0)):
    """A lobulated ellipsoid in its bounding box: (box slices, (z, y, x) bool mask in the box).

    The radius along unit direction u is r(u) = R * (1 + a * f(u)), f a sum of a few cosines of
    low spatial frequency over the sphere (unit sd, clipped to +-2), so the lesion is
    star-shaped and connected.
    """
    reach = radius_mm * (1 + 2 * irregularity) * max(axes)
    box = tuple(
        slice(
            max(int(np.floor((c - reach - g.ravel()[0]) / s)), 0),
            max(int(np.ceil((c + reach - g.ravel()[0]) / s)) + 1, 0),
        )
        for c, g, s in zip(centre, grid, sp, strict=True)
    )
    z, y, x = grid[0][box[0]], grid[1][:, box[1]], grid[2][:, :, box[2]]
    d = [(z - centre[0]) / axes[0], (y - centre[1]) / axes[1], (x - centre[2]) / axes[2]]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    n_terms = 4
    f = np.zeros(r.shape, np.float32)
    if irregularity > 0:
        u = [di / np.maximum(r, 1e-6) for di in d]
        for _ in range(n_terms):
            kvec = rng.standard_normal(3)
            kvec *= rng.uniform(0.6, 1.6) / np.linalg.norm(kvec)
            phase = rng.uniform(0, 2 * np.pi)
            f += np.cos(2 * np.pi * (kvec[0] * u[0] + kvec[1] * u[1] + kvec[2] * u[2]) + phase)
        f /= math.sqrt(n_terms / 2)  # unit sd
    return box, r <= radius_mm * (1 + irregularity * np.clip(f, -2.0, 2.0))


def _pick_centre(rng, room, needed_mm, taken, grid_mm):
    """A voxel whose distance inside the breast is >= needed_mm and that keeps clear of `taken`.

    Returns (centre_mm, needed_mm actually used) or None; shrinks the need when nothing fits.
    """
    z, y, x = grid_mm
    for _ in range(6):
        ok = room >= needed_mm
        for c, reach in taken:
            dist = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
            ok &= dist >= reach + needed_mm
        idx = np.flatnonzero(ok)
        if idx.size:
            flat = idx[rng.integers(idx.size)]
            iz, iy, ix = np.unravel_index(flat, room.shape)
            return (float(z[iz, 0, 0]), float(y[0, iy, 0]), float(x[0, 0, ix])), needed_mm
        needed_mm *= 0.8
    return None


def _vessel_points(rng, start, end, n=160):
    """Points of a wiggly curve from start to end (mm), (n, 3)."""
    s = np.linspace(0.0, 1.0, n)[:, None]
    line = start[None] + s * (end - start)[None]
    length = float(np.linalg.norm(end - start))
    wiggle = np.zeros_like(line)
    for harmonic in (1, 2, 3):
        direction = rng.standard_normal(3)
        wiggle += (
            np.sin(np.pi * harmonic * s + rng.uniform(0, np.pi))
            * direction[None]
            * length
            * 0.06
            / harmonic
        )
    return line + wiggle * np.sin(np.pi * s)


def _anatomy(rng, cfg: SynthConfig, sp) -> tuple[_Painter, np.ndarray, list[float]]:
    """Paint one case's tissues; returns the painter, the tumour mask and tumour diameters.

    The random draws happen in the order of the calls below (body, tissues, vessels, tumours,
    benign foci): a seed gives the same case only while that order holds.
    """
    g = _Grid.make(cfg.shape, sp)
    p = _Painter(cfg.shape)
    body = _body(rng, cfg, g)
    _paint_tissues(rng, cfg, g, body, p)
    _paint_vessels(rng, cfg, g, body, p)
    place = _placement(cfg, g, body.breast)
    mask, diameters = _paint_tumours(rng, cfg, g, place, p)
    _paint_benign(rng, cfg, g, place, mask, p)
    return p, mask, diameters


@dataclass(frozen=True, eq=False)
class _Grid:
    """Voxel centres of the canonical grid in mm, broadcastable against each other.

    Attributes:
        shape: (Z, Y, X) voxels.
        sp: spacing (Z, Y, X) mm.
        fov: extent (Z, Y, X) mm, shape times spacing.
        z: (Z, 1, 1) float32 from the centre, superior positive.
        y: (1, Y, 1) float32 from the posterior edge, anterior positive.
        x: (1, 1, X) float32 from the centre, towards the patient's right.
    """

    shape: tuple[int, int, int]
    sp: tuple[float, float, float]
    fov: tuple[float, float, float]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @classmethod
    def make(cls, shape, sp) -> _Grid:
        """The grid of a (Z, Y, X) `shape` with spacing `sp` (mm)."""
        nz, ny, nx = shape
        fov = tuple(n * s for n, s in zip(shape, sp, strict=True))
        z = ((np.arange(nz) - (nz - 1) / 2) * sp[0])[:, None, None].astype(np.float32)
        y = (np.arange(ny) * sp[1])[None, :, None].astype(np.float32)
        x = ((np.arange(nx) - (nx - 1) / 2) * sp[2])[None, None, :].astype(np.float32)
        return cls(shape=shape, sp=sp, fov=fov, z=z, y=y, x=x)

    @property
    def zyx(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x), as `_lesion` and `_pick_centre` take them."""
        return self.z, self.y, self.x


@dataclass(frozen=True)
class _Breast:
    """One half-ellipsoid breast on the chest wall, in mm.

    Attributes:
        cx: centre along X (negative: the patient's left).
        base: Y of its base on the chest wall.
        cz: centre along Z at the base.
        rx, ry, rz: radii along X, Y (anterior protrusion) and Z.
        droop: how far the centre moves inferior towards the front (at Y = base + ry).
    """

    cx: float
    base: float
    cz: float
    rx: float
    ry: float
    rz: float
    droop: float

    def radius(self, g: _Grid) -> np.ndarray:
        """(Z, Y, X) float32 normalised ellipsoid radius: 1 on the surface."""
        cz_y = self.cz - self.droop * np.clip((g.y - self.base) / self.ry, 0, 1)
        return np.sqrt(
            ((g.x - self.cx) / self.rx) ** 2
            + ((g.y - self.base) / self.ry) ** 2
            + ((g.z - cz_y) / self.rz) ** 2
        )


@dataclass(frozen=True, eq=False)
class _Body:
    """The body of one case; masks are (Z, Y, X) bool.

    Attributes:
        chest_wall_mm: Y of the chest wall at the midline.
        thorax: everything behind the chest wall, within the body's width.
        muscle: the front `muscle_mm` of the thorax (pectoral muscle).
        breast: both breasts.
        rho: (Z, Y, X) float32 normalised radius of the nearer breast (inf behind its base).
        inside: thorax or breast, i.e. not air.
        skin: voxels of `inside` within `skin_mm` of the air.
        breasts: the two breasts, left then right.
    """

    chest_wall_mm: float
    thorax: np.ndarray
    muscle: np.ndarray
    breast: np.ndarray
    rho: np.ndarray
    inside: np.ndarray
    skin: np.ndarray
    breasts: list[_Breast]


def _body(rng, cfg: SynthConfig, g: _Grid) -> _Body:
    """Chest wall, thorax, pectoral muscle, breasts and skin."""
    from scipy.ndimage import distance_transform_edt

    fz, fy, fx = g.fov
    # Chest wall: curved, more anterior at the midline; the thorax is everything behind it.
    cw0 = _uniform(rng, cfg.chest_wall) * fy
    bend = cfg.chest_wall_curvature * fy
    chest_wall = cw0 - bend * (g.x / (fx / 2)) ** 2  # (1, 1, X)
    halfwidth = cfg.body_halfwidth * fx
    body_x = np.abs(g.x) <= halfwidth
    thorax = np.broadcast_to((g.y < chest_wall) & body_x, g.shape)
    muscle = thorax & (g.y >= chest_wall - cfg.muscle_mm)

    breast = np.zeros(g.shape, bool)
    rho = np.full(g.shape, np.inf, np.float32)
    breasts = []
    for side in (-1.0, 1.0):
        b = _draw_breast(rng, cfg, g, side, cw0, bend)
        r = b.radius(g)
        breast |= (r <= 1.0) & (g.y >= chest_wall)
        rho = np.minimum(rho, np.where(g.y >= b.base, r, np.inf))
        breasts.append(b)

    inside = thorax | breast
    depth = distance_transform_edt(inside, sampling=g.sp).astype(np.float32)  # mm to the air
    return _Body(
        chest_wall_mm=cw0,
        thorax=thorax,
        muscle=muscle,
        breast=breast,
        rho=rho,
        inside=inside,
        skin=inside & (depth <= cfg.skin_mm),
        breasts=breasts,
    )


def _draw_breast(rng, cfg: SynthConfig, g: _Grid, side: float, cw0: float, bend: float) -> _Breast:
    """One breast (`side` -1 left, +1 right) on the chest wall at `cw0`, bent back by `bend`.

    Half-ellipsoids, slightly drooping (the centre moves inferior towards the front).
    """
    fz, fy, fx = g.fov
    cx = side * _uniform(rng, cfg.breast_offset) * fx
    rx = _uniform(rng, cfg.breast_halfwidth) * fx
    ry = _uniform(rng, cfg.breast_depth) * fy
    rz = _uniform(rng, cfg.breast_height) * fz
    cz = rng.uniform(-0.05, 0.05) * fz
    base = cw0 - bend * (cx / (fx / 2)) ** 2 - 0.03 * fy
    droop = rng.uniform(0.0, 0.25) * rz
    return _Breast(cx=cx, base=base, cz=cz, rx=rx, ry=ry, rz=rz, droop=droop)


def _paint_tissues(rng, cfg: SynthConfig, g: _Grid, body: _Body, p: _Painter) -> None:
    """Thorax, muscle, heart, breast fat, fibroglandular tissue and skin, in that order."""
    p.paint(body.thorax, "thorax", _draw_curve(rng, cfg.thorax))
    p.paint(body.muscle, "muscle", _draw_curve(rng, cfg.muscle))
    fz, fy, fx = g.fov
    (hz, hy, hx), (rz, ry, rx) = cfg.heart_centre, cfg.heart_radii
    heart = (
        ((g.x - hx * fx) / (rx * fx)) ** 2
        + ((g.y - hy * fy) / (ry * fy)) ** 2
        + ((g.z - hz * fz) / (rz * fz)) ** 2
    ) <= 1.0
    p.paint(body.thorax & ~body.muscle & heart, "heart", _draw_curve(rng, cfg.heart))
    p.paint(body.breast, "fat", _draw_curve(rng, cfg.fat))
    fgt, het = _fgt(rng, cfg, g, body)
    p.paint(fgt, "fgt", _draw_curve(rng, cfg.fgt), het)
    p.paint(body.skin, "skin", _draw_curve(rng, cfg.skin))


def _fgt(rng, cfg: SynthConfig, g: _Grid, body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """Fibroglandular tissue: smooth noise, biased to the breast centre, cut at a case quantile.

    Returns its (Z, Y, X) bool mask and the (Z, Y, X) float32 factor on its enhancement.
    """
    sigma_vox = [cfg.fgt_scale_mm / s for s in g.sp]
    score = _smooth_noise(rng, g.shape, sigma_vox) + 1.5 * (1.0 - np.minimum(body.rho, 1.0))
    interior = body.breast & ~body.skin
    fgt = np.zeros(g.shape, bool)
    if interior.any():
        cut = np.quantile(score[interior], 1.0 - _uniform(rng, cfg.fgt_fraction))
        fgt = interior & (score > cut)
    het = 1.0 + cfg.fgt.heterogeneity * _smooth_noise(rng, g.shape, sigma_vox)
    return fgt, het


class _VesselSeeds:
    """Vessel centre lines as seed voxels, each with its radius and curve (S0, A, tau, k)."""

    def __init__(self, g: _Grid):
        self.grid = g
        self.seeds = np.zeros(g.shape, bool)
        self.radius = np.zeros(g.shape, np.float32)
        self.curve = np.zeros(g.shape, np.int32)
        self.curves: list[tuple[float, float, float, float]] = []

    def add(self, points: np.ndarray, radius: float, curve) -> None:
        """Adds the voxels of (n, 3) (z, y, x) mm `points` that lie inside the grid."""
        g = self.grid
        idx = np.round(
            (points - [g.z[0, 0, 0], g.y[0, 0, 0], g.x[0, 0, 0]]) / np.asarray(g.sp, np.float32)
        ).astype(int)
        keep = np.all((idx >= 0) & (idx < np.asarray(g.shape)), axis=1)
        iz, iy, ix = idx[keep].T
        self.seeds[iz, iy, ix] = True
        self.radius[iz, iy, ix] = radius
        self.curve[iz, iy, ix] = len(self.curves)
        self.curves.append(curve)

    def paint(self, p: _Painter, inside: np.ndarray) -> None:
        """Paints the voxels of `inside` within their nearest seed's radius, with its curve."""
        from scipy.ndimage import distance_transform_edt

        if not self.seeds.any():
            return
        dist, (iz, iy, ix) = distance_transform_edt(
            ~self.seeds, sampling=self.grid.sp, return_indices=True
        )
        vessel = inside & (dist <= self.radius[iz, iy, ix])
        which = self.curve[iz, iy, ix]
        for n, curve in enumerate(self.curves):
            p.paint(vessel & (which == n), "vessel", curve)


def _paint_vessels(rng, cfg: SynthConfig, g: _Grid, body: _Body, p: _Painter) -> None:
    """Vessels: wiggly tubes from the chest wall towards the nipple, plus the internal mammary
    arteries running S/I beside the sternum. One distance transform rasterises all of them.
    """
    seeds = _VesselSeeds(g)
    lo, hi = cfg.vessels_per_breast
    for b in body.breasts:
        for _ in range(int(rng.integers(lo, hi + 1))):
            start = np.array(
                [b.cz + rng.uniform(-0.6, 0.6) * b.rz, b.base, b.cx + rng.uniform(-0.7, 0.7) * b.rx]
            )
            end = np.array(
                [
                    b.cz + rng.uniform(-0.3, 0.3) * b.rz,
                    b.base + 0.85 * b.ry,
                    b.cx + rng.uniform(-0.2, 0.2) * b.rx,
                ]
            )
            points = _vessel_points(rng, start, end)
            seeds.add(points, _uniform(rng, cfg.vessel_radius_mm), _draw_curve(rng, cfg.vessel))
    nz, fz, fx = g.shape[0], g.fov[0], g.fov[2]
    for side in (-1.0, 1.0):
        xs = side * 0.05 * fx
        ys = body.chest_wall_mm - cfg.muscle_mm - 3.0
        pts = np.stack(
            [np.linspace(-fz / 2, fz / 2, 4 * nz), np.full(4 * nz, ys), np.full(4 * nz, xs)], 1
        )
        seeds.add(pts, 1.5 * cfg.vessel_radius_mm[1], _draw_curve(rng, cfg.vessel))
    seeds.paint(p, body.inside)


@dataclass(eq=False)
class _Placement:
    """Where lesions may go: inside the breast, clear of the skin and of each other.

    Attributes:
        breast: (Z, Y, X) bool.
        room: (Z, Y, X) float32 mm from a breast voxel to the skin's inner edge (-skin_mm
            outside the breast).
        taken: (centre (z, y, x) mm, keep-out radius mm) of each lesion placed so far.
        margin: extra keep-out distance around a lesion, two voxels, in mm.
        min_d: the smallest lesion diameter, mm (`_min_diameter_mm`).
    """

    breast: np.ndarray
    room: np.ndarray
    taken: list[tuple[tuple[float, float, float], float]]
    margin: float
    min_d: float


def _placement(cfg: SynthConfig, g: _Grid, breast: np.ndarray) -> _Placement:
    """The room inside `breast`, before any lesion is placed."""
    from scipy.ndimage import distance_transform_edt

    room = np.where(breast, distance_transform_edt(breast, sampling=g.sp), 0.0) - cfg.skin_mm
    return _Placement(
        breast=breast,
        room=room.astype(np.float32),
        taken=[],
        margin=2.0 * max(g.sp),
        min_d=_min_diameter_mm(cfg, g.sp),
    )


def _paint_tumours(
    rng, cfg: SynthConfig, g: _Grid, place: _Placement, p: _Painter
) -> tuple[np.ndarray, list[float]]:
    """The labelled tumours, never touching each other; at least one, however small the breast.

    Returns the (Z, Y, X) bool tumour mask and each tumour's diameter in mm.
    """
    from scipy.ndimage import binary_dilation

    mask = np.zeros(g.shape, bool)
    near = mask  # tumour voxels and their 26-neighbours
    diameters: list[float] = []
    lo, hi = cfg.tumour_count
    n_tumours = int(rng.integers(lo, hi + 1))
    d_lo, d_hi = cfg.tumour_diameter_mm
    log_lo, log_hi = math.log(max(d_lo, place.min_d)), math.log(max(d_hi, place.min_d))
    for _ in range(n_tumours):
        diameter = math.exp(rng.uniform(log_lo, log_hi))
        reach = diameter / 2 * (1 + 2 * cfg.tumour_irregularity)
        pick = _pick_centre(rng, place.room, reach, place.taken, g.zyx)
        if pick is None:
            continue
        centre, reach = pick
        diameter = max(min(diameter, 2 * reach / (1 + 2 * cfg.tumour_irregularity)), place.min_d)
        box, lesion, diameter = _grow_tumour(rng, cfg, g, place.breast & ~near, centre, diameter)
        if not lesion.any():
            continue
        place.taken.append(
            (centre, max(reach, diameter / 2 * (1 + 2 * cfg.tumour_irregularity)) + place.margin)
        )
        het = _heterogeneity(rng, lesion.shape, g.sp, cfg.tumour.heterogeneity)
        p.paint(lesion, "tumour", _draw_curve(rng, cfg.tumour), het, box)
        mask[box] |= lesion
        near = binary_dilation(mask, np.ones((3, 3, 3), bool))
        diameters.append(diameter)
    if not mask.any():  # nothing fitted: every case has a tumour
        diameters.append(_deepest_tumour(rng, cfg, g, place, mask, p))
    return mask, diameters


def _grow_tumour(rng, cfg: SynthConfig, g: _Grid, allowed: np.ndarray, centre, diameter: float):
    """A tumour at `centre` within `allowed` ((Z, Y, X) bool), grown by 25 % steps (at most 8
    tries) until it has `min_lesion_voxels`: a coarse grid would almost miss a small one.

    Returns (box slices, (z, y, x) bool lesion in the box, its diameter in mm).
    """
    for _ in range(8):
        box, lesion = _lesion(rng, g.zyx, g.sp, centre, diameter / 2, cfg.tumour_irregularity)
        lesion &= allowed[box]  # in the breast, never touching another tumour
        lesion = _largest_component(lesion)  # coarse grids can cut off a lobe
        if lesion.sum() >= cfg.min_lesion_voxels:
            break
        diameter *= 1.25
    return box, lesion, diameter


def _deepest_tumour(
    rng, cfg: SynthConfig, g: _Grid, place: _Placement, mask: np.ndarray, p: _Painter
) -> float:
    """Paints the smallest tumour in the deepest breast voxel, adds it to `mask`; its diameter."""
    flat = int(np.argmax(place.room))
    iz, iy, ix = np.unravel_index(flat, g.shape)
    centre = (float(g.z[iz, 0, 0]), float(g.y[0, iy, 0]), float(g.x[0, 0, ix]))
    box, lesion = _lesion(rng, g.zyx, g.sp, centre, place.min_d / 2, 0.0)
    lesion &= place.breast[box]
    p.paint(lesion, "tumour", _draw_curve(rng, cfg.tumour), None, box)
    mask[box] |= lesion
    return place.min_d


def _paint_benign(
    rng, cfg: SynthConfig, g: _Grid, place: _Placement, mask: np.ndarray, p: _Painter
) -> None:
    """Benign foci: smooth ellipsoids, painted under the tumours (never over a labelled voxel)."""
    lo, hi = cfg.benign_count
    for _ in range(int(rng.integers(lo, hi + 1))):
        diameter = max(_uniform(rng, cfg.benign_diameter_mm), place.min_d * 2 / 3)
        pick = _pick_centre(rng, place.room, diameter / 2, place.taken, g.zyx)
        if pick is None:
            continue
        centre, reach = pick
        axes = rng.uniform(0.75, 1.0, 3)
        box, lesion = _lesion(rng, g.zyx, g.sp, centre, reach, 0.05, axes)
        lesion &= place.breast[box] & ~mask[box]
        place.taken.append((centre, reach + place.margin))
        het = _heterogeneity(rng, lesion.shape, g.sp, cfg.benign.heterogeneity)
        p.paint(lesion, "benign", _draw_curve(rng, cfg.benign), het, box)


# ---------------------------------------------------------------------------------------------
# Signal, bias, noise; geometry


def _bias_field(rng, shape, strength) -> np.ndarray:
    """exp of a random quadratic polynomial over normalised coordinates. (Z, Y, X) float32."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    terms = [z, y, x, z * y, z * x, y * x, z * z - 1 / 3, y * y - 1 / 3, x * x - 1 / 3]
    log_b = sum(
        float(c) * t for c, t in zip(rng.normal(0, strength, len(terms)), terms, strict=True)
    )
    return np.exp(log_b).astype(np.float32)


def _rotation(rng, max_deg) -> np.ndarray:
    """A rotation about a random axis by up to max_deg (Rodrigues). (3, 3)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _file_geometry(rng, cfg, sp) -> tuple[np.ndarray, str, tuple[bool, bool, bool]]:
    """Affine of the file grid and which canonical axes (X, Y, Z) are reversed in the file.

    The canonical RAS voxel (x, y, z) sits at R diag(spacing) ((x, y, z) - centre) + offset; a
    reversed file axis stores index n-1-x, which the affine's negative column undoes.
    """
    code = cfg.orientations[int(rng.integers(len(cfg.orientations)))]
    flips = (code[0] == "L", code[1] == "P", code[2] == "I")
    n = np.array(cfg.shape[::-1], float)  # (X, Y, Z)
    spacing_xyz = np.array(sp[::-1], float)
    sign = np.where(flips, -1.0, 1.0)
    rot = _rotation(rng, cfg.max_rotation_deg)
    offset = rng.uniform(-cfg.max_offset_mm, cfg.max_offset_mm, 3)
    centre = (n - 1) / 2
    corner = np.where(flips, n - 1, 0.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing_xyz * sign)
    affine[:3, 3] = rot @ (spacing_xyz * (corner - centre)) + offset
    return affine, code, flips


def synthesize(rng_or_seed: np.random.Generator | int, config: SynthConfig | None = None):
    """One synthetic case with its ground truth (tissue map, diameters, orientation).

    Args:
        rng_or_seed: a numpy Generator, or an int seed for `numpy.random.default_rng`.
        config: the generator's parameters; None for the defaults.

    Returns:
        `SynthCase`: image (T, Z, Y, X) int16, mask and tissues (Z, Y, X) uint8, affine (4, 4),
        all on the file's grid.
    """
    from scipy.ndimage import gaussian_filter

    cfg = config or SynthConfig()
    rng = (
        rng_or_seed
        if isinstance(rng_or_seed, np.random.Generator)
        else np.random.default_rng(rng_or_seed)
    )
    sp = cfg.voxel_mm
    times = cfg.acquisition_times
    painter, mask, diameters = _anatomy(rng, cfg, sp)
    t0 = _uniform(rng, cfg.bolus_arrival_s)
    gain = _uniform(rng, cfg.gain)
    bias = _bias_field(rng, cfg.shape, cfg.bias_strength) * gain
    sigma = cfg.noise_sd * gain
    inv_tau = 1.0 / painter.tau
    k_per_s = painter.k / 60.0

    image = np.empty((len(times), *cfg.shape), np.int16)  # (T, Z, Y, X)
    for i, t in enumerate(times):
        tp = max(t - t0, 0.0)
        enh = painter.amp * (1.0 - np.exp(-tp * inv_tau)) * np.exp(-k_per_s * tp)  # (K1)
        signal = painter.s0 * (1.0 + enh)
        if cfg.psf_sigma_vox > 0:
            signal = gaussian_filter(signal, cfg.psf_sigma_vox, mode="nearest")
        signal *= bias
        # Rician magnitude: |S + n_re + i n_im| with independent Gaussian channels.
        re = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
        im = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
        mag = np.sqrt(re * re + im * im)
        image[i] = np.clip(np.rint(mag), 0, np.iinfo(np.int16).max).astype(np.int16)

    affine, code, flips = _file_geometry(rng, cfg, sp)
    # Canonical (Z, Y, X) -> file grid: reverse the flipped axes (file X, Y, Z = array -1, -2, -3).
    rev = tuple(ax for ax, f in zip((-1, -2, -3), flips, strict=True) if f)

    def to_file(vol):
        return np.ascontiguousarray(np.flip(vol, rev) if rev else vol)

    return SynthCase(
        image=to_file(image),
        mask=to_file(mask.astype(np.uint8)),
        affine=affine,
        tissues=to_file(painter.tissues),
        spacing=sp,
        times_s=times,
        tumour_diameters_mm=[round(d, 2) for d in diameters],
        orientation=code,
    )


def synthesize_case(
    rng_or_seed: np.random.Generator | int, config: SynthConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: (image (T, Z, Y, X) int16, mask (Z, Y, X) uint8, affine (4, 4)).

    Arrays are on the file's grid (see the module docstring); `synthesize` also returns the
    tissue map and the tumour diameters.
    """
    case = synthesize(rng_or_seed, config)
    return case.image, case.mask, case.affine
