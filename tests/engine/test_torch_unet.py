"""The PyTorch port equals the Keras U-Net (same weights) in float32; tiled inference accepts it."""

import numpy as np
import numpy.testing as npt
import pytest

torch = pytest.importorskip("torch")

from cryoves.engine.network.inference import InferenceParams, predict_tiled  # noqa: E402
from cryoves.engine.network.model import build_unet, make_logit_fn  # noqa: E402
from cryoves.engine.network.torch_unet import TorchUNet, load_torch_unet, make_torch_logit_fn  # noqa: E402


def _random_keras_weights(n_filter_base):
    model = build_unet(n_filter_base=n_filter_base)
    rng = np.random.default_rng(0)
    weights = {}
    for layer in model.layers:
        arrays = []
        for w in layer.weights:
            value = np.asarray(w)
            if "moving_variance" in w.path or "gamma" in w.path:
                value = rng.uniform(0.5, 1.5, value.shape)
            elif "moving_mean" in w.path or "beta" in w.path or "bias" in w.path:
                value = rng.normal(0, 0.2, value.shape)
            arrays.append(value.astype(np.float32))
        if arrays:
            layer.set_weights(arrays)
            weights[layer.name] = arrays
    return model, weights


def test_parameter_count():
    net = TorchUNet()
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() for name, b in net.named_buffers() if "running" in name)
    assert n_params + n_buffers == 250_641


def test_equals_keras_with_random_weights():
    model, weights = _random_keras_weights(4)
    net = TorchUNet(n_filter_base=4)
    net.load_keras_weights(weights)
    x = np.random.default_rng(1).standard_normal((2, 8, 16, 12)).astype(np.float32)
    npt.assert_allclose(make_torch_logit_fn(net.eval())(x), make_logit_fn(model)(x), atol=1e-4)


def test_equals_keras_with_cryovesnet_weights(cryovesnet_weights):
    from cryoves.engine.network.model import load_unet

    x = np.random.default_rng(2).standard_normal((1, 64, 64, 64)).astype(np.float32)
    torch_logits = make_torch_logit_fn(load_torch_unet(cryovesnet_weights))(x)
    keras_logits = make_logit_fn(load_unet(cryovesnet_weights))(x)
    npt.assert_allclose(torch_logits, keras_logits, atol=1e-4)


def test_tiled_inference_accepts_the_torch_logit_fn():
    model, weights = _random_keras_weights(2)
    net = TorchUNet(n_filter_base=2)
    net.load_keras_weights(weights)
    volume = np.random.default_rng(3).standard_normal((16, 24, 20)).astype(np.float32)
    params = InferenceParams(tile_vox=16, memory_gb=0.05)
    npt.assert_allclose(predict_tiled(volume, make_torch_logit_fn(net.eval()), params),
                        predict_tiled(volume, make_logit_fn(model), params), atol=1e-4)


def test_loads_a_cryoves_model_folder(tmp_path):
    from cryoves.engine.network.model import save_model

    model, _ = _random_keras_weights(16)
    save_model(model, tmp_path, {})
    x = np.random.default_rng(4).standard_normal((1, 16, 16, 24)).astype(np.float32)
    npt.assert_allclose(make_torch_logit_fn(load_torch_unet(tmp_path))(x), make_logit_fn(model)(x), atol=1e-4)
