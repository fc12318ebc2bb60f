"""The label kernels equal their NumPy references (and scipy's find_objects) on random label volumes."""

import numpy as np
import numpy.testing as npt
import pytest
from scipy import ndimage

from cryoves.kernels.labels import label_stats, label_stats_reference, relabel, relabel_reference


@pytest.fixture
def labels(rng):
    """Blobs with ids 1..40, some ids absent, on a non-cubic grid."""
    noise = ndimage.gaussian_filter(rng.normal(size=(21, 34, 27)), 1.5)
    blobs, n = ndimage.label(noise > 0.05)
    ids = rng.permutation(np.arange(1, 61))[:n] if n <= 60 else np.arange(1, n + 1)
    return np.concatenate([[0], ids])[blobs].astype(np.uint32)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_label_stats_equal_the_reference(labels, dtype):
    labels = labels.astype(dtype)
    top = int(labels.max()) + 3  # absent ids at the top too
    fast, ref = label_stats(labels, top), label_stats_reference(labels, top)
    for a, b in zip(fast, ref):
        npt.assert_allclose(a, b, rtol=1e-12)
    count, sums, lo, hi = fast
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            assert count[i] == 0 and np.all(lo[i] > hi[i])
        else:
            assert [s.start for s in box] == lo[i].tolist() and [s.stop for s in box] == hi[i].tolist()
            npt.assert_allclose(sums[i] / count[i], ndimage.center_of_mass(labels == i))
    assert count[0] == 0 and count.sum() == np.count_nonzero(labels)


def test_label_stats_refuse_a_label_above_the_maximum(labels):
    with pytest.raises(ValueError):
        label_stats(labels, int(labels.max()) - 1)


@pytest.mark.parametrize("lut_dtype", [np.uint16, np.uint32])
def test_relabel_equals_the_gather(labels, rng, lut_dtype):
    lut = rng.integers(0, 1000, size=int(labels.max()) + 1).astype(lut_dtype)
    out = relabel(labels, lut)
    assert out.dtype == lut_dtype
    npt.assert_array_equal(out, relabel_reference(labels, lut))


def test_relabel_overwrites_labels_of_the_table_s_dtype_only(labels, rng):
    lut = rng.integers(0, 1000, size=int(labels.max()) + 1).astype(np.uint16)
    expected = relabel_reference(labels, lut)
    mine = labels.astype(np.uint16)
    assert relabel(mine, lut, overwrite=True) is mine
    npt.assert_array_equal(mine, expected)
    wide, before = labels.astype(np.uint32), labels.astype(np.uint32)
    out = relabel(wide, lut, overwrite=True)  # another dtype: a new array, the labels left as they were
    assert out is not wide and out.dtype == np.uint16
    npt.assert_array_equal(out, expected)
    npt.assert_array_equal(wide, before)


def test_relabel_refuses_labels_outside_the_table(labels):
    with pytest.raises(ValueError, match="no entry"):
        relabel(labels, np.arange(int(labels.max()), dtype=np.uint32))


def test_label_dtype_is_uint16_up_to_65535_labels():
    from cryoves.kernels.labels import label_dtype

    assert label_dtype(0) == np.uint16 and label_dtype(65_535) == np.uint16 and label_dtype(65_536) == np.uint32
