"""Tiled U-Net inference: tomogram → vesicle probability map (method.md §2.2-2.8).

The network is fully convolutional, so the map must not depend on how the volume is cut. The volume is
first extended by `border_vox` voxels on every face (half-sample-symmetric, scipy "reflect") and to the
4-voxel pooling grid; beyond that the network's own zero padding applies, at every layer. Windows cover
this extended volume: one per axis where the memory budget allows (nothing is computed twice), else a few,
whose edges at a cut between two windows lie at least `halo_vox` voxels (the receptive field, 23 network
voxels on the widest side) from any voxel they keep and whose origins sit on the pooling grid. Under these
rules every tiling gives the map of one pass over the whole extended volume.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

import numpy as np
from scipy.special import expit

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.model import POOLING_FACTOR, PRECISIONS, LogitFn, default_precision, streamed_bytes
from cryoves.engine.network.rescale import (
    NETWORK_VOXEL_SIZE_A,
    gaussian_prefilter,
    network_shape,
    resample_band_limited,
    resample_to_shape,
    zscore,
)

Progress = Callable[[int, int], None]
"""Called as progress(n_tiles_done, n_tiles_total)."""

GRID_VOX = POOLING_FACTOR
"""Window origins and sizes lie on the network's pooling grid."""
RECEPTIVE_HALF_WIDTH_VOX = 23
MEMORY_SHARE = 0.25
"""The default network memory budget: this share of the machine's memory (`default_memory_gb`)."""
WINDOW_BYTES_PER_VOXEL = 12
"""Memory per voxel of a window batch: the window and its logits (float32 each, the kept probabilities
overwrite the logits), and a copy of the window for test-time augmentation or the network; the streamed
network adds `model.streamed_bytes`."""
MAX_WINDOWS_PER_AXIS = 64


def _linear_then_prefilter(tomogram: np.ndarray, shape: tuple[int, int, int], sigma_vox: float) -> np.ndarray:
    """CryoVesNet's code's pre-processing: trilinear resampling, then the Gaussian (nearest boundary)."""
    return gaussian_prefilter(resample_to_shape(tomogram, shape), sigma_vox)


RESAMPLERS = {"fourier": resample_band_limited, "linear": _linear_then_prefilter}
"""Resampling to the network grid with the Gaussian pre-filter of σ network voxels, by `InferenceParams.resampling`."""

# method.md §2.7, in its order; axes of a (B, Z, Y, X) batch: 1 = z, 2 = y, 3 = x.
_TTA = (
    ("identity",),
    ("flip", 3),
    ("flip", 2),
    ("flip", 1),
    ("rot90", (1, 2)),
    ("rot90", (1, 3)),
    ("rot90", (2, 3)),
    ("flip_rot90", 1, (1, 2)),
)


def default_memory_gb() -> float:
    """`MEMORY_SHARE` of this machine's memory, or of the container's limit where that is lower (cgroup)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as handle:
                total = min(total, int(handle.read().strip()))
            break
        except (OSError, ValueError):  # no such cgroup file, or "max" (no limit)
            continue
    return round(MEMORY_SHARE * total / 1e9, 1)


@dataclass(frozen=True, kw_only=True)
class InferenceParams:
    """Network-input preparation and tiling of the U-Net pass."""
    network_voxel_size_a: float = NETWORK_VOXEL_SIZE_A
    gaussian_sigma_vox: float = 1.0  # network voxels; 0 = off
    resampling: str = "fourier"  # to the network grid: "fourier" (band-limited) or "linear" (method.md §2.2)
    tta: int = 1  # 1, 4 (identity + flips x, y, z) or 8 (method.md §2.7)
    memory_gb: float = field(default_factory=default_memory_gb)  # budget for the network's windows in flight
    border_vox: int = 4  # reflected margin beyond every face of the volume; 0 = the network's zero padding alone
    #                      (at faces that cut vesicles CryoVesNet's weights need it, the bundled model does
    #                      better without: its config.json says 0; benchmarks/BORDERS.md)
    halo_vox: int = 24  # network voxels a window keeps beyond a cut between windows (the receptive field)
    tile_vox: int | None = None  # at most this many voxels per window along each axis between cuts (multiple
    #                              of 4); None = the tiling of fewest network voxels that fits memory_gb
    precision: str = field(default_factory=default_precision)  # the network's arithmetic on the CPU, which
    #                              `load_logit_fn` takes from here: "float32", or "bfloat16" (the default where
    #                              the CPU has it; the GPU port runs float16)

    def __post_init__(self) -> None:
        if not self.network_voxel_size_a > 0:
            raise CryovesError(f"network_voxel_size_a must be > 0 Å, got {self.network_voxel_size_a}")
        if self.gaussian_sigma_vox < 0:
            raise CryovesError(f"gaussian_sigma_vox must be >= 0 voxels, got {self.gaussian_sigma_vox}")
        if self.resampling not in RESAMPLERS:
            raise CryovesError(f"resampling must be one of {', '.join(RESAMPLERS)}, got {self.resampling!r}")
        if self.tta not in (1, 4, 8):
            raise CryovesError(f"tta must be 1, 4 or 8, got {self.tta}")
        if not self.memory_gb > 0:
            raise CryovesError(f"memory_gb must be > 0 GB, got {self.memory_gb}")
        if self.border_vox < 0:
            raise CryovesError(f"border_vox must be >= 0 voxels, got {self.border_vox}")
        if self.halo_vox < RECEPTIVE_HALF_WIDTH_VOX or self.halo_vox % GRID_VOX:
            raise CryovesError(
                f"halo_vox must be a multiple of {GRID_VOX} and >= {RECEPTIVE_HALF_WIDTH_VOX} voxels "
                f"(the receptive field), got {self.halo_vox}"
            )
        if self.precision not in PRECISIONS:
            raise CryovesError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tile_vox is not None and (self.tile_vox < GRID_VOX or self.tile_vox % GRID_VOX):
            raise CryovesError(f"tile_vox must be a positive multiple of {GRID_VOX} voxels, got {self.tile_vox}")


@dataclass(frozen=True)
class Tile:
    """One window: `read` indexes the volume extended by the border (see `read_tile`), `crop` the part of
    the network output that is kept, `write` where it goes in the output volume."""
    read: tuple[slice, slice, slice]
    crop: tuple[slice, slice, slice]
    write: tuple[slice, slice, slice]


@dataclass(frozen=True)
class TilePlan:
    """Windows of one shape, how many run per network call, and the redundant-compute factor."""
    tiles: list[Tile]
    window_shape: tuple[int, int, int]
    batch_size: int
    redundancy: float  # voxels the network computes / output voxels


def _ceil_grid(n: int) -> int:
    return -(-n // GRID_VOX) * GRID_VOX


def _extended(n: int, border: int) -> int:
    """Length of an axis of n voxels extended by `border` on both sides and to the pooling grid."""
    return _ceil_grid(n + 2 * border)


def _window_width(extended: int, count: int, halo: int) -> int:
    """Width of each of `count` windows covering `extended` voxels, consecutive ones overlapping by 2·halo."""
    if count == 1:
        return extended
    return min(extended, _ceil_grid(-(-(extended + 2 * halo * (count - 1)) // count)))


def _axis_tiles(n: int, count: int, halo: int, border: int) -> list[tuple[slice, slice, slice]]:
    """(read, crop, write) along one axis: `count` equal windows from the first to the last extended voxel,
    each keeping what lies at least `halo` from its edges inside the volume, or at a face of the extended volume."""
    end = _extended(n, border)
    width = _window_width(end, count, halo)
    out, written = [], 0
    for j in range(count):
        origin = min(j * (width - 2 * halo), end - width)
        keep_stop = origin + width - halo if origin + width < end else end
        stop = min(keep_stop - border, n)
        if stop <= written:
            continue
        start = written
        assert j == 0 or start + border >= origin + halo, "windows too far apart"
        out.append((slice(origin, origin + width), slice(start + border - origin, stop + border - origin),
                    slice(start, stop)))
        written = stop
    assert written == n, (n, count, halo, border)
    return out


def plan_tiles(shape: tuple[int, int, int], counts: tuple[int, int, int], halo: int, border: int) -> list[Tile]:
    """`counts` windows per axis covering `shape` exactly once, all of one shape, origins on the pooling grid."""
    if len(shape) != 3 or len(counts) != 3:
        raise ValueError(f"shape and counts must be (z, y, x), got {shape} and {counts}")
    if halo % GRID_VOX or halo < 0 or border < 0 or min(counts) < 1:
        raise ValueError(f"halo {halo} must be a multiple of {GRID_VOX}, border {border} >= 0, counts {counts} >= 1")
    per_axis = [_axis_tiles(n, k, halo, border) for n, k in zip(shape, counts)]
    return [Tile(read=(az[0], ay[0], ax[0]), crop=(az[1], ay[1], ax[1]), write=(az[2], ay[2], ax[2]))
            for az in per_axis[0] for ay in per_axis[1] for ax in per_axis[2]]


def window_bytes(window_shape: tuple[int, int, int], tta: int = 1) -> float:
    """Memory of one window in the network: per voxel, and what the streamed network holds for the window
    as it sees it (the rotations of 8-fold TTA stream it along y and x as well as z)."""
    z, y, x = window_shape
    seen = [(z, y, x), (y, z, x), (x, y, z)] if tta == 8 else [(z, y, x)]
    return WINDOW_BYTES_PER_VOXEL * z * y * x + max(streamed_bytes(shape) for shape in seen)


def _fewest_voxels(ends: list[int], halo: int, budget: float, tta: int) -> tuple[int, int, int]:
    """Windows per axis that compute the fewest voxels with one window within `budget` bytes (the finest
    tiling if none is)."""
    def counts(end: int) -> range:  # more windows than this would not shrink them
        most = 1
        while most < MAX_WINDOWS_PER_AXIS and _window_width(end, most + 1, halo) < _window_width(end, most, halo):
            most += 1
        return range(1, most + 1)

    best, finest = None, None
    for kz in counts(ends[0]):
        for ky in counts(ends[1]):
            for kx in counts(ends[2]):
                k = (kz, ky, kx)
                widths = tuple(_window_width(e, c, halo) for e, c in zip(ends, k))
                finest = k
                if window_bytes(widths, tta) <= budget:
                    cost = (prod(c * w for c, w in zip(k, widths)), prod(k))
                    if best is None or cost < best[0]:
                        best = (cost, k)
                    break  # more windows along x only cost more
    return finest if best is None else best[1]


def plan_inference(shape: tuple[int, int, int], params: InferenceParams) -> TilePlan:
    """Tiling of a network-grid volume: at most `params.tile_vox` voxels per window along each axis, or the
    fewest network voxels with one window within `params.memory_gb`; windows batched up to the same budget."""
    halo, border = params.halo_vox, params.border_vox
    ends = [_extended(n, border) for n in shape]
    budget = params.memory_gb * 1e9
    if params.tile_vox is not None:
        counts = tuple(max(1, -(-(e - 2 * halo) // params.tile_vox)) if e > params.tile_vox else 1 for e in ends)
    else:
        counts = _fewest_voxels(ends, halo, budget, params.tta)
    counts = tuple(c if _window_width(e, c, halo) < e else 1 for e, c in zip(ends, counts))
    tiles = plan_tiles(shape, counts, halo, border)
    window_shape = tuple(_window_width(e, c, halo) for e, c in zip(ends, counts))
    batch_size = int(max(1, min(len(tiles), budget // window_bytes(window_shape, params.tta))))
    redundancy = len(tiles) * prod(window_shape) / prod(shape)
    return TilePlan(tiles=tiles, window_shape=window_shape, batch_size=batch_size, redundancy=redundancy)


def _reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices into an axis of length n for positions [start, stop) of its half-sample-symmetric extension."""
    i = np.mod(np.arange(start, stop), 2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def read_tile(volume: np.ndarray, tile: Tile, border: int, out: np.ndarray | None = None) -> np.ndarray:
    """The tile's window, taken from `volume` extended by `border` voxels (reflect) without padding it all."""
    index = np.ix_(*(_reflect_indices(s.start - border, s.stop - border, n) for s, n in zip(tile.read, volume.shape)))
    if out is None:
        return volume[index]
    out[...] = volume[index]
    return out


def _forward(batch: np.ndarray, transform: tuple, logit_fn: LogitFn) -> np.ndarray:
    kind = transform[0]
    if kind == "identity":
        return logit_fn(batch)
    if kind == "flip":
        return np.flip(logit_fn(np.flip(batch, transform[1])), transform[1])
    if kind == "rot90":
        return np.rot90(logit_fn(np.rot90(batch, 1, transform[1])), -1, transform[1])
    axis, plane = transform[1], transform[2]
    return np.flip(np.rot90(logit_fn(np.rot90(np.flip(batch, axis), 1, plane)), -1, plane), axis)


def predict_batch(volume: np.ndarray, plan: TilePlan, first: int, logit_fn: LogitFn,
                  params: InferenceParams) -> list[np.ndarray]:
    """Probabilities of the kept cores of the batch of tiles that starts at tile `first`.

    TTA outputs are averaged in logit space, then passed through the sigmoid. The Ray scheduler
    sends such batches of one tomogram to several actors; `predict_tiled` runs them in turn.
    """
    tiles = plan.tiles[first:first + plan.batch_size]
    batch = np.empty((len(tiles), *plan.window_shape), dtype=np.float32)
    for b, tile in enumerate(tiles):
        read_tile(volume, tile, params.border_vox, out=batch[b])
    transforms = _TTA[:params.tta]
    logits = np.asarray(_forward(batch, transforms[0], logit_fn), dtype=np.float32)
    for transform in transforms[1:]:
        logits += _forward(batch, transform, logit_fn)
    if len(transforms) > 1:
        logits /= len(transforms)
    return [expit(logits[b][tile.crop], out=logits[b][tile.crop]) for b, tile in enumerate(tiles)]


def predict_tiled(volume: np.ndarray, logit_fn: LogitFn, params: InferenceParams,
                  progress: Progress | None = None) -> np.ndarray:
    """Probability map of a z-scored network-grid volume, batch by batch, into one float32 array."""
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.shape}")
    plan = plan_inference(volume.shape, params)
    output = np.empty(volume.shape, dtype=np.float32)
    n_tiles = len(plan.tiles)
    for first in range(0, n_tiles, plan.batch_size):
        tiles = plan.tiles[first:first + plan.batch_size]
        for tile, probability in zip(tiles, predict_batch(volume, plan, first, logit_fn, params)):
            output[tile.write] = probability
        if progress is not None:
            progress(first + len(tiles), n_tiles)
    return output


def prepare_network_input(tomogram: np.ndarray, voxel_size_a: float, params: InferenceParams) -> np.ndarray:
    """Resample to the network voxel size, Gaussian pre-filter, z-score: a new float32 array."""
    if tomogram.ndim != 3:
        raise CryovesError(f"tomogram must be 3-D (z, y, x), got shape {tomogram.shape}")
    shape = network_shape(tomogram.shape, voxel_size_a, params.network_voxel_size_a)
    net = RESAMPLERS[params.resampling](tomogram, shape, params.gaussian_sigma_vox)
    if np.shares_memory(net, tomogram):
        net = net.copy()
    return zscore(net, inplace=True)


def predict_probability(tomogram: np.ndarray, voxel_size_a: float, logit_fn: LogitFn,
                        params: InferenceParams, progress: Progress | None = None) -> np.ndarray:
    """Vesicle probability (float32, network grid) of a tomogram with voxels of `voxel_size_a` Å.

    `logit_fn` comes from `cryoves.engine.network.model.load_logit_fn(weights)`.
    """
    return predict_tiled(prepare_network_input(tomogram, voxel_size_a, params), logit_fn, params, progress)


def probability_on_input_grid(prob_net: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The network-grid probability resampled to the tomogram's exact shape (float32, method.md §2.8)."""
    prob = resample_to_shape(prob_net, shape)
    if np.shares_memory(prob, prob_net):
        return prob.copy()
    return np.clip(prob, 0.0, 1.0, out=prob)
