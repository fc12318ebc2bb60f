"""The whole post-processing (with each stage's seconds as the engine times them) and the network step
on phantoms of the `cryoves bench` sizes, the kernels not benchmarked elsewhere, and how time scales.

Run ``pytest benchmarks/test_pipeline_bench.py --benchmark-enable``; CI runs it untimed
(``--benchmark-disable``, the default), on the small size only. ``CRYOVES_BENCH_LARGE=1`` adds the
medium and large sizes (128x256x256, 200x512x512 at 22 Å; minutes and GBs) and the compile-time
benchmark. Post-processing is fed the phantom's true vesicle mask blurred by one voxel
(`cryoves.cluster.bench.phantom_probability`), so it does not depend on a trained model. Peak memory
per size is in each benchmark's ``extra_info``; the scaling tests put the fitted log-log exponent there.
Nothing here strings stages together itself: post-processing is `postprocess`, the network step the
job calls' `predict`, as `cryoves segment` runs them.
"""

import dataclasses
import os
import subprocess
import sys
import time
import tracemalloc
from math import prod

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.cluster.bench import BENCH_VOXEL_SIZE_A, SIZES, fitted_exponent, phantom_probability
from cryoves.engine.io.mrc import write_volume
from cryoves.engine.io.outputs import peak_memory_mb
from cryoves.engine.io.tables import active_mask
from cryoves.engine.job import Job, Settings, predict, prepare
from cryoves.engine.pipeline import STAGES, SegmentParams, postprocess
from cryoves.engine.synthetic.phantom import PRESETS, make_phantom
from cryoves.kernels.radial import extract_boxes, extract_boxes_reference, xcorr_shift, xcorr_shift_reference

LARGE = bool(os.environ.get("CRYOVES_BENCH_LARGE"))
RUN_SIZES = ["small", "medium", "large"] if LARGE else ["small"]
VS = BENCH_VOXEL_SIZE_A
PARAMS = SegmentParams()
_PHANTOMS: dict = {}


def phantom(size: str):
    """The phantom of `size`, made once per session."""
    if size not in _PHANTOMS:
        _PHANTOMS[size] = make_phantom(SIZES[size], VS, seed=0)
    return _PHANTOMS[size]


def _shape_id(size):
    return f"{size} {'x'.join(map(str, SIZES[size]))}"


def _traced_peak_mb(fn, *args) -> float:
    """Peak of memory allocated through Python/NumPy during one untimed call (numba's own not included)."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def _found(result) -> int:
    return int(active_mask(result.vesicles).sum())


@pytest.mark.parametrize("size", RUN_SIZES, ids=_shape_id)
def test_postprocess(benchmark, size):
    benchmark.group = "whole post-processing (threshold to overlap), 22 Å"
    p = phantom(size)
    run = (p.tomogram, phantom_probability(p), VS, PARAMS)
    postprocess(*run)  # compile outside the timed rounds
    result = benchmark.pedantic(postprocess, args=run, rounds=1 if size != "small" else 3, iterations=1)
    assert _found(result) >= 0.8 * p.vesicles.num_rows
    benchmark.extra_info["stage_seconds"] = {stage: round(result.seconds[stage], 4) for stage in STAGES[1:]}
    benchmark.extra_info["n_vesicles"] = p.vesicles.num_rows
    benchmark.extra_info["peak_rss_mb"] = round(peak_memory_mb())  # process high-water mark so far
    benchmark.extra_info["peak_traced_mb"] = round(_traced_peak_mb(postprocess, *run))
    if benchmark.stats is not None:
        benchmark.extra_info["mvoxel_per_s"] = prod(SIZES[size]) / benchmark.stats.stats.min / 1e6


@pytest.fixture(scope="module")
def logit_fn():
    from cryoves.engine.network.model import (
        MODEL_WEIGHTS,
        build_unet,
        bundled_model_dir,
        layer_weights,
        load_logit_fn,
        make_logit_fn,
    )

    if (bundled_model_dir() / MODEL_WEIGHTS).is_file():
        return load_logit_fn(None)
    return make_logit_fn(layer_weights(build_unet()))  # same compute as the trained network


@pytest.mark.parametrize("size", RUN_SIZES, ids=_shape_id)
def test_network_stage(benchmark, logit_fn, tmp_path, size):
    """What `segment` times as "network": network input, tiled U-Net (TensorFlow, CPU), map on the input grid."""
    benchmark.group = "network stage on CPU, 22 Å"
    tomogram = write_volume(tmp_path / "tomo.mrc", phantom(size).tomogram, VS)
    settings = Settings(params=PARAMS, weights_sha256="bench")
    prepared = prepare(Job(path=tomogram), settings, tmp_path)
    prob = benchmark.pedantic(predict, args=(prepared, logit_fn, PARAMS), rounds=1, iterations=1,
                              warmup_rounds=1)  # warm-up traces the graph
    assert prob.probability.shape == SIZES[size]
    benchmark.extra_info["peak_rss_mb"] = round(peak_memory_mb())
    if benchmark.stats is not None:
        benchmark.extra_info["mvoxel_per_s"] = prod(SIZES[size]) / benchmark.stats.stats.mean / 1e6


# --- kernels without a benchmark elsewhere -----------------------------------------------------

RNG = np.random.default_rng(7)
VOLUME = RNG.normal(size=(64, 128, 128)).astype(np.float32)
CENTERS = RNG.uniform([8, 16, 16], [56, 112, 112], size=(50, 3))
BOXES = RNG.normal(size=(50, 9, 9, 9))
MODELS = np.roll(BOXES, (1, -2, 1), axis=(1, 2, 3)) + RNG.normal(0, 0.1, BOXES.shape)


@pytest.mark.benchmark(group="extract_boxes 64x128x128, 50 boxes of 33^3")
@pytest.mark.parametrize("impl", [extract_boxes, extract_boxes_reference], ids=["numba", "reference"])
def test_extract_boxes(benchmark, impl):
    impl(VOLUME, CENTERS, 16)
    boxes = benchmark(impl, VOLUME, CENTERS, 16)
    npt.assert_array_equal(boxes, extract_boxes_reference(VOLUME, CENTERS, 16))


@pytest.mark.benchmark(group="xcorr_shift 50 boxes of 9^3")
@pytest.mark.parametrize("impl", [xcorr_shift, xcorr_shift_reference], ids=["fft", "reference"])
def test_xcorr_shift(benchmark, impl):
    shifts = benchmark(impl, BOXES, MODELS)
    npt.assert_allclose(shifts, xcorr_shift_reference(BOXES, MODELS), atol=1e-6)


def test_compile_time(benchmark):
    """First post-processing call in a fresh process with an empty numba cache: compilation included."""
    if not LARGE:
        pytest.skip("set CRYOVES_BENCH_LARGE=1 (compiles every kernel from scratch, tens of seconds)")
    benchmark.group = "compile: first post-processing call, empty numba cache"
    code = ("from cryoves.cluster.bench import phantom_probability\n"
            "from cryoves.engine.synthetic.phantom import make_phantom\n"
            "from cryoves.engine.pipeline import SegmentParams, postprocess\n"
            "p = make_phantom((32, 64, 64), 22.0, 0)\n"
            "import time; t = time.perf_counter()\n"
            "postprocess(p.tomogram, phantom_probability(p), 22.0, SegmentParams())\n"
            "print(time.perf_counter() - t)\n")

    def fresh(tmp):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp))
        return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()[-1])

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        seconds = benchmark.pedantic(fresh, args=(tmp,), rounds=1, iterations=1)
    benchmark.extra_info["first_call_s"] = seconds


# --- scaling -------------------------------------------------------------------------------------

VOXEL_SHAPES = [SIZES[n] for n in ("small", "medium", "large")] if LARGE else [(32, 64, 64), (48, 96, 96),
                                                                               (64, 128, 128)]
FRACTIONS = (0.04, 0.12, 0.3)
FRACTION_SHAPE = SIZES["medium"] if LARGE else SIZES["small"]


def _best_postprocess_s(phantom, repeats: int) -> float:
    probability = phantom_probability(phantom)
    found = _found(postprocess(phantom.tomogram, probability, VS, PARAMS))  # compile / warm caches
    assert found >= 0.8 * phantom.vesicles.num_rows  # times of a post-processing that works
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        postprocess(phantom.tomogram, probability, VS, PARAMS)
        times.append(time.perf_counter() - start)
    return min(times)


def _scaling(benchmark, phantoms, x, name):
    repeats = 3 if benchmark.enabled else 1

    def run():
        return [_best_postprocess_s(p, repeats) for p in phantoms]

    seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    exponent = fitted_exponent(x, seconds)
    benchmark.extra_info[name] = list(x)
    benchmark.extra_info["seconds"] = [round(s, 4) for s in seconds]
    benchmark.extra_info["exponent"] = round(exponent, 2)
    return exponent


@pytest.mark.benchmark(group="scaling of post-processing")
def test_scaling_with_voxels(benchmark):
    """Time against voxel count at the default vesicle density; exponent 1 = linear."""
    phantoms = [make_phantom(shape, VS, seed=0) for shape in VOXEL_SHAPES]
    _scaling(benchmark, phantoms, [prod(shape) for shape in VOXEL_SHAPES], "n_voxels")


@pytest.mark.benchmark(group="scaling of post-processing")
def test_scaling_with_vesicles(benchmark):
    """Time against vesicle count (vesicle_fraction 0.04, 0.12, 0.3) at a fixed volume."""
    phantoms = [make_phantom(FRACTION_SHAPE, VS, seed=0,
                             preset=dataclasses.replace(PRESETS["default"], vesicle_fraction=f)) for f in FRACTIONS]
    _scaling(benchmark, phantoms, [p.vesicles.num_rows for p in phantoms], "n_vesicles")
