"""Trilinear resizing with an optional Gaussian anti-alias, one axis at a time, by slabs of output z-sections in
parallel (method.md §2.2, §2.8).

Pixel centres are aligned: x_in = (x_out + 1/2) N_in / N_out - 1/2 on each axis, with a reflecting (half-sample
symmetric) boundary, as `scipy.ndimage.zoom(order=1, mode="reflect", grid_mode=True)`; the anti-alias is
`scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)` before it. Both are separable, so each axis is one
pass whose taps are the Gaussian's folded into the two interpolation weights. scipy took 12 s to bring a
probability map back to a 261x1024x1024 tomogram, and 9 s more for the anti-alias on the way in.

Each slab of a few output z-sections goes through the z, y and x passes before the next (`_SLAB_BYTES` of
intermediate per slab): no intermediate volume exists, which took up to 1.7 times the output's memory (190 MB
over the output for a 200x512x512 tomogram brought to 2.2 nm), and a slab's passes run in cache.
"""

import numba
import numpy as np
from scipy import ndimage

from cryoves.kernels.arrays import readonly
from cryoves.kernels.threads import parallel_over, threads_for

__all__ = ["resize_linear", "resize_linear_at", "resize_linear_reference"]

_TRUNCATE = 4.0  # scipy's default for gaussian_filter, in σ


def resize_linear(volume: np.ndarray, shape: tuple[int, int, int], sigma_vox=(0.0, 0.0, 0.0), *,
                  sections: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """`volume` (3-D) smoothed by a Gaussian of `sigma_vox` input voxels per axis (0: none), then resized
    trilinearly to `shape`; float32, a new array or `out` (C-contiguous float32 of the sections' shape). `sections`
    (k0, k1): only output z-sections k0 to k1 - 1, from only the input sections they need (a mapped volume can then
    be read by parts, straight into the parts of one output)."""
    volume, shape, sigma = _checked(volume, shape, sigma_vox)
    k0, k1 = (0, shape[0]) if sections is None else (int(sections[0]), int(sections[1]))
    if not 0 <= k0 < k1 <= shape[0]:
        raise ValueError(f"sections must be (k0, k1) with 0 <= k0 < k1 <= {shape[0]}, got {sections}")
    taps = [_taps(n_in, n_out, s) if n_in != n_out or _radius(s) else None
            for n_in, n_out, s in zip(volume.shape, shape, sigma)]
    if out is None:
        out = np.empty((k1 - k0, *shape[1:]), np.float32)
    elif out.shape != (k1 - k0, *shape[1:]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(k1 - k0, *shape[1:])}, got {out.shape} "
                         f"{out.dtype}")
    if not any(taps):
        out[...] = volume[k0:k1]
        return out
    lo, hi = k0, k1  # the input sections read
    if taps[0] is not None:
        index, weights = taps[0][0][k0:k1], taps[0][1][k0:k1]
        lo, hi = int(index.min()), int(index.max()) + 1
        taps[0] = (readonly(index - lo), weights)
    source = readonly(np.ascontiguousarray(volume[lo:hi], dtype=np.float32))
    n_taps = max(t[0].shape[1] for t in taps if t is not None)
    planes = max(1, min(out.shape[0], _SLAB_BYTES // (4 * source.shape[1] * source.shape[2])))
    with threads_for(out.size * n_taps // 2):
        parallel_over(_resize_slabs, -(-out.shape[0] // planes), source, taps, out, planes)
    return out


def resize_linear_at(volume: np.ndarray, shape: tuple[int, int, int], sigma_vox, indices: np.ndarray) -> np.ndarray:
    """`resize_linear(volume, shape, sigma_vox).reshape(-1)[indices]` without the rest of the output: float32, the
    same numbers bit for bit (each pass's sums taken in the same order and type), reading only the input sections
    the indices' output sections need. For an output needed at a few voxels: the threshold search reads the
    tomogram on the shells of the probability map (2.5 % of the network grid of a 1024x1024x261 tomogram), where
    the whole resize took 0.8 s and 325 MB."""
    volume, shape, sigma = _checked(volume, shape, sigma_vox)
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= np.prod(shape)):
        raise ValueError(f"indices must lie in the output of {int(np.prod(shape))} voxels")
    out = np.empty(indices.size, np.float32)
    if not indices.size:
        return out
    (iz, wz), (iy, wy), (ix, wx) = (_taps(n_in, n_out, s) if n_in != n_out or _radius(s) else _identity(n_in)
                                    for n_in, n_out, s in zip(volume.shape, shape, sigma))
    needed = iz[indices.min() // (shape[1] * shape[2]):indices.max() // (shape[1] * shape[2]) + 1]
    lo, hi = int(needed.min()), int(needed.max()) + 1  # the input sections read, as `resize_linear`'s `sections`
    source = readonly(np.ascontiguousarray(volume[lo:hi], dtype=np.float32))
    _resize_at(source, readonly(iz - lo), wz, iy, wy, ix, wx, shape[1], shape[2], readonly(indices), out)
    return out


def _checked(volume, shape, sigma_vox):
    """(volume as an array, shape as ints, σ per axis), or a ValueError for what `resize_linear` cannot take."""
    volume = np.asarray(volume)
    shape = tuple(int(n) for n in shape)
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    if volume.ndim != 3 or len(shape) != 3 or min(shape) < 1 or volume.size == 0:
        raise ValueError(f"need a non-empty 3-D volume and a 3-D shape of positive sizes, got {volume.shape} -> "
                         f"{shape}")
    if np.any(sigma < 0):
        raise ValueError(f"sigma_vox must be >= 0, got {sigma_vox}")
    return volume, shape, sigma


def _identity(n: int):
    """One tap of weight 1 per sample: the pass `resize_linear` skips, which changes no bit of a float32 value."""
    return readonly(np.arange(n).reshape(n, 1)), readonly(np.ones((n, 1)))


@numba.njit(cache=True, nogil=True)
def _resize_at(src, iz, wz, iy, wy, ix, wx, ny, nx, indices, out):
    """Each output voxel (indices ascending) through the z, y and x passes of `_along_z`, `_along_y` and `_along_x`,
    in their order and types; the z pass's values of the current output section and the y pass's of the current
    output row are kept for the voxels after (neighbours share most of their taps), so each is summed once."""
    z_pass = np.empty(src.shape[1:], np.float32)
    z_done = np.full(src.shape[1:], -1, np.int32)  # the output section each z_pass value is of
    y_pass = np.empty(src.shape[2], np.float32)
    y_done = np.full(src.shape[2], -1, np.int32)  # the output row each y_pass value is of
    for n in range(indices.size):
        row, i = divmod(indices[n], nx)
        k, j = divmod(row, ny)
        acc = 0.0  # float64, as `_along_x`
        for tx in range(ix.shape[1]):
            x = ix[i, tx]
            if y_done[x] != row:
                line = np.float32(0.0)  # float32, as `_along_y`
                for ty in range(iy.shape[1]):
                    y = iy[j, ty]
                    if z_done[y, x] != k:
                        plane = np.float32(0.0)  # float32, as `_along_z`
                        for tz in range(iz.shape[1]):
                            plane += np.float32(wz[k, tz]) * src[iz[k, tz], y, x]
                        z_pass[y, x], z_done[y, x] = plane, k
                    line += np.float32(wy[j, ty]) * z_pass[y, x]
                y_pass[x], y_done[x] = line, row
            acc += wx[i, tx] * y_pass[x]
        out[n] = acc


_SLAB_BYTES = 1 << 22
"""Bytes of input-sized z-sections per slab, about: in cache, and few enough sections that slabs balance."""


def _resize_slabs(source: np.ndarray, taps, out: np.ndarray, planes: int, first: int, stop: int) -> None:
    """Slabs `first` to `stop` - 1 of `planes` output z-sections each, through the z, y and x passes."""
    for slab in range(first, stop):
        k0, k1 = slab * planes, min((slab + 1) * planes, out.shape[0])
        part = source[k0:k1]  # the sections themselves where z is not resized
        if taps[0] is not None:
            index, weights = taps[0]
            part = _pass(_along_z, source, index[k0:k1], weights[k0:k1], (k1 - k0, *source.shape[1:]))
        if taps[1] is not None:
            part = _pass(_along_y, part, *taps[1], (k1 - k0, out.shape[1], part.shape[2]))
        if taps[2] is not None:
            _along_x(part, *taps[2], out[k0:k1], 0, k1 - k0)
        else:
            out[k0:k1] = part


def _pass(kernel, source, index, weights, shape) -> np.ndarray:
    """One axis's pass of `source` into a new read-only slab of `shape` (the kernels' one signature)."""
    part = np.empty(shape, np.float32)
    kernel(source, index, weights, part, 0, shape[0])
    return readonly(part)


def resize_linear_reference(volume: np.ndarray, shape: tuple[int, int, int], sigma_vox=(0.0, 0.0, 0.0)) -> np.ndarray:
    """`resize_linear` by scipy's gaussian_filter and zoom."""
    out = np.asarray(volume, np.float32)
    if any(_radius(s) for s in np.broadcast_to(sigma_vox, (3,))):
        out = ndimage.gaussian_filter(out, sigma_vox, mode="reflect", truncate=_TRUNCATE, output=np.float32)
    zoom = [n_out / n_in for n_in, n_out in zip(volume.shape, shape)]
    return ndimage.zoom(out, zoom, output=np.float32, order=1, mode="reflect", grid_mode=True)


def _radius(sigma: float) -> int:
    """The Gaussian's half-width in taps, as scipy truncates it (0: a one-tap kernel, which changes nothing)."""
    return int(_TRUNCATE * sigma + 0.5)


def _taps(n_in: int, n_out: int, sigma: float):
    """Source indices and weights (n_out, taps) of each output sample along one axis: the two interpolation
    neighbours, each spread over the Gaussian's taps, indices reflected into [0, n_in)."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    left = np.floor(x)
    weight = x - left
    left = left.astype(np.int64)
    sides = np.stack([np.clip(left, 0, n_in - 1), np.clip(left + 1, 0, n_in - 1)], axis=1)
    side_weights = np.stack([1.0 - weight, weight], axis=1)
    r = _radius(sigma)
    offsets = np.arange(-r, r + 1)
    gauss = np.exp(-0.5 * (offsets / sigma) ** 2) if r else np.ones(1)
    gauss /= gauss.sum()
    index = np.mod(sides[:, :, None] + offsets[None, None, :], 2 * n_in)  # half-sample symmetric reflection,
    index = np.where(index >= n_in, 2 * n_in - 1 - index, index)           # repeated where the kernel is longer
    weights = side_weights[:, :, None] * gauss[None, None, :]
    return readonly(index.reshape(n_out, -1)), readonly(weights.reshape(n_out, -1))


@numba.njit(cache=True, nogil=True)
def _along_z(src, index, weights, out, start, stop):
    """Output planes start..stop-1: each a weighted sum of whole input planes (loops over x vectorise)."""
    for k in range(start, stop):
        plane = out[k]
        plane[:] = 0.0
        for t in range(index.shape[1]):
            weight, source = np.float32(weights[k, t]), src[index[k, t]]
            for y in range(plane.shape[0]):
                for x in range(plane.shape[1]):
                    plane[y, x] += weight * source[y, x]


@numba.njit(cache=True, nogil=True)
def _along_y(src, index, weights, out, start, stop):
    """Output planes start..stop-1: each row a weighted sum of whole input rows (loops over x vectorise)."""
    for z in range(start, stop):
        for k in range(out.shape[1]):
            row = out[z, k]
            row[:] = 0.0
            for t in range(index.shape[1]):
                weight, source = np.float32(weights[k, t]), src[z, index[k, t]]
                for x in range(row.shape[0]):
                    row[x] += weight * source[x]


@numba.njit(cache=True, nogil=True)
def _along_x(src, index, weights, out, start, stop):
    for z in range(start, stop):
        for y in range(out.shape[1]):
            for k in range(out.shape[2]):
                acc = 0.0
                for t in range(index.shape[1]):
                    acc += weights[k, t] * src[z, y, index[k, t]]
                out[z, y, k] = acc
