"""SHA-256 of files, read once in chunks that a caller may also look at (the tomogram's check of every voxel)."""

import hashlib
from collections.abc import Callable

CHUNK_BYTES = 1 << 24
"""Bytes per chunk: a multiple of every voxel size, so that chunks split no voxel of data that starts on one."""


def file_sha256(path, each_chunk: Callable[[int, memoryview], None] | None = None) -> str:
    """SHA-256 of a file, read into one buffer (a new 16 MB object per chunk is fresh memory each time), each chunk
    also given to `each_chunk(file offset, bytes)`: every chunk but the last is CHUNK_BYTES long."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    offset = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            filled = 0
            while filled < CHUNK_BYTES and (n := handle.readinto(view[filled:])):
                filled += n
            if not filled:
                return digest.hexdigest()
            digest.update(view[:filled])
            if each_chunk is not None:
                each_chunk(offset, view[:filled])
            offset += filled
