"""One array type per dtype at the kernel boundary."""

import numpy as np


def readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view (no copy) of an input: Numba compiles a kernel once per argument type, and
    writable and read-only arrays (a memory-mapped MRC, a pyarrow column) are different types."""
    view = array.view()
    view.flags.writeable = False
    return view
