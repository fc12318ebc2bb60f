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
    indices = shell_voxels(probability, thresholds)
    return shell_sums_at(intensity.reshape(-1)[indices], indices, probability, thresholds)


def shell_voxels(probability, thresholds) -> np.ndarray:
    """Flat indices (ascending) of the voxels in the shell of ``{probability > t}`` for at least one ``t``: the
    only voxels whose intensity `shell_sums` reads (2.5 % of a 1024x1024x261 tomogram's network grid)."""
    probability, thresholds = _validate_map(probability, thresholds)
    if thresholds.shape[0] == 0 or probability.size == 0:
        return np.zeros(0, np.int64)
    starts = _chunk_rows(probability)
    # room for every voxel above the lowest threshold, counted cheaply; each chunk fills its own part
    offsets = np.concatenate([[0], np.cumsum(_count_above(readonly(probability), thresholds[0], readonly(starts)))])
    indices = np.empty(int(offsets[-1]), np.int64)
    filled = _shell_fill(readonly(probability), readonly(thresholds), readonly(starts), readonly(offsets), indices)
    return np.concatenate([indices[a:a + n] for a, n in zip(offsets[:-1], filled)])


def shell_sums_at(values, indices, probability, thresholds):
    """`shell_sums` of an intensity given only at `shell_voxels`' `indices` (ascending; `values` in their order), the
    same numbers bit for bit: each chunk of rows sums its voxels in the same order."""
    probability, thresholds = _validate_map(probability, thresholds)
    values = np.ascontiguousarray(values)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    if values.shape != indices.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and indices {indices.shape} must be 1-D of one length")
    n_t = thresholds.shape[0]
    if n_t == 0 or probability.size == 0:
        return np.zeros(n_t, np.float64), np.zeros(n_t, np.int64)
    starts = _chunk_rows(probability)
    bounds = np.searchsorted(indices, starts * probability.shape[2])
    sums_diff, counts_diff = _shell_sums(readonly(values), readonly(indices), readonly(probability),
                                         readonly(thresholds), readonly(bounds))
    return np.cumsum(sums_diff.sum(axis=0))[:n_t], np.cumsum(counts_diff.sum(axis=0))[:n_t]


def _chunk_rows(probability) -> np.ndarray:
    """First (z, y) row of each chunk, and the end: a few chunks per thread balance the uneven foreground, and each
    owns its accumulator row."""
    n_rows = probability.shape[0] * probability.shape[1]
    n_chunks = max(1, min(n_rows, 4 * numba.get_num_threads()))
    return np.arange(n_chunks + 1) * n_rows // n_chunks


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
    probability, thresholds = _validate_map(probability, thresholds)
    if intensity.shape != probability.shape:
        raise ValueError(
            f"intensity shape {intensity.shape} differs from probability shape {probability.shape}"
        )
    if intensity.dtype == np.bool_ or not (
        np.issubdtype(intensity.dtype, np.integer) or np.issubdtype(intensity.dtype, np.floating)
    ):
        raise ValueError(f"intensity must be a real numeric array, got {intensity.dtype}")
    # Numba wants native byte order (MRC files may be big-endian) and a C layout.
    if not intensity.dtype.isnative:
        intensity = intensity.astype(intensity.dtype.newbyteorder("="))
    if intensity.dtype == np.float16:
        intensity = intensity.astype(np.float32)
    return np.ascontiguousarray(intensity), probability, thresholds


def _validate_map(probability, thresholds):
    probability = np.asarray(probability)
    if probability.ndim != 3:
        raise ValueError(f"probability must be 3-D (z, y, x), got shape {probability.shape}")
    if not np.issubdtype(probability.dtype, np.floating):
        raise ValueError(f"probability must be float32 or float64, got {probability.dtype}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError(f"thresholds must be 1-D, got shape {thresholds.shape}")
    if not np.all(np.isfinite(thresholds)):
        raise ValueError("thresholds must be finite")
    if np.any(np.diff(thresholds) < 0):
        raise ValueError("thresholds must be sorted ascending")
    if not probability.dtype.isnative:
        probability = probability.astype(probability.dtype.newbyteorder("="))
    if probability.dtype == np.float16:
        probability = probability.astype(np.float32)
    return np.ascontiguousarray(probability), thresholds


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


@numba.njit(cache=True, inline="always")
def _shell_bins(probability, z, y, x, thresholds):
    """Threshold bins [lo, hi) whose shell holds voxel (z, y, x): every t with min6 <= t < P; lo >= hi for none."""
    nz, ny, nx = probability.shape
    p = np.float64(probability[z, y, x])
    if not p > thresholds[0]:  # below every threshold (or NaN): in no mask
        return 0, 0
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
        return 0, 0
    return _first_at_least(thresholds, m), _first_at_least(thresholds, p)


@numba.njit(parallel=True, cache=True)
def _count_above(probability, t, starts):
    """Voxels with P > t per chunk of rows."""
    ny, nx = probability.shape[1], probability.shape[2]
    counts = np.zeros(starts.size - 1, np.int64)
    for c in numba.prange(starts.size - 1):
        n = 0
        for r in range(starts[c], starts[c + 1]):
            row = probability[r // ny, r % ny]
            for x in range(nx):
                n += np.float64(row[x]) > t
        counts[c] = n
    return counts


@numba.njit(parallel=True, cache=True)
def _shell_fill(probability, thresholds, starts, offsets, indices):
    """Each chunk's shell voxels from its offset on; how many each found."""
    ny, nx = probability.shape[1], probability.shape[2]
    filled = np.zeros(starts.size - 1, np.int64)
    for c in numba.prange(starts.size - 1):
        n = offsets[c]
        for r in range(starts[c], starts[c + 1]):
            z, y = divmod(r, ny)
            for x in range(nx):
                lo, hi = _shell_bins(probability, z, y, x, thresholds)
                if lo < hi:
                    indices[n] = r * nx + x
                    n += 1
        filled[c] = n - offsets[c]
    return filled


@numba.njit(parallel=True, cache=True)
def _shell_sums(values, indices, probability, thresholds, bounds):
    ny, nx = probability.shape[1], probability.shape[2]
    n_t = thresholds.shape[0]
    n_chunks = bounds.size - 1
    sums = np.zeros((n_chunks, n_t + 1), np.float64)
    counts = np.zeros((n_chunks, n_t + 1), np.int64)
    for c in numba.prange(n_chunks):  # row c of the accumulators is written by chunk c only
        for j in range(bounds[c], bounds[c + 1]):
            r, x = divmod(indices[j], nx)
            z, y = divmod(r, ny)
            lo, hi = _shell_bins(probability, z, y, x, thresholds)
            if lo < hi:
                v = np.float64(values[j])
                sums[c, lo] += v
                sums[c, hi] -= v
                counts[c, lo] += 1
                counts[c, hi] -= 1
    return sums, counts
