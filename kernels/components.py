"""How many connected pieces a segment falls into at each of many raised thresholds, in one pass.

The split step of adaptive local thresholding (method.md §2.11) raises the threshold over a segment until
{P > t} holds more pieces than at the global threshold. Labelling the segment's box once per threshold
(up to a few hundred thresholds per segment) was most of the post-processing time of a large tomogram.
Here the voxels enter a union-find forest from the highest P down (26-connectivity), and the number of
pieces of at least `min_size` voxels is read off as the level passes each threshold.
"""

import numba
import numpy as np
from scipy import ndimage

from cryoves.kernels.arrays import readonly

__all__ = ["component_counts", "component_counts_reference"]

_STRUCTURE26 = np.ones((3, 3, 3), bool)


def component_counts(values, thresholds, min_size: float = 0.0) -> np.ndarray:
    """Number of 26-connected components of ``{values > t}`` (float64 comparison) with at least
    ``min_size`` voxels, for each ``t`` of ``thresholds`` (any order); int64, one per threshold."""
    values = np.ascontiguousarray(values)
    if values.ndim != 3 or values.dtype.kind != "f":
        raise ValueError(f"values must be a 3-D float array, got {values.dtype} {values.shape}")
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        return np.zeros(0, np.int64)
    flat = values.reshape(-1)
    candidates = np.flatnonzero(flat.astype(np.float64) > thresholds.min())
    order = candidates[np.argsort(-flat[candidates], kind="stable")]
    descending = np.argsort(-thresholds, kind="stable")
    counts = _counts(readonly(values), readonly(order), readonly(thresholds[descending]), float(min_size))
    out = np.empty(thresholds.size, np.int64)
    out[descending] = counts
    return out


def component_counts_reference(values, thresholds, min_size: float = 0.0) -> np.ndarray:
    """`component_counts` by one `scipy.ndimage.label` per threshold."""
    values = np.asarray(values, dtype=np.float64)
    out = []
    for t in np.asarray(thresholds, dtype=np.float64).reshape(-1):
        labels, n = ndimage.label(values > t, structure=_STRUCTURE26)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        out.append(int(np.count_nonzero(sizes >= min_size)))
    return np.array(out, np.int64)


@numba.njit(cache=True)
def _find(parent, v):
    while parent[v] != v:
        parent[v] = parent[parent[v]]  # path halving
        v = parent[v]
    return v


@numba.njit(cache=True)
def _counts(values, order, thresholds_descending, min_size):
    nz, ny, nx = values.shape
    flat = values.reshape(-1)
    parent = np.full(flat.size, -1, np.int64)  # -1: not yet above the level
    size = np.zeros(flat.size, np.int64)
    counts = np.zeros(thresholds_descending.size, np.int64)
    large = 0
    k = 0
    for j in range(thresholds_descending.size):
        t = thresholds_descending[j]
        while k < order.size and np.float64(flat[order[k]]) > t:
            v = order[k]
            k += 1
            parent[v] = v
            size[v] = 1
            if 1 >= min_size:
                large += 1
            z, rem = divmod(v, ny * nx)
            y, x = divmod(rem, nx)
            for dz in range(-1, 2):
                zz = z + dz
                if zz < 0 or zz >= nz:
                    continue
                for dy in range(-1, 2):
                    yy = y + dy
                    if yy < 0 or yy >= ny:
                        continue
                    for dx in range(-1, 2):
                        xx = x + dx
                        if xx < 0 or xx >= nx or (dz == 0 and dy == 0 and dx == 0):
                            continue
                        u = (zz * ny + yy) * nx + xx
                        if parent[u] < 0:
                            continue
                        a, b = _find(parent, u), _find(parent, v)
                        if a == b:
                            continue
                        before = (size[a] >= min_size) + (size[b] >= min_size)
                        if size[a] < size[b]:
                            a, b = b, a
                        parent[b] = a
                        size[a] += size[b]
                        large += (size[a] >= min_size) - before
        counts[j] = large
    return counts
