"""Shell sums for the global threshold search: intensity summed over the inner shell of {P > t}.

The shell of the mask ``{P > t}`` (method.md §2.9) is the mask minus its erosion by the 6-neighbourhood
cross, with voxels outside the volume counting as foreground. A voxel is therefore in the shell of
threshold ``t`` exactly when ``min6 <= t < P``, where ``min6`` is the smallest ``P`` among its in-volume
face neighbours (a NaN neighbour is background, so it acts as ``-inf``). Each voxel thus contributes to a
contiguous range of sorted thresholds, which lets one pass over the volume fill every threshold bin
through a difference array (method.md §6 item 2).

All comparisons are made in float64: ``P > t`` means ``float64(P) > float64(t)``, also for float32 maps.
"""

import numba
import numpy as np
from scipy import ndimage

from cryoves.kernels.arrays import readonly


def shell_sums(intensity, probability, thresholds):
    """Sum and count of ``intensity`` over the 1-voxel inner shell of ``{probability > t}``, per ``t``.

    Parameters
    ----------
    intensity : ndarray (z, y, x), any real dtype (int8/int16/float32 pass through uncopied)
    probability : ndarray (z, y, x), same shape, float32 or float64
    thresholds : 1-D array-like, sorted ascending

    Returns
    -------
    sums : float64[n_t]
    counts : int64[n_t]
    """
    intensity, probability, thresholds = _validate(intensity, probability, thresholds)
    n_t = thresholds.shape[0]
    if n_t == 0 or probability.size == 0:
        return np.zeros(n_t, np.float64), np.zeros(n_t, np.int64)
    n_rows = probability.shape[0] * probability.shape[1]
    # A few chunks per thread balance the uneven foreground; each chunk owns its accumulator row.
    n_chunks = max(1, min(n_rows, 4 * numba.get_num_threads()))
    sums_diff, counts_diff = _shell_sums(readonly(intensity), readonly(probability), readonly(thresholds), n_chunks)
    sums = np.cumsum(sums_diff.sum(axis=0))[:n_t]
    counts = np.cumsum(counts_diff.sum(axis=0))[:n_t]
    return sums, counts


def shell_sums_reference(intensity, probability, thresholds):
    """Obviously correct version: binarise, erode (6-cross, border = foreground), subtract, per threshold."""
    intensity, probability, thresholds = _validate(intensity, probability, thresholds)
    structure = ndimage.generate_binary_structure(3, 1)
    p64 = probability.astype(np.float64)
    sums = np.zeros(thresholds.shape[0], np.float64)
    counts = np.zeros(thresholds.shape[0], np.int64)
    for i, t in enumerate(thresholds):
        mask = p64 > t
        if probability.size:
            eroded = ndimage.binary_erosion(mask, structure=structure, border_value=1)
        else:
            eroded = mask
        shell = mask & ~eroded
        sums[i] = intensity[shell].sum(dtype=np.float64)
        counts[i] = np.count_nonzero(shell)
    return sums, counts


def _validate(intensity, probability, thresholds):
    intensity = np.asarray(intensity)
    probability = np.asarray(probability)
    if probability.ndim != 3:
        raise ValueError(f"probability must be 3-D (z, y, x), got shape {probability.shape}")
    if intensity.shape != probability.shape:
        raise ValueError(
            f"intensity shape {intensity.shape} differs from probability shape {probability.shape}"
        )
    if not np.issubdtype(probability.dtype, np.floating):
        raise ValueError(f"probability must be float32 or float64, got {probability.dtype}")
    if intensity.dtype == np.bool_ or not (
        np.issubdtype(intensity.dtype, np.integer) or np.issubdtype(intensity.dtype, np.floating)
    ):
        raise ValueError(f"intensity must be a real numeric array, got {intensity.dtype}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError(f"thresholds must be 1-D, got shape {thresholds.shape}")
    if not np.all(np.isfinite(thresholds)):
        raise ValueError("thresholds must be finite")
    if np.any(np.diff(thresholds) < 0):
        raise ValueError("thresholds must be sorted ascending")
    # Numba wants native byte order (MRC files may be big-endian) and a C layout.
    if not probability.dtype.isnative:
        probability = probability.astype(probability.dtype.newbyteorder("="))
    if not intensity.dtype.isnative:
        intensity = intensity.astype(intensity.dtype.newbyteorder("="))
    if probability.dtype == np.float16:
        probability = probability.astype(np.float32)
    if intensity.dtype == np.float16:
        intensity = intensity.astype(np.float32)
    return np.ascontiguousarray(intensity), np.ascontiguousarray(probability), thresholds


@numba.njit(cache=True)
def _lower(m, q):
    """Running minimum where a NaN neighbour counts as -inf (it is never foreground)."""
    if q < m:
        return q
    if q != q:
        return -np.inf
    return m


@numba.njit(cache=True)
def _first_at_least(thresholds, v):
    """First index i with thresholds[i] >= v (len(thresholds) if none); binary search."""
    lo = 0
    hi = thresholds.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if thresholds[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(parallel=True, cache=True)
def _shell_sums(intensity, probability, thresholds, n_chunks):
    nz, ny, nx = probability.shape
    n_t = thresholds.shape[0]
    n_rows = nz * ny
    t_first = thresholds[0]
    sums = np.zeros((n_chunks, n_t + 1), np.float64)
    counts = np.zeros((n_chunks, n_t + 1), np.int64)
    for c in numba.prange(n_chunks):  # row c of the accumulators is written by chunk c only
        r0 = c * n_rows // n_chunks
        r1 = (c + 1) * n_rows // n_chunks
        for r in range(r0, r1):
            z = r // ny
            y = r - z * ny
            for x in range(nx):
                p = np.float64(probability[z, y, x])
                if not p > t_first:  # below every threshold (or NaN): in no mask
                    continue
                m = np.inf
                if z > 0:
                    m = _lower(m, np.float64(probability[z - 1, y, x]))
                if z < nz - 1:
                    m = _lower(m, np.float64(probability[z + 1, y, x]))
                if y > 0:
                    m = _lower(m, np.float64(probability[z, y - 1, x]))
                if y < ny - 1:
                    m = _lower(m, np.float64(probability[z, y + 1, x]))
                if x > 0:
                    m = _lower(m, np.float64(probability[z, y, x - 1]))
                if x < nx - 1:
                    m = _lower(m, np.float64(probability[z, y, x + 1]))
                if m >= p:
                    continue
                # shell for every t with m <= t < p: bins [lo, hi)
                lo = _first_at_least(thresholds, m)
                hi = _first_at_least(thresholds, p)
                if lo < hi:
                    v = np.float64(intensity[z, y, x])
                    sums[c, lo] += v
                    sums[c, hi] -= v
                    counts[c, lo] += 1
                    counts[c, hi] -= 1
    return sums, counts
