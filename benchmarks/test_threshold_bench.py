"""Benchmarks of the global threshold search and the local step on a 64x128x128 vesicle scene.

Run: ``pytest benchmarks/test_threshold_bench.py``; the group table's bracketed ratios give the
numba speed-up over the erosion reference from the same run. ``--benchmark-disable`` runs each once.
"""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.engine.stages.localize import LocalizeParams, label_segments, localize
from cryoves.engine.stages.threshold import ThresholdParams, global_threshold
from cryoves.kernels.shell import shell_sums, shell_sums_reference

SHAPE = (64, 128, 128)
THRESHOLDS = ThresholdParams().thresholds()


@pytest.fixture(scope="module")
def scene():
    """About 30 vesicles of radius 7 voxels, some touching; dark membrane 2 voxels inside the P = 0.5 level."""
    rng = np.random.default_rng(11)
    centres = []
    while len(centres) < 30:
        c = rng.uniform([10, 10, 10], np.array(SHAPE) - 10)
        if all(np.linalg.norm(c - o) > 18 for o in centres):
            centres.append(c)
    for c in centres[:4]:  # touching partners, merged by the global threshold
        v = rng.normal(size=3)
        centres.append(c + 11 * v / np.linalg.norm(v))
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    s = np.full(SHAPE, np.inf, np.float32)
    for c in centres:
        np.minimum(s, np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - 7.0, out=s)
    probability = (1.0 / (1.0 + np.exp(np.clip(s, -50, 50)))).astype(np.float32)
    tomogram = (-np.exp(-((s + 2.0) ** 2) / 0.5) + rng.normal(0, 0.3, SHAPE)).astype(np.float32)
    return tomogram, probability


@pytest.mark.benchmark(group="shell_sums 64x128x128, 20 thresholds")
@pytest.mark.parametrize("impl", [shell_sums, shell_sums_reference], ids=["numba", "reference"])
def test_shell_sums(benchmark, scene, impl):
    tomogram, probability = scene
    impl(tomogram, probability, THRESHOLDS)  # compile outside the timed rounds
    sums, counts = benchmark(impl, tomogram, probability, THRESHOLDS)
    ref_sums, ref_counts = shell_sums_reference(tomogram, probability, THRESHOLDS)
    npt.assert_array_equal(counts, ref_counts)
    npt.assert_allclose(sums, ref_sums, rtol=1e-9, atol=1e-9 * np.abs(tomogram).sum(dtype=np.float64))


@pytest.mark.benchmark(group="global threshold 64x128x128")
def test_global_threshold(benchmark, scene):
    tomogram, probability = scene
    global_threshold(tomogram, probability, ThresholdParams())
    result = benchmark(global_threshold, tomogram, probability, ThresholdParams())
    assert 0.80 <= result.threshold < 1.0


@pytest.mark.benchmark(group="threshold + label + localize 64x128x128")
def test_threshold_label_localize(benchmark, scene):
    tomogram, probability = scene

    def pipeline():
        t = global_threshold(tomogram, probability, ThresholdParams()).threshold
        labels = label_segments(probability, t, 6)
        return localize(probability, labels, t, 30.0, LocalizeParams())  # r_min = 4 voxels

    pipeline()
    local = benchmark(pipeline)
    assert local.max() > 0
