"""Single-axis tilt-series projection and back-projection of a (z, y, x) volume, tilt axis y.

Geometry shared by every function here. Angles are in degrees; at angle θ the detector coordinate of a
point is ``u = cu + (x - cx) cos θ + (z - cz) sin θ``, with ``cz, cx, cu`` the centres ``(n - 1) / 2`` of
the z, x and detector axes, so θ = 0 integrates along z and the rotation centre is the volume's centre.
A projection has one row per y and ``nu`` detector pixels of one voxel each.

The projector is Joseph's: a ray is sampled once per voxel row along the axis it crosses fastest (z when
|cos θ| >= |sin θ|, else x), linearly interpolated along the other axis, and the samples are summed times
the path length per row (1/|cos θ| or 1/|sin θ|), so a projection is a line integral in voxel lengths.
Back-projection is voxel-driven: each voxel takes the linearly interpolated detector value its ray hits.
Interpolation treats everything outside the array as zero (a voxel's value tapers to 0 over one voxel).
"""

import numba
import numpy as np
from scipy.ndimage import map_coordinates

from cryoves.kernels.threads import threads_for

__all__ = ["project", "project_reference", "back_project", "back_project_reference"]


def _check_angles(angles_deg):
    angles = np.ascontiguousarray(np.asarray(angles_deg, dtype=np.float64).reshape(-1))
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise ValueError(f"angles_deg must be one or more finite angles, got {angles_deg}")
    radians = np.radians(angles)
    return np.cos(radians), np.sin(radians)


def _check_array(array, name):
    array = np.asarray(array)
    if array.ndim != 3 or array.dtype.kind != "f":
        raise ValueError(f"{name} must be a 3-D float array, got shape {array.shape} and dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _check_back_project(projections, angles_deg, weights, nz):
    projections = _check_array(projections, "projections (angle, y, u)")
    cos, sin = _check_angles(angles_deg)
    if projections.shape[0] != cos.size:
        raise ValueError(f"projections hold {projections.shape[0]} angles, angles_deg {cos.size}")
    weights = np.ascontiguousarray(np.broadcast_to(np.asarray(weights, dtype=np.float64), cos.shape))
    if int(nz) != nz or nz < 1:
        raise ValueError(f"nz must be a positive integer, got {nz}")
    return projections, cos, sin, weights, int(nz)


def project(volume, angles_deg):
    """Line integrals (voxel lengths) of `volume` (z, y, x) at each tilt angle about y: (angle, y, x) float32."""
    volume = _check_array(volume, "volume (z, y, x)")
    cos, sin = _check_angles(angles_deg)
    out = np.empty((cos.size, volume.shape[1], volume.shape[2]), dtype=np.float32)
    with threads_for(volume.size * cos.size):
        _project(volume, cos, sin, out)
    return out


@numba.njit(cache=True, fastmath=True)
def _span(start, step, n_cols, n):
    """Indices [lo, hi) of 0..n-1 (a superset) where ``start + i step`` lies inside (0, n_cols + 1)."""
    t0 = -start / step
    t1 = (n_cols + 1 - start) / step
    lo = max(0, int(np.floor(min(t0, t1))))
    hi = min(n, int(np.ceil(max(t0, t1))) + 1)
    return lo, hi


@numba.njit(cache=True, fastmath=True)
def _padded(values, out):
    """Copy `values` into `out[1:n + 1]` with zeros around: a lerp at p + 1 in `out`, p clamped to
    [-1, n], is the zero-padded lerp at p, without a branch."""
    out[0] = 0.0
    out[values.size + 1:] = 0.0
    out[1:values.size + 1] = values


@numba.njit(cache=True, fastmath=True)
def _ray_sums(plane, centre_row, centre_col, along, across, cu, line):
    """Add to `line` the samples of the rays through every row of `plane` (zero-padded by one column on the
    left, two on the right): row r is crossed at column ``centre_col + ((u - cu) - (r - centre_row) along)
    / across``, linearly interpolated."""
    n_rows, n_cols = plane.shape[0], plane.shape[1] - 3
    step = 1.0 / across
    for r in range(n_rows):
        start = 1.0 + centre_col + (-cu - (r - centre_row) * along) * step
        lo, hi = _span(start, step, n_cols, line.size)
        for u in range(lo, hi):
            p = min(max(start + u * step, 0.0), n_cols + 1.0)
            i = int(p)
            w = p - i
            line[u] += (1.0 - w) * plane[r, i] + w * plane[r, i + 1]


@numba.njit(parallel=True, cache=True, fastmath=True)
def _project(volume, cos, sin, out):
    nz, ny, nx = volume.shape
    nu = out.shape[2]
    cz, cx, cu = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    for y in numba.prange(ny):  # out[:, y] is written by iteration y only: no races
        rows = np.empty((nz, nx + 3))  # the x-z slice by z rows and by x columns (cache-friendly rays), padded
        columns = np.empty((nx, nz + 3))
        for z in range(nz):
            _padded(volume[z, y].astype(np.float64), rows[z])
        for x in range(nx):
            _padded(volume[:, y, x].astype(np.float64), columns[x])
        line = np.empty(nu)
        for a in range(cos.size):
            line[:] = 0.0
            if abs(cos[a]) >= abs(sin[a]):
                _ray_sums(rows, cz, cx, sin[a], cos[a], cu, line)
                length = 1.0 / abs(cos[a])
            else:
                _ray_sums(columns, cx, cz, cos[a], sin[a], cu, line)
                length = 1.0 / abs(sin[a])
            for u in range(nu):
                out[a, y, u] = line[u] * length


def project_reference(volume, angles_deg):
    """Plain NumPy/SciPy version of :func:`project` (map_coordinates at the same ray samples, summed), for tests."""
    volume = np.asarray(_check_array(volume, "volume (z, y, x)"), dtype=np.float64)
    cos, sin = _check_angles(angles_deg)
    nz, ny, nx = volume.shape
    cz, cx, cu = (nz - 1) / 2, (nx - 1) / 2, (nx - 1) / 2
    u = np.arange(nx, dtype=np.float64)[None, None, :] - cu
    y = np.broadcast_to(np.arange(ny, dtype=np.float64)[None, :, None], (1, ny, nx))
    out = []
    for c, s in zip(cos, sin):
        if abs(c) >= abs(s):
            z = np.arange(nz, dtype=np.float64)[:, None, None]
            x = cx + (u - (z - cz) * s) / c
            length = 1 / abs(c)
        else:
            x = np.arange(nx, dtype=np.float64)[:, None, None]
            z = cz + (u - (x - cx) * c) / s
            length = 1 / abs(s)
        z, y_, x = np.broadcast_arrays(z, y, x)
        samples = map_coordinates(volume, [z, y_, x], order=1, mode="grid-constant", prefilter=False)
        out.append(samples.sum(axis=0) * length)
    return np.array(out, dtype=np.float32)


def back_project(projections, angles_deg, weights, nz):
    """Weighted sum over angles of each voxel's detector value: the (nz, y, u) volume, float32.

    `projections` (angle, y, u) are usually ramp-filtered first (weighted back-projection); `weights`
    (one per angle, or one for all) are the angular intervals each projection stands for.
    """
    projections, cos, sin, weights, nz = _check_back_project(projections, angles_deg, weights, nz)
    out = np.empty((nz, projections.shape[1], projections.shape[2]), dtype=np.float32)
    with threads_for(out.size * cos.size):
        _back_project(projections, cos, sin, weights, out)
    return out


@numba.njit(parallel=True, cache=True, fastmath=True)
def _back_project(projections, cos, sin, weights, out):
    nz, ny, nx = out.shape
    n_angles, _, nu = projections.shape
    cz, cx, cu = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    for y in numba.prange(ny):  # out[:, y] is written by iteration y only: no races
        lines = np.empty((n_angles, nu + 3))
        for a in range(n_angles):
            _padded(projections[a, y].astype(np.float64), lines[a])
        row = np.empty(nx)
        for z in range(nz):
            row[:] = 0.0
            for a in range(n_angles):
                c, w = cos[a], weights[a]
                start = 1.0 + cu - cx * c + (z - cz) * sin[a]
                lo, hi = (0, nx) if c == 0.0 else _span(start, c, nu, nx)
                for x in range(lo, hi):
                    p = min(max(start + x * c, 0.0), nu + 1.0)
                    i = int(p)
                    f = p - i
                    row[x] += w * ((1.0 - f) * lines[a, i] + f * lines[a, i + 1])
            for x in range(nx):
                out[z, y, x] = row[x]


def back_project_reference(projections, angles_deg, weights, nz):
    """Plain NumPy/SciPy version of :func:`back_project` (map_coordinates per angle, summed), for tests."""
    projections, cos, sin, weights, nz = _check_back_project(projections, angles_deg, weights, nz)
    _, ny, nu = projections.shape
    cz, cx, cu = (nz - 1) / 2, (nu - 1) / 2, (nu - 1) / 2
    z, y, x = np.meshgrid(np.arange(nz) - cz, np.arange(ny), np.arange(nu) - cx, indexing="ij")
    out = np.zeros((nz, ny, nu))
    for q, c, s, w in zip(np.asarray(projections, dtype=np.float64), cos, sin, weights):
        out += w * map_coordinates(q, [y, cu + x * c + z * s], order=1, mode="grid-constant", prefilter=False)
    return out.astype(np.float32)
