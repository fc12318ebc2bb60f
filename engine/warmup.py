"""Compile the Numba kernels of the post-processing in a child process while this one loads TensorFlow and
runs the network, so that the first tomogram after an install does not wait for them (about 10-15 s of one
core, once per machine: Numba caches them on disk, and later processes load them in about a second)."""

import functools
import hashlib
import importlib
import platform
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SHAPE = (40, 64, 80)
_CENTRES = ((20.0, 16.0, 16.0), (20.0, 44.0, 20.0),
            (20.0, 20.0, 50.0), (20.0, 29.0, 59.0),   # a touching pair that a raised threshold splits
            (20.0, 44.0, 50.0), (20.0, 53.0, 59.0))   # one that only the neck cut splits: P = 1 through it
_RADIUS_VOX = 8.0  # 17.6 nm at 22 Å: every vesicle passes every stage
_WAIT_S = 600.0
FINISH_IMPORTS = ("scipy.stats", "imodmodel.models")
"""Modules the steps after the network import where they first need them (together about 1 s)."""


def import_in_background(modules=FINISH_IMPORTS) -> threading.Thread:
    """Import `modules` on a daemon thread while this process runs the network, which releases the GIL, so that
    the steps after it do not wait for the imports."""
    thread = threading.Thread(target=lambda: [importlib.import_module(name) for name in modules], daemon=True,
                              name="cryoves-imports")
    thread.start()
    return thread


def warm_kernels() -> None:
    """Resample a probability map to the input grid and run every stage after the network once on small
    synthetic vesicles, two pairs of them touching (both ways of the split step): each kernel is compiled
    (or loaded from Numba's cache) for the types a tomogram brings (float32 tomogram and map)."""
    from cryoves.engine.network.inference import probability_on_input_grid
    from cryoves.engine.pipeline import SegmentParams, postprocess

    grid = np.indices(_SHAPE, dtype=np.float32)
    distances = [np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) for centre in _CENTRES]
    distance = np.min(distances, axis=0)
    tomogram = -np.exp(-0.5 * (distance - _RADIUS_VOX) ** 2).astype(np.float32)  # dark membranes
    tomogram += np.random.default_rng(0).normal(0.0, 0.05, _SHAPE).astype(np.float32)
    probability = (1.0 / (1.0 + np.exp(distance - _RADIUS_VOX))).astype(np.float32)
    probability[np.min(distances[4:], axis=0) < _RADIUS_VOX] = 1.0
    probability = probability_on_input_grid(np.ascontiguousarray(probability[::2, ::2, ::2]), _SHAPE)
    postprocess(tomogram, probability, 22.0, SegmentParams(), keep_stages=False)


def warm_marker() -> Path | None:
    """The file a finished warm-up leaves in the kernels' Numba cache folder, named for what makes Numba
    recompile (its version, the CPU, the kernels' sources); None where Numba's cache folder is not ours to know."""
    import llvmlite.binding
    import numba

    from cryoves import kernels

    folder = kernels.cache_dir()
    if folder is None:
        return None
    sources = sorted(Path(kernels.__file__).parent.glob("*.py"))
    stamp = [numba.__version__, platform.machine(), llvmlite.binding.get_host_cpu_name()]
    stamp += [f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in sources]
    return Path(folder) / f"cryoves-warm-{hashlib.sha256('|'.join(stamp).encode()).hexdigest()[:16]}"


@dataclass(eq=False)
class KernelWarmup:
    """The child process compiling the kernels, or None when Numba's cache already holds them."""

    process: subprocess.Popen | None

    def join(self) -> None:
        """Wait for the kernels to be in Numba's cache (at most _WAIT_S; past that this process compiles
        what it needs itself)."""
        if self.process is not None:
            try:
                self.process.wait(_WAIT_S)
            except subprocess.TimeoutExpired:
                pass


@functools.cache
def start_kernel_warmup() -> KernelWarmup:
    """Start `warm_kernels` in a child process, once per process and only while the cache is cold; `join`
    it before the first stage after the network."""
    marker = warm_marker()
    if marker is None or marker.exists():
        return KernelWarmup(None)
    return KernelWarmup(subprocess.Popen([sys.executable, "-m", "cryoves.engine.warmup"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


if __name__ == "__main__":
    warm_kernels()
    marker = warm_marker()
    if marker is not None:
        marker.touch()
