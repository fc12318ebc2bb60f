"""A phantom scene (`cryoves.engine.synthetic.phantom`) rendered as scattering density and imaged as a tomogram.

Every object is an analytic, band-limited profile drawn only in its bounding box; imaging is one FFT:
phase-contrast CTF with envelope, single-axis missing wedge and noise at constant dose. `scene` is the
phantom's laid-out scene and `p` its PhantomPreset (defocus, amplitude contrast, B-factor, tilt range,
SNR, crowding); lengths are nm.
"""

import math

import numpy as np
import scipy.fft
from scipy.ndimage import gaussian_filter
from scipy.special import erf, erfc

ANTIALIAS_VOX = 0.6           # Gaussian prefilter (voxels) folded into every analytic profile
REFERENCE_VOXEL_NM = 2.2      # the grid on which `snr` is defined
WAVELENGTH_NM = 0.00197       # electrons at 300 kV
CS_NM = 2.7e6                 # spherical aberration, 2.7 mm
PM_THICKNESS_NM = 5.0
HEAD_SIGMA_NM = 0.5           # head-group layer of a bilayer
# Densities relative to protein = 1 and vitreous ice = 0.
HEAD, TAIL, CYTOPLASM, LUMEN, MATRIX, CORE, CLEFT, PSD = 1.3, 0.1, 0.2, 0.05, 0.4, 0.8, 0.25, 0.5
PROTEIN_SIGMA_NM, PROTEIN_PEAK = 1.5, 0.5
COMPLEX_SIGMA_NM, COMPLEX_PEAK = 4.0, 0.8
FILAMENT_SIGMA_NM, FILAMENT_PEAK = 2.5, 0.7


def _box(center_nm, half_nm: float, shape, voxel_nm: float):
    """Slices of the voxels within `half_nm` of a centre and their offsets (nm, float32) from it."""
    c = np.asarray(center_nm, dtype=np.float64) / voxel_nm
    lo = np.clip(np.floor(c - half_nm / voxel_nm).astype(int), 0, shape)
    hi = np.clip(np.ceil(c + half_nm / voxel_nm).astype(int) + 1, 0, shape)
    slices = tuple(slice(a, b) for a, b in zip(lo, hi))
    axes = [((np.arange(a, b) - ci) * voxel_nm).astype(np.float32) for a, b, ci in zip(lo, hi, c)]
    return slices, (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])


def _edge(s, sigma: float):
    """Band-limited indicator of s < 0."""
    return 0.5 * erfc(s / (math.sqrt(2) * sigma))


def _bilayer(s, thickness_nm: float, voxel_nm: float):
    """Density across a lipid bilayer at signed distance s (nm) from its mid-plane.

    Two head-group Gaussians and a tail band, all widened (mass kept) by the anti-alias prefilter so
    that leaflets 4 nm apart never alias into spurious rings on coarse grids.
    """
    sigma = math.hypot(HEAD_SIGMA_NM, ANTIALIAS_VOX * voxel_nm)
    half = 0.35 * thickness_nm
    heads = np.exp(-0.5 * ((s - half) / sigma) ** 2) + np.exp(-0.5 * ((s + half) / sigma) ** 2)
    tails = 0.5 * (erf((half - s) / (math.sqrt(2) * sigma)) + erf((half + s) / (math.sqrt(2) * sigma)))
    return (HEAD * HEAD_SIGMA_NM / sigma) * heads + TAIL * tails


def render_objects(scene, shape, voxel_nm: float):
    """Density of slab, plasma membrane and cleft, organelles and vesicles; plus the crowd-free mask."""
    sigma = ANTIALIAS_VOX * voxel_nm
    z, y, x = (np.arange(n, dtype=np.float32) * np.float32(voxel_nm) for n in shape)
    s = scene.membrane.distance_nm(y[:, None], x[None, :]).astype(np.float32)
    post = -(scene.cleft_nm + PM_THICKNESS_NM)
    sheet = (CYTOPLASM * (1 - _edge(s, sigma)) + CLEFT * (_edge(s, sigma) - _edge(s - post, sigma))
             + CYTOPLASM * _edge(s - post, sigma) + PSD * (_edge(s - post, sigma) - _edge(s - post + 30, sigma))
             + _bilayer(s, PM_THICKNESS_NM, voxel_nm) + _bilayer(s - post, PM_THICKNESS_NM, voxel_nm))
    slab = _edge(scene.slab_nm[0] - z, sigma) * _edge(z - scene.slab_nm[1], sigma)
    density = slab[:, None, None].astype(np.float32) * sheet[None].astype(np.float32)
    excluded = np.zeros(shape, dtype=bool)
    excluded |= ((z < scene.slab_nm[0]) | (z > scene.slab_nm[1]))[:, None, None]
    excluded |= ((s < PM_THICKNESS_NM / 2 + 1) & (s > post - PM_THICKNESS_NM / 2 - 1))[None]
    for organelle in scene.organelles:
        _render_organelle(density, excluded, organelle, voxel_nm)
    for center, radius, thickness, kind in zip(scene.centers_nm, scene.radii_nm, scene.thickness_nm, scene.kinds):
        slices, (dz, dy, dx) = _box(center, radius + 4 * sigma + 2, shape, voxel_nm)
        d = np.sqrt(dz**2 + dy**2 + dx**2)
        mid = radius - thickness / 2
        profile = _bilayer(d - mid, thickness, voxel_nm) + (LUMEN - CYTOPLASM) * _edge(d - mid, sigma)
        if kind == "dense_core":
            profile += CORE * _edge(d - (radius - thickness - 4.0), sigma + 1.0)
        density[slices] += profile
        excluded[slices] |= d < radius + 1.0
    return density, excluded


def _render_organelle(density, excluded, o, voxel_nm: float) -> None:
    """Add an endosome (one bilayer, light lumen) or a mitochondrion (two bilayers, dense matrix, cristae)."""
    sigma = ANTIALIAS_VOX * voxel_nm
    slices, offsets = _box(o.center_nm, o.semi_axes_nm.max() + 4 * sigma + 2, density.shape, voxel_nm)
    s = o.distance_nm(*offsets)
    if o.kind == "endosome":
        profile = _bilayer(s + PM_THICKNESS_NM / 2, PM_THICKNESS_NM, voxel_nm) + \
            (LUMEN - CYTOPLASM) * _edge(s + PM_THICKNESS_NM / 2, sigma)
    else:
        inner = s + 10.0
        _, u, _ = o.local(*offsets)
        spacing = o.cristae_spacing_nm
        folds = (u + o.cristae_phase_nm) % spacing - spacing / 2
        cristae = _bilayer(folds - 6.0, PM_THICKNESS_NM, voxel_nm) + _bilayer(folds + 6.0, PM_THICKNESS_NM, voxel_nm)
        profile = (_bilayer(s + PM_THICKNESS_NM / 2, PM_THICKNESS_NM, voxel_nm)
                   + _bilayer(inner + PM_THICKNESS_NM / 2, PM_THICKNESS_NM, voxel_nm)
                   + (MATRIX - CYTOPLASM) * _edge(inner + PM_THICKNESS_NM, sigma)
                   + cristae * _edge(inner + 8.0, sigma))
    density[slices] += profile.astype(np.float32)
    excluded[slices] |= s < 1.0


def render_crowd(scene, excluded, p, voxel_nm: float, rng) -> np.ndarray:
    """Macromolecules (point masses blurred to proteins and large complexes) and filaments, outside membranes."""
    shape = excluded.shape
    volume_um3 = np.prod(shape) * voxel_nm**3 * 1e-9
    crowd = np.zeros(shape, dtype=np.float32)
    for per_um3, sigma_nm, peak in ((p.proteins_per_um3, PROTEIN_SIGMA_NM, PROTEIN_PEAK),
                                    (p.complexes_per_um3, COMPLEX_SIGMA_NM, COMPLEX_PEAK)):
        n = rng.poisson(per_um3 * volume_um3)
        index = tuple(rng.integers(0, size, n) for size in shape)
        sigma_vox = np.hypot(sigma_nm / voxel_nm, ANTIALIAS_VOX)
        mass = peak * rng.uniform(0.5, 1.5, n) * (2 * np.pi) ** 1.5 * (sigma_nm / voxel_nm) ** 3
        keep = ~excluded[index]
        points = np.zeros(shape, dtype=np.float32)
        np.add.at(points, tuple(i[keep] for i in index), mass[keep].astype(np.float32))
        crowd += gaussian_filter(points, sigma_vox, truncate=3.0)
    sigma = math.hypot(FILAMENT_SIGMA_NM, ANTIALIAS_VOX * voxel_nm)
    peak = FILAMENT_PEAK * (FILAMENT_SIGMA_NM / sigma) ** 2
    for start, end in scene.filaments_nm:
        n_pieces = max(1, int(np.ceil(np.linalg.norm(end - start) / 12.0)))
        knots = start + np.linspace(0, 1, n_pieces + 1)[:, None] * (end - start)
        for a, b in zip(knots[:-1], knots[1:]):
            slices, (dz, dy, dx) = _box((a + b) / 2, np.linalg.norm(b - a) / 2 + 4 * sigma, shape, voxel_nm)
            ab = (b - a).astype(np.float32)
            rel = (dz + ab[0] / 2, dy + ab[1] / 2, dx + ab[2] / 2)
            t = np.clip((rel[0] * ab[0] + rel[1] * ab[1] + rel[2] * ab[2]) / float(ab @ ab), 0, 1)
            d2 = sum((r - t * c) ** 2 for r, c in zip(rel, ab))
            np.maximum(crowd[slices], peak * np.exp(-0.5 * d2 / sigma**2), out=crowd[slices])
    crowd[excluded] = 0
    return crowd


def image_density(density: np.ndarray, voxel_nm: float, p, rng) -> np.ndarray:
    """Image the density: CTF with envelope, missing wedge (tilt axis y) and noise, in one FFT; dense is dark.

    Noise has a flat spectrum in physical units (constant dose), scaled so that signal/noise variance
    on a 22 Å grid is `snr`; a finer grid therefore holds more noise per voxel.
    """
    shape = density.shape
    spectrum = scipy.fft.rfftn(density, workers=-1)
    kz = scipy.fft.fftfreq(shape[0], d=voxel_nm).astype(np.float32)[:, None, None]
    ky = scipy.fft.fftfreq(shape[1], d=voxel_nm).astype(np.float32)[None, :, None]
    kx = scipy.fft.rfftfreq(shape[2], d=voxel_nm).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    chi = np.float32(np.pi * WAVELENGTH_NM * p.defocus_um * 1e3) * k2 \
        - np.float32(0.5 * np.pi * CS_NM * WAVELENGTH_NM**3) * k2**2
    amplitude = np.float32(p.amplitude_contrast)
    transfer = np.sqrt(1 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi)
    transfer *= np.exp(np.float32(-p.b_factor_nm2 / 4) * k2)
    del chi, k2
    tilt = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    wedge = np.clip((p.tilt_max_deg - tilt) / 3.0 + 0.5, 0, 1).astype(np.float32)
    spectrum *= transfer * wedge
    del transfer

    band = 1 / (2 * max(voxel_nm, REFERENCE_VOXEL_NM)) + 1e-9
    in_z, in_y, in_x = (np.abs(k.ravel()) <= band for k in (kz, ky, kx))
    weight_x = np.full(kx.size, 2.0)
    weight_x[0] = 1.0
    if shape[2] % 2 == 0:
        weight_x[-1] = 1.0
    power = np.abs(spectrum[np.ix_(in_z, in_y, in_x)]) ** 2
    power[0, 0, 0] = 0
    signal_var = float(np.sum(power * weight_x[in_x])) / np.prod(shape, dtype=np.float64) ** 2
    wedge_band = wedge[np.ix_(in_z, [0], in_x)]
    wedge_share = float(np.sum(wedge_band * weight_x[in_x]) / (in_z.sum() * np.sum(weight_x[in_x])))
    noise_var = signal_var / (p.snr * wedge_share) / (2 * band * voxel_nm) ** 3
    scale = np.float32(np.sqrt(np.prod(shape, dtype=np.float64) * noise_var / 2))
    noise = np.empty(spectrum.shape, dtype=np.complex64)
    noise.real = rng.standard_normal(spectrum.shape, dtype=np.float32)
    noise.imag = rng.standard_normal(spectrum.shape, dtype=np.float32)
    noise *= scale * wedge
    spectrum += noise
    del noise
    tomogram = scipy.fft.irfftn(spectrum, s=shape, workers=-1)
    tomogram -= tomogram.mean()
    tomogram /= -tomogram.std()
    return tomogram.astype(np.float32, copy=False)


def render_labels(scene, shape, voxel_nm: float) -> np.ndarray:
    """Vesicle i (1-based, table order) as the digital ball of its outer radius: |v - c| <= r in voxels."""
    labels = np.zeros(shape, dtype=np.uint16)
    for i, (center, radius) in enumerate(zip(scene.centers_nm / voxel_nm, scene.radii_nm / voxel_nm), start=1):
        lo = np.clip(np.floor(center - radius).astype(int), 0, shape)
        hi = np.clip(np.ceil(center + radius).astype(int) + 1, 0, shape)
        dz, dy, dx = ((np.arange(a, b) - c) for a, b, c in zip(lo, hi, center))
        ball = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2 <= radius**2
        labels[tuple(slice(a, b) for a, b in zip(lo, hi))][ball] = i
    return labels
