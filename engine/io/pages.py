"""The resident pages of a memory-mapped tomogram: mapped files count in a process's resident memory for as long as
their pages stay mapped, so the steps that read a whole tomogram give them back."""

import mmap

import numpy as np

__all__ = ["is_mapped", "release_pages"]


def is_mapped(data: np.ndarray) -> bool:
    """Whether `data` is (a view of) a read-only memory-mapped file, whose pages `release_pages` can release."""
    return _mapping(data) is not None


def release_pages(data: np.ndarray) -> None:
    """Take the pages of a read-only memory-mapped volume (`read_volume`) out of this process's resident memory
    after steps that read all of it, for the steps after them that read parts. The file stays mapped and the
    operating system's cache keeps the pages, so a later read maps them back without the disk; arrays in
    memory (and copy-on-write maps) are left alone."""
    mapped = _mapping(data)
    if mapped is not None:
        mapped.madvise(mmap.MADV_DONTNEED)


def _mapping(data: np.ndarray) -> mmap.mmap | None:
    base = data
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapped = getattr(base, "_mmap", None)
    return mapped if mapped is not None and base.mode == "r" and hasattr(mmap, "MADV_DONTNEED") else None
