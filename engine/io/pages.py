"""The resident pages of a memory-mapped tomogram: mapped files count in a process's resident memory for as long as
their pages stay mapped, so the steps that read a whole tomogram give them back, and the steps that read small boxes
of it read them from the file (`read_box`)."""

import mmap
from dataclasses import dataclass

import numpy as np

__all__ = ["MappedFile", "is_mapped", "mapped_file", "read_box", "release_pages"]


@dataclass(frozen=True)
class MappedFile:
    """Where a read-only memory-mapped volume lies in its file: what another process needs to map it again (`open`)
    instead of being sent its data."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def open(self) -> np.ndarray:
        return np.memmap(self.path, np.dtype(self.dtype), "r", self.offset, self.shape)


def mapped_file(data: np.ndarray) -> MappedFile | None:
    """`data`'s place in its file when it is a 3-D C-ordered view of a read-only memory-mapped file, else None."""
    region = _file_region(data)
    return None if region is None else MappedFile(region[0], region[1], tuple(data.shape), data.dtype.str)


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


def read_box(data: np.ndarray, box: tuple[slice, slice, slice], scratch: np.ndarray | None = None) -> np.ndarray:
    """`data[box]` (3-D, unit steps) as a new array. A C-ordered read-only memory-mapped volume is read with the
    file's reads, whole rows of each section of the box, not through the map: a page fault maps a whole block of
    the operating system's cache (measured: about 1 MB, a section of a 512x512 float32 tomogram, per fault), so
    reading around one vesicle through the map made 40-65 MB of it resident.

    `scratch` (bytes, at least the box's whole rows) is read into instead of new memory, and the result views it:
    a reader of a whole tomogram by parts reuses one buffer (new memory is dear to touch: 2.2-2.6 s per GB on a
    virtual machine whose host takes freed memory back, 1.1 GB per 1024x1024x261 tomogram)."""
    region = _file_region(data)
    if region is None:
        return np.array(data[box])
    path, offset = region
    (z0, z1, _), (y0, y1, _), (x0, x1, _) = (s.indices(n) for s, n in zip(box, data.shape))
    _, ny, nx = data.shape
    shape = (max(z1 - z0, 0), max(y1 - y0, 0), nx)
    if scratch is None:
        rows = np.empty(shape, data.dtype)
    else:
        rows = scratch[:int(np.prod(shape)) * data.itemsize].view(data.dtype).reshape(shape)
    with open(path, "rb") as handle:
        for section, z in zip(rows, range(z0, z1)):
            handle.seek(offset + (z * ny + y0) * nx * data.itemsize)
            if handle.readinto(memoryview(section).cast("B")) != section.nbytes:
                raise OSError(f"{path}: ended before section {z} of its mapped volume (was it truncated?)")
    if (x0, x1) == (0, nx):
        return rows
    return rows[:, :, x0:x1] if scratch is not None else np.array(rows[:, :, x0:x1])


def _memmap(data: np.ndarray) -> np.memmap | None:
    """The read-only `np.memmap` made on the file's map that `data` views, if any (its slices are memmaps too, with
    the same `offset` but not at it)."""
    base = data
    while base is not None and not (isinstance(base, np.memmap) and isinstance(base.base, mmap.mmap)):
        base = getattr(base, "base", None)
    return base if base is not None and base.mode == "r" else None


def _mapping(data: np.ndarray) -> mmap.mmap | None:
    base = _memmap(data)
    return base._mmap if base is not None and hasattr(mmap, "MADV_DONTNEED") else None


def _file_region(data: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of data[0, 0, 0]) of a 3-D C-ordered view of a read-only memory-mapped file; None for
    anything else, read through the array."""
    base = _memmap(data)
    if base is None or data.ndim != 3 or not data.flags.c_contiguous or not getattr(base, "filename", None):
        return None
    return base.filename, base.offset + data.ctypes.data - base.ctypes.data
