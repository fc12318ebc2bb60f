"""Speed figures measured on this machine beside the published anchors and the goals.

Regenerates benchmarks/RESULTS.md (about 2-4 minutes on 2 cores; `--large` adds the 200x512x512
size and its CPU network pass, several minutes more):

    python benchmarks/results.py --weights ../shared/models/cryovesnet/weights.h5 > benchmarks/RESULTS.md

GPU figures come from `python benchmarks/gpu_inference.py --json OUT.json` on a GPU machine; pass
`--gpu OUT.json` to put them in the table. Without it they read "not measured". Each figure is the
fastest of a few repeats in one run; on a shared machine they vary by tens of percent between runs.
"""

import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from math import prod
from pathlib import Path
from unittest.mock import patch

import numpy as np

from cryoves.cluster.bench import (
    BENCH_VOXEL_SIZE_A,
    SIZES,
    TARGET_SHAPE,
    TARGET_VOXEL_SIZE_A,
    WARMUP_SHAPE,
    Node,
    fitted_exponent,
    hardware,
    model_throughput,
    phantom_probability,
    run_bench,
)
from cryoves.cluster.run import finish_memory_bytes, run_batch
from cryoves.engine.io.mrc import write_volume
from cryoves.engine.job import (
    Job,
    ProbabilityMap,
    Settings,
    batch_starts,
    finish,
    network_input,
    predict_tiles,
    prepare,
    probability_map,
    segment_job,
    tile_plan,
)
from cryoves.engine.network.model import load_logit_fn, model_inference_params
from cryoves.engine.network.rescale import network_shape
from cryoves.engine.pipeline import SegmentParams, postprocess
from cryoves.engine.stages.refine import RefineParams, refine_spheres
from cryoves.engine.stages.threshold import ThresholdParams
from cryoves.engine.synthetic.phantom import PRESETS, make_phantom, write_phantom
from cryoves.engine.warmup import warm_kernels
from cryoves.kernels.labels import label_stats, label_stats_reference, relabel, relabel_reference
from cryoves.kernels.radial import (
    back_project,
    back_project_reference,
    extract_boxes,
    extract_boxes_reference,
    radial_profiles,
    radial_profiles_reference,
    xcorr_shift,
    xcorr_shift_reference,
)
from cryoves.kernels.render import render_spheres, render_spheres_reference
from cryoves.kernels.shell import shell_sums, shell_sums_reference

FINISH_GB = finish_memory_bytes(prod(TARGET_SHAPE), prod(network_shape(TARGET_SHAPE, TARGET_VOXEL_SIZE_A)),
                                float("inf")) / 1e9
NOT_MEASURED = "not measured (no GPU in this session)"
QUOTED_GPU_MVOXEL_S = 600.0
"""This network in float16 (PyTorch, channels-last) on one H200, as reported when the GPU path was
specified (570-640 Mvoxel/s): the model's input until benchmarks/gpu_inference.py has measured it."""
MODEL_NODES = ((1, Node(1, 16, 128.0)), (1, Node(2, 32, 256.0)), (1, Node(4, 64, 512.0)), (1, Node(8, 128, 1024.0)),
               (4, Node(8, 128, 1024.0)))
"""(nodes, node) for the scaling table: 16 cores and 128 GB per GPU, as on the lent H100/H200 machines."""
TARGET = f"{'x'.join(map(str, TARGET_SHAPE[::-1]))} at {TARGET_VOXEL_SIZE_A:g} Å"


def best_of(fn, *args, repeats: int = 5, budget_s: float = 5.0) -> float:
    """Fastest of up to `repeats` calls (at least one, fewer once `budget_s` is spent), after one warm-up call."""
    fn(*args)
    times: list[float] = []
    spent = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - spent < budget_s):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def per_vesicle_stages(tomogram, labels, *, reference: bool = False):
    """Sphere refinement and rendering of every segment, on the Numba kernels or on their NumPy references."""
    import cryoves.engine.stages.overlaps as spheres
    import cryoves.engine.stages.refine as refine
    from cryoves.kernels import radial

    swaps = [(refine, name, getattr(radial, f"{name}_reference"))
             for name in ("box_profiles", "back_project", "extract_boxes", "xcorr_shift")]
    swaps.append((spheres, "render_spheres", render_spheres_reference))
    with ExitStack() as stack:
        for module, name, function in swaps if reference else ():
            stack.enter_context(patch.object(module, name, function))
        table = refine_spheres(tomogram, labels, BENCH_VOXEL_SIZE_A, RefineParams())
        return spheres.render_labels(labels.shape, table)


def kernel_speedups() -> list[tuple[str, float, float]]:
    """(case, kernel s, reference s) on the inputs of the benchmark files."""
    rng = np.random.default_rng(11)
    volume = rng.normal(size=(64, 128, 128)).astype(np.float32)
    centers = rng.uniform([8, 16, 16], [56, 112, 112], size=(50, 3))
    profiles = rng.normal(size=(50, 28))
    offsets = rng.uniform(-0.5, 0.5, size=(50, 3))
    ball_centers = rng.uniform(0, [64, 128, 128], size=(100, 3))
    ball_radii = rng.uniform(6, 12, size=100)
    ids = np.arange(1, 101)
    boxes = rng.normal(size=(50, 9, 9, 9))
    models = np.roll(boxes, (1, -2, 1), axis=(1, 2, 3)) + rng.normal(0, 0.1, boxes.shape)
    phantom = make_phantom(SIZES["small"], BENCH_VOXEL_SIZE_A, seed=0)
    probability = phantom_probability(phantom)
    thresholds = ThresholdParams().thresholds()
    cases = [
        (f"shell_sums, phantom 64x128x128, {len(thresholds)} thresholds", shell_sums, shell_sums_reference,
         (phantom.tomogram, probability, thresholds)),
        ("radial_profiles 64x128x128, 50 vesicles, R=16", radial_profiles, radial_profiles_reference,
         (volume, centers, 16, 28)),
        ("back_project 50 boxes of 33³", back_project, back_project_reference, (profiles, 16, offsets)),
        ("render_spheres 64x128x128, 100 balls", render_spheres, render_spheres_reference,
         ((64, 128, 128), ball_centers, ball_radii, ids)),
        ("extract_boxes 64x128x128, 50 boxes of 33³", extract_boxes, extract_boxes_reference, (volume, centers, 16)),
        ("xcorr_shift 50 boxes of 9³ (FFT vs direct)", xcorr_shift, xcorr_shift_reference, (boxes, models)),
        ("label_stats, phantom labels 64x128x128", label_stats, label_stats_reference,
         (phantom.labels, int(phantom.labels.max()))),
        ("relabel, phantom labels 64x128x128", relabel, relabel_reference,
         (phantom.labels, np.arange(int(phantom.labels.max()) + 1, dtype=np.uint32)[::-1].copy())),
        (f"per-vesicle stages (refine + render), phantom 64x128x128, {int(phantom.labels.max())} vesicles",
         per_vesicle_stages, partial(per_vesicle_stages, reference=True),
         (phantom.tomogram, phantom.labels.astype(np.uint32))),
    ]
    return [(name, *best_of_pair(fast, ref, args)) for name, fast, ref, args in cases]


def best_of_pair(fast, ref, args, repeats: int = 15, budget_s: float = 4.0) -> tuple[float, float]:
    """Fastest call of each of two functions, calls alternating so that a burst of load hits both alike."""
    fast(*args)
    ref(*args)
    times: tuple[list[float], list[float]] = ([], [])
    spent = time.perf_counter()
    while len(times[0]) < repeats and (not times[0] or time.perf_counter() - spent < budget_s):
        for fn, out in zip((fast, ref), times):
            start = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def scaling() -> dict:
    """Post-processing seconds against voxel count (three sizes) and vesicle count (three densities)."""
    params = SegmentParams()

    def post_s(phantom):
        probability = phantom_probability(phantom)
        return best_of(postprocess, phantom.tomogram, probability, phantom.voxel_size_a, params, repeats=3,
                       budget_s=20.0)

    shapes = [SIZES[n] for n in ("small", "medium", "large")]
    by_size = [(prod(s), post_s(make_phantom(s, BENCH_VOXEL_SIZE_A, seed=0))) for s in shapes]
    fraction_shape = SIZES["medium"]
    by_density = []
    for fraction in (0.04, 0.12, 0.3):
        preset = dataclasses.replace(PRESETS["default"], vesicle_fraction=fraction)
        phantom = make_phantom(fraction_shape, BENCH_VOXEL_SIZE_A, seed=0, preset=preset)
        by_density.append((phantom.vesicles.num_rows, post_s(phantom)))
    return {"voxels": by_size, "voxel_exponent": fitted_exponent(*zip(*by_size)),
            "vesicles": by_density, "vesicle_exponent": fitted_exponent(*zip(*by_density)),
            "fraction_shape": fraction_shape}


ORIGINAL_CRYOVESNET = {"first_s": 192.0, "later_s": (150.0, 192.0), "peak_gb": 1.25}
"""The original CryoVesNet code with its weights on the medium phantom (128x256x256 at 22 Å), 2 shared cores, as
recorded when issue 14 was filed (it is not importable here): first run, later runs, peak resident memory."""
LARGE_SEGMENT_VOXEL_SIZE_A = 14.7
LARGE_SEGMENT = f"{'x'.join(map(str, SIZES['large'][::-1]))} at {LARGE_SEGMENT_VOXEL_SIZE_A:g} Å"
"""The second size of issue 14's memory target: `cryoves segment` within 1.5 GB."""

_MEASURE_CHILD = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                  "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                  "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def segment_command(weights: str | None = None, runs: int = 3, precision: str = "auto", size: str = "medium",
                    voxel_size_a: float = BENCH_VOXEL_SIZE_A) -> dict:
    """`cryoves segment` as a user runs it, on the `size` phantom, each run a new process: on a fresh install without
    the install's `cryoves warmup` (an empty Numba cache), then after it (timed) the first run and `runs` more.
    Wall seconds and the peak resident memory of each process (measured from a clean parent, whose only child it
    is)."""
    options = [*(["--weights", weights] if weights else []),
               *(["--precision", precision] if precision != "auto" else [])]
    cli = [sys.executable, "-c", "from cryoves.cluster.cli import command_line; command_line()"]
    with tempfile.TemporaryDirectory(prefix="cryoves-segment-") as tmp:
        write_phantom(tmp, make_phantom(SIZES[size], voxel_size_a, seed=0), name=size)
        command = [*cli, "segment", str(Path(tmp) / f"{size}.mrc"), "--out", str(Path(tmp) / "out"), "--no-report",
                   "--force", *options]

        def measure(argv, cache: str) -> tuple[float, float]:
            env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / cache))
            done = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, *argv], env=env, capture_output=True,
                                  text=True, check=True)
            seconds, max_rss_kb = done.stdout.split()
            return float(seconds), int(max_rss_kb) * 1024 / 1e9

        without_warmup = measure(command, "numba-cold")
        warmup = measure([*cli, "warmup"], "numba")
        measured = [measure(command, "numba") for _ in range(1 + runs)]
    later = sorted(s for s, _ in measured[1:])
    return {"without_warmup_s": without_warmup[0], "warmup_s": warmup[0], "first_s": measured[0][0],
            "later_median_s": later[len(later) // 2], "later_s": later,
            "peak_gb": max(gb for _, gb in measured), "peak_without_warmup_gb": without_warmup[1],
            "command": " ".join([f"cryoves segment {size}.mrc --out out --no-report", *options])}


def work_outside_network() -> dict:
    """One TARGET tomogram's work outside the network, as `cryoves run` splits it, on one core.

    `_prepare`'s engine calls (`prepare`, `network_input`) and `_finish`'s (`probability_map` of the
    tile batches, `finish` without optional outputs) each run in a fresh process with one numba thread (the
    fastest of `OUTSIDE_REPEATS` processes), on a phantom of the target size itself and the bundled network's
    tile batches (computed here, untimed): CPU seconds of the process (core-seconds), its wall seconds, and the
    peak growth of its resident memory over the work, which is what `cryoves run` asks Ray for per tomogram.
    """
    import multiprocessing
    from unittest.mock import patch as patch_env

    params = SegmentParams(inference=model_inference_params(None))
    settings = Settings(params=params, weights_sha256="sha", force=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom(tmp, make_phantom(TARGET_SHAPE, TARGET_VOXEL_SIZE_A, seed=0), name="target")
        prepared = prepare(Job(path=Path(tmp) / "target.mrc"), settings, tmp)
        network = network_input(prepared, params)
        logit_fn = load_logit_fn(None, "cpu", params.inference.precision)
        batches = [predict_tiles(network.volume, first, logit_fn, params.inference)
                   for first in batch_starts(tile_plan(prepared, params.inference))]
        (Path(tmp) / "batches.pickle").write_bytes(pickle.dumps(batches))
        del network, batches, prepared
        steps = {}
        for touched, env in ((False, {}), (True, PRETOUCHED_HEAP)):
            with patch_env.dict(os.environ, {"NUMBA_NUM_THREADS": "1"} | env):
                with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
                    steps[touched] = [_fastest([pool.apply(_one_core_step, (tmp, step, settings, touched))
                                                for _ in range(OUTSIDE_REPEATS)])
                                      for step in ("prepare", "finish")]
    (prepare_step, finish_step), (prepare_touched, finish_touched) = steps[False], steps[True]
    return {"prepare_s": prepare_step["seconds"], "finish_s": finish_step["seconds"],
            "core_seconds": prepare_step["seconds"] + finish_step["seconds"],
            "wall_s": prepare_step["wall_s"] + finish_step["wall_s"],
            "prepare_touched_s": prepare_touched["seconds"], "finish_touched_s": finish_touched["seconds"],
            "core_seconds_touched": prepare_touched["seconds"] + finish_touched["seconds"],
            "prepare_peak_gb": prepare_step["peak_gb"], "finish_peak_gb": finish_step["peak_gb"],
            "n_vesicles": finish_step["n_vesicles"]}


OUTSIDE_REPEATS = 3
"""Processes per step of `work_outside_network`: the fastest counts (single runs here differed by up to 25 %)."""


def _fastest(runs: list[dict]) -> dict:
    """The fastest of a step's runs, with the largest memory growth of them all."""
    return min(runs, key=lambda run: run["seconds"]) | {"peak_gb": max(run["peak_gb"] for run in runs)}


PRETOUCHED_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc keeps every allocation in its heap and never returns freed memory: with `PRETOUCH_GB` touched and freed
first, the timed work reuses memory this process has touched, and times the CPU's work without the first touch
of fresh memory (which a virtual machine whose host reclaims freed guest memory makes 10-20x dearer, see
`first_touch`)."""
PRETOUCH_GB = 6


def first_touch() -> dict:
    """Seconds per GB to write memory this process gets fresh from the system, after the machine has been
    idle 30 s, and to write it again: a first touch costs a page fault per 4 KB page, which on a virtual machine
    whose host reclaims freed guest memory also costs the host's fault."""
    code = ("import time, numpy as np; time.sleep(30); a = np.empty(1 << 28, np.float32); t = time.perf_counter(); "
            "a.fill(1); t1 = time.perf_counter(); a.fill(2); t2 = time.perf_counter(); print(t1 - t, t2 - t1)")
    fresh, again = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    return {"fresh_s_per_gb": fresh / 1.073741824, "again_s_per_gb": again / 1.073741824}


def _one_core_step(tmp: str, step: str, settings: Settings, pretouch: bool = False) -> dict:
    """`_prepare`'s or `_finish`'s calls of `work_outside_network`, in a fresh process after a small warm-up
    (every kernel, as `cryoves` warms them, so that no compilation is timed); with `pretouch` (and
    `PRETOUCHED_HEAP` in the environment) after touching `PRETOUCH_GB` of memory the work reuses. `seconds` is the
    process's CPU time over the work (every thread: core-seconds, whatever a library's threads do), `wall_s` its
    wall time."""
    if pretouch:
        np.ones(PRETOUCH_GB << 28, np.float32)
    warm_kernels()
    warm = make_phantom(WARMUP_SHAPE, BENCH_VOXEL_SIZE_A, seed=1)
    warm_job = Job(path=write_volume(Path(tmp) / "warm.mrc", warm.tomogram, warm.voxel_size_a))
    warmed = prepare(warm_job, settings, tmp)
    network_input(warmed, settings.params)
    finish(warmed, ProbabilityMap(phantom_probability(warm), 0.0), settings, tmp)
    target = Job(path=Path(tmp) / "target.mrc")
    if step == "finish":  # as the task receives them: the batches, and a Prepared whose file is mapped again
        batches = pickle.loads((Path(tmp) / "batches.pickle").read_bytes())
        prepared = pickle.loads(pickle.dumps(prepare(target, settings, tmp)))
    n_vesicles = None
    with ResidentGrowth() as growth:
        start, start_cpu = time.perf_counter(), time.process_time()
        if step == "prepare":
            network_input(prepare(target, settings, tmp), settings.params)
        else:
            probability = probability_map(prepared, 0.0, batches, settings.params)
            n_vesicles = finish(prepared, probability, settings, tmp).n_vesicles
        seconds, wall = time.process_time() - start_cpu, time.perf_counter() - start
    return {"seconds": seconds, "wall_s": wall, "peak_gb": growth.peak_bytes / 1e9, "n_vesicles": n_vesicles}


class ResidentGrowth:
    """Peak growth of this process's resident memory inside the block, sampled every 5 ms.

    Not `ru_maxrss`: a process started by fork and exec inherits its parent's high-water mark.
    """

    def __init__(self) -> None:
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_bytes = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)

    def __enter__(self) -> "ResidentGrowth":
        self._base = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss() - self._base)


def batch_overhead(n_tomograms: int = 50) -> dict:
    """`cryoves run` on a local Ray instance against `segment_job` in a loop, same small phantoms, same run.

    The overhead compares steady rates: in-process with the model loaded beforehand, and Ray from its
    first finished tomogram to its last, so Ray's start and the actor's model load (once per batch,
    `startup_s`) do not count against each tomogram.
    """
    settings = Settings(params=SegmentParams(), weights_sha256="sha")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tomograms"
        for seed in range(n_tomograms):
            write_phantom(folder, make_phantom((32, 64, 64), 22.0, seed=seed), name=f"phantom{seed}")
        paths = sorted(folder.glob("phantom*[0-9].mrc"))
        logit_fn = load_logit_fn(None, "cpu", settings.params.inference.precision)
        start = time.perf_counter()
        out = Path(tmp) / "in_process"
        for path in paths:
            segment_job(prepare(Job(path=path), settings, out), logit_fn, settings, out)
        in_process_s = time.perf_counter() - start
        finished: list[float] = []
        start = time.perf_counter()
        table = run_batch(paths, Path(tmp) / "ray", settings, weights=None,
                          progress=lambda row: finished.append(time.perf_counter()))
        ray_s = time.perf_counter() - start
    assert table["status"].to_pylist() == ["ok"] * n_tomograms
    in_process_per_min = 60 * n_tomograms / in_process_s
    ray_per_min = 60 * (n_tomograms - 1) / (finished[-1] - finished[0])
    return {"n": n_tomograms, "in_process_s": in_process_s, "ray_s": ray_s, "startup_s": finished[0] - start,
            "in_process_per_min": in_process_per_min, "ray_per_min": ray_per_min,
            "overhead": in_process_per_min / ray_per_min - 1}


def network_on_one_window(weights: str | None) -> dict:
    """Target 2's comparison, in a fresh process, for `weights` (None: the bundled model): the framework's own forward
    (Keras `predict_on_batch`, float32) and cryoves' (`load_logit_fn`: float32, and the CPU's default precision) on
    the window of the medium size's plan, the same input, in turns; Mvoxel/s of window voxels, the fastest of
    `WINDOW_REPEATS` calls after a warm-up call each. Also the plan of each size and of the TARGET tomogram: windows
    and redundant compute (window voxels computed per output voxel)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_network_on_one_window, (weights,))


WINDOW_REPEATS = 2


def _network_on_one_window(weights: str | None) -> dict:
    from cryoves.engine.network.inference import plan_inference
    from cryoves.engine.network.model import default_precision, load_model

    params = model_inference_params(weights)
    grids = {size: network_shape(shape, BENCH_VOXEL_SIZE_A, params.network_voxel_size_a) for size, shape in
             SIZES.items()} | {TARGET: network_shape(TARGET_SHAPE, TARGET_VOXEL_SIZE_A, params.network_voxel_size_a)}
    plans = {size: plan_inference(grid, params) for size, grid in grids.items()}
    window = plans["medium"].window_shape
    tile = np.random.default_rng(0).standard_normal((1, *window)).astype(np.float32)
    model = load_model(weights)
    runs = {"keras float32": lambda: model.predict_on_batch(tile[..., None])}
    for precision in dict.fromkeys(("float32", default_precision())):
        runs[f"cryoves {precision}"] = partial(load_logit_fn(weights, "cpu", precision), tile)
    seconds = {name: [] for name in runs}
    for repeat in range(1 + WINDOW_REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    return {"window": window, "mvoxel_per_s": {name: prod(window) / min(s) / 1e6 for name, s in seconds.items()},
            "plans": {size: {"grid": grids[size], "window": plan.window_shape, "windows": len(plan.tiles),
                             "redundancy": plan.redundancy} for size, plan in plans.items()}}


def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also run the 200x512x512 size through run_bench")
    parser.add_argument("--gpu", type=Path, help="JSON written by benchmarks/gpu_inference.py --json")
    parser.add_argument("--weights", help="CryoVesNet's weights.h5, for the comparison with the original code")
    args = parser.parse_args()
    say = lambda message: print(f"[results] {message}", file=sys.stderr, flush=True)  # noqa: E731

    say("cryoves segment as a user runs it, CryoVesNet's weights and the bundled model")
    commands = {"bundled model": segment_command(None)}
    if args.weights:
        commands = {"CryoVesNet's weights": segment_command(args.weights)} | commands
    if model_inference_params(None).precision != "float32":  # as on a CPU without bfloat16 instructions
        commands[f"{'CryoVesNet' if args.weights else 'bundled'}, float32"] = segment_command(args.weights,
                                                                                             precision="float32")
    if args.large and args.weights:
        say(f"cryoves segment {LARGE_SEGMENT}, CryoVesNet's weights")
        large_command = segment_command(args.weights, runs=1, size="large", voxel_size_a=LARGE_SEGMENT_VOXEL_SIZE_A)
    say("kernels against their references")
    kernels = kernel_speedups()
    records = {}
    for size in ["small", "medium"] + (["large"] if args.large else []):
        say(f"run_bench {size} cpu")
        records[size] = run_bench(size, "cpu", repeats=3 if size == "small" else 2)
    network_float32 = (run_bench("medium", "cpu", precision="float32", repeats=2)["stages"]["network"]
                       if records["medium"]["precision"] != "float32" else None)
    say("the network on one window: Keras against cryoves")
    window = network_on_one_window(args.weights)
    say("scaling")
    scale = scaling()
    say("batch on Ray against in-process")
    batch = batch_overhead()
    say(f"work outside the network, {TARGET}, one core")
    outside = work_outside_network()
    touch = first_touch()
    gpu = json.loads(args.gpu.read_text()) if args.gpu else None

    hw = hardware("cpu")
    medium = records["medium"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = print
    out("# Speed: measured figures, published anchors, goals\n")
    out(f"Generated by `python benchmarks/results.py{' --large' if args.large else ''}"
        f"{' --gpu …' if args.gpu else ''}{' --weights …' if args.weights else ''} > benchmarks/RESULTS.md` on {when}."
        "\n")
    out(f"Machine: {hw['cpu']}, {hw['cores']} cores ({hw['cores_usable']} usable, numba {hw['numba_threads']} "
        f"threads), {hw['memory_gb']} GB, GPU: {hw['gpu'] or 'none'}; {hw['platform']}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in medium['versions'].items())}.\n")
    out("**Noise.** The development machines' cores are shared with other jobs: each "
        "figure is the fastest of a few repeats, and reruns differ by tens of percent; millisecond kernel timings "
        "vary most (when this page was first produced, the same kernel ratio varied up to 5x between three runs "
        "on 2 shared cores).\n")
    out(f"Network: {medium['model']}; post-processing input: network output.\n")

    out("## Summary\n")
    out("| figure | measured here (CPU) | GPU | published anchor | goal |")
    out("|---|---|---|---|---|")
    net = medium["stages"]["network"]
    proj = medium["projection"]
    gpu_total = f"{gpu['pipeline_seconds']:.1f} s ({gpu['device']})" if gpu else NOT_MEASURED
    gpu_net = (", ".join(f"{r['mvoxel_per_s']:.1f} Mvoxel/s {precision}" for precision, r in gpu["inference"].items())
               + f" ({gpu['device']})") if gpu else NOT_MEASURED
    gpu_per_hour = f"{3600 / gpu['pipeline_seconds']:.0f}" if gpu else NOT_MEASURED
    out(f"| end to end, one tomogram {TARGET} | {proj['seconds_per_tomogram']:.0f} s projected "
        f"(network {proj['network_seconds']:.0f} s + post-processing {proj['postprocess_seconds']:.0f} s) | "
        f"{gpu_total} | CryoVesNet ≈ 200 s on one RTX A4000 (20-30 % in the network); 27.5 min on an M1 CPU. "
        f"SynapseNet ≈ 135 s per tomogram on an A100 | ≤ 5 s on one H100/H200 |")
    out(f"| tomograms/hour, {TARGET} | {proj['tomograms_per_hour']:.1f} (projected from the medium run) | "
        f"{gpu_per_hour} | CryoVesNet ≈ 18 (A4000), ≈ 2.2 (M1); "
        f"SynapseNet ≈ 27 (A100) | ≥ 720 on one H100/H200 |")
    float32_net = (f"; float32 {network_float32['mvoxel_per_s']:.2f} (a CPU without bfloat16 instructions)"
                   if network_float32 else "")
    out(f"| network, Mvoxel/s (network grid, 22 Å) | {net['mvoxel_per_s']:.2f} (TensorFlow "
        f"{medium['precision']}, CPU, medium{float32_net}) | "
        f"{gpu_net} | "
        f"CryoVesNet ≈ 1.4-2.0 implied (20-30 % of 200 s for 81 Mvoxel, A4000) | ≥ 1.6 on 2 CPU cores |")
    rates = window["mvoxel_per_s"]
    keras_rate = rates.pop("keras float32")
    model_name = "CryoVesNet's weights" if args.weights else "bundled model"
    out(f"| network on one window of {'x'.join(map(str, window['window']))} (the medium plan's, {model_name}), "
        f"Mvoxel/s of the window, the same input in turns | Keras `predict_on_batch` float32 {keras_rate:.2f}; "
        + ", ".join(f"{name} {rate:.2f} ({rate / keras_rate:.0%})" for name, rate in rates.items())
        + " | — | TensorFlow on 2 cores 2.05 (recorded when issue 14 was filed) | ≥ 80 % of the framework's |")
    out(f"| redundant compute of the tile plans ({model_name}): window voxels computed per output voxel | "
        + "; ".join(f"{size} {plan['redundancy']:.2f}x ({plan['windows']} window{'s' if plan['windows'] > 1 else ''} "
                    f"of {'x'.join(map(str, plan['window']))} for {'x'.join(map(str, plan['grid']))})"
                    for size, plan in window["plans"].items())
        + " | — | CryoVesNet's 64³ windows keeping 24³: about 19x | ≤ 1.3x where the volume fits the budget |")
    out(f"| post-processing, 128x256x256 at 22 Å ({medium['n_vesicles_phantom']} vesicles) | "
        f"{_s(medium['postprocess_seconds'])} | CPU stage | — | — |")
    out(f"| post-processing, {TARGET} | {proj['postprocess_seconds']:.0f} s projected | CPU stage | "
        f"CryoVesNet ≈ 140-160 s (the 70-80 % of 200 s outside the network, A4000 machine) | — |")
    for name, c in commands.items():
        original = (f"original CryoVesNet {ORIGINAL_CRYOVESNET['first_s']:.0f} s first, "
                    f"{ORIGINAL_CRYOVESNET['later_s'][0]:.0f}-{ORIGINAL_CRYOVESNET['later_s'][1]:.0f} s later "
                    f"(recorded, same machine type) | ≥ 20x the original")
        ratio = (f"; {ORIGINAL_CRYOVESNET['first_s'] / c['first_s']:.1f}x and "
                 f"{ORIGINAL_CRYOVESNET['later_s'][0] / c['later_median_s']:.1f}-"
                 f"{ORIGINAL_CRYOVESNET['later_s'][1] / c['later_median_s']:.1f}x the original")
        out(f"| `{c['command']}` (128x256x256 at 22 Å), {name}, wall | first run after the install's "
            f"`cryoves warmup` ({c['warmup_s']:.1f} s) {c['first_s']:.1f} s, later runs {c['later_median_s']:.1f} s "
            f"(median of {len(c['later_s'])}){ratio}; without the warm-up (empty Numba cache) "
            f"{c['without_warmup_s']:.1f} s | — | {original} |")
        out(f"| peak resident memory of that command, {name} | {c['peak_gb']:.2f} GB after the warm-up (the most of "
            f"its runs); {c['peak_without_warmup_gb']:.2f} GB without it (Numba compiling beside the network) | — | "
            f"original CryoVesNet {ORIGINAL_CRYOVESNET['peak_gb']:.2f} GB (recorded) | ≤ the original |")
    if args.large and args.weights:
        c = large_command
        out(f"| `{c['command']}` ({LARGE_SEGMENT}), CryoVesNet's weights: wall, peak resident memory | later run "
            f"{c['later_median_s']:.1f} s (first after the warm-up {c['first_s']:.1f} s), {c['peak_gb']:.2f} GB "
            f"({c['peak_without_warmup_gb']:.2f} GB without the warm-up) | — "
            f"| — | ≤ 1.5 GB |")
    first_use = medium["kernel_first_use"]
    out(f"| Numba kernels on first use | compile {first_use['compile_seconds']:.1f} s of one core once per machine: "
        f"`cryoves warmup` at install, else in the background while the network runs (the rows above show what "
        f"each leaves); later processes load them in {first_use['cached_seconds']:.1f} s | — | — "
        f"| ≤ 2 s of waiting |")
    out(f"| outside the network, {TARGET}, one numba thread, CPU time of the process | "
        f"{outside['core_seconds']:.1f} core-s (`_prepare` {outside['prepare_s']:.1f} s + `_finish` "
        f"{outside['finish_s']:.1f} s, {outside['n_vesicles']} vesicles; wall {outside['wall_s']:.1f} s); "
        f"{outside['core_seconds_touched']:.1f} core-s ({outside['prepare_touched_s']:.1f} + "
        f"{outside['finish_touched_s']:.1f} s) in a process whose memory was touched before: this machine writes "
        f"fresh memory at {touch['fresh_s_per_gb']:.2f} s/GB, touched memory at {touch['again_s_per_gb']:.2f} s/GB "
        "(a virtual machine whose host takes freed memory back) | — | — | ≤ 15 core-s |")
    fastest = min(k[2] / k[1] for k in kernels)
    out(f"| kernels vs NumPy references | {fastest:.1f}x to {max(k[2] / k[1] for k in kernels):.0f}x "
        "(table below) | — | — | "
        f"≥ 50x faster post-processing than the NumPy references |")
    out("")
    out("Anchors are from the CryoVesNet and SynapseNet papers, on other hardware; tomograms/hour for the "
        "anchors is 3600 s over their seconds per tomogram. The projection for a 1024x1024x261 tomogram at "
        "14.69 Å uses the per-voxel rates of the medium run: the network on its 22 Å grid (684x684x174 "
        "voxels), post-processing per input voxel (at 22 Å both grids are one; at 14.69 Å the segments' search "
        "runs on the network grid, a third of the voxels, so this overestimates it); post-processing also grows "
        "with the number of vesicles (exponent below), so it is an estimate. The one-core row measures that "
        "tomogram itself.\n")

    out("## Kernels against their NumPy references\n")
    out("Fastest of up to 15 alternating calls after a warm-up (compilation excluded), same inputs, same run. "
        "With only "
        f"{hw['numba_threads']} numba threads, the parallel kernels gain little from `prange` here; the goal is "
        "stated for the per-vesicle stages as a whole (last row: the same refine and render code on the kernels "
        "and on the references); the other rows are its parts.\n")
    out("| kernel, input | kernel | reference | speed-up | goal ≥ 50x |")
    out("|---|---|---|---|---|")
    for name, fast, ref in kernels:
        out(f"| {name} | {_s(fast)} | {_s(ref)} | {ref / fast:.1f}x | {'met' if ref / fast >= 50 else 'not met'} |")
    out("")

    out("## Stages (`cryoves bench`)\n")
    out("`cryoves bench --size S` on one phantom per size at 22 Å, after a warm-up pass; fastest of 3 runs (small) "
        "or 2 (medium, large) per stage; network on the CPU. Small tiles recompute a larger share of halo, so "
        "the network rate rises with size; the projection uses the medium run.\n")
    names = list(medium["stages"])
    sizes = list(records)
    out("| stage | grid | " + " | ".join(f"{s} {'x'.join(map(str, records[s]['shape']))} s (Mvoxel/s)" for s in sizes)
        + f" | projected for {TARGET} |")
    out("|---|---|" + "---|" * len(sizes) + "---|")
    for name in names:
        cells = [f"{_s(records[s]['stages'][name]['seconds'])} ({records[s]['stages'][name]['mvoxel_per_s']:.1f})"
                 for s in sizes]
        out(f"| {name} | {medium['stages'][name]['grid']} | " + " | ".join(cells)
            + f" | {proj['stage_seconds'][name]:.1f} s |")
    out("| post-processing | input | " + " | ".join(_s(records[s]["postprocess_seconds"]) for s in sizes)
        + f" | {proj['postprocess_seconds']:.1f} s |")
    out("| total | | " + " | ".join(_s(records[s]["total_seconds"]) for s in sizes)
        + f" | {proj['seconds_per_tomogram']:.1f} s |")
    out("| vesicles (phantom / found) | | " + " | ".join(
        f"{records[s]['n_vesicles_phantom']} / {records[s]['n_vesicles_found']}" for s in sizes) + " | |")
    out("| warm-up pass (compile, trace) | | " + " | ".join(_s(records[s]["warmup_seconds"]) for s in sizes) + " | |")
    out("| peak memory of the process | | " + " | ".join(f"{records[s]['peak_memory_mb']:.0f} MB" for s in sizes)
        + " | |")
    out("")

    out("## Scaling of post-processing\n")
    out("Fastest of up to 3 runs each; the exponent is the least-squares slope of log time against log size "
        "(1 = linear). Here post-processing is fed the phantom's true vesicle mask blurred by one voxel "
        "(independent of the model), so times differ somewhat from the stage table above.\n")
    out("| against | points (x, seconds) | exponent |")
    out("|---|---|---|")
    out("| voxel count (64x128x128, 128x256x256, 200x512x512; default density) | "
        + ", ".join(f"({x:,}, {_s(t)})" for x, t in scale["voxels"]) + f" | {scale['voxel_exponent']:.2f} |")
    out(f"| vesicle count (vesicle_fraction 0.04, 0.12, 0.3 at {'x'.join(map(str, scale['fraction_shape']))}) | "
        + ", ".join(f"({x}, {_s(t)})" for x, t in scale["vesicles"]) + f" | {scale['vesicle_exponent']:.2f} |")
    out("")

    out("## `cryoves run`: overhead, and multi-GPU scaling (modelled)\n")
    out(f"**Measured here.** {batch['n']} phantoms of 32x64x64 at 22 Å: in-process (`segment_job` in a loop, model "
        f"loaded beforehand) {batch['in_process_s']:.1f} s, {batch['in_process_per_min']:.0f} tomograms/min; "
        f"`cryoves run` on a local Ray instance {batch['ray_s']:.1f} s, of which {batch['startup_s']:.1f} s until "
        f"the first tomogram was done (Ray's start, the actor's model load: once per batch), then "
        f"{batch['ray_per_min']:.0f} tomograms/min: scheduling overhead {100 * batch['overhead']:+.1f} % "
        f"(negative: Ray's pipelining of the network and post-processing gains more than it costs). "
        f"One tomogram of {TARGET}, the work outside the network on one core: "
        f"`_prepare` {outside['prepare_s']:.1f} s + `_finish` {outside['finish_s']:.1f} s = "
        f"{outside['core_seconds']:.0f} core-seconds ({outside['n_vesicles']} vesicles); their processes grow by "
        f"{outside['prepare_peak_gb']:.1f} and {outside['finish_peak_gb']:.1f} GB at most "
        f"(`cryoves run` asks Ray for {FINISH_GB:.1f} GB per `_finish`).\n")
    gpu_rate = gpu["inference"]["float16"]["mvoxel_per_s"] if gpu else QUOTED_GPU_MVOXEL_S
    gpu_source = (f"measured by benchmarks/gpu_inference.py on {gpu['device']}" if gpu else
                  "the rate reported for this network in float16 on one H200 when the GPU path was specified "
                  "(570-640), not yet measured by cryoves' own script")
    out(f"**Modelled.** A single machine here has no GPU, let alone several, so multi-GPU throughput is a model "
        f"(`cryoves.cluster.bench.model_throughput`): a batch of {TARGET} tomograms goes at the slower of the GPUs "
        f"(network grid at {gpu_rate:.0f} Mvoxel/s per GPU: {gpu_source}) and the CPUs (the "
        f"{outside['core_seconds']:.0f} core-seconds above per tomogram, as many tomograms at once as the cores, "
        f"Ray's memory (70 % of RAM) at {FINISH_GB:.1f} GB each and the in-flight limit allow), less the measured "
        f"overhead. Not modelled: a GPU actor's own CPU use, object transfers between nodes, shared-filesystem "
        f"bandwidth.\n")
    out("| nodes x (GPUs, cores, RAM) | GPU-bound tomograms/h | CPU-bound tomograms/h (at once) | modelled tomograms/h "
        "| limited by | with `--max-in-flight 4` |")
    out("|---|---|---|---|---|---|")
    for n_nodes, node in MODEL_NODES:
        common = {"gpu_mvoxel_s": gpu_rate, "cpu_core_seconds": outside["core_seconds"], "finish_gb": FINISH_GB,
                  "overhead": max(batch["overhead"], 0.0)}
        m = model_throughput(node, n_nodes, **common)
        old = model_throughput(node, n_nodes, max_in_flight=4, **common)
        out(f"| {n_nodes} x ({node.n_gpus}, {node.n_cores}, {node.memory_gb:g} GB) | {m['gpu_per_hour']:,.0f} | "
            f"{m['cpu_per_hour']:,.0f} ({m['concurrent']}) | {m['tomograms_per_hour']:,.0f} | {m['limit']} | "
            f"{old['tomograms_per_hour']:,.0f} |")
    out("\nOne GPU predicts a tomogram in well under a second, while post-processing it takes tens of "
        "core-seconds: a node needs on the order of a hundred cores per GPU before the GPU limits, so the "
        "scaling is set by CPU cores and memory. That is why `cryoves run` keeps as many tomograms in flight as "
        "the cluster has CPUs (the last column is the former default of 4) and lets Ray place post-processing "
        "by memory.\n")

    out("## GPU\n")
    if gpu:
        out(f"From `benchmarks/gpu_inference.py` on {gpu['device']} ({gpu['date']}, {gpu['model']}): tiled "
            f"inference of {'x'.join(map(str, gpu['network_shape']))} voxels at {gpu_net}; whole pipeline "
            f"{gpu['pipeline_seconds']:.1f} s (network stage {gpu['stage_seconds']['network']:.1f} s including "
            f"CPU resampling, post-processing {gpu['postprocess_seconds']:.1f} s on the CPU).\n")
    else:
        out("Not measured (no GPU in this session). `bash benchmarks/gpu_session.sh` on a GPU machine (its header "
            "says how to carry the wheels it needs) runs the GPU equality tests and `benchmarks/gpu_inference.py`: "
            "tiled PyTorch inference (float32 and float16) of a 174x684x684 network-grid volume, the same in one "
            "tile, and the whole pipeline for a 1024x1024x261 tomogram at 14.69 Å; then rerun this script with "
            "`--gpu gpu.json`.\n")

    out("## Reproduce\n")
    out("```bash\npython benchmarks/results.py > benchmarks/RESULTS.md        # this page\n"
        "cryoves bench --size medium --json                           # one record per size\n"
        "pytest benchmarks --benchmark-enable                          # per-benchmark tables and ratios\n"
        "CRYOVES_BENCH_LARGE=1 pytest benchmarks --benchmark-enable    # + medium/large sizes, compile time\n```")


if __name__ == "__main__":
    main()
