"""U-Net inference throughput: cryoves tiling vs CryoVesNet's default tiling, same input, same run.

CryoVesNet (method.md §2.6) runs one 64³ window per call, keeps the central 24³ (stride 24, zero
padding), ≈19x redundant compute; cryoves uses large halo-24 tiles chosen from a memory budget.
Set CRYOVES_BENCH_LARGE=1 to add a larger volume (minutes on CPU).
"""

import os
from math import prod

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import expit

from cryoves.engine.network.inference import InferenceParams, plan_inference, predict_tiled

SHAPES = [(48, 48, 48)] + ([(64, 192, 192)] if os.environ.get("CRYOVES_BENCH_LARGE") else [])
WINDOW, KEEP = 64, 24


@pytest.fixture(scope="module")
def logit_fn(cryovesnet_weights_path):
    from cryoves.engine.network.model import build_unet, layer_weights, load_logit_fn, make_logit_fn

    if cryovesnet_weights_path.is_file():
        return load_logit_fn(cryovesnet_weights_path)
    return make_logit_fn(layer_weights(build_unet()))


def _volume(shape):
    raw = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(raw, 1.0)
    return (smooth - smooth.mean()) / smooth.std()


def cryovesnet_tiling(volume, logit_fn):
    """The reference's default: zero-pad, 64³ windows at stride 24, keep [20, 44), one per call."""
    margin = (WINDOW - KEEP) // 2
    padded = np.pad(volume, [(margin, KEEP - n % KEEP + margin) for n in volume.shape])
    out = np.empty(volume.shape, dtype=np.float32)
    for z in range(0, volume.shape[0], KEEP):
        for y in range(0, volume.shape[1], KEEP):
            for x in range(0, volume.shape[2], KEEP):
                tile = padded[None, z:z + WINDOW, y:y + WINDOW, x:x + WINDOW]
                kept = expit(logit_fn(tile)[0, margin:margin + KEEP, margin:margin + KEEP, margin:margin + KEEP])
                dz, dy, dx = (min(KEEP, n - o) for n, o in zip(volume.shape, (z, y, x)))
                out[z:z + dz, y:y + dy, x:x + dx] = kept[:dz, :dy, :dx]
    return out


def _cryovesnet_redundancy(shape):
    return prod(-(-n // KEEP) for n in shape) * WINDOW ** 3 / prod(shape)


@pytest.mark.benchmark(group="U-Net inference")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tiling", ["cryoves", "cryovesnet"])
def test_inference_throughput(benchmark, logit_fn, shape, tiling):
    volume = _volume(shape)
    params = InferenceParams()
    if tiling == "cryoves":
        def run():
            return predict_tiled(volume, logit_fn, params)
        redundancy = plan_inference(shape, params).redundancy
    else:
        def run():
            return cryovesnet_tiling(volume, logit_fn)
        redundancy = _cryovesnet_redundancy(shape)
    prob = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)  # warm-up traces the graph
    assert prob.shape == shape and np.isfinite(prob).all()
    if benchmark.stats is not None:
        benchmark.extra_info["mvoxel_per_s"] = prod(shape) / benchmark.stats.stats.mean / 1e6
    benchmark.extra_info["redundancy"] = round(redundancy, 2)

