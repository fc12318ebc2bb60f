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
    window_bytes,
)


@pytest.fixture(scope="module")
def tiny_unet():
    """The same architecture (same receptive field) with 2 base filters and random weights."""
    from cryoves.engine.network.model import build_unet

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
    return model


@pytest.fixture(scope="module")
def tiny_logit_fn(tiny_unet):
    from cryoves.engine.network.model import layer_weights, make_logit_fn

    return make_logit_fn(layer_weights(tiny_unet))


@pytest.mark.parametrize("shape", [(4, 4, 4), (8, 12, 20), (36, 28, 16)])
@pytest.mark.parametrize("rows", [1, 2, 4, 16, 64])
def test_streamed_forward_equals_one_whole_window_pass(tiny_unet, shape, rows):
    """Layer by layer, a few z-rows at a time, each row kept only while needed: the logits of the whole window."""
    from cryoves.engine.network.model import layer_weights, logit_model, make_logit_fn

    tiles = np.random.default_rng(6).standard_normal((2, *shape)).astype(np.float32)
    expected = np.asarray(logit_model(tiny_unet)(tiles[..., None], training=False))[..., 0]
    npt.assert_allclose(make_logit_fn(layer_weights(tiny_unet), rows=rows)(tiles), expected, atol=1e-5)


@pytest.fixture(scope="module")
def volume():
    """Smooth noise, large enough to be cut along every axis with 24-voxel halos."""
    raw = np.random.default_rng(1).standard_normal((80, 80, 100)).astype(np.float32)
    smooth = ndimage.gaussian_filter(raw, 1.5)
    return (smooth - smooth.mean()) / smooth.std()


def _untiled(volume, logit_fn, border):
    """One network pass over the whole volume extended by `border` (reflect) and to the 4-voxel grid."""
    pad = [(border, border + (-(n + 2 * border)) % 4) for n in volume.shape]
    padded = np.pad(volume, pad, mode="symmetric")
    logits = logit_fn(padded[None])[0]
    z, y, x = volume.shape
    return expit(logits[border:border + z, border:border + y, border:border + x])


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 9, 13), (29, 42, 37), (64, 64, 8), (60, 130, 200)])
@pytest.mark.parametrize("counts", [(1, 1, 1), (1, 2, 3), (2, 2, 2)])
@pytest.mark.parametrize("border", [0, 4, 24])
def test_plan_tiles_cover_once_on_the_grid(shape, counts, border):
    halo = 24
    tiles = plan_tiles(shape, counts, halo, border)
    count = np.zeros(shape, dtype=int)
    windows = set()
    for t in tiles:
        count[t.write] += 1
        windows.add(tuple(s.stop - s.start for s in t.read))
        for r, c, w, n in zip(t.read, t.crop, t.write, shape):
            end = -(-(n + 2 * border) // 4) * 4  # the extended axis
            assert r.start % 4 == 0 and (r.stop - r.start) % 4 == 0 and 0 <= r.start < r.stop <= end
            assert c.stop - c.start == w.stop - w.start > 0
            assert r.start + c.start - border == w.start  # crop and write are the same voxels
            # kept voxels lie `halo` inside the window, except at a face of the extended volume
            assert c.start >= halo or r.start == 0
            assert c.stop <= r.stop - r.start - halo or r.stop == end
    npt.assert_array_equal(count, 1)
    assert len(windows) == 1


def test_read_tile_is_reflect_extension():
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    border = 8
    (tile,) = plan_tiles(volume.shape, (1, 1, 1), 24, border)
    padded = np.pad(volume, [(border, border + (-(n + 2 * border)) % 4) for n in volume.shape], mode="symmetric")
    npt.assert_array_equal(read_tile(volume, tile, border), padded[tile.read])


def test_plan_inference_from_memory_budget():
    small = plan_inference((40, 200, 200), InferenceParams(memory_gb=0.2))
    large = plan_inference((40, 200, 200), InferenceParams(memory_gb=4.0))
    assert large.redundancy < small.redundancy
    assert len(large.tiles) == 1 < len(small.tiles)
    assert window_bytes(small.window_shape) * small.batch_size <= 0.2e9
    # one window: the volume, its 4-voxel reflected border and the grid; nothing else is computed
    whole = plan_inference((8, 12, 16), InferenceParams())
    assert len(whole.tiles) == 1 and whole.window_shape == (16, 20, 24)
    fits = plan_inference((64, 128, 128), InferenceParams(memory_gb=4.0))
    assert fits.redundancy == pytest.approx(72 * 136 * 136 / (64 * 128 * 128))
    assert plan_inference((64, 128, 128), InferenceParams(border_vox=0)).redundancy == 1.0
    # the old rule: every window keeps 24 voxels on every side, cores of 24
    cryovesnet_like = plan_inference((48, 48, 48), InferenceParams(tile_vox=24, border_vox=24))
    assert cryovesnet_like.window_shape == (72, 72, 72) and len(cryovesnet_like.tiles) == 8


def test_plan_inference_cuts_the_section_before_z():
    """Memory grows with the window's y·x section (the network streams along z): cuts go across y and x."""
    plan = plan_inference((134, 342, 342), InferenceParams(memory_gb=1.0))
    counts = [len({t.read[a].start for t in plan.tiles}) for a in range(3)]
    assert counts[0] == 1 and counts[1] * counts[2] > 1
    assert window_bytes(plan.window_shape) <= 1e9


@pytest.mark.parametrize("border, tta, tile", [(0, 1, 28), (4, 1, 28), (24, 1, 40), (4, 4, 28), (4, 8, 28)])
def test_tiling_invariance_interior_and_borders(tiny_logit_fn, volume, border, tta, tile):
    cut = InferenceParams(tile_vox=tile, tta=tta, border_vox=border, memory_gb=0.05)
    tiles = plan_inference(volume.shape, cut).tiles
    assert all(len({t.read[axis].start for t in tiles}) >= 2 for axis in range(3))  # cut across every axis
    tiled = predict_tiled(volume, tiny_logit_fn, cut)
    whole = predict_tiled(volume, tiny_logit_fn, InferenceParams(tta=tta, border_vox=border, memory_gb=4))
    assert tiled.dtype == np.float32 and tiled.shape == volume.shape
    assert 0.01 < tiled.std()  # not a saturated, trivially tiling-invariant map
    npt.assert_allclose(tiled, whole, atol=1e-4)
    if tta == 1:
        npt.assert_allclose(tiled, _untiled(volume, tiny_logit_fn, border), atol=1e-4)


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
    from cryoves.engine.network.model import load_logit_fn

    z, y, x = np.mgrid[:48, :48, :48].astype(np.float32) - 23.5
    r = np.sqrt(z * z + y * y + x * x)
    tomogram = -np.exp(-((r - 9.0) ** 2) / 2.0) + 0.05 * np.random.default_rng(5).standard_normal(r.shape)
    prob = predict_probability(tomogram.astype(np.float32), 22.0, load_logit_fn(cryovesnet_weights),
                               InferenceParams())
    assert prob[r < 7].mean() > 0.5
    assert prob[r > 16].mean() < 0.2


def test_importing_inference_and_model_does_not_import_tensorflow():
    code = ("import sys, cryoves.engine.network.inference, cryoves.engine.network.model; "
            "sys.exit(any(m.split('.')[0] in ('tensorflow', 'keras', 'csbdeep') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
