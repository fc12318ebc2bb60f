"""Resampling between grids, Gaussian pre-filter and z-score (method.md §2.2-2.4, §2.8)."""

import numpy as np
import numpy.testing as npt
import pytest
from scipy import ndimage
from skimage.transform import resize

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.network import rescale
from cryoves.engine.network.rescale import (
    gaussian_prefilter,
    mean_std,
    network_shape,
    resample_at,
    resample_to_shape,
    zscore,
)


def test_network_shape_example_from_method():
    assert network_shape((261, 1024, 1024), 14.69) == (174, 684, 684)
    assert network_shape((5, 7, 1), 22.0) == (5, 7, 1)
    assert network_shape((1, 1, 3), 2.2) == (1, 1, 1)


def test_network_shape_rejects_bad_voxel_size():
    with pytest.raises(CryovesError, match="voxel size must be > 0"):
        network_shape((4, 4, 4), 0.0)


@pytest.mark.parametrize("shape_out", [(7, 20, 33), (30, 11, 17), (12, 12, 12), (1, 5, 40)])
def test_resample_matches_skimage_resize(shape_out):
    volume = np.random.default_rng(1).standard_normal((12, 16, 21)).astype(np.float32)
    ours = resample_to_shape(volume, shape_out)
    expected = resize(volume.astype(np.float64), shape_out, order=1, mode="symmetric", anti_aliasing=True,
                      preserve_range=True)
    assert ours.dtype == np.float32 and ours.shape == shape_out
    npt.assert_allclose(ours, expected, atol=1e-5)


def test_resample_upsampling_is_pixel_centre_aligned():
    n_in, n_out = 10, 25
    ramp = np.arange(n_in, dtype=np.float32)
    volume = np.broadcast_to(ramp, (3, 4, n_in)).copy()
    out = resample_to_shape(volume, (3, 4, n_out))
    x_in = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    inside = (x_in >= 0) & (x_in <= n_in - 1)
    npt.assert_allclose(out[1, 2, inside], x_in[inside], atol=1e-5)
    assert np.all(out[..., ~inside] >= 0) and np.all(out[..., ~inside] <= n_in - 1)


def test_resample_keeps_int16_values_as_float():
    volume = np.random.default_rng(5).integers(-100, 100, (8, 8, 8)).astype(np.int16)
    out = resample_to_shape(volume, (5, 6, 11))
    assert out.dtype == np.float32
    assert not np.all(out == np.trunc(out))  # the reference truncates to int16; we do not


@pytest.mark.parametrize("shape_out", [(3, 4, 5), (20, 30, 9)])
def test_resample_constant_stays_constant(shape_out):
    out = resample_to_shape(np.full((9, 9, 9), 2.5, dtype=np.float32), shape_out)
    npt.assert_allclose(out, 2.5, rtol=1e-6)


def test_resample_same_shape_is_float32_view():
    volume = np.ones((4, 5, 6), dtype=np.float32)
    assert resample_to_shape(volume, (4, 5, 6)) is volume


def test_gaussian_prefilter_matches_scipy_and_zero_is_off():
    from scipy import ndimage

    volume = np.random.default_rng(2).standard_normal((10, 11, 12)).astype(np.float32)
    npt.assert_allclose(gaussian_prefilter(volume, 1.0),
                        ndimage.gaussian_filter(volume.astype(np.float64), 1.0, mode="nearest"), atol=1e-5)
    assert gaussian_prefilter(volume, 0.0) is volume


def test_mean_std_over_slabs_equals_numpy(monkeypatch):
    volume = (np.random.default_rng(3).standard_normal((13, 20, 30)) * 5 + 100).astype(np.float32)
    monkeypatch.setattr(rescale, "_SLAB_VOXELS", 1000)  # several slabs of 2 z-planes
    mean, std = mean_std(volume)
    assert mean == pytest.approx(volume.astype(np.float64).mean(), rel=1e-12)
    assert std == pytest.approx(volume.astype(np.float64).std(), rel=1e-12)


def test_zscore():
    volume = (np.random.default_rng(4).standard_normal((9, 10, 11)) * 3 - 7).astype(np.float32)
    out = zscore(volume)
    assert out.dtype == np.float32 and out is not volume
    assert abs(out.astype(np.float64).mean()) < 1e-6
    assert out.astype(np.float64).std() == pytest.approx(1.0, rel=1e-5)
    assert zscore(volume, inplace=True) is volume
    npt.assert_allclose(volume, out)
    npt.assert_array_equal(zscore(np.full((3, 3, 3), 5, dtype=np.int16)), 0.0)


def _cosine_series_reference(signal: np.ndarray, n_out: int) -> np.ndarray:
    """The DCT-II interpolant of `signal`, truncated to its first n_out terms, at the output pixel centres."""
    n_in = len(signal)
    n = np.arange(n_in)
    k = np.arange(n_out)[:, None]
    weights = np.where(k == 0, 1 / n_in, 2 / n_in)
    coefficients = (weights * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) @ signal)
    x_in = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # pixel-centre aligned, as resample_to_shape
    return np.cos(np.pi * k.T * (2 * x_in[:, None] + 1) / (2 * n_in)) @ coefficients


def test_band_limited_shrink_matches_the_truncated_cosine_series():
    volume = np.random.default_rng(2).standard_normal((9, 14, 23))
    out = rescale.resample_band_limited(volume.astype(np.float32), (5, 14, 10))
    expected = np.apply_along_axis(_cosine_series_reference, 0, volume, 5)
    expected = np.apply_along_axis(_cosine_series_reference, 2, expected, 10)
    assert out.dtype == np.float32 and out.shape == (5, 14, 10)
    npt.assert_allclose(out, expected, atol=1e-5)


def test_band_limited_shrink_keeps_the_noise_of_the_coarser_grid():
    noise = np.random.default_rng(3).standard_normal((60, 90, 120)).astype(np.float32)
    out = rescale.resample_band_limited(noise, (40, 45, 80))
    assert out.var() == pytest.approx((40 / 60) * (45 / 90) * (80 / 120), rel=0.03)


@pytest.mark.parametrize("shape", [(12, 20, 31), (24, 40, 50), (30, 40, 64), (24, 40, 64)])  # all shrink; one; none
def test_the_band_limited_prefilter_is_the_gaussian_reflecting_on_shrinking_axes(shape):
    """σ on a shrinking axis weights the kept spectrum: scipy's Gaussian of σ output voxels with a reflecting
    boundary, faces included. On the other axes it is the pre-filter of the linear path (nearest boundary)."""
    volume = np.random.default_rng(5).standard_normal((24, 40, 64)).astype(np.float32)
    unfiltered = rescale.resample_band_limited(volume, shape)
    filtered = rescale.resample_band_limited(volume, shape, 1.0)
    expected = unfiltered
    for axis, (n_in, n_out) in enumerate(zip(volume.shape, shape)):
        mode = "reflect" if n_out < n_in else "nearest"
        expected = ndimage.gaussian_filter1d(expected, 1.0, axis=axis, mode=mode, truncate=4.0)
    npt.assert_allclose(filtered, expected, atol=1e-6 * unfiltered.std())
    assert np.abs(filtered - unfiltered).max() > 0.5 * unfiltered.std()
    if shape == volume.shape:
        npt.assert_array_equal(filtered, gaussian_prefilter(volume, 1.0))


@pytest.mark.parametrize("shape", [(7, 30, 41), (10, 9, 50), (10, 35, 13), (12, 30, 64), (7, 40, 64)])
def test_band_limited_crops_each_axis_in_place_in_one_buffer(monkeypatch, shape):
    """x's and z's crops run on each slab across y, then y's crop overwrites
    their output from its start, slab by slab (a few voxels each here): the same numbers as a whole-volume crop per
    axis in that order (z or y alone shrinking included), the input untouched, and only the result's bytes kept."""
    monkeypatch.setattr(rescale, "_DCT_SLAB_VOXELS", 300)
    volume = np.random.default_rng(6).standard_normal((12, 40, 64)).astype(np.float32)
    before = volume.copy()
    out = rescale.resample_band_limited(volume, shape, 0.8)
    expected = volume
    order = [2, 0, 1]
    for axis in (a for a in order if shape[a] < volume.shape[a]):
        weights = rescale._crop_weights(expected.shape[axis], shape[axis], 0.8, axis, 3)
        expected = rescale._dct_crop(expected, axis, weights)
    for axis in (a for a in range(3) if shape[a] == volume.shape[a]):  # the pre-filter on the others
        expected = ndimage.gaussian_filter1d(expected, 0.8, axis=axis, mode="nearest", truncate=4.0, output=np.float32)
    npt.assert_array_equal(out, expected)
    npt.assert_array_equal(volume, before)
    assert out.flags.c_contiguous and (out.base is None or out.base.nbytes == out.nbytes)


def test_band_limited_reads_a_mapped_tomogram_from_its_file(tmp_path, resident_mb, monkeypatch):
    """The first crop reads a mapped tomogram's slabs from its file (`read_box`, in groups of `_MAPPED_PART_BYTES`),
    and the crops' one buffer (34 MB here: always its own map in glibc) is cut to the 8 MB result: neither the 67 MB
    file nor the whole buffer stays resident (1.1 and 0.7 GB at 1024x1024x261)."""
    monkeypatch.setattr(rescale, "_MAPPED_PART_BYTES", 1 << 20)
    volume = np.random.default_rng(7).standard_normal((64, 512, 512)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", volume, 10.0)).data
    before = resident_mb()
    out = rescale.resample_band_limited(mapped, (32, 256, 256))
    assert resident_mb() - before < 33  # half the file (a page fault maps up to 1 MB of it on Linux)
    npt.assert_array_equal(out, rescale.resample_band_limited(volume, (32, 256, 256)))


def test_band_limited_grows_trilinearly_and_keeps_constants():
    volume = np.random.default_rng(4).standard_normal((6, 8, 10)).astype(np.float32)
    npt.assert_allclose(rescale.resample_band_limited(volume, (6, 13, 17)), resample_to_shape(volume, (6, 13, 17)),
                        atol=1e-6)
    npt.assert_allclose(rescale.resample_band_limited(np.full((9, 9, 9), 2.5, np.float32), (4, 12, 5)), 2.5,
                        rtol=1e-5)


def test_nearest_to_shape_is_pixel_centre_aligned():
    from cryoves.engine.network.rescale import nearest_to_shape

    labels = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    doubled = nearest_to_shape(labels, (4, 6, 8))
    np.testing.assert_array_equal(doubled, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(nearest_to_shape(doubled, labels.shape), labels)
    # 3 -> 5 voxels: output centres at input coordinates -0.2, 0.4, 1.0, 1.6, 2.2: nearest voxels 0, 0, 1, 2, 2
    np.testing.assert_array_equal(nearest_to_shape(labels, (2, 5, 4))[0, :, 0], labels[0, [0, 0, 1, 2, 2], 0])
    assert nearest_to_shape(labels, (2, 5, 4)).dtype == np.uint16


def test_a_mapped_tomogram_is_resampled_by_parts_that_leave_resident_memory(tmp_path, rng, monkeypatch, resident_mb):
    """A tomogram mapped from its file is read by parts of output sections, its pages released after each: the
    same result as in memory, and the process keeps the output, not the tomogram's 16.8 MB of pages."""
    data = rng.normal(size=(64, 256, 256)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", data, 10.0)).data
    monkeypatch.setattr(rescale, "_MAPPED_PART_BYTES", 1 << 21)
    before = resident_mb()
    out = resample_to_shape(mapped, (29, 116, 116))  # 1.6 MB
    assert resident_mb() - before < 8
    npt.assert_array_equal(out, resample_to_shape(data, (29, 116, 116)))


def test_resample_at_is_the_resample_there_also_by_parts_of_a_mapped_tomogram(tmp_path, rng, monkeypatch, resident_mb):
    """`resample_at` equals `resample_to_shape` at the voxels asked for (a finer grid, the same one, a mapped file
    read by parts of sections whose pages are released after each: the 16.8 MB file does not stay resident)."""
    data = rng.normal(size=(64, 256, 256)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", data, 10.0)).data
    monkeypatch.setattr(rescale, "_MAPPED_PART_BYTES", 1 << 21)
    for shape in ((29, 116, 116), (64, 256, 256)):
        whole = resample_to_shape(data, shape).reshape(-1)
        indices = np.sort(rng.choice(whole.size, 20_000, replace=False))
        npt.assert_array_equal(resample_at(data, shape, indices), whole[indices])
        before = resident_mb()
        npt.assert_array_equal(resample_at(mapped, shape, indices), whole[indices])
        assert shape == data.shape or resident_mb() - before < 6
