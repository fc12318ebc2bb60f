"""A phantom scene imaged by simulated acquisition: tilt series, CTF and shot noise per projection, WBP.

The second imaging of `cryoves.engine.synthetic.phantom` (the first, `imaging.py`, is one FFT). The scene
is rendered at a finer voxel size, projected at the angles of a single-axis tilt series (tilt axis y,
dose-symmetric order), each projection is imaged (weak-phase CTF with envelope, radiation damage by the
dose received before it, inelastic loss through the tilted slab, Poisson shot noise at its share of the
dose), and the series is reconstructed by weighted back-projection and binned to the output grid. So
the noise is coloured by the reconstruction, streaks come from the finite angular sampling and the
missing wedge is where the tilt range leaves it. Defocus, amplitude contrast, B-factor, tilt range and SNR
are the preset's (`PhantomPreset`); the SNR scales the dose. Lengths are nm unless named otherwise.
"""

from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy.ndimage import correlate1d

from cryoves.engine.errors import CryovesError
from cryoves.engine.synthetic.imaging import CS_NM, WAVELENGTH_NM, render_crowd, render_objects
from cryoves.kernels.projection import back_project, project

DIFFUSION_ITERATIONS = 8      # Perona-Malik steps of the denoised variant
DIFFUSION_STEP = 1 / 7        # below 1/6, the stability limit with six neighbours
DIFFUSION_EDGE = 1.5          # conductance edge, in units of the MAD noise estimate of the differences
MAX_TILT_DEG = 80.0           # a slab's path length grows as 1 / cos(tilt): at 90° no electron gets through


@dataclass(frozen=True, kw_only=True)
class TiltSeriesImaging:
    """Acquisition and reconstruction of the simulated tilt series (the preset gives the rest)."""

    tilt_step_deg: float = 3.0
    dose_e_per_a2: float = 100.0         # total dose of the series at preset snr = 1; the series gets dose × snr
    phase_rad_per_nm: float = 0.016      # phase shift per nm of protein-density path (density 1) against ice
    inelastic_mfp_nm: float = 350.0      # inelastic mean free path: each tilt keeps exp(-path / this) of its electrons
    radiation_damage: bool = True        # attenuate each tilt by the dose before it (critical exposure)
    oversampling: int = 2                # fine voxel = output voxel / this, lowered until the fine grid fits below
    max_fine_voxels: int = 2**27         # about 0.5 GB per float32 fine volume
    denoised: bool = False               # smooth the reconstruction by nonlinear (edge-stopping) diffusion

    def __post_init__(self) -> None:
        if not 0 < self.tilt_step_deg <= 30:
            raise CryovesError(f"tilt_step_deg must be in (0, 30] degrees, got {self.tilt_step_deg}")
        if not (self.dose_e_per_a2 > 0 and self.phase_rad_per_nm > 0 and self.inelastic_mfp_nm > 0):
            raise CryovesError("dose_e_per_a2, phase_rad_per_nm and inelastic_mfp_nm must be > 0")
        if self.oversampling < 1 or self.max_fine_voxels < 1:
            raise CryovesError(f"oversampling ({self.oversampling}) and max_fine_voxels must be >= 1")


def tilt_angles_deg(tilt_max_deg: float, tilt_step_deg: float) -> np.ndarray:
    """Tilt angles in acquisition order, dose-symmetric: 0, +step, -step, +2 step, -2 step, ... up to ±tilt_max."""
    if not 0 < tilt_max_deg <= MAX_TILT_DEG:
        raise CryovesError(f"tilt-series imaging needs tilt_max_deg in (0, {MAX_TILT_DEG:g}] degrees, "
                           f"got {tilt_max_deg}")
    n = int(np.floor(tilt_max_deg / tilt_step_deg + 1e-9))
    steps = [0] + [sign * k for k in range(1, n + 1) for sign in (1, -1)]
    return np.array(steps, dtype=np.float64) * tilt_step_deg


def fine_oversampling(shape, params: TiltSeriesImaging) -> int:
    """The oversampling used for `shape`: the requested one, lowered until the fine grid holds max_fine_voxels."""
    n_voxels = int(np.prod(shape, dtype=np.int64))
    factor = params.oversampling
    while factor > 1 and n_voxels * factor**3 > params.max_fine_voxels:
        factor -= 1
    return factor


def acquire_tomogram(scene, shape, voxel_nm: float, preset, params: TiltSeriesImaging, crowd_rng,
                     noise_rng) -> np.ndarray:
    """Render `scene` on the fine grid and image it by a simulated tilt series: the (z, y, x) tomogram of
    `shape` at `voxel_nm`, dense matter dark, zero mean and unit std, float32."""
    angles = tilt_angles_deg(preset.tilt_max_deg, params.tilt_step_deg)
    factor = fine_oversampling(shape, params)
    fine_shape = tuple(int(n) * factor for n in shape)
    fine_nm = voxel_nm / factor
    density, excluded = render_objects(scene, fine_shape, fine_nm)
    density += render_crowd(scene, excluded, preset, fine_nm, crowd_rng)
    del excluded
    tomogram = bin_volume(reconstruct(density, fine_nm, angles, preset, params, noise_rng), factor)
    if params.denoised:
        tomogram = diffuse(tomogram)
    tomogram -= tomogram.mean()
    tomogram /= tomogram.std()
    return tomogram.astype(np.float32, copy=False)


def reconstruct(density: np.ndarray, voxel_nm: float, angles_deg: np.ndarray, preset, params: TiltSeriesImaging,
                rng: np.random.Generator | None) -> np.ndarray:
    """Weighted back-projection of the tilt series of `density` (z, y, x) imaged at `angles_deg` (acquisition
    order, `tilt_step_deg` apart), on the density's grid.

    Values are the reconstructed image contrast (intensity / electrons expected - 1; dense is negative).
    `rng` draws the shot noise; None images without noise (the noiseless reference of the same series).
    """
    images = tilt_images(density, voxel_nm, angles_deg, preset, params, rng)
    filtered = ramp_filter(images)
    del images
    return back_project(filtered, angles_deg, np.radians(params.tilt_step_deg), density.shape[0])


def tilt_images(density: np.ndarray, voxel_nm: float, angles_deg: np.ndarray, preset,
                params: TiltSeriesImaging, rng: np.random.Generator | None) -> np.ndarray:
    """Each tilt's recorded image (angle, y, x) as intensity / electrons expected - 1, float32.

    The part of the density that is uniform across each z-plane (ice, the cell slab) is projected as the
    infinite slab it stands for, so rays that leave the box sideways at high tilt see no step.
    """
    nz, ny, nx = density.shape
    plane_means = density.mean(axis=(1, 2), dtype=np.float64)
    cos = np.cos(np.radians(angles_deg))
    projected = project(density - plane_means[:, None, None].astype(np.float32), angles_deg)
    projected += (plane_means.sum() / cos)[:, None, None].astype(np.float32)
    phase = projected * np.float32(voxel_nm * params.phase_rad_per_nm)
    del projected

    dose_per_tilt = params.dose_e_per_a2 * preset.snr / len(angles_deg)
    margin_y, margin_x = ny // 4, nx // 4  # mirrored margins: the CTF must not wrap one edge onto the other
    size = (ny + 2 * margin_y, nx + 2 * margin_x)
    spectra = scipy.fft.rfft2(np.pad(phase, [(0, 0), (margin_y,) * 2, (margin_x,) * 2], mode="symmetric"),
                              workers=-1)
    del phase
    k2 = scipy.fft.fftfreq(size[0], d=voxel_nm)[:, None] ** 2 + scipy.fft.rfftfreq(size[1], d=voxel_nm)[None, :] ** 2
    transfer = ctf(k2, preset)
    critical = critical_exposure_e_per_a2(np.sqrt(k2))
    for i in range(len(angles_deg)):  # dose-symmetric order: tilt i is recorded after i tilts
        received = dose_per_tilt * (i + 0.5)
        damage = np.exp(-received / (2 * critical)) if params.radiation_damage else 1.0
        spectra[i] *= (transfer * damage).astype(np.complex64)
    images = scipy.fft.irfft2(spectra, s=size, workers=-1)[:, margin_y:margin_y + ny, margin_x:margin_x + nx]
    del spectra
    images *= -2  # weak-phase image: intensity 1 - 2 (CTF * phase); dense matter (CTF > 0 at low k) is dark
    if rng is not None:
        electrons = dose_per_tilt * (10 * voxel_nm) ** 2 * np.exp(-nz * voxel_nm / (params.inelastic_mfp_nm * cos))
        for image, expected in zip(images, electrons):
            image[...] = rng.poisson(expected * np.maximum(1 + image, 0.0)) / expected - 1
    return images.astype(np.float32, copy=False)


def ctf(k2: np.ndarray, preset) -> np.ndarray:
    """Phase-contrast transfer with amplitude contrast and B-factor envelope at squared frequency k2 (1/nm^2)."""
    chi = np.pi * WAVELENGTH_NM * preset.defocus_um * 1e3 * k2 - 0.5 * np.pi * CS_NM * WAVELENGTH_NM**3 * k2**2
    a = preset.amplitude_contrast
    return (np.sqrt(1 - a**2) * np.sin(chi) + a * np.cos(chi)) * np.exp(-preset.b_factor_nm2 / 4 * k2)


def critical_exposure_e_per_a2(k_per_nm: np.ndarray) -> np.ndarray:
    """Dose (e/Å^2) after which the amplitude at spatial frequency k has fallen by e^(-1/2): Grant & Grigorieff
    (2015, eLife), 300 kV; a tilt recorded after dose N keeps exp(-N / (2 critical)) of its amplitude."""
    k_per_a = np.maximum(np.asarray(k_per_nm, dtype=np.float64) / 10, 1e-12)
    return 0.245 * k_per_a**-1.665 + 2.81


def ramp_filter(projections: np.ndarray) -> np.ndarray:
    """Filter each projection row (along x) with the ramp |k| apodised by a Hamming window, as weighted
    back-projection needs: the band-limited ramp's sampled kernel (no DC bias), on rows padded to twice
    their length with their edge values (a step at the edge would ring into the reconstruction)."""
    n = projections.shape[-1]
    size = scipy.fft.next_fast_len(2 * n, real=True)
    left = (size - n) // 2
    padded = np.pad(projections, [(0, 0)] * (projections.ndim - 1) + [(left, size - n - left)], mode="edge")
    offsets = np.minimum(np.arange(size), size - np.arange(size))
    kernel = np.where(offsets % 2 == 1, -1 / (np.pi * np.maximum(offsets, 1)) ** 2, 0.0)
    kernel[0] = 0.25
    frequency = scipy.fft.rfftfreq(size)
    response = scipy.fft.rfft(kernel).real * (0.54 + 0.46 * np.cos(2 * np.pi * frequency))
    spectra = scipy.fft.rfft(padded, axis=-1, workers=-1)
    del padded
    spectra *= response.astype(np.float32)
    return scipy.fft.irfft(spectra, n=size, axis=-1, workers=-1)[..., left:left + n]


def bin_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Area-average a fine grid onto the grid `factor` times coarser whose voxel i is centred on fine voxel
    factor * i (so both grids start at the same point, as the renderer lays them out); edges replicated."""
    if factor == 1:
        return volume
    weights = np.ones(factor + 1 - factor % 2)
    if factor % 2 == 0:
        weights[[0, -1]] = 0.5
    weights /= factor
    for axis in reversed(range(volume.ndim)):  # the contiguous axis first: each pass leaves less to the next
        volume = correlate1d(volume, weights, axis=axis, mode="nearest")
        volume = volume[(slice(None),) * axis + (slice(None, None, factor),)]
    return np.ascontiguousarray(volume)


def diffuse(volume: np.ndarray) -> np.ndarray:
    """Nonlinear (Perona-Malik) diffusion: smooths noise, stops at edges stronger than the noise, as the
    anisotropic-diffusion denoising that tomograms often get before segmentation."""
    volume = np.array(volume, dtype=np.float32)
    differences = np.diff(volume, axis=-1)
    edge = np.float32(DIFFUSION_EDGE * 1.4826 * np.median(np.abs(differences - np.median(differences))))
    del differences
    for _ in range(DIFFUSION_ITERATIONS):
        update = np.zeros_like(volume)
        for axis in range(3):
            d = np.diff(volume, axis=axis)
            flux = d * np.exp(-((d / edge) ** 2))
            ahead = (slice(None),) * axis + (slice(None, -1),)
            behind = (slice(None),) * axis + (slice(1, None),)
            update[ahead] += flux
            update[behind] -= flux
        volume += np.float32(DIFFUSION_STEP) * update
    return volume
