"""Numba kernels for the hot loops, each beside a slow NumPy reference that tests compare against."""

import os
import tempfile

from numba.core import caching, config

_LOCATORS = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)


def cache_dir() -> str | None:
    """The folder where Numba caches these kernels, by its own rules (NUMBA_CACHE_DIR, beside the sources,
    the user cache); None where none is writable or the user chose other locators."""
    if config.CACHE_LOCATOR_CLASSES:
        return None
    source = os.path.join(os.path.dirname(__file__), "shell.py")
    for locator in _LOCATORS:
        found = locator.from_function(cache_dir, source)
        if found is not None:
            return found.get_cache_path()
    return None


if not config.CACHE_LOCATOR_CLASSES and cache_dir() is None:
    # A read-only install and home: cache in a temporary folder instead of failing at import. Child
    # processes (Ray workers) read the same folder from the environment.
    config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"cryoves-numba-{os.getuid()}")
    os.environ["NUMBA_CACHE_DIR"] = config.CACHE_DIR
