"""render_spheres against its reference: exact labels, clipping, nearest-centre split."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.render import render_spheres, render_spheres_reference


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("radius, count", [(0, 1), (1, 7), (2, 33), (5, 515)])
def test_lone_ball_voxel_count(radius, count):
    labels = render_spheres((13, 13, 13), [[6, 6, 6]], [radius], [3])
    assert labels.dtype == np.uint16  # up to 65,535 balls
    assert (labels == 3).sum() == count
    npt.assert_array_equal(labels, render_spheres_reference((13, 13, 13), [[6, 6, 6]], [radius], [3]))
    # a digital ball's longest side is 2r + 1
    assert np.flatnonzero((labels > 0).any(axis=(0, 1))).size == 2 * radius + 1


def test_ball_clipped_at_face():
    labels = render_spheres((10, 11, 11), [[0, 5, 5]], [5], [1])
    assert labels.sum() == (515 + 81) // 2  # half the ball plus half its central disc (81 voxels)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 4), (19, 23, 29)])
def test_random_balls_match_reference(rng, shape):
    n = 20
    centers = rng.uniform(-4, max(shape) + 4, size=(n, 3))
    radii = rng.uniform(-1, 9, size=n)
    ids = rng.permutation(np.arange(1, n + 1) * 3)
    npt.assert_array_equal(render_spheres(shape, centers, radii, ids),
                           render_spheres_reference(shape, centers, radii, ids))


def test_no_balls():
    npt.assert_array_equal(render_spheres((3, 4, 5), np.zeros((0, 3)), np.zeros(0), np.zeros(0, int)),
                           np.zeros((3, 4, 5), np.uint32))


def test_overlap_goes_to_nearest_centre_not_painting_order():
    c = np.array([[10.0, 10.0, 7.0], [10.0, 10.0, 14.0]])
    for order in ([0, 1], [1, 0]):
        labels = render_spheres((21, 21, 21), c[order], [5.0, 5.0], np.array([1, 2])[order])
        # equal radii: the split is the mid-plane x = 10.5, whatever the order
        assert np.all(labels[..., :11][labels[..., :11] > 0] == 1)
        assert np.all(labels[..., 11:][labels[..., 11:] > 0] == 2)
    # unequal radii: the boundary is the radical plane, shared voxels follow the power distance
    labels = render_spheres((21, 21, 21), c, [6.0, 3.0], [1, 2])
    x = np.arange(21)
    power1 = (x - 7.0) ** 2 - 36.0
    power2 = (x - 14.0) ** 2 - 9.0
    row = labels[10, 10]
    assert np.all(row[(row > 0) & (power1 < power2)] == 1)
    assert np.all(row[(row > 0) & (power2 < power1)] == 2)


def test_bad_ids():
    with pytest.raises(ValueError, match="ids"):
        render_spheres((3, 3, 3), [[1, 1, 1]], [1], [0])


def test_ids_above_uint16_are_kept_exactly():
    labels = render_spheres((9, 9, 9), [[4, 4, 4]], [2], [70_000])
    assert labels.dtype == np.uint32 and labels[4, 4, 4] == 70_000
    npt.assert_array_equal(labels, render_spheres_reference((9, 9, 9), [[4, 4, 4]], [2], [70_000]))


def test_sections_are_those_of_the_whole_volume(rng):
    """Sections k0..k1 of the volume, rendered alone (a label file is written by slabs), are the whole's bit for bit,
    balls that cross the slab faces and overlaps included."""
    shape = (40, 33, 29)
    centers = rng.uniform(0, 1, (60, 3)) * shape
    radii = rng.uniform(1.5, 7.0, 60)
    ids = np.arange(1, 61)
    whole = render_spheres(shape, centers, radii, ids)
    for sections in ((0, 40), (0, 1), (7, 19), (39, 40), (12, 12)):
        npt.assert_array_equal(render_spheres(shape, centers, radii, ids, sections=sections),
                               whole[sections[0]:sections[1]])
    with pytest.raises(ValueError, match="sections"):
        render_spheres(shape, centers, radii, ids, sections=(5, 41))
