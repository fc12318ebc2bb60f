"""Numba kernels for the hot loops, each beside a slow NumPy reference that tests compare against."""

import os
import tempfile

from numba.core import caching, config


def _cache_locatable() -> bool:
    """Whether Numba finds a writable place for this folder's kernel caches (numba.core.caching's rules)."""
    if config.CACHE_LOCATOR_CLASSES:
        return True  # the user chose the locators
    source = os.path.join(os.path.dirname(__file__), "shell.py")
    locators = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)
    return any(locator.from_function(_cache_locatable, source) is not None for locator in locators)


if not _cache_locatable():
    # A read-only install and home: cache in a temporary folder instead of failing at import. Child
    # processes (Ray workers) read the same folder from the environment.
    config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"cryoves-numba-{os.getuid()}")
    os.environ["NUMBA_CACHE_DIR"] = config.CACHE_DIR
