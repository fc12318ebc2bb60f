"""Whole-volume passes over label volumes: per-label statistics in one pass, and renumbering by a
lookup table in place of NumPy's `lut[labels]` gather (which allocates a second full-size array).

`check_labels` is the one validator of label volumes; `present_labels` is what every per-label
centroid and box in the engine comes from."""

from dataclasses import dataclass

import numba
import numpy as np

from cryoves.kernels.arrays import readonly
from cryoves.kernels.threads import threads_for

__all__ = ["check_labels", "label_dtype", "label_stats", "label_stats_reference", "present_labels", "LabelStats",
           "relabel", "relabel_reference"]


def check_labels(labels) -> np.ndarray:
    """`labels` as a 3-D unsigned integer array (signed input becomes its unsigned view, after checking
    that no label is negative); ValueError otherwise."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if np.issubdtype(labels.dtype, np.signedinteger):
        if labels.size and labels.min() < 0:
            raise ValueError("labels must be >= 0")
        labels = labels.view(np.dtype(f"u{labels.dtype.itemsize}"))  # same values
    return labels


def label_dtype(max_label: int) -> np.dtype:
    """uint16 for up to 65,535 labels (half the memory of a whole-volume label array), else uint32."""
    return np.dtype(np.uint16 if max_label <= np.iinfo(np.uint16).max else np.uint32)


def label_stats(labels: np.ndarray, max_label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label 0..max_label: voxel count (int64), coordinate sums (float64, z y x), and box lo
    (inclusive) and hi (exclusive) as `scipy.ndimage.find_objects` gives them; absent labels have
    count 0 and lo > hi. Labels above `max_label` raise ValueError."""
    return _label_stats(readonly(check_labels(labels)), int(max_label))


@numba.njit(cache=True)
def _label_stats(labels, max_label):
    n = max_label + 1
    count = np.zeros(n, np.int64)
    sums = np.zeros((n, 3), np.float64)
    lo = np.empty((n, 3), np.int64)
    hi = np.zeros((n, 3), np.int64)
    nz, ny, nx = labels.shape
    lo[:, 0], lo[:, 1], lo[:, 2] = nz, ny, nx
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = labels[z, y, x]
                if v == 0:
                    continue
                if v > max_label:
                    raise ValueError("a label exceeds max_label")
                count[v] += 1
                sums[v, 0] += z
                sums[v, 1] += y
                sums[v, 2] += x
                lo[v, 0] = min(lo[v, 0], z)
                lo[v, 1] = min(lo[v, 1], y)
                lo[v, 2] = min(lo[v, 2], x)
                hi[v, 0] = max(hi[v, 0], z + 1)
                hi[v, 1] = max(hi[v, 1], y + 1)
                hi[v, 2] = max(hi[v, 2], x + 1)
    return count, sums, lo, hi


def label_stats_reference(labels: np.ndarray, max_label: int):
    """NumPy version of :func:`label_stats` (bincount over the foreground, boxes by find_objects)."""
    from scipy import ndimage

    labels = check_labels(labels)
    if labels.size and labels.max() > max_label:
        raise ValueError("a label exceeds max_label")
    n = max_label + 1
    flat = labels.reshape(-1)
    index = np.flatnonzero(flat)
    lab = flat[index].astype(np.int64)
    count = np.bincount(lab, minlength=n)
    count[0] = 0
    coords = np.unravel_index(index, labels.shape)
    sums = np.stack([np.bincount(lab, weights=c, minlength=n) for c in coords], axis=1)
    sums[0] = 0.0
    lo = np.tile(np.array(labels.shape, np.int64), (n, 1))
    hi = np.zeros((n, 3), np.int64)
    for i, box in enumerate(ndimage.find_objects(labels, max_label=max_label)):
        if box is not None:
            lo[i + 1] = [s.start for s in box]
            hi[i + 1] = [s.stop for s in box]
    return count, sums, lo, hi


@dataclass(frozen=True)
class LabelStats:
    """The labels present in a volume (ascending) with their voxel counts, boxes and centroids (z, y, x)."""

    ids: np.ndarray       # (n,) uint32
    volume: np.ndarray    # (n,) int64 voxels
    lo: np.ndarray        # (n, 3) int64, inclusive
    hi: np.ndarray        # (n, 3) int64, exclusive
    centroid: np.ndarray  # (n, 3) float64 voxels

    @property
    def sides(self) -> np.ndarray:
        """(n, 3) box edge lengths in voxels."""
        return self.hi - self.lo

    @property
    def bbox_volume(self) -> np.ndarray:
        return np.prod(self.sides, axis=1)

    @property
    def extent(self) -> np.ndarray:
        """Voxel count over box volume."""
        return self.volume / np.maximum(self.bbox_volume, 1)


def present_labels(labels: np.ndarray) -> LabelStats:
    """Counts, boxes and centroids of the labels present in `labels`, in one pass (`label_stats`)."""
    labels = check_labels(labels)
    count, sums, lo, hi = label_stats(labels, int(labels.max()) if labels.size else 0)
    ids = np.flatnonzero(count).astype(np.uint32)
    volume = count[ids]
    return LabelStats(ids, volume, lo[ids], hi[ids], sums[ids] / volume[:, None])


def relabel(labels: np.ndarray, lut: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """``lut[labels]`` (dtype of `lut`), parallel over z; labels outside the table raise ValueError. With `overwrite`,
    written into `labels` itself where it has the table's dtype (each voxel is read before it is written)."""
    labels = check_labels(labels)
    lut = np.ascontiguousarray(lut)
    if lut.ndim != 1 or lut.size == 0:
        raise ValueError(f"lut must be a non-empty 1-D table, got shape {lut.shape}")
    if labels.size and labels.max() >= lut.size:
        raise ValueError(f"a label ({labels.max()}) has no entry in the table of {lut.size}")
    in_place = overwrite and labels.dtype == lut.dtype and labels.flags.writeable
    out = labels if in_place else np.empty(labels.shape, lut.dtype)
    with threads_for(labels.size):  # in place, `out` is `labels` itself: one compiled signature for both
        _relabel(readonly(labels), readonly(lut), out)
    return out


@numba.njit(parallel=True, cache=True)
def _relabel(labels, lut, out):
    for z in numba.prange(labels.shape[0]):
        for y in range(labels.shape[1]):
            for x in range(labels.shape[2]):
                out[z, y, x] = lut[labels[z, y, x]]


def relabel_reference(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """NumPy version of :func:`relabel`."""
    return np.asarray(lut)[check_labels(labels)]
