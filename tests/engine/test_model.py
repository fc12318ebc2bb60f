"""The U-Net of method.md §2.5: architecture, parameter count, CryoVesNet weight loading."""

import gc
import weakref

import h5py
import numpy as np
import numpy.testing as npt
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.model import (
    N_PARAMETERS,
    build_unet,
    layer_weights,
    load_model,
    logit_model,
    make_logit_fn,
)


@pytest.fixture(scope="module")
def random_model(random_unet):
    return random_unet()[0]


def _csbdeep_unet():
    import keras
    from csbdeep.internals.blocks import unet_block

    inputs = keras.Input(shape=(None, None, None, 1))
    x = unet_block(n_depth=2, n_filter_base=16, kernel_size=(3, 3, 3), n_conv_per_depth=2,
                   batch_norm=True, pool=(2, 2, 2))(inputs)
    outputs = keras.layers.Conv3D(1, (1, 1, 1), activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def test_parameter_count():
    model = build_unet()
    assert model.count_params() == N_PARAMETERS == 250_641
    n_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert n_trainable == 250_097


@pytest.mark.parametrize("weights", ["random", "cryovesnet"])
def test_equals_csbdeep_unet_block(random_model, weights, request):
    model = random_model if weights == "random" else load_model(request.getfixturevalue("cryovesnet_weights"))
    reference = _csbdeep_unet()
    ours = model.get_weights()
    assert [tuple(w.shape) for w in reference.weights] == [w.shape for w in ours]
    reference.set_weights(ours)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 64, 1)).astype(np.float32)
    expected = np.asarray(reference(x, training=False))
    npt.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-5)
    logits = make_logit_fn(layer_weights(model))(x[..., 0])
    npt.assert_allclose(1 / (1 + np.exp(-logits)), expected[..., 0], atol=1e-5)


def test_logit_model_drops_only_the_sigmoid(random_model):
    x = np.random.default_rng(2).standard_normal((2, 16, 24, 8, 1)).astype(np.float32)
    logits = np.asarray(logit_model(random_model)(x, training=False))
    npt.assert_allclose(1 / (1 + np.exp(-logits)), np.asarray(random_model(x, training=False)), atol=1e-6)


def test_logit_fn_holds_nothing_of_a_window_once_it_returns(random_model):
    """The streamed forward's row caches refer to each other: they are cleared on return, not left to Python's
    garbage collector, which held the window (and its batch) and layer outputs after the network ran."""
    window = np.random.default_rng(3).standard_normal((1, 16, 24, 8)).astype(np.float32)
    gone = weakref.ref(window)
    gc.disable()
    try:
        make_logit_fn(layer_weights(random_model))(window)
        del window
        assert gone() is None
    finally:
        gc.enable()


def test_logit_fn_rejects_sizes_off_the_pooling_grid(random_model):
    with pytest.raises(ValueError, match="multiples of 4"):
        make_logit_fn(layer_weights(random_model))(np.zeros((1, 8, 8, 6), np.float32))


def test_load_cryovesnet_weights_by_topological_order(cryovesnet_weights):
    model = load_model(cryovesnet_weights)
    with h5py.File(cryovesnet_weights, "r") as f:
        g = f["model_weights"]
        npt.assert_array_equal(model.get_layer("middle_2").get_weights()[0], g["middle_2/middle_2/kernel:0"])
        bn = model.get_layer("middle_2_bn").get_weights()
        npt.assert_array_equal(bn[3], g["batch_normalization_5/batch_normalization_5/moving_variance:0"])
        npt.assert_array_equal(model.get_layer("output").get_weights()[1], g["conv3d/conv3d/bias:0"])
    assert model.count_params() == N_PARAMETERS


def test_missing_weights_file(tmp_path):
    with pytest.raises(CryovesError, match="weight file not found"):
        load_model(tmp_path / "nope.h5")


def test_not_an_h5_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not hdf5")
    with pytest.raises(CryovesError, match="not a Keras HDF5 weight file"):
        load_model(path)


def test_incompatible_weights(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"down_level_0_no_0", b"dense"]
        conv = g.create_group("down_level_0_no_0")
        conv.attrs["weight_names"] = [b"down_level_0_no_0/kernel:0", b"down_level_0_no_0/bias:0"]
        conv.create_dataset("down_level_0_no_0/kernel:0", data=np.zeros((3, 3, 3, 1, 8), np.float32))
        conv.create_dataset("down_level_0_no_0/bias:0", data=np.zeros(8, np.float32))
        dense = g.create_group("dense")
        dense.attrs["weight_names"] = [b"dense/kernel:0"]
        dense.create_dataset("dense/kernel:0", data=np.zeros((8, 1), np.float32))
    with pytest.raises(CryovesError, match="do not match the CryoVesNet U-Net"):
        load_model(path)


def test_cryovesnet_weights_get_the_reference_prefilter_by_default(cryovesnet_weights, tmp_path):
    from cryoves.cluster.cli import _segment_params, build_parser
    from cryoves.engine.network.model import model_inference_params

    reference = model_inference_params(cryovesnet_weights)  # method.md §2.2-2.3: the reference code's
    assert reference.gaussian_sigma_vox == 1.0 and reference.resampling == "linear"
    # the reflected border each model does best with at faces that cut vesicles (benchmarks/BORDERS.md)
    assert reference.border_vox == 4 and model_inference_params(None).border_vox == 0
    parse = build_parser().parse_args
    tomo = str(tmp_path / "t.mrc")
    default = _segment_params(parse(["segment", tomo, "--out", "o", "--weights", str(cryovesnet_weights)]))
    assert default.inference == reference
    denoised = _segment_params(parse(["segment", tomo, "--out", "o", "--weights", str(cryovesnet_weights),
                                      "--prefilter-sigma", "0"]))
    assert denoised.inference.gaussian_sigma_vox == 0.0


def test_a_model_folder_of_another_network_is_refused(tmp_path):
    from cryoves.engine.network.model import MODEL_WEIGHTS, load_logit_fn, read_model_weights

    arrays = {f"{name}/{i}": a for name, ws in read_model_weights(None).items() for i, a in enumerate(ws)}
    arrays["middle_0/0"] = np.zeros((3, 3, 3, 32, 32), np.float32)  # 32 filters where the U-Net has 64
    np.savez(tmp_path / MODEL_WEIGHTS, **arrays)
    with pytest.raises(CryovesError, match=r"layer middle_0 has weight shapes \[\(3, 3, 3, 32, 32\), \(64,\)\]"):
        load_logit_fn(tmp_path)


def test_running_the_network_leaves_tensorflows_public_api_and_keras_unimported():
    """The network runs on TensorFlow's operations alone (`tensorflow_ops`: about 680 modules of TensorFlow's
    3,500, 1.2 against 3.7 s), without Keras (1 s, 120 MB), and the same logits as through the public API; both
    still import afterwards, and the operations are the public API's own functions (two of them the public API
    wraps for its WeakTensor dtype rules, which act only with NumPy behaviour switched on)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from cryoves.engine.network.model import load_logit_fn; "
            "from cryoves.engine.network.tensorflow_ops import SOURCES, tensorflow_ops; "
            "tiles = np.random.default_rng(0).normal(size=(1, 8, 16, 12)).astype(np.float32); "
            "logits = load_logit_fn(None)(tiles); "
            "public_api = [m for m in sys.modules if m.startswith(('keras', 'tensorflow._api'))]; "
            "assert not public_api and len(sys.modules) < 1500, (public_api[:5], len(sys.modules)); "
            "import inspect, operator, tensorflow as tf, keras; keras.layers.Conv3D(1, 1); ops = tensorflow_ops(); "
            "public = {f: inspect.unwrap(operator.attrgetter(n)(tf)) for f, (n, _, _) in SOURCES.items()}; "
            "moved = [f for f in SOURCES if inspect.unwrap(getattr(ops, f)) is not public[f]]; "
            "assert not moved, moved; "
            "tensorflow_ops.cache_clear(); public = load_logit_fn(None)(tiles); "
            "assert np.array_equal(logits, public); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
