"""`cryoves bench`: time the pipeline on phantoms of standard sizes and project the throughput.

`run_bench` writes a phantom to a file and segments it with the engine's job calls, exactly as
`cryoves segment` does (`time_pipeline`), after an untimed warm-up (numba compilation or cache load,
TensorFlow graph tracing), and returns one record: seconds and Mvoxel/s per step (the run record's
`seconds`: reading, network, each post-processing stage, writing), hardware, package versions, and
the projection to a typical tomogram (1024 x 1024 x 261 voxels at 14.69 Å). The network is rated
per voxel of the network grid (22 Å: 684 x 684 x 174 voxels for that tomogram), every other step
per voxel of the input grid. `format_bench` renders the record as text; `--json` prints the record.

"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from math import prod
from pathlib import Path

import numpy as np
from scipy import ndimage

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import write_volume
from cryoves.engine.io.outputs import package_versions, peak_memory_mb
from cryoves.engine.job import STEPS, Job, Settings, prepare, segment_job
from cryoves.engine.network.model import check_device_precision, load_logit_fn, model_inference_params
from cryoves.engine.network.rescale import network_shape
from cryoves.engine.pipeline import STAGES, SegmentParams
from cryoves.engine.synthetic.phantom import Phantom, make_phantom

SIZES: dict[str, tuple[int, int, int]] = {
    "small": (64, 128, 128),
    "medium": (128, 256, 256),
    "large": (200, 512, 512),
}
"""Phantom shapes (z, y, x) of `--size`, all at BENCH_VOXEL_SIZE_A."""
BENCH_VOXEL_SIZE_A = 22.0
TARGET_SHAPE = (261, 1024, 1024)
"""The projected tomogram (z, y, x): CryoVesNet's published timing case."""
TARGET_VOXEL_SIZE_A = 14.69
WARMUP_SHAPE = (64, 128, 128)
WARMUP_SHAPES = ((64, 128, 128), (32, 96, 96))
POST_STAGES = STAGES[1:]
"""The post-processing stages, threshold to overlap: STEPS less reading, the network and writing."""
DEVICES = ("cpu", "gpu")
RAY_MEMORY_SHARE = 0.7
"""Share of a node's memory Ray offers tasks by default (most of the rest is its object store)."""

Progress = Callable[[str], None]


def run_bench(size: str, device: str, *, weights=None, precision: str = "auto",
              shape: tuple[int, int, int] | None = None, seed: int = 0, repeats: int | None = None,
              progress: Progress | None = None) -> dict:
    """Benchmark one phantom of `size` (small, medium, large) with the network on `device` (cpu, gpu).

    `weights` and `precision` are what `--weights` and `--precision` take elsewhere (None: the bundled
    model; "auto": `default_precision`); `shape` overrides the
    size's shape (tests use a smaller one). Each stage's time is the fastest of `repeats` timed runs
    (None: 3 for small, 1 otherwise).
    """
    if size not in SIZES:
        raise CryovesError(f"--size {size!r} is unknown; choose one of {', '.join(SIZES)}")
    if device not in DEVICES:
        raise CryovesError(f"--device {device!r} is unknown; choose one of {', '.join(DEVICES)}")
    check_device_precision(device, precision)
    repeats = (3 if size == "small" else 1) if repeats is None else int(repeats)
    if repeats < 1:
        raise CryovesError(f"repeats must be >= 1, got {repeats}")
    shape = tuple(int(n) for n in (shape or SIZES[size]))
    say = progress or (lambda message: None)
    changes = {} if precision == "auto" else {"precision": precision}
    params = SegmentParams(inference=model_inference_params(weights, **changes))
    say("loading the network")
    logit_fn = load_logit_fn(weights, device, params.inference.precision)
    model = ("bundled model" if weights is None else f"weights {weights}") + \
        (", PyTorch float16 on CUDA" if device == "gpu" else f", TensorFlow {params.inference.precision} on CPU")
    say(f"phantom {'x'.join(map(str, shape))} at {BENCH_VOXEL_SIZE_A:g} Å")
    start = time.perf_counter()
    phantom = make_phantom(shape, BENCH_VOXEL_SIZE_A, seed=seed)
    phantom_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="cryoves-bench-") as work:
        tomogram = _phantom_file(phantom, work, "bench")
        say("warm-up (compilation, graph tracing)")
        start = time.perf_counter()
        if prod(shape) <= prod(WARMUP_SHAPE):
            warm_files = [tomogram]
        else:  # two small shapes: TensorFlow's second trace is the shape-generic one that larger tiles reuse
            warm_files = [_phantom_file(make_phantom(warm_shape, BENCH_VOXEL_SIZE_A, seed), work, f"warm{i}")
                          for i, warm_shape in enumerate(WARMUP_SHAPES)]
        for warm in warm_files:
            time_pipeline(warm, logit_fn, params, work)
        warmup_s = time.perf_counter() - start

        seconds: dict[str, float] = {}
        for i in range(repeats):
            say(f"timed run {i + 1} of {repeats}")
            run_s, n_found = time_pipeline(tomogram, logit_fn, params, work)
            seconds = {name: min(t, seconds.get(name, t)) for name, t in run_s.items()}
    say("kernel compilation in a fresh Numba cache (a first run after installing)")
    first_use = kernel_first_use()
    net_voxels = prod(network_shape(shape, BENCH_VOXEL_SIZE_A, params.inference.network_voxel_size_a))
    stages = {name: _rate(seconds[name], net_voxels if name == "network" else prod(shape), name)
              for name in STEPS}
    post_s = sum(seconds[name] for name in POST_STAGES)
    return {
        "size": size,
        "shape": list(shape),
        "voxel_size_a": BENCH_VOXEL_SIZE_A,
        "device": device,
        "precision": "float16" if device == "gpu" else params.inference.precision,
        "model": model,
        "n_vesicles_phantom": phantom.vesicles.num_rows,
        "n_vesicles_found": n_found,
        "stages": stages,
        "postprocess_seconds": post_s,
        "total_seconds": sum(seconds.values()),
        "repeats": repeats,
        "warmup_seconds": warmup_s,
        "kernel_first_use": first_use,
        "phantom_seconds": phantom_s,
        "peak_memory_mb": peak_memory_mb(),
        "projection": project(stages, params),
        "hardware": hardware(device),
        "versions": _versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def format_bench(record: dict) -> str:
    """The record as a table of stages, then the projection line."""
    shape = "x".join(map(str, record["shape"]))
    hw = record["hardware"]
    lines = [
        f"cryoves bench: {record['size']} phantom {shape} voxels at {record['voxel_size_a']:g} Å, "
        f"{record['n_vesicles_phantom']} vesicles ({record['n_vesicles_found']} found), network on {record['device']}",
        f"model: {record['model']}",
        f"machine: {hw['cpu']}, {hw['cores']} cores ({hw['cores_usable']} usable), GPU: {hw['gpu'] or 'none'}",
        "",
        f"{'stage':12s} {'grid':8s} {'seconds':>9s} {'Mvoxel/s':>10s}",
    ]
    for name, stage in record["stages"].items():
        lines.append(f"{name:12s} {stage['grid']:8s} {stage['seconds']:9.3f} {stage['mvoxel_per_s']:10.2f}")
    lines += [
        f"{'post-proc.':12s} {'input':8s} {record['postprocess_seconds']:9.3f}",
        f"{'total':12s} {'':8s} {record['total_seconds']:9.3f}",
        f"(fastest of {record['repeats']} runs; warm-up {record['warmup_seconds']:.1f} s, "
        f"phantom {record['phantom_seconds']:.1f} s, peak memory {record['peak_memory_mb']:.0f} MB)",
        f"first use: the kernels compile in {record['kernel_first_use']['compile_seconds']:.1f} s (once per machine, "
        f"while the network runs), later processes load them in {record['kernel_first_use']['cached_seconds']:.1f} s",
        "",
    ]
    p = record["projection"]
    lines.append(
        f"projected: {p['tomograms_per_hour']:.1f} tomograms/hour ({p['seconds_per_tomogram']:.1f} s each: network "
        f"{p['network_seconds']:.1f} s, post-processing {p['postprocess_seconds']:.1f} s, reading and writing "
        f"{p['seconds_per_tomogram'] - p['network_seconds'] - p['postprocess_seconds']:.1f} s) for "
        f"{'x'.join(map(str, p['shape'][::-1]))} voxels at {p['voxel_size_a']:g} Å on this machine")
    if record["size"] == "small":
        lines.append("(small tiles recompute more halo per voxel: --size medium projects more faithfully)")
    return "\n".join(lines)


def project(stages: dict, params: SegmentParams | None = None) -> dict:
    """Seconds per TARGET tomogram from measured per-voxel rates (network grid for the network).

    Post-processing also scales with the vesicle count, which grows with the volume at a fixed
    vesicle density; a finer voxel size puts more voxels on each vesicle, which the per-voxel rate
    accounts for only approximately.
    """
    params = params or SegmentParams()
    net_shape = network_shape(TARGET_SHAPE, TARGET_VOXEL_SIZE_A, params.inference.network_voxel_size_a)
    per_stage = {name: (prod(net_shape) if stage["grid"] == "network" else prod(TARGET_SHAPE))
                 / (stage["mvoxel_per_s"] * 1e6) for name, stage in stages.items()}
    network_s = sum(s for name, s in per_stage.items() if stages[name]["grid"] == "network")
    total_s = sum(per_stage.values())
    post_s = sum(s for name, s in per_stage.items() if name in POST_STAGES)
    return {
        "shape": list(TARGET_SHAPE),
        "voxel_size_a": TARGET_VOXEL_SIZE_A,
        "network_shape": list(net_shape),
        "stage_seconds": per_stage,
        "network_seconds": network_s,
        "postprocess_seconds": post_s,
        "seconds_per_tomogram": total_s,
        "tomograms_per_hour": 3600.0 / total_s,
    }


@dataclass(frozen=True)
class Node:
    """One machine of a Ray cluster, as the throughput model sees it."""

    n_gpus: int
    n_cores: int
    memory_gb: float


def model_throughput(node: Node, n_nodes: int, *, gpu_mvoxel_s: float, cpu_core_seconds: float,
                     finish_gb: float, overhead: float, max_in_flight: int | None = None,
                     params: SegmentParams | None = None) -> dict:
    """Modelled `cryoves run` throughput for TARGET tomograms on `n_nodes` identical nodes.

    The batch goes at the slower of two rates: the GPUs (each predicts the network grid at
    `gpu_mvoxel_s`), and the CPUs (`cpu_core_seconds` of single-core work per tomogram outside the
    network, as many tomograms at once as the cores, Ray's memory at `finish_gb` each and the in-flight
    limit allow), less the measured scheduling `overhead` (a fraction of the time).
    """
    params = params or SegmentParams()
    net_voxels = prod(network_shape(TARGET_SHAPE, TARGET_VOXEL_SIZE_A, params.inference.network_voxel_size_a))
    gpu_per_hour = n_nodes * node.n_gpus * 3600.0 * gpu_mvoxel_s * 1e6 / net_voxels
    cores = n_nodes * node.n_cores
    by_memory = n_nodes * int(node.memory_gb * RAY_MEMORY_SHARE // finish_gb)
    in_flight = max_in_flight or max(4, cores)
    concurrent = min(cores, by_memory, in_flight)
    cpu_per_hour = concurrent * 3600.0 / cpu_core_seconds
    cpu_limit = next(name for name, n in (("CPU cores", cores), ("memory", by_memory), ("in-flight limit", in_flight))
                     if n == concurrent)
    limit = "GPU" if gpu_per_hour < cpu_per_hour else cpu_limit
    return {"gpu_per_hour": gpu_per_hour, "cpu_per_hour": cpu_per_hour, "concurrent": concurrent,
            "tomograms_per_hour": min(gpu_per_hour, cpu_per_hour) * (1.0 - overhead), "limit": limit}


def phantom_probability(phantom: Phantom, sigma_vox: float = 1.0) -> np.ndarray:
    """A stand-in for a trained network's output: the true vesicle mask blurred by `sigma_vox` voxels.

    It crosses 0.5 at the outer vesicle surface and joins touching vesicles, as the network does.
    """
    mask = (phantom.labels > 0).astype(np.float32)
    return np.clip(ndimage.gaussian_filter(mask, sigma_vox), 0.0, 1.0).astype(np.float32)


def fitted_exponent(x, seconds) -> float:
    """Least-squares slope of log(seconds) against log(x): time ∝ x**slope."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(seconds, float))
    return float(np.polyfit(lx, ly, 1)[0]) if len(lx) > 1 else float("nan")


def hardware(device: str = "cpu") -> dict:
    """CPU model, core counts, numba threads and the GPU (if one is visible)."""
    import numba

    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "memory_gb": _memory_gb(),
        "gpu": _gpu_name(device),
        "platform": platform.platform(),
    }


def kernel_first_use() -> dict:
    """Seconds of `warm_kernels` in a new process with an empty Numba cache (what the first run after an
    install compiles, in the background while the network runs), and again with that cache filled."""
    code = ("import time; t = time.perf_counter(); from cryoves.engine.warmup import warm_kernels; warm_kernels(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory(prefix="cryoves-numba-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        compile_s, cached_s = (float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                     text=True, check=True).stdout.split()[-1]) for _ in range(2))
    return {"compile_seconds": compile_s, "cached_seconds": cached_s}


def time_pipeline(tomogram: Path, logit_fn, params: SegmentParams, out_dir) -> tuple[dict, int]:
    """Segment one tomogram file into `out_dir` with the job calls, as `cryoves segment` does without
    optional outputs: (the run record's seconds per step, vesicles found)."""
    settings = Settings(params=params, weights_sha256="bench", force=True)
    finished = segment_job(prepare(Job(path=Path(tomogram)), settings, out_dir), logit_fn, settings, out_dir)
    return finished.seconds, finished.n_vesicles


def _phantom_file(phantom: Phantom, folder, name: str) -> Path:
    return write_volume(Path(folder) / f"{name}.mrc", phantom.tomogram, phantom.voxel_size_a)


def _rate(seconds: float, n_voxels: int, name: str) -> dict:
    seconds = max(seconds, 1e-9)
    return {"seconds": seconds, "grid": "network" if name == "network" else "input", "n_voxels": n_voxels,
            "mvoxel_per_s": n_voxels / seconds / 1e6}


def _versions() -> dict:
    versions = package_versions()
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_name(device: str) -> str | None:
    """The CUDA device name from PyTorch when it is in use, else from nvidia-smi if installed."""
    if device == "gpu" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return "; ".join(out.splitlines()) or None
    return None


__all__ = ["SIZES", "run_bench", "format_bench", "project", "time_pipeline", "kernel_first_use", "phantom_probability",
           "fitted_exponent", "hardware", "Node", "model_throughput"]
