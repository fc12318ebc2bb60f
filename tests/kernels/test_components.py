"""label_above equals scipy's labelling of the mask; component_counts one scipy labelling per threshold."""

import numpy as np
import numpy.testing as npt
import pytest
from scipy import ndimage

from cryoves.kernels.components import (
    component_counts,
    component_counts_reference,
    deep_maxima,
    deep_maxima_reference,
    label_above,
    label_above_reference,
)


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_above_equals_scipys_labelling(rng, connectivity, dtype):
    """Same ids in the same order (raster order of first voxels), on smooth and on speckled maps, with runs
    through the faces of the volume."""
    for sigma in (0.0, 0.8, 2.0):
        values = ndimage.gaussian_filter(rng.normal(size=(13, 21, 17)), sigma).astype(dtype)
        for quantile in (0.3, 0.7, 0.95):
            threshold = float(np.quantile(values, quantile))
            labels, n = label_above(values, threshold, connectivity)
            expected, n_expected = label_above_reference(values, threshold, connectivity)
            assert n == n_expected and labels.dtype == expected.dtype == np.uint16
            npt.assert_array_equal(labels, expected)


def test_label_above_ties_diagonals_and_float64_comparison():
    values = np.zeros((2, 3, 4), np.float32)
    values[0, 0, 0] = values[1, 1, 1] = 0.9  # corner neighbours: one component only with 26-connectivity
    values[0, 2, 3] = np.float32(0.7)  # 0.699999988 in float64: not above 0.7
    assert label_above(values, 0.7, 6)[1] == 2 and label_above(values, 0.7, 26)[1] == 1
    assert label_above(values, 0.69999998, 6)[1] == 3
    assert label_above(np.zeros((1, 1, 1)), 0.0)[1] == 0


def test_label_above_goes_to_uint32_beyond_65535_components():
    values = np.zeros((1, 2, 2 * 70_000), np.float32)
    values[0, 0, ::2] = 1.0  # 70,000 single voxels
    labels, n = label_above(values, 0.5)
    assert n == 70_000 and labels.dtype == np.uint32 and labels[0, 0, -2] == 70_000


def test_label_above_refuses_other_connectivities():
    with pytest.raises(ValueError, match="connectivity must be 6 or 26"):
        label_above(np.zeros((2, 2, 2)), 0.5, 18)


@pytest.mark.parametrize("min_size", [0.0, 1.0, 7.5, 40.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counts_equal_the_reference(rng, min_size, dtype):
    values = ndimage.gaussian_filter(rng.normal(size=(17, 30, 23)), 1.2).astype(dtype)
    values[values < 0] = 0  # outside a segment P is 0, as the split step passes it
    thresholds = np.concatenate([np.quantile(values, np.linspace(0.5, 0.999, 40)), [0.0, values.max()]])
    thresholds = rng.permutation(np.concatenate([thresholds, thresholds[:3]]))  # any order, some twice
    npt.assert_array_equal(component_counts(values, thresholds, min_size),
                           component_counts_reference(values, thresholds, min_size))


def test_ties_and_strict_comparison():
    """Voxels equal to a threshold are not above it; diagonal neighbours join (26-connectivity)."""
    values = np.zeros((3, 4, 4), np.float32)
    values[1, 1, 1] = values[1, 2, 2] = 0.5  # diagonal pair
    values[1, 0, 3] = 0.9
    npt.assert_array_equal(component_counts(values, [0.0, 0.5, 0.8, 0.9]), [2, 1, 1, 0])
    npt.assert_array_equal(component_counts(values, [0.0], min_size=2), [1])


def test_float32_values_compare_in_float64():
    values = np.full((2, 2, 2), np.float32(0.7))
    npt.assert_array_equal(component_counts(values, [0.7, 0.69999998]), [0, 1])  # float32(0.7) = 0.699999988


@pytest.mark.parametrize("depth", [0.05, 0.2, 0.5])
def test_deep_maxima_are_the_h_maxima(rng, depth):
    """One peak inside each h-maximum region, and no peak outside them."""
    values = ndimage.gaussian_filter(rng.normal(size=(19, 28, 24)), 2.0)
    values = np.clip(values / values.std(), 0, None).astype(np.float32)  # > 0 where a segment would be
    regions = deep_maxima_reference(values, depth)
    peaks = deep_maxima(values, depth)
    assert regions.max() >= 2
    npt.assert_array_equal(np.sort(regions.ravel()[peaks]), np.arange(1, regions.max() + 1))


def test_two_touching_balls_have_two_deep_maxima_of_their_distance_transform():
    z, y, x = np.ogrid[:20, :20, :34]
    pair = ((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 <= 49) | ((z - 10) ** 2 + (y - 10) ** 2 + (x - 22) ** 2 <= 49)
    distance = ndimage.distance_transform_edt(pair).astype(np.float32)
    peaks = np.unravel_index(deep_maxima(distance, 2.0), pair.shape)
    npt.assert_array_equal(peaks[2], [10, 22])
    assert deep_maxima(distance, 5.0).size == 1  # the neck is 3.6 voxels below the centres
