"""The PyTorch port equals the Keras U-Net (same weights) in float32; tiled inference accepts it."""

import numpy as np
import numpy.testing as npt
import pytest

torch = pytest.importorskip("torch")

from cryoves.engine.network.inference import InferenceParams, predict_tiled  # noqa: E402
from cryoves.engine.network.model import layer_weights, make_logit_fn  # noqa: E402
from cryoves.engine.network.torch_unet import TorchUNet, load_torch_unet, make_torch_logit_fn  # noqa: E402


def test_parameter_count():
    net = TorchUNet()
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() for name, b in net.named_buffers() if "running" in name)
    assert n_params + n_buffers == 250_641


def test_equals_keras_with_random_weights(random_unet):
    model, weights = random_unet(4)
    net = TorchUNet(n_filter_base=4)
    net.load_keras_weights(weights)
    x = np.random.default_rng(1).standard_normal((2, 8, 16, 12)).astype(np.float32)
    npt.assert_allclose(make_torch_logit_fn(net.eval())(x), make_logit_fn(layer_weights(model))(x), atol=1e-4)


def test_equals_keras_with_cryovesnet_weights(cryovesnet_weights):
    from cryoves.engine.network.model import load_model

    x = np.random.default_rng(2).standard_normal((1, 64, 64, 64)).astype(np.float32)
    torch_logits = make_torch_logit_fn(load_torch_unet(cryovesnet_weights))(x)
    keras_logits = make_logit_fn(layer_weights(load_model(cryovesnet_weights)))(x)
    npt.assert_allclose(torch_logits, keras_logits, atol=1e-4)


def test_tiled_inference_accepts_the_torch_logit_fn(random_unet):
    model, weights = random_unet(2)
    net = TorchUNet(n_filter_base=2)
    net.load_keras_weights(weights)
    volume = np.random.default_rng(3).standard_normal((16, 24, 20)).astype(np.float32)
    params = InferenceParams(tile_vox=16, memory_gb=0.05)
    npt.assert_allclose(predict_tiled(volume, make_torch_logit_fn(net.eval()), params),
                        predict_tiled(volume, make_logit_fn(layer_weights(model)), params), atol=1e-4)


def test_loads_a_cryoves_model_folder(tmp_path, random_unet):
    from cryoves.engine.network.model import save_model

    model, _ = random_unet(16)
    save_model(model, tmp_path, {})
    x = np.random.default_rng(4).standard_normal((1, 16, 16, 24)).astype(np.float32)
    expected = make_logit_fn(layer_weights(model))(x)
    npt.assert_allclose(make_torch_logit_fn(load_torch_unet(tmp_path))(x), expected, atol=1e-4)
