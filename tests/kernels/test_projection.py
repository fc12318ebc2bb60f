"""project / back_project against their references; known answers: sums at 0° and 90°, a Gaussian's line integral."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.projection import back_project, back_project_reference, project, project_reference

# both sides of the ±45° switch between z and x stepping, ±90°, beyond 90°, and a non-multiple of anything
ANGLES = [-90.0, -60.0, -45.0001, -45.0, -30.0, 0.0, 3.0, 44.9999, 45.0, 46.0, 61.7, 89.0, 90.0, 135.0, 180.0]


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 5, 13), (12, 3, 7), (4, 2, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_project_matches_reference(rng, shape, dtype):
    volume = rng.normal(size=shape).astype(dtype)
    got = project(volume, ANGLES)
    assert got.dtype == np.float32 and got.shape == (len(ANGLES), shape[1], shape[2])
    npt.assert_allclose(got, project_reference(volume, ANGLES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 5, 13), (12, 3, 7), (4, 2, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_back_project_matches_reference(rng, shape, dtype):
    projections = rng.normal(size=(len(ANGLES), shape[1], shape[2])).astype(dtype)
    weights = rng.uniform(0.1, 2.0, len(ANGLES))
    got = back_project(projections, ANGLES, weights, shape[0])
    assert got.dtype == np.float32 and got.shape == shape
    npt.assert_allclose(got, back_project_reference(projections, ANGLES, weights, shape[0]), rtol=1e-5, atol=1e-5)


def test_projection_at_0_and_90_degrees_sums_along_z_and_x(rng):
    volume = rng.normal(size=(11, 4, 11))
    npt.assert_allclose(project(volume, [0.0])[0], volume.sum(axis=0), rtol=1e-5, atol=1e-5)
    # at +90° the detector runs along z; at -90° it runs backwards
    npt.assert_allclose(project(volume, [90.0])[0], volume.sum(axis=2).T, rtol=1e-5, atol=1e-5)
    npt.assert_allclose(project(volume, [-90.0])[0], volume.sum(axis=2).T[:, ::-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("angle", [-75.0, -45.0, -20.0, 0.0, 10.0, 45.0, 60.0])
def test_projection_of_a_gaussian_is_its_line_integral(angle):
    """A 2-D Gaussian (sigma 3 voxels) in every x-z plane projects to sqrt(2 pi) sigma times a 1-D Gaussian at the
    detector position of its centre: mass exactly, shape to within the blur of linear interpolation (< 1.2 %)."""
    nz, nx, sigma, (z0, x0) = 31, 41, 3.0, (17.3, 16.6)
    z = np.arange(nz)[:, None, None]
    x = np.arange(nx)[None, None, :]
    volume = np.broadcast_to(np.exp(-((z - z0) ** 2 + (x - x0) ** 2) / (2 * sigma**2)), (nz, 2, nx))
    theta = np.radians(angle)
    u0 = (nx - 1) / 2 + (x0 - (nx - 1) / 2) * np.cos(theta) + (z0 - (nz - 1) / 2) * np.sin(theta)
    u = np.arange(nx)
    expected = np.sqrt(2 * np.pi) * sigma * np.exp(-((u - u0) ** 2) / (2 * sigma**2))
    got = project(volume, [angle])[0]
    assert got[0].sum() == pytest.approx(expected.sum(), rel=1e-3)
    npt.assert_allclose(got[0], expected, atol=1.2e-2 * expected.max())
    npt.assert_array_equal(got[0], got[1])


def test_back_projection_at_0_degrees_smears_along_z():
    projections = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = back_project(projections, [0.0], 0.5, 5)
    npt.assert_array_equal(out, np.broadcast_to(0.5 * projections, (5, 3, 4)))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="3-D float array"):
        project(np.zeros((4, 4)), [0.0])
    with pytest.raises(ValueError, match="3-D float array"):
        project(np.zeros((4, 4, 4), dtype=np.int16), [0.0])
    with pytest.raises(ValueError, match="finite angles"):
        project(np.zeros((4, 4, 4)), [np.nan])
    with pytest.raises(ValueError, match="hold 2 angles, angles_deg 3"):
        back_project(np.zeros((2, 4, 4)), [0.0, 1.0, 2.0], 1.0, 4)
    with pytest.raises(ValueError, match="nz must be a positive integer"):
        back_project(np.zeros((1, 4, 4)), [0.0], 1.0, 0)
