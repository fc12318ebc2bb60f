"""Radial profiles, their 3-D back-projection and the cross-correlation shift (method.md §2.14-2.17).

Geometry shared by every function here. A vesicle has a float centre ``c`` (z, y, x voxels) and an
integer box radius ``R``. Its box is the odd cube of ``2R + 1`` voxels centred on the voxel
``a = floor(c + 0.5)`` nearest to the centre, i.e. indices ``[a - R, a + R]`` on each axis. (The
reference uses the even box ``[C - R, C + R)`` around an integer centre.) Every voxel ``v`` of the
box falls in bin ``k(v) = floor(|v - c| / w)`` of width ``w`` voxels, so bin k holds the distances
``[k w, (k + 1) w)`` measured from the *float* centre (sub-voxel centres, method.md §6.6).

Border rule: a box that sticks out of the volume is simply **clipped to the volume**; shells keep
every voxel that exists. The reference shrinks the box symmetrically instead, which gives border
vesicles smaller boxes and worse radii (method.md §2.14, §6.9). A bin with no voxel is NaN.

Every vesicle is independent (row i of each output depends on vesicle i only), so any chunk of
vesicles can be sent to another worker and the results concatenated.
"""

import numba
import numpy as np
import scipy.fft

from cryoves.kernels.arrays import readonly
from cryoves.kernels.threads import fft_workers, threads_for

_BATCH_VOXELS = 1 << 22
"""Box voxels read at a time by `boxes_by_radius` (16 MiB of float32)."""

__all__ = [
    "radial_profiles",
    "box_offsets",
    "box_profiles",
    "boxes_by_radius",
    "box_profiles_reference",
    "radial_profiles_reference",
    "extract_boxes",
    "extract_boxes_reference",
    "back_project",
    "back_project_reference",
    "xcorr_shift",
    "xcorr_shift_reference",
]


def _check_volume(volume):
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.shape}")
    if volume.dtype.kind not in "iuf":
        raise ValueError(f"volume must be numeric, got dtype {volume.dtype}")
    return np.ascontiguousarray(volume)


def _check_centers(centers_vox):
    centers = np.ascontiguousarray(np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3))
    if not np.all(np.isfinite(centers)):
        raise ValueError("centers_vox must be finite")
    return centers


def _check_box_radii(box_radius_vox, n):
    radii = np.asarray(box_radius_vox)
    if radii.dtype.kind == "f" and not np.all(radii == np.round(radii)):
        raise ValueError(f"box_radius_vox must be whole voxels, got {box_radius_vox}")
    radii = np.ascontiguousarray(np.broadcast_to(radii.astype(np.int64), (n,)))
    if np.any(radii < 0):
        raise ValueError(f"box_radius_vox must be >= 0, got min {radii.min()}")
    return radii


def _check_bins(n_bins, bin_width_vox):
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    if not bin_width_vox > 0:
        raise ValueError(f"bin_width_vox must be > 0, got {bin_width_vox}")
    return int(n_bins), 1.0 / float(bin_width_vox)


# ---------------------------------------------------------------------------------------------
# radial profiles


def radial_profiles(volume, centers_vox, box_radius_vox, n_bins, *, bin_width_vox=1.0):
    """Mean intensity in shells ``[k w, (k+1) w)`` around each centre, within its clipped box: `box_profiles` of
    the `extract_boxes` boxes, vesicles grouped by box radius.

    Parameters
    ----------
    volume : (z, y, x) array, any numeric dtype (read as float32, float64 kept).
    centers_vox : (n, 3) float centres in voxels.
    box_radius_vox : int or (n,) ints, the half-edge R of each box (edge 2R + 1).
    n_bins : number of shells returned.

    Returns
    -------
    (n, n_bins) float64 profiles, NaN where a shell holds no voxel.
    """
    volume = _check_volume(volume)
    centers = _check_centers(centers_vox)
    radii = _check_box_radii(box_radius_vox, centers.shape[0])
    n_bins, _ = _check_bins(n_bins, bin_width_vox)
    profiles = np.empty((centers.shape[0], n_bins))
    dtype = np.float64 if volume.dtype == np.float64 else np.float32
    for rows, boxes in boxes_by_radius(volume, centers, radii, dtype=dtype):
        profiles[rows] = box_profiles(boxes, box_offsets(centers[rows]), n_bins, bin_width_vox=bin_width_vox)
    return profiles


def boxes_by_radius(volume, centers_vox, box_radius_vox, *, dtype=np.float32):
    """`extract_boxes` of vesicles with boxes of several radii: (rows, boxes) per batch of one radius, about
    `_BATCH_VOXELS` each."""
    centers = _check_centers(centers_vox)
    radii = _check_box_radii(box_radius_vox, centers.shape[0])
    for r in np.unique(radii):
        same = np.flatnonzero(radii == r)
        for rows in np.array_split(same, -(-same.size * (2 * int(r) + 1) ** 3 // _BATCH_VOXELS)):
            yield rows, extract_boxes(volume, centers[rows], int(r), dtype=dtype)


def box_offsets(centers_vox):
    """Each centre's offset from its box's middle voxel, ``c - floor(c + 0.5)``, as `box_profiles` and
    `back_project` take it."""
    centers = np.asarray(centers_vox, dtype=np.float64)
    return centers - np.floor(centers + 0.5)


def box_profiles(boxes, offsets_vox, n_bins, *, bin_width_vox=1.0):
    """`radial_profiles` of boxes already read (`extract_boxes`: NaN outside the volume, left out), centred at
    ``offsets_vox`` (n, 3) from their middle voxel, ``c - floor(c + 0.5)``: equal to reading the volume again, bit
    for bit, at a quarter of the time (each row of a box lies on its own page of a large volume: reading them is
    most of the work)."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 4 or boxes.shape[1] % 2 == 0 or not boxes.shape[1] == boxes.shape[2] == boxes.shape[3]:
        raise ValueError(f"boxes must be an (n, e, e, e) stack of odd edge e, got shape {boxes.shape}")
    offsets = _check_offsets(offsets_vox, boxes.shape[0])
    n_bins, inv_width = _check_bins(n_bins, bin_width_vox)
    with threads_for(boxes.size):
        sums, counts = _box_profile_sums(readonly(np.ascontiguousarray(boxes)), readonly(offsets), n_bins, inv_width)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


@numba.njit(parallel=True, cache=True)
def _box_profile_sums(boxes, offsets, n_bins, inv_width):
    n, e = boxes.shape[0], boxes.shape[1]
    r = (e - 1) // 2
    sums = np.zeros((n, n_bins), dtype=np.float64)
    counts = np.zeros((n, n_bins), dtype=np.int64)
    for i in numba.prange(n):  # row i is written by iteration i only: no races
        s = np.zeros(n_bins)  # local accumulators: cheaper than scattering into the 2-D outputs
        c = np.zeros(n_bins, dtype=np.int64)
        dx2 = np.empty(e)
        bins = np.empty(e, dtype=np.int64)
        for j in range(e):  # (j - r) - offset: the same double as voxel - centre of the volume's coordinates
            dx = (j - r) - offsets[i, 2]
            dx2[j] = dx * dx
        for jz in range(e):
            dz = (jz - r) - offsets[i, 0]
            for jy in range(e):
                dy = (jy - r) - offsets[i, 1]
                dzy = dz * dz + dy * dy
                for j in range(e):  # apart from the scatter below, so that it vectorises: 30 % faster
                    bins[j] = int(np.sqrt(dzy + dx2[j]) * inv_width)
                row = boxes[i, jz, jy]
                for j in range(e):
                    k = bins[j]
                    v = row[j]
                    if k < n_bins and v == v:  # NaN: outside the volume
                        s[k] += v
                        c[k] += 1
        for k in range(n_bins):  # element-wise: a row assignment compiles shape-error formatting (~2 s)
            sums[i, k] = s[k]
            counts[i, k] = c[k]
    return sums, counts


def box_profiles_reference(boxes, offsets_vox, n_bins, *, bin_width_vox=1.0):
    """Plain NumPy version of :func:`box_profiles` (one box at a time), for tests."""
    boxes = np.asarray(boxes, dtype=np.float64)
    offsets = _check_offsets(offsets_vox, boxes.shape[0])
    n_bins, inv_width = _check_bins(n_bins, bin_width_vox)
    grid = np.arange(boxes.shape[1]) - (boxes.shape[1] - 1) // 2
    profiles = np.full((boxes.shape[0], n_bins), np.nan)
    for i, (box, (oz, oy, ox)) in enumerate(zip(boxes, offsets)):
        dz, dy, dx = grid - oz, grid - oy, grid - ox
        dist = np.sqrt((dz[:, None, None] * dz[:, None, None] + dy[None, :, None] * dy[None, :, None])
                       + dx[None, None, :] * dx[None, None, :])
        k = (dist * inv_width).astype(np.int64).ravel()
        keep = (k < n_bins) & np.isfinite(box.ravel())
        sums = np.bincount(k[keep], weights=box.ravel()[keep], minlength=n_bins)
        counts = np.bincount(k[keep], minlength=n_bins)
        np.divide(sums, counts, out=profiles[i], where=counts > 0)
    return profiles


def _box_axes(center, r, shape):
    """Clipped index ranges and the float offsets from the centre, per axis (z, y, x)."""
    out = []
    for c, size in zip(center, shape):
        a = int(np.floor(c + 0.5))
        idx = np.arange(max(a - r, 0), min(a + r + 1, size))
        out.append((idx, idx - c))
    return out


def radial_profiles_reference(volume, centers_vox, box_radius_vox, n_bins, *, bin_width_vox=1.0):
    """Plain NumPy version of :func:`radial_profiles` (one vesicle at a time), for tests."""
    volume = _check_volume(volume)
    centers = _check_centers(centers_vox)
    radii = _check_box_radii(box_radius_vox, centers.shape[0])
    n_bins, inv_width = _check_bins(n_bins, bin_width_vox)
    profiles = np.full((centers.shape[0], n_bins), np.nan)
    for i, (center, r) in enumerate(zip(centers, radii)):
        (iz, dz), (iy, dy), (ix, dx) = _box_axes(center, r, volume.shape)
        dist = np.sqrt((dz[:, None, None] * dz[:, None, None] + dy[None, :, None] * dy[None, :, None])
                       + dx[None, None, :] * dx[None, None, :])
        k = (dist * inv_width).astype(np.int64).ravel()
        values = volume[np.ix_(iz, iy, ix)].astype(np.float64).ravel()
        keep = k < n_bins
        sums = np.bincount(k[keep], weights=values[keep], minlength=n_bins)
        counts = np.bincount(k[keep], minlength=n_bins)
        np.divide(sums, counts, out=profiles[i], where=counts > 0)
    return profiles


# ---------------------------------------------------------------------------------------------
# boxes of raw data


def extract_boxes(volume, centers_vox, box_radius_vox, *, dtype=np.float32):
    """Boxes ``[a - R, a + R]`` of raw data (n, 2R+1, 2R+1, 2R+1) as float32, the correlation's type (exact for
    float32 and 16-bit integer tomograms), or `dtype`; NaN outside the volume.

    One R for the whole batch (boxes are stacked for a batched FFT): group vesicles by box size.
    """
    volume = _check_volume(volume)
    centers = _check_centers(centers_vox)
    r = _check_scalar_radius(box_radius_vox)
    out = np.empty((centers.shape[0], *(2 * r + 1,) * 3), dtype)
    with threads_for(out.size):
        _extract(readonly(volume), readonly(centers), r, out)
    return out


def _check_scalar_radius(box_radius_vox):
    if int(box_radius_vox) != box_radius_vox or box_radius_vox < 0:
        raise ValueError(f"box_radius_vox must be one whole number >= 0, got {box_radius_vox}")
    return int(box_radius_vox)


@numba.njit(parallel=True, cache=True)
def _extract(volume, centers, r, out):
    n = centers.shape[0]
    nz, ny, nx = volume.shape
    e = 2 * r + 1
    for i in numba.prange(n):
        az = int(np.floor(centers[i, 0] + 0.5)) - r
        ay = int(np.floor(centers[i, 1] + 0.5)) - r
        ax = int(np.floor(centers[i, 2] + 0.5)) - r
        m0 = min(max(0, -ax), e)  # the row's part inside the volume: [m0, m1)
        m1 = max(m0, min(e, nx - ax))
        for j in range(e):
            for k in range(e):
                row = out[i, j, k]
                if not (0 <= az + j < nz and 0 <= ay + k < ny):
                    row[:] = np.nan
                    continue
                source = volume[az + j, ay + k]  # whole rows, element by element, ran 3-4 times as long
                row[:m0] = np.nan
                row[m0:m1] = source[ax + m0:ax + m1]
                row[m1:] = np.nan


def extract_boxes_reference(volume, centers_vox, box_radius_vox):
    """Plain NumPy version of :func:`extract_boxes`, for tests."""
    volume = _check_volume(volume)
    centers = _check_centers(centers_vox)
    r = _check_scalar_radius(box_radius_vox)
    e = 2 * r + 1
    out = np.full((centers.shape[0], e, e, e), np.nan, dtype=np.float32)
    for i, center in enumerate(centers):
        a = np.floor(center + 0.5).astype(np.int64) - r
        lo = np.maximum(a, 0)
        hi = np.minimum(a + e, volume.shape)
        if np.any(hi <= lo):
            continue
        out[i, lo[0] - a[0]:hi[0] - a[0], lo[1] - a[1]:hi[1] - a[1], lo[2] - a[2]:hi[2] - a[2]] = (
            volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    return out


# ---------------------------------------------------------------------------------------------
# back-projection A(v) = P[k(v)] (eq. 5)


def back_project(profiles, box_radius_vox, offsets_vox=None, *, bin_width_vox=1.0):
    """Spherically symmetric boxes ``A(v) = P[k(v)]`` of edge 2R + 1 (paper eq. 5).

    ``offsets_vox`` (n, 3) is the float centre minus its anchor voxel, ``c - floor(c + 0.5)``, so the
    model is centred exactly where :func:`radial_profiles` measured (zero: the box centre). Voxels
    whose bin lies past the profile, or whose shell was empty (NaN), are NaN.
    """
    profiles = np.ascontiguousarray(np.asarray(profiles, dtype=np.float64))
    if profiles.ndim != 2 or profiles.shape[1] < 1:
        raise ValueError(f"profiles must be (n, n_bins), got shape {profiles.shape}")
    r = _check_scalar_radius(box_radius_vox)
    offsets = _check_offsets(offsets_vox, profiles.shape[0])
    _, inv_width = _check_bins(1, bin_width_vox)
    with threads_for(profiles.shape[0] * (2 * r + 1) ** 3):
        return _back_project(readonly(profiles), r, readonly(offsets), inv_width)


def _check_offsets(offsets_vox, n):
    if offsets_vox is None:
        return np.zeros((n, 3))
    offsets = np.ascontiguousarray(np.asarray(offsets_vox, dtype=np.float64).reshape(-1, 3))
    if offsets.shape[0] != n or not np.all(np.isfinite(offsets)):
        raise ValueError(f"offsets_vox must be finite with shape ({n}, 3), got {offsets.shape}")
    return offsets


@numba.njit(parallel=True, cache=True)
def _back_project(profiles, r, offsets, inv_width):
    n, n_bins = profiles.shape
    e = 2 * r + 1
    out = np.empty((n, e, e, e))
    for i in numba.prange(n):
        for j in range(e):
            dz = j - r - offsets[i, 0]
            for k in range(e):
                dy = k - r - offsets[i, 1]
                dzy = dz * dz + dy * dy
                for m in range(e):
                    dx = m - r - offsets[i, 2]
                    b = int(np.sqrt(dzy + dx * dx) * inv_width)
                    out[i, j, k, m] = profiles[i, b] if b < n_bins else np.nan
    return out


def back_project_reference(profiles, box_radius_vox, offsets_vox=None, *, bin_width_vox=1.0):
    """Plain NumPy version of :func:`back_project`, for tests."""
    profiles = np.asarray(profiles, dtype=np.float64)
    r = _check_scalar_radius(box_radius_vox)
    offsets = _check_offsets(offsets_vox, profiles.shape[0])
    _, inv_width = _check_bins(1, bin_width_vox)
    grid = np.arange(2 * r + 1) - r
    padded = np.concatenate([profiles, np.full((profiles.shape[0], 1), np.nan)], axis=1)
    out = []
    for profile, (oz, oy, ox) in zip(padded, offsets):
        dz, dy, dx = grid - oz, grid - oy, grid - ox
        dist = np.sqrt((dz[:, None, None] * dz[:, None, None] + dy[None, :, None] * dy[None, :, None])
                       + dx[None, None, :] * dx[None, None, :])
        k = np.minimum((dist * inv_width).astype(np.int64), profile.size - 1)
        out.append(profile[k])
    return np.array(out).reshape(profiles.shape[0], *(grid.size,) * 3)


# ---------------------------------------------------------------------------------------------
# cross-correlation shift


def _centred(boxes):
    """Replace NaN (outside the volume / past the profile) by the box mean, then subtract it.

    Mean subtraction keeps the DC term of raw intensities from dominating the correlation; a
    plain unnormalised correlation (the reference) is otherwise identical.
    """
    boxes = np.array(boxes, dtype=np.float32)  # a copy, in single precision: half the FFT time, the same peaks
    axes = tuple(range(1, boxes.ndim))
    n_finite = np.full(boxes.shape[0], int(np.prod(boxes.shape[1:])))
    missing = ~np.isfinite(boxes)
    if missing.any():  # boxes past the volume's faces; the masks' passes are a third of the time
        n_finite -= missing.sum(axis=axes)
        boxes[missing] = 0.0
    else:
        missing = None
    sums = boxes.sum(axis=axes, dtype=np.float64)
    means = np.divide(sums, n_finite, out=np.zeros_like(sums), where=n_finite > 0).astype(np.float32)
    boxes -= means.reshape((-1,) + (1,) * (boxes.ndim - 1))
    if missing is not None:
        boxes[missing] = 0.0
    return boxes


def _peak_shifts(cc, subvoxel):
    """Argmax of each circular correlation, wrapped to [-e/2, e/2), optionally parabola-refined."""
    n = cc.shape[0]
    e = np.array(cc.shape[1:])
    flat = cc.reshape(n, -1)
    peak = np.argmax(flat, axis=1)
    idx = np.stack(np.unravel_index(peak, cc.shape[1:]), axis=1)
    shifts = np.where(idx > e // 2, idx - e, idx).astype(np.float64)
    # a flat correlation (empty or constant box) has no peak: no shift (the largest |cc| is |max| or |min|)
    rows = np.arange(n)
    c0, low = flat[rows, peak], flat.min(axis=1)
    flat_cc = c0 - low <= 1e-6 * np.maximum(np.maximum(np.abs(c0), np.abs(low)), 1e-30)
    if subvoxel:
        for axis in range(3):
            lo, hi = idx.copy(), idx.copy()
            lo[:, axis] = (idx[:, axis] - 1) % e[axis]
            hi[:, axis] = (idx[:, axis] + 1) % e[axis]
            cm = cc[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
            cp = cc[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
            denom = cm - 2.0 * c0 + cp
            ok = (denom < 0) & (e[axis] >= 3)
            delta = np.divide(0.5 * (cm - cp), denom, out=np.zeros(n), where=ok)
            shifts[:, axis] += np.clip(delta, -0.5, 0.5)
    shifts[flat_cc] = 0.0
    return shifts


def xcorr_shift(boxes, models, *, subvoxel=True):
    """Displacement d (n, 3) of each box's content relative to its model, by circular correlation.

    If the vesicle in ``boxes[i]`` sits at the model centre + d, the result is d, so the improved
    centre is ``c + d``. (The reference returns ``s = -d`` and updates ``C <- C - s``.) The integer
    argmax of the FFT cross-correlation (NaN and means handled by `_centred`) is refined to sub-voxel
    by a parabola through the peak and its two neighbours on each axis when ``subvoxel``.
    All vesicles of the batch share one box size, so the FFT runs once over the stack. Boxes are never padded
    with zeros to a fast FFT length (the zeros made the correlation partly linear, and one vesicle of the crowded
    development phantoms was lost); refine reads real data at such a length instead (`correlation_radius`).
    """
    a, b = _check_pair(boxes, models)
    axes = (1, 2, 3)
    workers = fft_workers(a.size)
    spec = scipy.fft.rfftn(a, axes=axes, workers=workers) * np.conj(scipy.fft.rfftn(b, axes=axes, workers=workers))
    cc = scipy.fft.irfftn(spec, s=a.shape[1:], axes=axes, workers=workers)
    return _peak_shifts(cc, subvoxel)


def _check_pair(boxes, models):
    boxes = np.asarray(boxes)
    models = np.asarray(models)
    if boxes.ndim != 4 or boxes.shape != models.shape:
        raise ValueError(f"boxes and models must be equal (n, e, e, e) stacks, got {boxes.shape} "
                         f"and {models.shape}")
    return _centred(boxes), _centred(models)


def xcorr_shift_reference(boxes, models, *, subvoxel=True):
    """Direct (no FFT) circular cross-correlation over every shift, for tests on small boxes."""
    a, b = _check_pair(boxes, models)
    cc = np.empty(a.shape)
    e = a.shape[1:]
    for t in np.ndindex(*e):
        # cc[t] = sum_v B(v + t) A(v): the content moved by +t matches the model
        cc[(slice(None),) + t] = np.sum(np.roll(a, tuple(-s for s in t), axis=(1, 2, 3)) * b,
                                        axis=(1, 2, 3))
    return _peak_shifts(cc, subvoxel)
