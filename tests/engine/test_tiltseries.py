"""Tilt-series imaging: angles, binning, reconstruction of a known blob, the missing wedge in the spectrum,
noise that follows the dose, labels equal to the fft imaging's, visible vesicles, metadata and CLI."""

import json
from dataclasses import asdict, replace

import numpy as np
import numpy.testing as npt
import pyarrow.parquet as pq
import pytest
from scipy.ndimage import gaussian_filter

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.synthetic.phantom import PRESETS, make_phantom
from cryoves.engine.synthetic.tiltseries import (
    TiltSeriesImaging,
    bin_volume,
    fine_oversampling,
    ramp_filter,
    reconstruct,
    tilt_angles_deg,
)
from cryoves.kernels.projection import back_project, project

SHAPE = (48, 96, 96)
VOXEL_A = 22.0
ANGLES = tilt_angles_deg(60.0, 3.0)


@pytest.fixture(scope="module")
def pair():
    """The same scene imaged both ways."""
    return tuple(make_phantom(SHAPE, VOXEL_A, seed=2, imaging=imaging) for imaging in ("fft", "tilt-series"))


def test_tilt_angles_are_dose_symmetric():
    angles = tilt_angles_deg(60.0, 3.0)
    assert angles.size == 41
    npt.assert_array_equal(angles[:5], [0.0, 3.0, -3.0, 6.0, -6.0])
    npt.assert_allclose(np.sort(angles), np.arange(-60.0, 60.1, 3.0))
    assert np.abs(tilt_angles_deg(50.0, 3.0)).max() == 48.0


def test_oversampling_is_lowered_to_fit_the_fine_grid():
    assert fine_oversampling((128, 256, 256), TiltSeriesImaging()) == 2
    n = 128 * 256 * 256
    assert fine_oversampling((128, 256, 256), TiltSeriesImaging(max_fine_voxels=8 * n - 1)) == 1
    assert fine_oversampling((128, 256, 256), TiltSeriesImaging(oversampling=3, max_fine_voxels=8 * n)) == 2


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_binning_averages_onto_the_coarse_grid_that_starts_with_the_fine_one(factor):
    """A linear ramp j along each fine axis becomes factor * i on the coarse grid (its voxel i is centred on
    fine voxel factor * i), away from the first voxel, where the edge is replicated."""
    fine = np.indices((4 * factor, 5 * factor, 6 * factor), dtype=np.float64).sum(axis=0)
    coarse = bin_volume(fine, factor)
    assert coarse.shape == (4, 5, 6)
    npt.assert_allclose(coarse[1:, 1:, 1:], factor * np.indices((4, 5, 6)).sum(axis=0)[1:, 1:, 1:], atol=1e-12)


def test_weighted_back_projection_of_full_coverage_returns_the_blob():
    """Projections over 180° in 1° steps, ramp-filtered and back-projected with weights of 1° in radians, give back
    a smooth blob (sigma 6 voxels) to within 2.5 % of its peak (the Hamming window blurs it a little)."""
    n = 64
    z = np.arange(n)[:, None, None] - 33.2
    x = np.arange(n)[None, None, :] - 27.7
    blob = np.broadcast_to(np.exp(-(z**2 + x**2) / (2 * 6.0**2)), (n, 3, n)).astype(np.float32)
    angles = np.arange(-89.5, 90.0, 1.0)
    reconstruction = back_project(ramp_filter(project(blob, angles)), angles, np.radians(1.0), n)
    npt.assert_allclose(reconstruction, blob, atol=0.025)


def _wedge_profile(tomogram: np.ndarray, voxel_a: float) -> np.ndarray:
    """Mean power in 5° sectors of the angle between k and the kx axis in the kz-kx plane (all ky), for 0.05 < |k_zx|
    < 0.4 cycles per voxel."""
    power = np.abs(np.fft.fftn(tomogram)) ** 2
    kz = np.fft.fftfreq(tomogram.shape[0], d=voxel_a)[:, None, None]
    kx = np.fft.fftfreq(tomogram.shape[2], d=voxel_a)[None, None, :]
    angle = np.broadcast_to(np.degrees(np.arctan2(np.abs(kz), np.abs(kx))), power.shape)
    k = np.broadcast_to(np.hypot(kz, kx) * voxel_a, power.shape)
    band = (k > 0.05) & (k < 0.4)
    return np.array([power[band & (angle >= a) & (angle < a + 5)].mean() for a in range(0, 90, 5)])


def test_missing_wedge_is_in_the_spectrum_and_shrinks_with_the_tilt_range():
    """Power beyond the tilt range (the wedge, kz-kx angle > tilt_max + 5°) is a few % of the power inside it, and
    the first 5° sector below 40 % of the inside power starts at the tilt range: ±40°, ±60°, ±70°."""
    edges = []
    for tilt_max in (40.0, 60.0, 70.0):
        preset = replace(PRESETS["default"], tilt_max_deg=tilt_max)
        tomogram = make_phantom((32, 64, 64), VOXEL_A, seed=1, preset=preset, imaging="tilt-series").tomogram
        profile = _wedge_profile(tomogram, VOXEL_A)
        sectors = np.arange(0, 90, 5)
        inside = profile[(sectors >= 5) & (sectors + 5 <= tilt_max - 5)].mean()  # 0-5°: the kz = 0 line, no wedge
        wedge = profile[sectors >= tilt_max + 5].mean()
        assert wedge < 0.05 * inside, tilt_max
        edges.append(sectors[np.argmax(profile < 0.4 * inside)])
    assert edges == [40, 60, 70]


def test_noise_variance_follows_the_dose():
    """Reconstruction of noisy minus noiseless projections of the same series: its variance scales as 1 / dose."""
    rng = np.random.default_rng(5)
    density = gaussian_filter(rng.normal(size=(32, 48, 48)), 1.5).astype(np.float32) + 0.3
    preset = PRESETS["default"]
    variance = {}
    for dose in (25.0, 100.0, 400.0):
        params = TiltSeriesImaging(dose_e_per_a2=dose)
        noise = reconstruct(density, 1.1, ANGLES, preset, params, np.random.default_rng(1)) - \
            reconstruct(density, 1.1, ANGLES, preset, params, None)
        variance[dose] = float(noise.var())
    for dose in (100.0, 400.0):
        assert variance[25.0] / variance[dose] == pytest.approx(dose / 25.0, rel=0.05)


def test_low_snr_preset_lowers_the_dose():
    """The preset's SNR scales the dose: low_snr (0.15) is as noisy as the default at 0.15 of its dose."""
    density = np.full((16, 16, 16), 0.2, dtype=np.float32)
    low = replace(PRESETS["default"], snr=0.15)
    noise_low = reconstruct(density, 1.1, ANGLES, low, TiltSeriesImaging(), np.random.default_rng(3))
    noise_dose = reconstruct(density, 1.1, ANGLES, PRESETS["default"], TiltSeriesImaging(dose_e_per_a2=15.0),
                             np.random.default_rng(3))
    npt.assert_allclose(noise_low, noise_dose, rtol=1e-5, atol=1e-6)


def test_labels_and_table_equal_those_of_the_fft_imaging(pair):
    fft, tilt = pair
    npt.assert_array_equal(tilt.labels, fft.labels)
    assert tilt.vesicles.replace_schema_metadata(None).equals(fft.vesicles.replace_schema_metadata(None))
    assert tilt.tomogram.dtype == np.float32 and tilt.tomogram.shape == SHAPE
    assert tilt.tomogram.mean() == pytest.approx(0.0, abs=1e-5) and tilt.tomogram.std() == pytest.approx(1.0, rel=1e-5)
    assert abs(np.corrcoef(tilt.tomogram.ravel(), fft.tomogram.ravel())[0, 1]) < 0.95  # imaged differently


def _membrane_and_lumen(phantom) -> tuple[float, float]:
    """Mean intensity on all vesicle membranes and in their lumens (3 nm inside the membrane)."""
    v = {name: phantom.vesicles.column(name).to_numpy() for name in phantom.vesicles.column_names}
    grid = np.indices(phantom.tomogram.shape, dtype=np.float64)
    membrane, lumen = [], []
    for k in range(len(v["id"])):
        center = np.array([v["center_z_vox"][k], v["center_y_vox"][k], v["center_x_vox"][k]])
        d_nm = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center))) * phantom.voxel_size_a / 10
        radius, thickness = v["radius_nm"][k], v["membrane_thickness_nm"][k]
        membrane.append(phantom.tomogram[(d_nm >= radius - thickness) & (d_nm <= radius)])
        lumen.append(phantom.tomogram[d_nm < radius - thickness - 3])
    return float(np.concatenate(membrane).mean()), float(np.concatenate(lumen).mean())


def test_vesicle_membranes_are_darker_than_their_lumen(pair):
    membrane, lumen = _membrane_and_lumen(pair[1])
    assert membrane < lumen - 0.3


def test_denoised_variant_is_smoother_and_keeps_the_membranes(pair):
    raw = pair[1]
    denoised = make_phantom(SHAPE, VOXEL_A, seed=2, imaging=TiltSeriesImaging(denoised=True))
    def roughness(t):  # the median step between neighbours: noise, not the few large steps at membranes
        return float(np.median(np.abs(np.diff(t, axis=2))))

    assert roughness(denoised.tomogram) < 0.3 * roughness(raw.tomogram)
    membrane, lumen = _membrane_and_lumen(denoised)
    assert membrane < lumen - 0.3


def test_same_seed_same_tomogram():
    a, b = (make_phantom((16, 32, 32), VOXEL_A, seed=4, imaging="tilt-series").tomogram for _ in range(2))
    npt.assert_array_equal(a, b)


def test_metadata_records_the_imaging(pair):
    fft, tilt = pair
    assert fft.vesicles.schema.metadata[b"imaging"] == b"fft"
    metadata = tilt.vesicles.schema.metadata
    assert metadata[b"imaging"] == b"tilt-series"
    assert json.loads(metadata[b"imaging_params"]) == {**asdict(TiltSeriesImaging()), "fine_voxel_size_a": VOXEL_A / 2}


def test_bad_imaging_is_refused():
    with pytest.raises(CryovesError, match="imaging 'radon' is unknown"):
        make_phantom((16, 16, 16), VOXEL_A, seed=0, imaging="radon")
    with pytest.raises(CryovesError, match=r"needs tilt_max_deg in \(0, 80\] degrees, got 90"):
        make_phantom((16, 16, 16), VOXEL_A, seed=0, preset=replace(PRESETS["default"], tilt_max_deg=90.0),
                     imaging="tilt-series")
    with pytest.raises(CryovesError, match="tilt_step_deg must be in"):
        TiltSeriesImaging(tilt_step_deg=0.0)
    with pytest.raises(CryovesError, match="must be > 0"):
        TiltSeriesImaging(dose_e_per_a2=-1.0)


def test_cli_phantom_tilt_series(tmp_path, capsys):
    argv = ["phantom", str(tmp_path), "--shape", "16", "32", "32", "--seed", "1", "--imaging", "tilt-series",
            "--tilt-max", "50", "--tilt-step", "5", "--dose", "80", "--denoised"]
    assert main(argv) == 0
    assert "tilt-series imaging" in capsys.readouterr().out
    metadata = pq.read_table(tmp_path / "phantom.vesicles.parquet").schema.metadata
    params = json.loads(metadata[b"imaging_params"])
    assert (params["tilt_step_deg"], params["dose_e_per_a2"], params["denoised"]) == (5.0, 80.0, True)
    assert json.loads(metadata[b"preset_params"])["tilt_max_deg"] == 50.0
    assert main(["phantom", str(tmp_path), "--shape", "16", "32", "32", "--denoised"]) == 2
    assert "need --imaging tilt-series" in capsys.readouterr().err
