"""Tiled U-Net inference: tomogram → vesicle probability map (method.md §2.2-2.8).

The network is fully convolutional, so the map must not depend on how the volume is cut. Each
tile's core is extended by a halo at least as wide as the receptive field (23 network voxels on the
widest side for this U-Net), tile origins and sizes sit on the 4-voxel pooling grid, and the
volume border is defined once, by half-sample-symmetric (scipy "reflect") extension of the whole
volume. Under these rules every tiling gives the map of one whole-volume pass.
"""

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import numpy as np
from scipy.special import expit

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.model import POOLING_FACTOR, LogitFn
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
"""Tile origins and sizes lie on the network's pooling grid."""
RECEPTIVE_HALF_WIDTH_VOX = 23
BYTES_PER_WINDOW_VOXEL = 500
"""Peak memory per voxel of a tile window in the network (TensorFlow on CPU: ~350 B measured)."""

RESAMPLERS = {"fourier": resample_band_limited, "linear": resample_to_shape}

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


@dataclass(frozen=True, kw_only=True)
class InferenceParams:
    """Network-input preparation and tiling of the U-Net pass."""
    network_voxel_size_a: float = NETWORK_VOXEL_SIZE_A
    gaussian_sigma_vox: float = 1.0  # network voxels; 0 = off
    resampling: str = "fourier"  # to the network grid: "fourier" (band-limited) or "linear" (method.md §2.2)
    tta: int = 1  # 1, 4 (identity + flips x, y, z) or 8 (method.md §2.7)
    memory_gb: float = 4.0  # budget for one batch of tiles in the network
    halo_vox: int = 24  # network voxels on each side of a tile core
    tile_vox: int | None = None  # tile core edge, multiple of 4; None = largest that fits memory_gb

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
        if self.halo_vox < RECEPTIVE_HALF_WIDTH_VOX or self.halo_vox % GRID_VOX:
            raise CryovesError(
                f"halo_vox must be a multiple of {GRID_VOX} and >= {RECEPTIVE_HALF_WIDTH_VOX} voxels "
                f"(the receptive field), got {self.halo_vox}"
            )
        if self.tile_vox is not None and (self.tile_vox < GRID_VOX or self.tile_vox % GRID_VOX):
            raise CryovesError(f"tile_vox must be a positive multiple of {GRID_VOX} voxels, got {self.tile_vox}")


@dataclass(frozen=True)
class Tile:
    """One tile: `read` indexes the volume extended by `halo` voxels on every side (see `read_tile`),
    `crop` the part of the network output that is kept, `write` where it goes in the output volume."""
    read: tuple[slice, slice, slice]
    crop: tuple[slice, slice, slice]
    write: tuple[slice, slice, slice]


@dataclass(frozen=True)
class TilePlan:
    """Tiles of one shape, how many run per network call, and the redundant-compute factor."""
    tiles: list[Tile]
    window_shape: tuple[int, int, int]
    batch_size: int
    redundancy: float  # voxels the network computes / output voxels


def _ceil_grid(n: int) -> int:
    return -(-n // GRID_VOX) * GRID_VOX


def _axis_tiles(n: int, core: int, halo: int) -> list[tuple[slice, slice, slice]]:
    """(read, crop, write) along one axis; equal windows, the last one shifted back to end at the grid end."""
    end = _ceil_grid(n)
    core = min(core, end)
    origins = list(range(0, end - core, core)) + [end - core]
    out = []
    written = 0
    for origin in origins:
        stop = min(origin + core, n)
        if stop <= written:
            continue
        out.append((slice(origin, origin + core + 2 * halo),
                    slice(halo + written - origin, halo + stop - origin),
                    slice(written, stop)))
        written = stop
    return out


def plan_tiles(shape: tuple[int, int, int], tile: int | tuple[int, int, int], halo: int) -> list[Tile]:
    """Tiles with cores of `tile` voxels (clipped to the volume) covering `shape` exactly once.

    Windows are core + 2·halo, all of the same shape; cores start on the 4-voxel grid.
    """
    tile = (tile,) * 3 if isinstance(tile, int) else tuple(tile)
    if len(shape) != 3:
        raise ValueError(f"shape must be (z, y, x), got {shape}")
    if any(t % GRID_VOX or t <= 0 for t in tile) or halo % GRID_VOX or halo < 0:
        raise ValueError(f"tile {tile} and halo {halo} must be multiples of {GRID_VOX}")
    per_axis = [_axis_tiles(n, t, halo) for n, t in zip(shape, tile)]
    return [Tile(read=(az[0], ay[0], ax[0]), crop=(az[1], ay[1], ax[1]), write=(az[2], ay[2], ax[2]))
            for az in per_axis[0] for ay in per_axis[1] for ax in per_axis[2]]


def plan_inference(shape: tuple[int, int, int], params: InferenceParams) -> TilePlan:
    """Tiling of a network-grid volume: `params.tile_vox`, or the largest cubic core whose window fits
    `params.memory_gb`, then shrunk per axis to split that axis evenly (less recomputed overlap).
    Small tiles are batched up to the same budget."""
    halo = params.halo_vox
    budget_voxels = params.memory_gb * 1e9 / BYTES_PER_WINDOW_VOXEL
    ends = [_ceil_grid(n) for n in shape]
    if params.tile_vox is not None:
        cores = tuple(min(params.tile_vox, e) for e in ends)
    else:
        core = GRID_VOX
        while core < max(ends) and prod(min(core + GRID_VOX, e) + 2 * halo for e in ends) <= budget_voxels:
            core += GRID_VOX
        cores = tuple(_ceil_grid(-(-e // -(-e // core))) for e in ends)
    tiles = plan_tiles(shape, cores, halo)
    window_shape = tuple(c + 2 * halo for c in cores)
    batch_size = int(max(1, min(len(tiles), budget_voxels // prod(window_shape))))
    redundancy = len(tiles) * prod(window_shape) / prod(shape)
    return TilePlan(tiles=tiles, window_shape=window_shape, batch_size=batch_size, redundancy=redundancy)


def _reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices into an axis of length n for positions [start, stop) of its half-sample-symmetric extension."""
    i = np.mod(np.arange(start, stop), 2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def read_tile(volume: np.ndarray, tile: Tile, halo: int, out: np.ndarray | None = None) -> np.ndarray:
    """The tile's window, taken from `volume` extended by `halo` voxels (reflect) without padding it all."""
    index = np.ix_(*(_reflect_indices(s.start - halo, s.stop - halo, n) for s, n in zip(tile.read, volume.shape)))
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
        read_tile(volume, tile, params.halo_vox, out=batch[b])
    transforms = _TTA[:params.tta]
    logits = np.array(_forward(batch, transforms[0], logit_fn), dtype=np.float32)
    for transform in transforms[1:]:
        logits += _forward(batch, transform, logit_fn)
    if len(transforms) > 1:
        logits /= len(transforms)
    return [expit(logits[b][tile.crop]) for b, tile in enumerate(tiles)]


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
    net = RESAMPLERS[params.resampling](tomogram, shape)
    net = gaussian_prefilter(net, params.gaussian_sigma_vox)
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
