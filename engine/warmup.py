"""Compile the Numba kernels of the post-processing into Numba's cache in child processes: at install
(`cryoves warmup`, the README's install line), or, where that was skipped, while the first `segment` loads
TensorFlow and runs the network, so that the first tomogram waits for as little of them as the cores allow
(about 12-17 s of one core, once per machine: later processes load them in 1-2 s). Two children share the
kernels (`PARTS`), so that they compile on two cores."""

import functools
import hashlib
import importlib
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SHAPE = (40, 64, 80)
_CENTRES = ((20.0, 16.0, 16.0), (20.0, 44.0, 20.0),
            (20.0, 20.0, 50.0), (20.0, 29.0, 59.0),   # a touching pair that a raised threshold splits
            (20.0, 44.0, 50.0), (20.0, 53.0, 59.0))   # one that only the neck cut splits: P = 1 through it
_RADIUS_VOX = 8.0  # 17.6 nm at 22 Å: every vesicle passes every stage
_WAIT_S = 600.0
FINISH_IMPORTS = ("imodmodel.models",)
"""Modules the steps after the network import where they first need them (imodmodel imports pandas: 0.5 s)."""


def import_in_background(modules=FINISH_IMPORTS) -> threading.Thread:
    """Import `modules` on a daemon thread while this process runs the network, which releases the GIL, so that
    the steps after it do not wait for the imports."""
    thread = threading.Thread(target=lambda: [importlib.import_module(name) for name in modules], daemon=True,
                              name="cryoves-imports")
    thread.start()
    return thread


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small synthetic vesicles, two pairs of them touching: a float32 tomogram, its network-grid probability
    map (half the size) and the vesicles' uint16 labels."""
    grid = np.indices(_SHAPE, dtype=np.float32)
    distances = [np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) for centre in _CENTRES]
    distance = np.min(distances, axis=0)
    tomogram = -np.exp(-0.5 * (distance - _RADIUS_VOX) ** 2).astype(np.float32)  # dark membranes
    tomogram += np.random.default_rng(0).normal(0.0, 0.05, _SHAPE).astype(np.float32)
    probability = (1.0 / (1.0 + np.exp(distance - _RADIUS_VOX))).astype(np.float32)
    probability[np.min(distances[4:], axis=0) < _RADIUS_VOX] = 1.0
    labels = np.where(distance < _RADIUS_VOX, np.argmin(distances, axis=0) + 1, 0).astype(np.uint16)
    return tomogram, np.ascontiguousarray(probability[::2, ::2, ::2]), labels


def _warm_detection() -> None:
    """The kernels up to localisation: resampling, threshold shell sums (with the tomogram resampled at the shells
    of the network grid's map), labelling, splitting (both ways)."""
    from cryoves.engine.network.inference import probability_on_input_grid
    from cryoves.engine.pipeline import SegmentParams
    from cryoves.engine.stages.localize import label_segments, localize
    from cryoves.engine.stages.threshold import global_threshold

    tomogram, probability_net, _ = _scene()
    params = SegmentParams()
    probability = probability_on_input_grid(probability_net, _SHAPE)
    threshold = global_threshold(tomogram, probability_net, params.threshold).threshold
    labels = label_segments(probability, threshold, params.localize.connectivity)
    localize(probability, labels, threshold, 22.0, params.localize)


def _warm_measurement() -> None:
    """The kernels from sphere refinement on: radial profiles, boxes, back-projection, outliers, rendering, and the
    statistics of the volumes written (labels and float32 maps)."""
    from cryoves.engine.pipeline import SegmentParams
    from cryoves.engine.stages.outliers import detect_outliers
    from cryoves.engine.stages.overlaps import render_labels, resolve_overlaps
    from cryoves.engine.stages.refine import refine_spheres
    from cryoves.kernels.stats import volume_stats

    tomogram, _, labels = _scene()
    params = SegmentParams()
    spheres = refine_spheres(tomogram, labels, 22.0, params.refine)
    checked = detect_outliers(tomogram, spheres, 22.0, params.outliers, params.refine)
    volume_stats(render_labels(_SHAPE, resolve_overlaps(checked, 22.0, params.overlap)))
    volume_stats(tomogram)


PARTS = {"detection": _warm_detection, "measurement": _warm_measurement}
"""The kernels in two shares, each warmed by one child: detection compiles in about twice the time of measurement
(11 and 6 s of one core on a cold cache, measured at stop 22), and the child that finishes first frees a core."""


def warm_kernels() -> None:
    """Compile (or load from Numba's cache) every kernel after the network for the types a tomogram brings
    (float32 tomogram and map, uint16 labels), on small synthetic vesicles."""
    for warm in PARTS.values():
        warm()


@functools.cache
def warm_marker(part: str) -> Path | None:
    """The file a finished warm-up of `part` leaves in the kernels' Numba cache folder, named for what makes
    Numba recompile (its version, the CPU, the kernels' sources); None where Numba's cache folder is not ours
    to know."""
    import llvmlite.binding
    import numba

    from cryoves import kernels

    folder = kernels.cache_dir()
    if folder is None:
        return None
    sources = sorted(Path(kernels.__file__).parent.glob("*.py"))
    stamp = [numba.__version__, platform.machine(), llvmlite.binding.get_host_cpu_name()]
    stamp += [f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in sources]
    return Path(folder) / f"cryoves-warm-{hashlib.sha256('|'.join(stamp).encode()).hexdigest()[:16]}.{part}"


@dataclass(eq=False)
class KernelWarmup:
    """The child processes compiling the kernels, by share (`PARTS`), none when Numba's cache already holds them."""

    processes: dict[str, subprocess.Popen]

    def join(self) -> list[str]:
        """Wait for the kernels to be in Numba's cache (at most _WAIT_S; past that this process compiles
        what it needs itself). Returns the shares whose child failed or did not finish."""
        deadline = time.monotonic() + _WAIT_S
        failed = []
        for part, process in self.processes.items():
            try:
                if process.wait(max(0.0, deadline - time.monotonic())) != 0:
                    failed.append(part)
            except subprocess.TimeoutExpired:
                failed.append(part)
        return failed


@functools.cache
def start_kernel_warmup() -> KernelWarmup:
    """Start one child per share of the kernels (`PARTS`) not yet in the cache, once per process; `join` them
    before the first stage after the network."""
    cold = [part for part in PARTS if warm_marker(part) is not None and not warm_marker(part).exists()]
    return KernelWarmup({part: subprocess.Popen([sys.executable, "-m", "cryoves.engine.warmup", part],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL) for part in cold})


if __name__ == "__main__":
    PARTS[sys.argv[1]]()
    if warm_marker(sys.argv[1]) is not None:
        warm_marker(sys.argv[1]).touch()
