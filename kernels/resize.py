"""Trilinear resizing, one axis at a time, parallel over z (method.md §2.2, §2.8).

Pixel centres are aligned: x_in = (x_out + 1/2) N_in / N_out - 1/2 on each axis, with a reflecting (half-sample
symmetric) boundary, exactly as `scipy.ndimage.zoom(order=1, mode="reflect", grid_mode=True)`, which is the
reference. Three 1-D passes equal one trilinear pass (the weights factorise); scipy's single-threaded zoom took
12 s to bring a probability map back to a 261x1024x1024 tomogram.
"""

import numba
import numpy as np
from scipy import ndimage

from cryoves.kernels.arrays import readonly
from cryoves.kernels.threads import threads_for

__all__ = ["resize_linear", "resize_linear_reference"]


def resize_linear(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`volume` (3-D) resized trilinearly to `shape`, float32; axes that shrink most are resized first."""
    volume = np.asarray(volume)
    shape = tuple(int(n) for n in shape)
    if volume.ndim != 3 or len(shape) != 3 or min(shape) < 1 or volume.size == 0:
        raise ValueError(f"need a non-empty 3-D volume and a 3-D shape of positive sizes, got {volume.shape} -> "
                         f"{shape}")
    out = np.ascontiguousarray(volume, dtype=np.float32)
    for axis in sorted(range(3), key=lambda a: shape[a] / out.shape[a]):
        if shape[axis] != out.shape[axis]:
            out = _resize_axis(out, shape[axis], axis)
    return out if out is not volume else out.copy()


def resize_linear_reference(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """`resize_linear` by scipy's zoom."""
    zoom = [n_out / n_in for n_in, n_out in zip(volume.shape, shape)]
    return ndimage.zoom(np.asarray(volume, np.float32), zoom, output=np.float32, order=1, mode="reflect",
                        grid_mode=True)


def _taps(n_in: int, n_out: int):
    """Left and right source indices and the right weight of each output sample along one axis."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    left = np.floor(x)
    weight = x - left
    left = left.astype(np.int64)
    return np.clip(left, 0, n_in - 1), np.clip(left + 1, 0, n_in - 1), weight


def _resize_axis(volume: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    shape = list(volume.shape)
    shape[axis] = n_out
    out = np.empty(shape, np.float32)
    left, right, weight = _taps(volume.shape[axis], n_out)
    with threads_for(out.size):
        (_along_z, _along_y, _along_x)[axis](readonly(volume), readonly(left), readonly(right), readonly(weight), out)
    return out


@numba.njit(parallel=True, cache=True)
def _along_z(src, left, right, weight, out):
    for k in numba.prange(out.shape[0]):
        a, b, w = left[k], right[k], weight[k]
        for y in range(out.shape[1]):
            for x in range(out.shape[2]):
                out[k, y, x] = (1.0 - w) * src[a, y, x] + w * src[b, y, x]


@numba.njit(parallel=True, cache=True)
def _along_y(src, left, right, weight, out):
    for z in numba.prange(out.shape[0]):
        for k in range(out.shape[1]):
            a, b, w = left[k], right[k], weight[k]
            for x in range(out.shape[2]):
                out[z, k, x] = (1.0 - w) * src[z, a, x] + w * src[z, b, x]


@numba.njit(parallel=True, cache=True)
def _along_x(src, left, right, weight, out):
    for z in numba.prange(out.shape[0]):
        for y in range(out.shape[1]):
            for k in range(out.shape[2]):
                w = weight[k]
                out[z, y, k] = (1.0 - w) * src[z, y, left[k]] + w * src[z, y, right[k]]
