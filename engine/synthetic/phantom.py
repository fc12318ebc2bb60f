"""Synthetic presynaptic tomograms with exact vesicle ground truth, for tests, benchmarks and tuning.

The scene is laid out in nm from the seed alone, so one seed gives the same vesicles at every voxel
size. `cryoves.engine.synthetic.imaging` renders it as band-limited scattering density and images it
(CTF, single-axis missing wedge, noise) in one FFT; `cryoves.engine.synthetic.tiltseries` images it by a
simulated tilt series and its reconstruction instead. Dense matter is dark (low values), as in tomograms that are
not contrast-inverted.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.io.mrc import write_labels, write_volume
from cryoves.engine.synthetic.imaging import PM_THICKNESS_NM, image_density, render_crowd, render_labels, render_objects
from cryoves.engine.synthetic.tiltseries import TiltSeriesImaging, acquire_tomogram, fine_oversampling
from cryoves.engine.units import vox_to_nm

LAYOUT_STEP_NM = 8.0          # extent is floored to this step, so resampled shapes share one layout
EDGE_MARGIN_NM = 4.0          # vesicles and organelles keep this far inside the layout box
KINDS = ("synaptic", "docked", "large", "dense_core")
IMAGINGS = ("fft", "tilt-series")


@dataclass(frozen=True, kw_only=True)
class PhantomPreset:
    """Scene and imaging parameters of a phantom; lengths in nm, shares are probabilities."""

    vesicle_fraction: float = 0.12       # target vesicle volume / presynaptic cytoplasm volume
    radius_mean_nm: float = 20.0
    radius_sd_nm: float = 2.5
    radius_min_nm: float = 15.0
    radius_max_nm: float = 30.0
    large_radius_min_nm: float = 25.0    # "large" and "dense_core" radii lie in [this, radius_max_nm]
    thickness_min_nm: float = 4.0
    thickness_max_nm: float = 5.0
    large_share: float = 0.03
    dense_core_share: float = 0.02
    n_docked: int = 4
    touching_share: float = 0.1          # share of placements made touching a placed vesicle (gap < 0.5 nm)
    min_gap_nm: float = 1.0              # smallest gap between vesicles that are not placed touching
    cluster_sigma_nm: float = 70.0       # spread of the vesicle cluster around its centre
    slab_margin_fraction: float = 0.1    # ice above and below the cell slab, as a share of z
    presynaptic_fraction: float = 0.8
    cleft_width_nm: float = 20.0
    n_endosomes: int = 1
    n_mitochondria: int = 0
    n_filaments: int = 12
    proteins_per_um3: float = 1.0e6
    complexes_per_um3: float = 1.0e4
    defocus_um: float = 5.0
    amplitude_contrast: float = 0.07
    b_factor_nm2: float = 20.0
    tilt_max_deg: float = 60.0
    snr: float = 1.0                     # signal/noise variance on a 22 Å grid; constant dose otherwise

    def __post_init__(self) -> None:
        if not 0 < self.radius_min_nm <= self.large_radius_min_nm <= self.radius_max_nm:
            raise CryovesError("radii must satisfy 0 < radius_min_nm <= large_radius_min_nm <= radius_max_nm")
        if not 0 < self.thickness_min_nm <= self.thickness_max_nm < self.radius_min_nm:
            raise CryovesError("thickness must satisfy 0 < thickness_min_nm <= thickness_max_nm < radius_min_nm")
        if self.min_gap_nm < 0.5:
            raise CryovesError(f"min_gap_nm must be >= 0.5 nm (the touching gap), got {self.min_gap_nm}")
        if self.snr <= 0 or not 0 < self.tilt_max_deg <= 90:
            raise CryovesError("snr must be > 0 and tilt_max_deg in (0, 90]")


PRESETS: dict[str, PhantomPreset] = {
    "default": PhantomPreset(),
    "crowded": PhantomPreset(vesicle_fraction=0.3, touching_share=0.35, min_gap_nm=0.5,
                             cluster_sigma_nm=110.0, n_docked=8),
    "low_snr": PhantomPreset(snr=0.15, defocus_um=6.0),
    "distractors": PhantomPreset(n_mitochondria=1, n_endosomes=3, n_filaments=40,
                                 proteins_per_um3=1.5e6, complexes_per_um3=3.0e4),
}


@dataclass(frozen=True)
class Phantom:
    """A synthetic tomogram (z, y, x), its vesicle labels (i = vesicle i) and the vesicle table."""

    tomogram: np.ndarray
    labels: np.ndarray
    vesicles: pa.Table
    voxel_size_a: float


@dataclass(frozen=True)
class _Membrane:
    """The plasma membrane: a gently undulating sheet parallel to z; presynaptic side has s > 0."""

    normal_yx: tuple[float, float]
    offset_nm: float
    amplitude_nm: float
    wavelength_nm: float
    phase: float

    def distance_nm(self, y_nm, x_nm):
        """Signed distance (first order in the undulation) of points (y, x) from the mid-plane."""
        ny, nx = self.normal_yx
        arg = 2 * np.pi * (ny * x_nm - nx * y_nm) / self.wavelength_nm + self.phase
        slope = 2 * np.pi * self.amplitude_nm / self.wavelength_nm * np.cos(arg)
        return (ny * y_nm + nx * x_nm - self.offset_nm - self.amplitude_nm * np.sin(arg)) / np.sqrt(1 + slope**2)


@dataclass(frozen=True)
class _Organelle:
    """An ellipsoidal organelle rotated by `angle` about z; kind is "mitochondrion" or "endosome"."""

    kind: str
    center_nm: np.ndarray
    semi_axes_nm: np.ndarray
    angle: float
    cristae_spacing_nm: float
    cristae_phase_nm: float

    def local(self, dz, dy, dx):
        """Coordinates along the semi-axes of offsets (nm) from the centre."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return dz, c * dy + s * dx, -s * dy + c * dx

    def distance_nm(self, dz, dy, dx):
        """Approximate signed distance from the surface (exact for spheres, an underestimate outside)."""
        a = self.semi_axes_nm
        p = self.local(dz, dy, dx)
        q2 = sum((pi / ai) ** 2 for pi, ai in zip(p, a)) - 1
        grad = 2 * np.sqrt(sum((pi / ai**2) ** 2 for pi, ai in zip(p, a))) + 1e-6
        return q2 / grad


@dataclass(frozen=True)
class _Scene:
    """Everything in nm: the layout box, cell slab, membrane, organelles, vesicles and filaments."""

    extent_nm: np.ndarray
    slab_nm: tuple[float, float]
    cleft_nm: float
    membrane: _Membrane
    organelles: list
    centers_nm: np.ndarray
    radii_nm: np.ndarray
    thickness_nm: np.ndarray
    kinds: list
    filaments_nm: np.ndarray      # (n, 2, 3) end points


def make_phantom(shape: tuple[int, int, int], voxel_size_a: float, seed: int,
                 preset: str | PhantomPreset = "default", imaging: str | TiltSeriesImaging = "fft") -> Phantom:
    """Generate a phantom of `shape` voxels at `voxel_size_a` Å; the scene depends on seed and extent only.

    `preset` names one of PRESETS or is a PhantomPreset of its own (training varies them). `imaging` is
    "fft" (one FFT), "tilt-series" (a simulated acquisition with TiltSeriesImaging's defaults) or a
    TiltSeriesImaging of its own; labels and table do not depend on it.
    """
    if isinstance(preset, PhantomPreset):
        params, preset = preset, "custom"
    elif preset in PRESETS:
        params = PRESETS[preset]
    else:
        raise CryovesError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if imaging == "tilt-series":
        imaging = TiltSeriesImaging()
    elif not (isinstance(imaging, TiltSeriesImaging) or imaging == "fft"):
        raise CryovesError(f"imaging {imaging!r} is unknown; choose one of {', '.join(IMAGINGS)}")
    if len(shape) != 3 or min(shape) < 16:
        raise CryovesError(f"shape {tuple(shape)} must be 3 axes (z, y, x) of at least 16 voxels")
    if not np.isfinite(voxel_size_a) or not 1.0 <= voxel_size_a <= 40.0:
        raise CryovesError(f"voxel size {voxel_size_a} Å is outside 1-40 Å")
    shape = tuple(int(n) for n in shape)
    voxel_nm = float(vox_to_nm(1.0, voxel_size_a))
    scene_seed, crowd_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    extent_nm = np.floor(np.array(shape) * voxel_nm / LAYOUT_STEP_NM) * LAYOUT_STEP_NM
    scene = _layout(extent_nm, params, np.random.default_rng(scene_seed))
    if isinstance(imaging, TiltSeriesImaging):
        tomogram = acquire_tomogram(scene, shape, voxel_nm, params, imaging, np.random.default_rng(crowd_seed),
                                    np.random.default_rng(noise_seed))
        imaging_metadata = {"imaging": "tilt-series", "imaging_params": {
            **asdict(imaging), "fine_voxel_size_a": float(voxel_size_a) / fine_oversampling(shape, imaging)}}
    else:
        density, excluded = render_objects(scene, shape, voxel_nm)
        density += render_crowd(scene, excluded, params, voxel_nm, np.random.default_rng(crowd_seed))
        tomogram = image_density(density, voxel_nm, params, np.random.default_rng(noise_seed))
        imaging_metadata = {"imaging": "fft"}
    labels = render_labels(scene, shape, voxel_nm)
    table = _table(scene, voxel_nm, {"voxel_size_a": float(voxel_size_a), "seed": int(seed), "preset": preset,
                                     "preset_params": asdict(params), **imaging_metadata})
    return Phantom(tomogram=tomogram, labels=labels, vesicles=table, voxel_size_a=float(voxel_size_a))


def write_phantom(out_dir, phantom: Phantom, name: str = "phantom") -> dict[str, Path]:
    """Write NAME.mrc, NAME.labels.mrc and NAME.vesicles.parquet into `out_dir`; returns their paths."""
    out = Path(out_dir)
    paths = {"tomogram": out / f"{name}.mrc", "labels": out / f"{name}.labels.mrc",
             "vesicles": out / f"{name}.vesicles.parquet"}
    write_volume(paths["tomogram"], phantom.tomogram, phantom.voxel_size_a)
    write_labels(paths["labels"], phantom.labels, phantom.voxel_size_a)
    with atomic_output(paths["vesicles"]) as tmp:
        pq.write_table(phantom.vesicles, tmp)
    return paths


def _layout(extent_nm: np.ndarray, p: PhantomPreset, rng: np.random.Generator) -> _Scene:
    """Lay out the scene in nm: slab, plasma membrane, organelles, then docked and clustered vesicles."""
    margin = p.slab_margin_fraction * extent_nm[0]
    slab = (float(margin), float(extent_nm[0] - margin))
    angle = rng.uniform(0, 2 * np.pi)
    normal = (float(np.sin(angle)), float(np.cos(angle)))
    corners = [normal[0] * y + normal[1] * x for y in (0, extent_nm[1]) for x in (0, extent_nm[2])]
    offset = min(corners) + (1 - p.presynaptic_fraction) * (max(corners) - min(corners))
    membrane = _Membrane(normal, float(offset), float(rng.uniform(3, 8)), float(rng.uniform(300, 600)),
                         float(rng.uniform(0, 2 * np.pi)))
    organelles = _place_organelles(extent_nm, slab, membrane, p, rng)
    vesicles = _place_vesicles(extent_nm, slab, membrane, organelles, p, rng)
    filaments = _place_filaments(extent_nm, slab, p, rng)
    return _Scene(extent_nm, slab, p.cleft_width_nm, membrane, organelles, *vesicles, filaments)


def _place_organelles(extent_nm, slab, membrane, p: PhantomPreset, rng) -> list:
    """Mitochondria then endosomes, each fully inside the slab and the presynaptic side, or left out."""
    half_slab = (slab[1] - slab[0]) / 2 - 3.0
    placed: list[_Organelle] = []
    for kind, count in (("mitochondrion", p.n_mitochondria), ("endosome", p.n_endosomes)):
        for _ in range(count):
            for _attempt in range(50):
                if kind == "mitochondrion":
                    u, v = rng.uniform(120, 220), rng.uniform(60, 90)
                    axes = np.array([min(v, half_slab - 3), u, v])
                else:
                    r = rng.uniform(40, 80)
                    axes = np.array([min(r, half_slab - 3), r * rng.uniform(1.0, 1.6), r])
                if axes[0] < 30 or np.any(extent_nm[1:] <= 2 * EDGE_MARGIN_NM):
                    break  # no room for this organelle in a thin slab or a narrow field
                center = np.array([rng.uniform(slab[0] + 3 + axes[0], slab[1] - 3 - axes[0]),
                                   *rng.uniform(EDGE_MARGIN_NM, extent_nm[1:] - EDGE_MARGIN_NM)])
                reach = axes.max()
                clear_pm = membrane.distance_nm(center[1], center[2]) > reach + 15
                clear = all(np.linalg.norm(center - o.center_nm) > reach + o.semi_axes_nm.max() + 10 for o in placed)
                if clear_pm and clear:
                    spacing = float(rng.uniform(22, 40))
                    placed.append(_Organelle(kind, center, axes, float(rng.uniform(0, np.pi)), spacing,
                                             float(rng.uniform(0, spacing))))
                    break
    return placed


def _draw_vesicle(kind: str, p: PhantomPreset, rng) -> tuple[float, float]:
    """Outer radius and membrane thickness (nm) of one vesicle of `kind`."""
    if kind in ("large", "dense_core"):
        radius = rng.uniform(p.large_radius_min_nm, p.radius_max_nm)
    else:
        radius = float(np.clip(rng.normal(p.radius_mean_nm, p.radius_sd_nm), p.radius_min_nm, p.large_radius_min_nm))
    return float(radius), float(rng.uniform(p.thickness_min_nm, p.thickness_max_nm))


def _place_vesicles(extent_nm, slab, membrane, organelles, p: PhantomPreset, rng):
    """Rejection sampling: docked vesicles on the membrane, then a Gaussian cluster behind it.

    A share of candidates is placed explicitly touching an existing vesicle (gap < 0.5 nm); all other
    pairs keep at least `min_gap_nm`, so the touching share is bounded and nothing overlaps.
    """
    centers, radii, thickness, kinds = [], [], [], []

    def fits(c, r, touching, min_pm_nm):
        if not slab[0] + 2 <= c[0] - r <= c[0] + r <= slab[1] - 2:
            return False
        if np.any(c[1:] - r < EDGE_MARGIN_NM) or np.any(c[1:] + r > extent_nm[1:] - EDGE_MARGIN_NM):
            return False
        if membrane.distance_nm(c[1], c[2]) < min_pm_nm:
            return False
        if any(o.distance_nm(*(c - o.center_nm)) < r + 3 for o in organelles):
            return False
        if not centers:
            return True
        gaps = np.linalg.norm(np.asarray(centers) - c, axis=1) - np.asarray(radii) - r
        if touching is not None:
            if gaps[touching] < 0:
                return False
            gaps[touching] = np.inf
        return bool(gaps.min() >= p.min_gap_nm)

    def try_add(kind, c, r, t, touching, min_pm_nm):
        if fits(c, r, touching, min_pm_nm):
            centers.append(c)
            radii.append(r)
            thickness.append(t)
            kinds.append(kind)

    normal = np.array(membrane.normal_yx)
    for _ in range(20 * p.n_docked):
        if len(centers) >= p.n_docked:
            break
        r, t = _draw_vesicle("docked", p, rng)
        target = r + PM_THICKNESS_NM / 2 + rng.uniform(0.0, 1.0)
        c = np.array([_slab_z(slab, r, rng), *rng.uniform(0, extent_nm[1:])])
        for _step in range(2):
            c[1:] += (target - membrane.distance_nm(c[1], c[2])) * normal
        try_add("docked", c, r, t, None, target - 0.5)

    depth = max(membrane.distance_nm(y, x) for y in (0, extent_nm[1]) for x in (0, extent_nm[2]))
    cluster = np.array([0.0, *_point_at_depth(membrane, extent_nm, min(60 + 0.25 * depth, 0.5 * depth), rng)])
    presynaptic_nm3 = (slab[1] - slab[0]) * np.prod(extent_nm[1:]) * p.presynaptic_fraction
    n_total = len(centers) + int(p.vesicle_fraction * presynaptic_nm3 / (4 / 3 * np.pi * p.radius_mean_nm**3))
    for _ in range(40 * max(n_total, 10)):
        if len(centers) >= n_total:
            break
        kind = str(rng.choice(KINDS, p=_kind_weights(p)))
        r, t = _draw_vesicle(kind, p, rng)
        j = int(rng.integers(len(centers))) if centers and kind == "synaptic" and rng.random() < p.touching_share \
            else None
        if j is not None:
            u = rng.normal(size=3)
            c = centers[j] + u / np.linalg.norm(u) * (radii[j] + r + rng.uniform(0.05, 0.45))
        elif rng.random() < 0.85:
            c = cluster + rng.normal(0.0, p.cluster_sigma_nm, 3)
            c[0] = _slab_z(slab, r, rng)
        else:
            c = np.array([_slab_z(slab, r, rng), *rng.uniform(0, extent_nm[1:])])
        try_add(kind, c, r, t, j, r + PM_THICKNESS_NM / 2 + 3.0)
    return (np.asarray(centers, dtype=np.float64).reshape(-1, 3), np.asarray(radii, dtype=np.float64),
            np.asarray(thickness, dtype=np.float64), kinds)


def _slab_z(slab, radius_nm: float, rng) -> float:
    """A random z (nm) that keeps a sphere of `radius_nm` inside the slab when possible."""
    lo, hi = slab[0] + 2 + radius_nm, slab[1] - 2 - radius_nm
    return float(rng.uniform(lo, max(lo, hi)))


def _kind_weights(p: PhantomPreset) -> list[float]:
    """Probabilities of KINDS for a vesicle of the cluster (docked ones are placed separately)."""
    return [1 - p.large_share - p.dense_core_share, 0.0, p.large_share, p.dense_core_share]


def _point_at_depth(membrane: _Membrane, extent_nm, depth_nm: float, rng) -> np.ndarray:
    """A (y, x) point `depth_nm` behind the membrane, near the middle of the layout along the membrane."""
    ny, nx = membrane.normal_yx
    middle = extent_nm[1:] / 2
    along = np.array([-nx, ny]) * rng.uniform(-0.2, 0.2) * extent_nm[1:].min()
    point = middle + along
    point += (depth_nm - membrane.distance_nm(*point)) * np.array([ny, nx])
    return point


def _place_filaments(extent_nm, slab, p: PhantomPreset, rng) -> np.ndarray:
    """Straight filament segments (actin-like) inside the slab, random in direction and length."""
    starts = np.column_stack([rng.uniform(*slab, p.n_filaments),
                              rng.uniform(0, extent_nm[1], p.n_filaments), rng.uniform(0, extent_nm[2], p.n_filaments)])
    directions = rng.normal(size=(p.n_filaments, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True) + 1e-12
    ends = starts + directions * rng.uniform(60, 250, (p.n_filaments, 1))
    ends[:, 0] = np.clip(ends[:, 0], *slab)
    return np.stack([starts, ends], axis=1)


def _table(scene: _Scene, voxel_nm: float, metadata: dict) -> pa.Table:
    """The vesicle table (one row per label id) with voxel size, seed and preset in its metadata."""
    c_nm = scene.centers_nm
    c_vox = c_nm / voxel_nm
    n = len(scene.radii_nm)
    columns = {
        "id": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        **{f"center_{a}_vox": pa.array(c_vox[:, i], pa.float64()) for i, a in enumerate("zyx")},
        **{f"center_{a}_nm": pa.array(c_nm[:, i], pa.float64()) for i, a in enumerate("zyx")},
        "radius_nm": pa.array(scene.radii_nm, pa.float64()),
        "membrane_thickness_nm": pa.array(scene.thickness_nm, pa.float64()),
        "kind": pa.array(scene.kinds, pa.string()),
    }
    table = pa.table(columns)
    encoded = {key: json.dumps(value) if isinstance(value, dict) else str(value) for key, value in metadata.items()}
    return table.replace_schema_metadata(encoded)
