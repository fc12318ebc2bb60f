"""Numba kernels for the hot loops, each beside a slow NumPy reference that tests compare against."""
