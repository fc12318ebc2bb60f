"""Atomic output: write to a temporary file beside the target, rename into place on success.

A crash or Ctrl-C therefore never leaves a file that looks complete, which is what lets a resumed
run trust every output it finds. A write that fails (full disk, read-only folder) is a user error
naming the file; a process killed mid-write leaves its temporary file, which `remove_stale_parts`
removes when the same file is written again.
"""

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cryoves.engine.errors import CryovesError

_PART_SUFFIX = ".part"


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    An OSError while creating, writing or renaming it becomes a CryovesError that names `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PART_SUFFIX, dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_parts(path) -> list[Path]:
    """Remove the temporary files that interrupted `atomic_output(path)` calls left beside `path`
    (a process killed mid-write cannot remove its own); returns them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+{re.escape(_PART_SUFFIX)}")
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    for part in stale:
        part.unlink(missing_ok=True)
    return stale


def _write_error(path: Path, error: OSError) -> CryovesError:
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        return CryovesError(f"{path}: cannot be written: {existing} is a file, not a folder")
    reason = error.strerror or str(error)
    return CryovesError(f"{path}: cannot be written ({reason}); check the free space and permissions of "
                        f"{path.parent}")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
