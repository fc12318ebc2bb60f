"""How many threads a parallel kernel call gets: every numba thread for large inputs, one for small ones."""

from contextlib import contextmanager

import numba

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
