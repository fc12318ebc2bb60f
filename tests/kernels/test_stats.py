"""volume_stats (one read per section) against NumPy in float64, over dtypes, shapes and non-finite voxels."""

import numpy as np
import pytest

from cryoves.kernels.stats import volume_stats, volume_stats_reference

SHAPES = [(1, 1, 1), (3, 5, 7), (0, 4, 4), (70, 3, 2), (9, 40, 50)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.uint16, np.int16, np.int8, np.uint32, bool,
                                   ">f4"])
def test_kernel_equals_reference(rng, shape, dtype):
    values = rng.normal(1000.0, 300.0, size=shape) if np.dtype(dtype).kind == "f" else rng.integers(0, 120, shape)
    volume = values.astype(dtype)
    np.testing.assert_allclose(volume_stats(volume), volume_stats_reference(volume), rtol=1e-12, equal_nan=True)


def test_non_finite_voxels_are_left_out(rng):
    volume = rng.normal(size=(6, 7, 8)).astype(np.float32)
    volume[2, 3, 4], volume[5, 0, 0], volume[0] = np.nan, np.inf, -np.inf
    stats = volume_stats(volume)
    finite = volume[np.isfinite(volume)].astype(np.float64)
    np.testing.assert_allclose(stats, (finite.min(), finite.max(), finite.mean(), finite.std()), rtol=1e-12)
    assert np.isnan(volume_stats(np.full((2, 2, 2), np.nan, np.float32))).all()


def test_a_large_offset_keeps_the_deviation():
    """Two-pass per section: a volume at 1e8 with unit spread keeps its standard deviation (one-pass sums of
    squares would lose it to cancellation)."""
    volume = (1e8 + np.random.default_rng(0).standard_normal((8, 64, 64))).astype(np.float64)
    assert volume_stats(volume).std == pytest.approx(volume.std(), rel=1e-9)


def test_not_a_volume():
    with pytest.raises(ValueError, match="3-D"):
        volume_stats(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="real"):
        volume_stats(np.zeros((2, 2, 2), complex))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int8, np.uint8])
def test_small_integers_over_their_whole_range(rng, dtype):
    """8- and 16-bit volumes take exact int64 sums of values and squares: extremes of the type, a section of one value
    (M2 = 0), and a section of 2^20 voxels at the type's maximum (the sums' worst case) match NumPy in float64."""
    info = np.iinfo(dtype)
    volume = rng.integers(info.min, int(info.max) + 1, (3, 1024, 1024)).astype(dtype)
    volume[1] = info.max
    volume[2, :2] = info.min
    np.testing.assert_allclose(volume_stats(volume), volume_stats_reference(volume), rtol=1e-12)
    assert volume_stats(volume[1:2]).std == 0.0
