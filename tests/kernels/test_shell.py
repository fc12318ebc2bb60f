"""shell_sums (one pass, difference array) against the per-threshold erosion reference."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.kernels.shell import shell_sums, shell_sums_at, shell_sums_reference, shell_voxels

SHAPES = [(1, 1, 1), (1, 1, 5), (3, 5, 7), (2, 9, 4), (7, 3, 1), (11, 13, 17)]
THRESHOLDS = np.round(0.80 + 0.01 * np.arange(20), 12)


def _random_inputs(rng, shape, p_dtype, i_dtype):
    # P on a 1/64 grid around 0.8..1 so that many voxels sit exactly on a threshold value
    # (exactly representable in float32 and float64: tests strict P > t).
    p = rng.integers(48, 65, size=shape) / 64.0
    thresholds = np.unique(np.concatenate([THRESHOLDS, rng.choice(p.ravel(), size=min(5, p.size))]))
    if np.issubdtype(i_dtype, np.integer):
        intensity = rng.integers(-3000, 3000, size=shape).astype(i_dtype)
    else:
        intensity = rng.normal(10.0, 3.0, size=shape).astype(i_dtype)
    return intensity, p.astype(p_dtype), thresholds


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("i_dtype", [np.float32, np.int16, np.int8])
def test_kernel_equals_reference(rng, shape, p_dtype, i_dtype):
    intensity, p, thresholds = _random_inputs(rng, shape, p_dtype, i_dtype)
    sums, counts = shell_sums(intensity, p, thresholds)
    ref_sums, ref_counts = shell_sums_reference(intensity, p, thresholds)
    assert sums.dtype == np.float64 and counts.dtype == np.int64
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_allclose(sums, ref_sums, rtol=1e-9, atol=1e-9 * np.abs(intensity).sum(dtype=np.float64))


def test_smooth_map_with_many_thresholds(rng):
    """A realistic smooth map and a fine, unevenly spaced threshold set (bins far apart in one voxel)."""
    z, y, x = np.mgrid[:20, :23, :21]
    d = np.sqrt((z - 9.3) ** 2 + (y - 11.2) ** 2 + (x - 10.1) ** 2)
    p = (1.0 / (1.0 + np.exp((d - 6.0) / 1.7))).astype(np.float32)
    intensity = rng.normal(0, 1, p.shape).astype(np.float32)
    thresholds = np.sort(np.concatenate([np.linspace(0.01, 0.99, 97), [0.999, 0.9999]]))
    sums, counts = shell_sums(intensity, p, thresholds)
    ref_sums, ref_counts = shell_sums_reference(intensity, p, thresholds)
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_allclose(sums, ref_sums, rtol=1e-9, atol=1e-9 * np.abs(intensity).sum(dtype=np.float64))
    assert counts.sum() > 0


def test_strict_inequality_on_exact_values():
    """P exactly equal to t is background; the border counts as foreground (not a shell)."""
    p = np.full((3, 3, 3), 0.9)
    p[1, 1, 1] = 0.95
    intensity = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    sums, counts = shell_sums(intensity, p, [0.9, 0.95])
    # t = 0.90: only the centre is above; it is its own shell. t = 0.95: nothing above.
    npt.assert_array_equal(counts, [1, 0])
    npt.assert_array_equal(sums, [13.0, 0.0])
    # all above t: the mask is the whole volume, which is not eroded at the faces -> no shell
    sums, counts = shell_sums(intensity, p, [0.5])
    npt.assert_array_equal(counts, [0])


def test_float32_compared_in_float64():
    """float32(0.8) > 0.8 in float64, though not in float32: the kernel and reference agree on float64."""
    p = np.full((1, 1, 2), np.float32(0.8))
    p[0, 0, 1] = 0.0
    intensity = np.ones(p.shape, np.int16)
    for impl in (shell_sums, shell_sums_reference):
        _, counts = impl(intensity, p, [0.8])
        npt.assert_array_equal(counts, [1])


def test_nan_is_background(rng):
    intensity, p, thresholds = _random_inputs(rng, (5, 6, 7), np.float32, np.float32)
    p[2, 3, 4] = np.nan
    p[0, 0, 0] = np.nan
    sums, counts = shell_sums(intensity, p, thresholds)
    ref_sums, ref_counts = shell_sums_reference(intensity, p, thresholds)
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_allclose(sums, ref_sums, rtol=1e-9)


def test_non_contiguous_and_big_endian(rng):
    intensity, p, thresholds = _random_inputs(rng, (6, 8, 10), np.float64, np.int16)
    p_view = p[:, ::2, ::-1]
    i_view = intensity.astype(">i2")[:, ::2, ::-1]
    sums, counts = shell_sums(i_view, p_view, thresholds)
    ref_sums, ref_counts = shell_sums_reference(i_view, p_view, thresholds)
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_allclose(sums, ref_sums, rtol=1e-12)


def test_repeated_and_out_of_range_thresholds(rng):
    intensity, p, _ = _random_inputs(rng, (5, 7, 6), np.float32, np.int16)
    thresholds = [-1.0, 0.8125, 0.8125, 0.9, 0.9, 0.9, 2.0]
    sums, counts = shell_sums(intensity, p, thresholds)
    ref_sums, ref_counts = shell_sums_reference(intensity, p, thresholds)
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_array_equal(sums, ref_sums)  # int16 sums are exact in float64
    assert counts[0] == 0 and counts[-1] == 0  # everything above -1 fills the volume: no shell


def test_no_thresholds_and_empty_volume():
    sums, counts = shell_sums(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [])
    assert sums.shape == (0,) and counts.shape == (0,)
    sums, counts = shell_sums(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)), [0.5])
    npt.assert_array_equal(counts, [0])


@pytest.mark.parametrize(
    ("intensity", "probability", "thresholds", "match"),
    [
        (np.zeros((2, 2)), np.zeros((2, 2)), [0.5], "must be 3-D"),
        (np.zeros((2, 2, 3)), np.zeros((2, 2, 2)), [0.5], "differs from probability shape"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2), np.int16), [0.5], "float32 or float64"),
        (np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2)), [0.5], "real numeric"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [0.9, 0.8], "sorted ascending"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [0.8, np.nan], "finite"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [[0.8]], "1-D"),
    ],
)
def test_invalid_inputs(intensity, probability, thresholds, match):
    with pytest.raises(ValueError, match=match):
        shell_sums(intensity, probability, thresholds)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shell_voxels_are_those_of_some_shell_and_their_sums_are_shell_sums(rng, shape):
    """`shell_voxels` are the voxels in the reference's shell of at least one threshold, ascending; the intensity
    given at them only (`shell_sums_at`) sums to `shell_sums`' numbers, bit for bit."""
    from scipy import ndimage

    intensity, p, thresholds = _random_inputs(rng, shape, np.float32, np.float32)
    cross = ndimage.generate_binary_structure(3, 1)
    in_some = np.zeros(shape, bool)
    for t in thresholds:
        mask = p.astype(np.float64) > t
        in_some |= mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=1)
    indices = shell_voxels(p, thresholds)
    npt.assert_array_equal(indices, np.flatnonzero(in_some))
    sums, counts = shell_sums(intensity, p, thresholds)
    at_sums, at_counts = shell_sums_at(intensity.reshape(-1)[indices], indices, p, thresholds)
    npt.assert_array_equal(at_sums, sums)
    npt.assert_array_equal(at_counts, counts)
