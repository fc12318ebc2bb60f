"""Network-input preparation: resampling between grids, Gaussian pre-filter, z-score (method.md §2.2-2.4, §2.8).

Everything stays float32 (the reference truncates to int16 after resampling and filtering; we do
not), and no float64 copy of a whole volume is ever made.
"""

import numpy as np
import scipy.fft
from scipy import ndimage

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.pages import is_mapped, read_box, release_pages
from cryoves.kernels.resize import resize_linear, resize_linear_at
from cryoves.kernels.threads import fft_workers

NETWORK_VOXEL_SIZE_A = 22.0
_SLAB_VOXELS = 1 << 22
_DCT_SLAB_VOXELS = 1 << 20
_MAPPED_PART_BYTES = 1 << 25  # input bytes read per part by `resample_to_shape`


def network_shape(shape: tuple[int, ...], voxel_size_a: float,
                  network_voxel_size_a: float = NETWORK_VOXEL_SIZE_A) -> tuple[int, ...]:
    """Shape on the network grid: N_net = max(1, round(f·N)) per axis, f = voxel_size_a / network_voxel_size_a."""
    if not voxel_size_a > 0:
        raise CryovesError(f"voxel size must be > 0 Å, got {voxel_size_a}; pass --voxel-size")
    factor = voxel_size_a / network_voxel_size_a
    return tuple(max(1, round(factor * n)) for n in shape)


def resample_to_shape(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resize to `shape`, pixel-centre aligned, reflect boundary, float32 out.

    Coordinates map as x_in = (x_out + 0.5)·N_in/N_out − 0.5 on each axis. Axes that shrink are
    first smoothed with an anti-alias Gaussian of σ = (N_in/N_out − 1)/2 input voxels. A memory-mapped
    tomogram leaves the process's resident memory as it is read.
    """
    if volume.ndim != len(shape):
        raise ValueError(f"volume has {volume.ndim} axes, shape {shape} has {len(shape)}")
    shape = tuple(int(n) for n in shape)
    if tuple(volume.shape) == shape:
        return volume.astype(np.float32, copy=False)
    sigma = _antialias_sigma(volume.shape, shape)
    if not is_mapped(volume) or volume.nbytes <= _MAPPED_PART_BYTES:
        return resize_linear(volume, shape, sigma)  # the anti-alias folded into the interpolation taps
    # a mapped tomogram by parts of output z-sections, its pages released after each (`release_pages`): all
    # its pages would otherwise become resident (200 MB at 200x512x512)
    out = np.empty(shape, np.float32)
    step = max(1, _MAPPED_PART_BYTES * shape[0] // volume.nbytes)
    for k0 in range(0, shape[0], step):
        k1 = min(k0 + step, shape[0])
        resize_linear(volume, shape, sigma, sections=(k0, k1), out=out[k0:k1])
        release_pages(volume)
    return out


def resample_at(volume: np.ndarray, shape: tuple[int, ...], indices: np.ndarray) -> np.ndarray:
    """`resample_to_shape(volume, shape).reshape(-1)[indices]` (flat indices, ascending), the same numbers, computed
    only there; a memory-mapped tomogram is read by parts of output z-sections, its pages released after each."""
    shape = tuple(int(n) for n in shape)
    if volume.ndim != len(shape) or len(shape) != 3:
        raise ValueError(f"need a 3-D volume and shape, got {volume.shape} and {shape}")
    indices = np.asarray(indices, dtype=np.int64)
    if tuple(volume.shape) == shape:
        return np.asarray(volume.reshape(-1)[indices], dtype=np.float32)
    sigma = _antialias_sigma(volume.shape, shape)
    if not is_mapped(volume) or volume.nbytes <= _MAPPED_PART_BYTES:
        return resize_linear_at(volume, shape, sigma, indices)
    out = np.empty(indices.size, np.float32)
    step = max(1, _MAPPED_PART_BYTES * shape[0] // volume.nbytes)
    bounds = np.searchsorted(indices, np.arange(0, shape[0] + step, step) * (shape[1] * shape[2]))
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a < b:
            out[a:b] = resize_linear_at(volume, shape, sigma, indices[a:b])
            release_pages(volume)
    return out


def _antialias_sigma(in_shape, out_shape) -> list[float]:
    """σ = (N_in/N_out − 1)/2 input voxels on each axis that shrinks, 0 on the others (`resample_to_shape`)."""
    return [max(0.0, (n_in / n_out - 1.0) / 2.0) for n_in, n_out in zip(in_shape, out_shape)]


def nearest_to_shape(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize to `shape` (labels), pixel-centre aligned as `resample_to_shape`: output voxel i
    takes input voxel floor((i + 0.5)·N_in/N_out) on each axis."""
    if volume.ndim != len(shape):
        raise ValueError(f"volume has {volume.ndim} axes, shape {shape} has {len(shape)}")
    index = [np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
             for n_in, n_out in zip(volume.shape, shape)]
    return volume[np.ix_(*index)]


def resample_band_limited(volume: np.ndarray, shape: tuple[int, ...], sigma_vox: float = 0.0) -> np.ndarray:
    """Resize to `shape`, float32: axes that shrink by cropping their DCT-II spectrum, axes that grow trilinearly;
    then a Gaussian pre-filter of `sigma_vox` output voxels (0: none).

    The DCT's even extension makes the boundary reflect and its basis puts samples at pixel centres, so
    coordinates map as in `resample_to_shape`. Unlike trilinear resizing after a small anti-alias Gaussian,
    the crop keeps exactly the band of the coarser grid: white noise keeps N_out/N_in of its variance per
    axis, as an acquisition at the coarser voxel size would have it. Growing axes stay trilinear, where a
    zero-padded spectrum would ring at edges and measured worse (benchmarks/ROBUSTNESS.md). On an axis that
    shrinks, the pre-filter weights the kept coefficients by the Gaussian's response, where the crop transforms
    anyway (a 3-D filter of the 1024x1024x261 tomogram's 174x684x684 grid took 1.5 s): its boundary reflects,
    as the DCT's does. On the others it filters directly, with `gaussian_prefilter`'s nearest boundary.
    """
    if volume.ndim != len(shape):
        raise ValueError(f"volume has {volume.ndim} axes, shape {shape} has {len(shape)}")
    if sigma_vox < 0:
        raise ValueError(f"sigma_vox must be >= 0, got {sigma_vox}")
    shape = tuple(int(n) for n in shape)
    shrinking = [axis for axis in range(volume.ndim) if shape[axis] < volume.shape[axis]]
    out = volume.astype(np.float32, copy=False)
    if shrinking:
        out = _dct_shrink_axes(out, shape, shrinking, sigma_vox)
    out = resample_to_shape(out, shape)
    for axis in (a for a in range(out.ndim) if sigma_vox > 0 and a not in shrinking):
        out = ndimage.gaussian_filter1d(out, sigma_vox, axis=axis, mode="nearest", truncate=4.0, output=np.float32)
    return out


def _dct_shrink_axes(volume: np.ndarray, shape: tuple[int, ...], axes: list[int], sigma_vox: float) -> np.ndarray:
    """`volume` with each of `axes` cropped to its length in `shape`, in one new buffer. On a 3-D volume the crops of
    x and z run slab by slab across y, both on each slab as it is read (a mapped tomogram is read once), into a buffer
    of the result with y still whole; y's crop then overwrites the buffer from its start, slab by slab across z (an
    output slab never reaches a slab not yet read), and the buffer is cut to the result's size (numpy's resize:
    realloc, the rest given back). For the 1024x1024x261 tomogram the buffer holds 487 MB, where a crop of z alone
    first held 730 MB of fresh memory, and the transforms along y (strided, the slowest) run on the smaller data."""
    later = [1] if volume.ndim == 3 and 1 in axes else []
    # x first where it shrinks: transforms along the contiguous axis cost half as much per sample, so they take the
    # largest data (3.4-3.8 -> 2.8-2.9 s for 1024x1024x261); the others by how much they shrink
    last = volume.ndim - 1
    first = sorted((axis for axis in axes if axis not in later), key=lambda a: (a != last, shape[a] / volume.shape[a]))
    across = 1 if volume.ndim == 3 else None
    sizes = [list(volume.shape)]
    for axis in first + later:
        sizes.append(list(sizes[-1]))
        sizes[-1][axis] = shape[axis]
    buffer = np.empty(np.prod(sizes[len(first)] if first else sizes[-1]), np.float32)
    source = volume
    for part_axes, part_across, size in ((first, across, sizes[len(first)]), (later, 0, sizes[-1])):
        if part_axes:
            target = buffer[:np.prod(size)].reshape(size)
            _dct_crop_slabs(source, target, part_axes, part_across, sigma_vox)
            source = target
    del source, target  # no view of `buffer` may outlive its resize
    buffer.resize(np.prod(sizes[-1]), refcheck=False)
    return buffer.reshape(sizes[-1])


def _dct_crop_slabs(volume: np.ndarray, out: np.ndarray, axes: list[int], across: int | None,
                    sigma_vox: float) -> None:
    """`out` = `volume` with each of `axes` in turn cropped to `out`'s length, in slabs across `across` (not one of
    `axes`; None: the whole volume at once), in order: each slab is read whole before its output is written. Every
    transform along an axis is independent, so the slabs give the numbers of the whole, and small slabs stay in
    cache (a z pass over 1024x1024x261 at once ran 3.6x longer)."""
    slabs = [()]
    if across is not None:
        step = max(1, _DCT_SLAB_VOXELS * volume.shape[across] // max(1, volume.size))
        slabs = [(slice(None),) * across + (slice(start, start + step),)
                 for start in range(0, volume.shape[across], step)]
    workers = fft_workers(volume.size)
    weights = {axis: _crop_weights(volume.shape[axis], out.shape[axis], sigma_vox, axis, volume.ndim) for axis in axes}
    for slab, part in _read_slabs(volume, slabs, across):
        for axis in axes:
            part = _dct_crop(part, axis, weights[axis], workers)
        out[slab] = part


def _crop_weights(n_in: int, n_out: int, sigma_vox: float, axis: int, ndim: int) -> np.ndarray:
    """The kept DCT coefficients' weights of a crop of `axis` from `n_in` to `n_out` samples: the pre-filter's
    response, and √(n_out/n_in) to keep the values (orthonormal transforms), shaped to broadcast along `axis`."""
    weights = (np.sqrt(n_out / n_in) * _gaussian_response(sigma_vox, n_out)).astype(np.float32)
    return weights.reshape([-1 if a == axis else 1 for a in range(ndim)])


def _dct_crop(volume: np.ndarray, axis: int, weights: np.ndarray, workers: int = 1) -> np.ndarray:
    """`volume` with `axis` cropped to the length of `weights` (`_crop_weights`): its DCT-II spectrum cut to the first
    coefficients, weighted, transformed back; on `workers` threads."""
    keep = [slice(None)] * volume.ndim
    keep[axis] = slice(0, weights.shape[axis])
    spectrum = scipy.fft.dct(volume, type=2, norm="ortho", axis=axis, workers=workers)
    return scipy.fft.idct(spectrum[tuple(keep)] * weights, type=2, norm="ortho", axis=axis, workers=workers)


def _read_slabs(volume: np.ndarray, slabs: list[tuple], across: int | None):
    """(slab, its data) for each of `slabs` (consecutive ranges along `across`), each used before the next is asked
    for. A mapped tomogram is read from its file (`read_box`, into one buffer) in groups of slabs of about
    _MAPPED_PART_BYTES, not through the map: a slab holds a few rows of every section, and a page fault maps a whole
    folio of the page cache (2 MB for a file just written), so the whole file became resident (1.1 GB at
    1024x1024x261), faster than releasing its pages could keep up with."""
    if across is None or volume.ndim != 3 or not is_mapped(volume):
        yield from ((slab, volume[slab]) for slab in slabs)
        return
    n = volume.shape[across]
    per_group = max(1, _MAPPED_PART_BYTES * len(slabs) // max(1, volume.nbytes))
    scratch = None  # one buffer for every group, the first (the largest)
    for first in range(0, len(slabs), per_group):
        group = slabs[first:first + per_group]
        start, stop = group[0][across].start, min(group[-1][across].stop, n)
        box = [slice(None)] * 3
        box[across] = slice(start, stop)
        if scratch is None:
            scratch = np.empty(volume[tuple(box)].nbytes, np.uint8)
        data = read_box(volume, tuple(box), scratch)
        for slab in group:
            box[across] = slice(slab[across].start - start, min(slab[across].stop, n) - start)
            yield slab, data[tuple(box)]


def _gaussian_response(sigma_vox: float, n: int) -> np.ndarray:
    """The response of scipy's sampled Gaussian (σ voxels, truncated at 4σ and normalised) to DCT-II coefficient
    k of n samples, frequency π k / n: filtering the even extension, i.e. with a reflecting boundary, exactly."""
    radius = int(4.0 * sigma_vox + 0.5)
    if radius == 0:
        return np.ones(n)
    taps = np.exp(-0.5 * (np.arange(radius + 1) / sigma_vox) ** 2)
    taps /= taps[0] + 2.0 * taps[1:].sum()
    frequency = np.pi * np.arange(n) / n
    return taps[0] + 2.0 * np.cos(np.outer(frequency, np.arange(1, radius + 1))) @ taps[1:]


def gaussian_prefilter(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Isotropic Gaussian blur (nearest boundary, truncated at 4σ), float32; σ = 0 returns the input."""
    if sigma_vox < 0:
        raise ValueError(f"sigma_vox must be >= 0, got {sigma_vox}")
    if sigma_vox == 0:
        return volume.astype(np.float32, copy=False)
    return ndimage.gaussian_filter(volume.astype(np.float32, copy=False), sigma_vox, mode="nearest",
                                   truncate=4.0, output=np.float32)


def z_slabs(volume: np.ndarray, max_voxels: int = _SLAB_VOXELS):
    """Views of whole z-sections, about `max_voxels` each: whole-volume statistics without a full-size temporary."""
    step = max(1, max_voxels // max(1, volume[0].size))
    for start in range(0, volume.shape[0], step):
        yield volume[start:start + step]


def mean_std(volume: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation, accumulated in float64 over z-slabs (two passes)."""
    if volume.size == 0:
        raise ValueError("volume is empty")
    total = sum(float(slab.sum(dtype=np.float64)) for slab in z_slabs(volume))
    mean = total / volume.size
    squares = 0.0
    for slab in z_slabs(volume):
        centred = slab.astype(np.float64) - mean
        centred = centred.ravel()
        squares += float(centred @ centred)
    return mean, (squares / volume.size) ** 0.5


def zscore(volume: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """(x − mean)/std over the whole volume, float32; a constant volume becomes all zeros.

    `inplace=True` overwrites a float32 `volume` (no second full-size array).
    """
    mean, std = mean_std(volume)
    if inplace and volume.dtype != np.float32:
        raise ValueError(f"inplace z-score needs a float32 volume, got {volume.dtype}")
    out = volume if inplace else volume.astype(np.float32, copy=True)
    out -= np.float32(mean)
    if std > 0:
        out *= np.float32(1.0 / std)
    return out
