"""The network in bfloat16 (`make_logit_fn` precision): close to float32, exactly tiling-invariant, chosen by
the CPU, recorded with the parameters."""

import numpy as np
import numpy.testing as npt
import pytest
from scipy import ndimage
from scipy.special import expit

from cryoves.engine.errors import CryovesError
from cryoves.engine.network import model
from cryoves.engine.network.inference import InferenceParams, predict_tiled
from cryoves.engine.network.model import load_logit_fn, make_logit_fn, read_model_weights


@pytest.fixture(scope="module")
def volume():
    raw = np.random.default_rng(1).standard_normal((48, 72, 80)).astype(np.float32)
    smooth = ndimage.gaussian_filter(raw, 1.5)
    return (smooth - smooth.mean()) / smooth.std()


@pytest.fixture(scope="module")
def logit_fns(cryovesnet_weights, volume):
    weights = read_model_weights(cryovesnet_weights)
    bfloat16 = make_logit_fn(weights, precision="bfloat16")
    try:
        bfloat16(volume[None, :8, :8, :8])
    except Exception as error:  # noqa: BLE001 - TensorFlow's error types for a missing kernel vary
        pytest.skip(f"TensorFlow has no bfloat16 convolution on this CPU ({type(error).__name__})")
    return make_logit_fn(weights), bfloat16


def test_bfloat16_probabilities_follow_float32(logit_fns, volume):
    window = volume[None, :32, :64, :64]
    single, half = (expit(fn(window)[0]) for fn in logit_fns)
    difference = np.abs(single - half)
    assert difference.max() > 0  # the arithmetic really is another one
    # measured on this input: largest 0.036, mean 0.0011, masks agree on 99.86 % of the voxels
    assert difference.max() < 0.1 and difference.mean() < 0.005
    assert np.mean((single >= 0.5) == (half >= 0.5)) > 0.995


def test_bfloat16_map_does_not_depend_on_tiling_or_steps(logit_fns, cryovesnet_weights, volume):
    """Each output voxel is the same sequence of bfloat16 roundings however the volume is cut."""
    half = logit_fns[1]
    whole = predict_tiled(volume, half, InferenceParams(border_vox=4, precision="bfloat16"))
    tiled = predict_tiled(volume, half, InferenceParams(border_vox=4, tile_vox=32, precision="bfloat16"))
    npt.assert_array_equal(tiled, whole)
    two_rows = make_logit_fn(read_model_weights(cryovesnet_weights), rows=2, precision="bfloat16")
    window = volume[None, :32, :64, :64]
    npt.assert_array_equal(two_rows(window), half(window))


@pytest.mark.parametrize("has_bfloat16", [True, False])
def test_the_default_precision_follows_the_cpu(monkeypatch, has_bfloat16):
    monkeypatch.setattr(model, "cpu_has_bfloat16", lambda: has_bfloat16)
    assert InferenceParams().precision == ("bfloat16" if has_bfloat16 else "float32")
    assert InferenceParams(precision="float32").precision == "float32"


def test_bfloat16_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(model, "cpu_has_bfloat16", lambda: False)
    with pytest.raises(CryovesError, match="no bfloat16 instructions.*--precision float32"):
        load_logit_fn(None, "cpu", "bfloat16")


def test_an_unknown_precision_is_refused():
    with pytest.raises(CryovesError, match="precision must be one of float32, bfloat16"):
        InferenceParams(precision="float16")


def test_precision_is_part_of_the_parameters_a_resume_compares():
    from cryoves.engine.io.outputs import params_digest
    from cryoves.engine.pipeline import SegmentParams

    def digest(precision):
        return params_digest(SegmentParams(inference=InferenceParams(precision=precision)), 22.0, "sha")

    assert digest("float32") != digest("bfloat16")
