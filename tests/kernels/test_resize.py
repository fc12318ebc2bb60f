"""resize_linear equals scipy's zoom (order 1, reflect, grid mode) when growing, shrinking or both."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.resize import resize_linear, resize_linear_reference


@pytest.mark.parametrize("shape", [(30, 41, 52), (9, 13, 17), (31, 20, 52), (20, 27, 35), (1, 27, 35)])
def test_equals_the_reference(rng, shape):
    volume = rng.normal(size=(20, 27, 35)).astype(np.float32)
    npt.assert_allclose(resize_linear(volume, shape), resize_linear_reference(volume, shape), atol=2e-6)


def test_same_shape_is_a_float32_copy(rng):
    volume = rng.normal(size=(4, 5, 6))
    out = resize_linear(volume, volume.shape)
    assert out.dtype == np.float32 and not np.shares_memory(out, volume)
    npt.assert_allclose(out, volume, rtol=1e-6)


def test_bad_shape():
    with pytest.raises(ValueError, match="3-D shape of positive sizes"):
        resize_linear(np.zeros((2, 2, 2)), (2, 0, 2))
