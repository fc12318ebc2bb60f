"""How many threads a parallel kernel call gets (every numba thread for large inputs, one for small ones), and
the thread pool that runs serial kernels over parts of their work (`parallel_over`).

A Numba kernel parallelised with `prange` compiles in about five times the time of the same loop run serially
(2.6 against 0.5 s for the radial profiles), and every kernel compiles on a machine's first run. The resize
passes are therefore serial `nogil` kernels that `parallel_over` runs on `numba.get_num_threads()` threads: as
fast as their `prange` versions. The per-vesicle kernels (radial profiles, boxes, back-projection, rendering)
and the shell sums keep `prange`: their serial versions ran up to twice as long per thread (back-projection of
50 boxes of 33³ on one thread: 4.5 against 2.0 ms), which costs more over a batch than their compile once.
"""

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import numba
import numpy as np

PARALLEL_MIN_VOXELS = 1 << 20
"""Calls touching fewer voxels than this run on one thread."""


@contextmanager
def threads_for(n_voxels: int):
    """Run small calls on one thread: a parallel launch costs more than it saves there, and on a
    busy machine (OpenMP layer, more threads than free cores) it can cost milliseconds."""
    previous = numba.get_num_threads()
    numba.set_num_threads(previous if n_voxels >= PARALLEL_MIN_VOXELS else 1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


FFT_VOXELS_PER_THREAD = 1 << 18
"""Voxels per thread of a scipy.fft call over a stack (refine's batches): 1 MB float32 stacks stay in glibc's heap,
where refine's former 16 MB ones were fresh pages each batch (0.7 against 0.15-0.25 GB of fresh memory for the
1024x1024x261 tomogram, 5.8 against 5.3 s of one core)."""


def fft_workers(n_voxels: int) -> int:
    """Threads for a scipy.fft call over `n_voxels`: one per `FFT_VOXELS_PER_THREAD`, at most the kernels' count, so
    that one setting (numba's thread count) bounds every thread cryoves starts (`workers=-1` took every core)."""
    return max(1, min(numba.get_num_threads(), n_voxels // FFT_VOXELS_PER_THREAD))


def fft_batch_voxels() -> int:
    """Voxels per batch of a stack transformed together: `FFT_VOXELS_PER_THREAD` for each of the kernels' threads."""
    return FFT_VOXELS_PER_THREAD * numba.get_num_threads()


_POOLS: dict[int, ThreadPoolExecutor] = {}
"""One pool per thread count, so that a call never runs on more threads than it was given."""


def parallel_over(kernel, n: int, *args) -> None:
    """``kernel(*args, start, stop)`` (a serial nogil kernel) over contiguous parts of range(n), a few per thread
    so that uneven parts balance, on `numba.get_num_threads()` threads (in this thread when that is 1); errors
    are raised here."""
    n_threads = numba.get_num_threads()
    n_parts = max(1, min(int(n), 4 * n_threads))
    bounds = np.arange(n_parts + 1) * int(n) // n_parts
    parts = [partial(kernel, *args, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if n_threads == 1 or len(parts) == 1:
        for part in parts:
            part()
        return
    if n_threads not in _POOLS:
        _POOLS[n_threads] = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="cryoves-kernel")
    for future in [_POOLS[n_threads].submit(part) for part in parts]:
        future.result()
