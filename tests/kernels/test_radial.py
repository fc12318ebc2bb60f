"""radial_profiles / box_profiles / extract_boxes / back_project / xcorr_shift against their references."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.radial import (
    back_project,
    back_project_reference,
    box_profiles,
    box_profiles_reference,
    extract_boxes,
    extract_boxes_reference,
    radial_profiles,
    radial_profiles_reference,
    xcorr_shift,
    xcorr_shift_reference,
)


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


def _centers(rng, shape, n):
    """Centres inside, on and just outside the faces (boxes clipped at the border)."""
    hi = np.array(shape, dtype=float)
    return rng.uniform(-2.0, hi + 1.0, size=(n, 3))


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 9, 11), (20, 31, 25)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("bin_width", [1.0, 0.5])
def test_profiles_match_reference(rng, shape, dtype, bin_width):
    volume = (rng.normal(size=shape) * 100).astype(dtype)
    centers = _centers(rng, shape, 12)
    box = rng.integers(0, 9, size=12)
    got = radial_profiles(volume, centers, box, 15, bin_width_vox=bin_width)
    want = radial_profiles_reference(volume, centers, box, 15, bin_width_vox=bin_width)
    npt.assert_array_equal(np.isnan(got), np.isnan(want))
    npt.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("r", [0, 1, 5])
@pytest.mark.parametrize("bin_width", [1.0, 0.7])
def test_box_profiles_of_read_boxes_match_the_volume_reference(rng, r, bin_width):
    """Profiles from boxes already read (NaN outside the volume: clipped boxes) are the volume's profiles."""
    volume = (rng.normal(size=(9, 14, 12)) * 100).astype(np.float32)
    centers = _centers(rng, volume.shape, 20)
    boxes = extract_boxes(volume, centers, r)
    got = box_profiles(boxes, centers - np.floor(centers + 0.5), 12, bin_width_vox=bin_width)
    npt.assert_allclose(got, radial_profiles_reference(volume, centers, r, 12, bin_width_vox=bin_width),
                        rtol=1e-12, atol=1e-9)
    npt.assert_array_equal(got, radial_profiles(volume, centers, r, 12, bin_width_vox=bin_width))
    npt.assert_allclose(got, box_profiles_reference(boxes, centers - np.floor(centers + 0.5), 12,
                                                    bin_width_vox=bin_width), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="odd edge"):
        box_profiles(boxes[:, :-1], centers - np.floor(centers + 0.5), 12)


def test_profile_of_distance_volume_is_arange():
    center = np.array([12.3, 14.6, 13.2])
    z, y, x = np.indices((26, 30, 28), dtype=np.float64)
    volume = np.floor(np.sqrt((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2))
    profile = radial_profiles(volume.astype(np.float32), center, 10, 12)[0]
    npt.assert_array_equal(profile, np.arange(12.0))
    # the box is clipped at the volume, not shrunk: a centre near a face keeps its far shells
    border = radial_profiles(volume.astype(np.float32), [[0.4, 14.6, 13.2]], 10, 10)[0]
    assert np.all(np.isfinite(border))


def test_scalar_box_radius_and_float64(rng):
    volume = rng.normal(size=(10, 12, 14))
    centers = _centers(rng, volume.shape, 5)
    npt.assert_allclose(radial_profiles(volume, centers, 4, 8), radial_profiles_reference(volume, centers, 4, 8),
                        rtol=1e-12)


def test_profile_input_errors():
    with pytest.raises(ValueError, match="3-D"):
        radial_profiles(np.zeros((4, 4)), [[0, 0, 0]], 2, 3)
    with pytest.raises(ValueError, match="box_radius_vox must be >= 0"):
        radial_profiles(np.zeros((4, 4, 4)), [[0, 0, 0]], -1, 3)
    with pytest.raises(ValueError, match="n_bins"):
        radial_profiles(np.zeros((4, 4, 4)), [[0, 0, 0]], 1, 0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 10, 11)])
def test_extract_boxes_match_reference(rng, shape):
    volume = rng.normal(size=shape).astype(np.float32)
    centers = _centers(rng, shape, 8)
    got = extract_boxes(volume, centers, 3)
    npt.assert_array_equal(got, extract_boxes_reference(volume, centers, 3))
    assert got.shape == (8, 7, 7, 7) and got.dtype == np.float32


def test_back_project_matches_reference_and_eq5(rng):
    profiles = rng.normal(size=(6, 9))
    offsets = rng.uniform(-0.5, 0.5, size=(6, 3))
    got = back_project(profiles, 5, offsets)
    npt.assert_array_equal(got, back_project_reference(profiles, 5, offsets))
    # A(v) = P[k(v)]: back-projecting arange gives the floored distance, NaN past the profile
    ar = back_project(np.arange(9.0)[None], 5)[0]
    g = np.arange(11) - 5
    dist = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    want = np.where(dist < 9, np.floor(dist), np.nan)
    npt.assert_array_equal(ar, want)


def test_back_project_then_profile_round_trip(rng):
    profile = rng.normal(size=(1, 7))
    box = back_project(profile, 4)[0]
    again = radial_profiles(np.nan_to_num(box), [[4.0, 4.0, 4.0]], 4, 5)
    npt.assert_allclose(again[0], profile[0, :5], rtol=1e-12)


def _shell(radius, box_r, offset=(0.0, 0.0, 0.0)):
    g = np.arange(2 * box_r + 1) - box_r
    d = np.sqrt((g[:, None, None] - offset[0]) ** 2 + (g[None, :, None] - offset[1]) ** 2
                + (g[None, None, :] - offset[2]) ** 2)
    return -np.exp(-0.5 * ((d - radius) / 1.2) ** 2)


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, -2, 3), (-3, 0, 2)])
def test_xcorr_integer_shift(shift):
    model = _shell(4.0, 7)[None]
    boxes = np.roll(model, shift, axis=(1, 2, 3))
    npt.assert_allclose(xcorr_shift(boxes, model), [shift], atol=1e-6)
    npt.assert_array_equal(xcorr_shift(boxes, model, subvoxel=False), [shift])


@pytest.mark.parametrize("box_r", [2, 3])  # box edges 5 and 7
def test_xcorr_matches_direct_reference(rng, box_r):
    e = 2 * box_r + 1
    boxes = rng.normal(size=(4, e, e, e))
    boxes[1, 0] = np.nan  # outside the volume
    models = np.stack([_shell(1.5, box_r)] * 4) + rng.normal(scale=0.1, size=(4, e, e, e))
    npt.assert_array_equal(xcorr_shift(boxes, models, subvoxel=False),
                           xcorr_shift_reference(boxes, models, subvoxel=False))
    npt.assert_allclose(xcorr_shift(boxes, models), xcorr_shift_reference(boxes, models), atol=1e-6)


def test_xcorr_subvoxel_and_flat_boxes():
    model = _shell(5.0, 8)[None]
    boxes = _shell(5.0, 8, offset=(0.3, -0.4, 0.2))[None]
    npt.assert_allclose(xcorr_shift(boxes, model), [[0.3, -0.4, 0.2]], atol=0.15)
    flat = np.ones((1, 17, 17, 17))
    npt.assert_array_equal(xcorr_shift(flat, model), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="equal"):
        xcorr_shift(flat, model[:, :3])


def test_chunks_of_vesicles_are_independent(rng):
    volume = rng.normal(size=(16, 20, 24)).astype(np.float32)
    centers = _centers(rng, volume.shape, 10)
    box = rng.integers(1, 7, size=10)
    whole = radial_profiles(volume, centers, box, 10)
    parts = np.concatenate([radial_profiles(volume, centers[:3], box[:3], 10),
                            radial_profiles(volume, centers[3:], box[3:], 10)])
    npt.assert_array_equal(whole, parts)
