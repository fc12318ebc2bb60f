"""Tiled inference: tiling plans, tiling invariance (interior and borders), TTA, full pipeline."""

import subprocess
import sys

import numpy as np
import numpy.testing as npt
import pytest
from scipy import ndimage
from scipy.special import expit

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.inference import (
    InferenceParams,
    plan_inference,
    plan_tiles,
    predict_probability,
    predict_tiled,
    prepare_network_input,
    probability_on_input_grid,
    read_tile,
)


@pytest.fixture(scope="module")
def tiny_logit_fn():
    """The same architecture (same receptive field) with 2 base filters and random weights."""
    from cryoves.engine.network.model import build_unet, make_logit_fn

    model = build_unet(n_filter_base=2)
    rng = np.random.default_rng(0)
    weights = []
    for w in model.weights:  # all drawn here: independent of Keras' global seed and test order
        shape = tuple(w.shape)
        if "kernel" in w.path:
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        elif "moving_variance" in w.path or "gamma" in w.path:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.3, shape)
        weights.append(value.astype(np.float32))
    model.set_weights(weights)
    return make_logit_fn(model)


@pytest.fixture(scope="module")
def volume():
    raw = np.random.default_rng(1).standard_normal((29, 42, 37)).astype(np.float32)
    smooth = ndimage.gaussian_filter(raw, 1.5)
    return (smooth - smooth.mean()) / smooth.std()


def _untiled(volume, logit_fn, halo):
    """One network pass over the whole volume, extended by `halo` (reflect) and to the 4-voxel grid."""
    pad = [(halo, halo + (-n) % 4) for n in volume.shape]
    padded = np.pad(volume, pad, mode="symmetric")
    logits = logit_fn(padded[None])[0]
    z, y, x = volume.shape
    return expit(logits[halo:halo + z, halo:halo + y, halo:halo + x])


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 9, 13), (29, 42, 37), (64, 64, 8)])
@pytest.mark.parametrize("tile", [4, 12, 32])
def test_plan_tiles_cover_once_on_the_grid(shape, tile):
    halo = 24
    tiles = plan_tiles(shape, tile, halo)
    count = np.zeros(shape, dtype=int)
    windows = set()
    for t in tiles:
        count[t.write] += 1
        windows.add(tuple(s.stop - s.start for s in t.read))
        for r, c, w in zip(t.read, t.crop, t.write):
            assert r.start % 4 == 0 and (r.stop - r.start) % 4 == 0
            assert c.stop - c.start == w.stop - w.start > 0
            assert c.start >= halo and c.stop <= r.stop - r.start - halo
            assert r.start + c.start - halo == w.start  # crop and write are the same voxels
    npt.assert_array_equal(count, 1)
    assert len(windows) == 1


def test_read_tile_is_reflect_extension():
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    halo = 8
    (tile,) = plan_tiles(volume.shape, 8, halo)
    padded = np.pad(volume, [(halo, halo + (-n) % 4) for n in volume.shape], mode="symmetric")
    npt.assert_array_equal(read_tile(volume, tile, halo), padded[tile.read])


def test_plan_inference_from_memory_budget():
    small = plan_inference((40, 200, 200), InferenceParams(memory_gb=0.2))
    large = plan_inference((40, 200, 200), InferenceParams(memory_gb=4.0))
    assert large.redundancy < small.redundancy
    assert len(large.tiles) < len(small.tiles)
    whole = plan_inference((8, 12, 16), InferenceParams())
    assert len(whole.tiles) == 1 and whole.window_shape == (56, 60, 64)
    cryovesnet_like = plan_inference((48, 48, 48), InferenceParams(tile_vox=24, halo_vox=24))
    assert cryovesnet_like.redundancy == pytest.approx(8 * 72 ** 3 / 48 ** 3)


@pytest.mark.parametrize("tta", [1, 4, 8])
def test_tiling_invariance_interior_and_borders(tiny_logit_fn, volume, tta):
    small = predict_tiled(volume, tiny_logit_fn, InferenceParams(tile_vox=12, tta=tta, memory_gb=0.05))
    large = predict_tiled(volume, tiny_logit_fn, InferenceParams(tile_vox=28, tta=tta))
    assert small.dtype == np.float32 and small.shape == volume.shape
    assert 0.01 < small.std()  # not a saturated, trivially tiling-invariant map
    npt.assert_allclose(small, large, atol=1e-4)
    if tta == 1:
        npt.assert_allclose(small, _untiled(volume, tiny_logit_fn, 24), atol=1e-4)


def test_tta_inverts_each_transform():
    volume = np.random.default_rng(2).standard_normal((8, 12, 16)).astype(np.float32)
    for tta in (1, 4, 8):
        out = predict_tiled(volume, lambda tiles: tiles.copy(), InferenceParams(tta=tta))
        npt.assert_allclose(out, expit(volume), atol=1e-6)


def test_progress_reports_every_tile(tiny_logit_fn, volume):
    calls = []
    params = InferenceParams(tile_vox=16, memory_gb=0.02)
    predict_tiled(volume, tiny_logit_fn, params, progress=lambda done, total: calls.append((done, total)))
    n_tiles = len(plan_inference(volume.shape, params).tiles)
    assert calls[-1] == (n_tiles, n_tiles)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("field, value, message", [
    ("tta", 2, "tta must be 1, 4 or 8"),
    ("halo_vox", 20, "halo_vox must be a multiple of 4 and >= 23"),
    ("tile_vox", 10, "tile_vox must be a positive multiple of 4"),
    ("memory_gb", 0, "memory_gb must be > 0"),
    ("gaussian_sigma_vox", -1, "gaussian_sigma_vox must be >= 0"),
])
def test_params_validation(field, value, message):
    with pytest.raises(CryovesError, match=message):
        InferenceParams(**{field: value})


def test_prepare_network_input_does_not_touch_the_tomogram():
    tomogram = np.random.default_rng(3).standard_normal((10, 12, 14)).astype(np.float32) + 5
    before = tomogram.copy()
    net = prepare_network_input(tomogram, 22.0, InferenceParams(gaussian_sigma_vox=0))
    npt.assert_array_equal(tomogram, before)
    assert net.shape == tomogram.shape and abs(net.mean()) < 1e-5
    assert prepare_network_input(tomogram, 11.0, InferenceParams()).shape == (5, 6, 7)


def test_predict_probability_and_back_to_input_grid(tiny_logit_fn):
    tomogram = np.random.default_rng(4).integers(-50, 50, (30, 41, 35)).astype(np.int16)
    prob = predict_probability(tomogram, 14.7, tiny_logit_fn, InferenceParams(memory_gb=0.1))
    assert prob.shape == (20, 27, 23) and prob.dtype == np.float32
    back = probability_on_input_grid(prob, tomogram.shape)
    assert back.shape == tomogram.shape and back.dtype == np.float32
    assert back.min() >= 0 and back.max() <= 1


def test_real_weights_find_a_dark_ring(cryovesnet_weights):
    """A hollow dark shell of vesicle size (~40 nm) lights up; flat background does not."""
    from cryoves.engine.network.model import load_unet, make_logit_fn

    z, y, x = np.mgrid[:48, :48, :48].astype(np.float32) - 23.5
    r = np.sqrt(z * z + y * y + x * x)
    tomogram = -np.exp(-((r - 9.0) ** 2) / 2.0) + 0.05 * np.random.default_rng(5).standard_normal(r.shape)
    prob = predict_probability(tomogram.astype(np.float32), 22.0, make_logit_fn(load_unet(cryovesnet_weights)),
                               InferenceParams())
    assert prob[r < 7].mean() > 0.5
    assert prob[r > 16].mean() < 0.2


def test_importing_inference_and_model_does_not_import_tensorflow():
    code = ("import sys, cryoves.engine.network.inference, cryoves.engine.network.model; "
            "sys.exit(any(m.split('.')[0] in ('tensorflow', 'keras', 'csbdeep') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
