"""Compile the post-processing's Numba kernels while the network runs, so that the first tomogram after an
install does not wait for them (about 10 s of compilation on 2 cores; later processes load Numba's cache)."""

import functools
import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

_SHAPE = (40, 64, 80)
_CENTRES = ((20.0, 16.0, 16.0), (20.0, 44.0, 20.0),
            (20.0, 20.0, 50.0), (20.0, 29.0, 59.0),   # a touching pair that a raised threshold splits
            (20.0, 44.0, 50.0), (20.0, 53.0, 59.0))   # one that only the neck cut splits: P = 1 through it
_RADIUS_VOX = 8.0  # 17.6 nm at 22 Å: every vesicle passes every stage


def warm_kernels() -> None:
    """Resample a probability map to the input grid and run every stage after the network once on small
    synthetic vesicles, two pairs of them touching (both ways of the split step): each kernel is compiled
    (or loaded from Numba's cache) for the types a tomogram brings (float32 tomogram and map)."""
    from cryoves.engine.network.inference import probability_on_input_grid
    from cryoves.engine.pipeline import SegmentParams, postprocess

    grid = np.indices(_SHAPE, dtype=np.float32)
    distances = [np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) for centre in _CENTRES]
    distance = np.min(distances, axis=0)
    tomogram = -np.exp(-0.5 * (distance - _RADIUS_VOX) ** 2).astype(np.float32)  # dark membranes
    tomogram += np.random.default_rng(0).normal(0.0, 0.05, _SHAPE).astype(np.float32)
    probability = (1.0 / (1.0 + np.exp(distance - _RADIUS_VOX))).astype(np.float32)
    probability[np.min(distances[4:], axis=0) < _RADIUS_VOX] = 1.0
    probability = probability_on_input_grid(np.ascontiguousarray(probability[::2, ::2, ::2]), _SHAPE)
    postprocess(tomogram, probability, 22.0, SegmentParams(), keep_stages=False)


def _warm_quietly() -> None:
    try:
        warm_kernels()
    except Exception as error:  # noqa: BLE001 - only a head start: the real run compiles what is missing
        log.debug(f"kernel warm-up failed: {error}")


@functools.cache
def start_kernel_warmup() -> threading.Thread:
    """Start `warm_kernels` in a background thread, once per process; join it before the first stage after
    the network. The network releases the GIL, so compilation overlaps it."""
    thread = threading.Thread(target=_warm_quietly, name="cryoves-kernel-warmup", daemon=True)
    thread.start()
    return thread
