"""resize_linear equals scipy's gaussian_filter then zoom (order 1, reflect, grid mode): growing, shrinking, both."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.resize import resize_linear, resize_linear_at, resize_linear_reference


@pytest.mark.parametrize("shape", [(30, 41, 52), (9, 13, 17), (31, 20, 52), (20, 27, 35), (1, 27, 35)])
def test_equals_the_reference(rng, shape):
    volume = rng.normal(size=(20, 27, 35)).astype(np.float32)
    npt.assert_allclose(resize_linear(volume, shape), resize_linear_reference(volume, shape), atol=2e-6)


@pytest.mark.parametrize("sigma", [(0.25, 0.25, 0.25), (0.5, 0.0, 1.3), (0.1, 0.2, 0.05), (2.0, 2.0, 2.0)])
@pytest.mark.parametrize("shape", [(13, 18, 23), (20, 27, 35), (3, 40, 12)])
def test_with_the_antialias_equals_the_reference(rng, sigma, shape):
    volume = rng.normal(size=(20, 27, 35)).astype(np.float32)
    npt.assert_allclose(resize_linear(volume, shape, sigma), resize_linear_reference(volume, shape, sigma), atol=1e-5)


def test_a_short_axis_reflects_like_scipy(rng):
    volume = rng.normal(size=(3, 4, 5)).astype(np.float32)  # shorter than a σ = 2 kernel (17 taps)
    npt.assert_allclose(resize_linear(volume, (2, 3, 4), 2.0), resize_linear_reference(volume, (2, 3, 4), 2.0),
                        atol=1e-5)


def test_same_shape_is_a_float32_copy(rng):
    volume = rng.normal(size=(4, 5, 6))
    out = resize_linear(volume, volume.shape)
    assert out.dtype == np.float32 and not np.shares_memory(out, volume)
    npt.assert_allclose(out, volume, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="3-D shape of positive sizes"):
        resize_linear(np.zeros((2, 2, 2)), (2, 0, 2))
    with pytest.raises(ValueError, match="sigma_vox must be >= 0"):
        resize_linear(np.zeros((2, 2, 2)), (2, 2, 2), -1.0)


@pytest.mark.parametrize("shape", [(13, 18, 23), (20, 14, 50), (41, 27, 35)])  # z shrinks, stays, grows
@pytest.mark.parametrize("sections", [(0, 1), (3, 9), (5, 13)])
def test_sections_are_those_of_the_whole_resize(rng, shape, sections):
    """A part of the output z-sections, from only the input sections they need, is bit for bit the whole's."""
    volume = rng.normal(size=(20, 27, 35)).astype(np.float32)
    whole = resize_linear(volume, shape, (0.7, 0.0, 0.4))
    npt.assert_array_equal(resize_linear(volume, shape, (0.7, 0.0, 0.4), sections=sections),
                           whole[sections[0]:sections[1]])
    into = np.full(whole.shape, np.nan, np.float32)  # the same, written straight into parts of one output
    assert resize_linear(volume, shape, (0.7, 0.0, 0.4), sections=sections,
                         out=into[sections[0]:sections[1]]).base is into
    npt.assert_array_equal(into[sections[0]:sections[1]], whole[sections[0]:sections[1]])
    with pytest.raises(ValueError, match="out must be"):
        resize_linear(volume, shape, sections=sections, out=into)


@pytest.mark.parametrize("sections", [(0, 0), (-1, 3), (2, 14)])
def test_sections_outside_the_output_are_refused(sections):
    with pytest.raises(ValueError, match="sections"):
        resize_linear(np.zeros((4, 5, 6), np.float32), (13, 5, 6), sections=sections)


@pytest.mark.parametrize("shape", [(13, 18, 23), (20, 14, 50), (41, 27, 35), (20, 27, 35)])  # z shrinks, stays, grows
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_at_some_voxels_is_bit_for_bit_the_whole_resize(rng, shape, dtype):
    """`resize_linear_at` gives the whole resize's values at the voxels asked for, in their order, bit for bit: with
    and without the anti-alias, every axis shrinking, kept or growing, for all voxels, a few, or those of a few
    sections (read from only the input sections they need)."""
    volume = (rng.normal(size=(20, 27, 35)) * 300).astype(dtype)
    section = shape[1] * shape[2]
    for sigma in ((0.7, 0.0, 0.4), (0.0, 0.0, 0.0), (0.25, 1.3, 0.25)):
        whole = resize_linear(volume, shape, sigma).reshape(-1)
        for indices in (np.arange(whole.size), np.sort(rng.choice(whole.size, 300, replace=False)),
                        np.arange(3 * section, 5 * section, 7), np.array([whole.size - 1, 0])):
            npt.assert_array_equal(resize_linear_at(volume, shape, sigma, indices), whole[indices])
    assert resize_linear_at(volume, shape, 0.0, np.zeros(0, np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="indices"):
        resize_linear_at(volume, shape, 0.0, [np.prod(shape)])
