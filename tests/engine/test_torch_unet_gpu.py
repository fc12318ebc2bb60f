"""The PyTorch network on a CUDA GPU equals the Keras network on the CPU (issue: GPU path).

The GPU machines have no TensorFlow, so the Keras output is stored: tests/data/unet_reference.npz
holds an input (float16, used as float32) and the bundled model's Keras probabilities for it. One
test recomputes them with Keras wherever Keras is installed (CI), so the file cannot go stale;
regenerate it with `python tests/engine/test_torch_unet_gpu.py`. The GPU tests skip without CUDA.
"""

from pathlib import Path

import numpy as np
import numpy.testing as npt
import pytest
from scipy.special import expit

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "unet_reference.npz"
SHAPE = (1, 32, 48, 48)


def _stored() -> tuple[np.ndarray, np.ndarray]:
    with np.load(REFERENCE) as data:
        return data["input"].astype(np.float32), data["probability"]


def _keras_probability(x: np.ndarray) -> np.ndarray:
    from cryoves.engine.network.model import load_logit_fn

    return expit(load_logit_fn(None, "cpu")(x)).astype(np.float32)


def _torch_probability(x: np.ndarray, device: str, half: bool) -> np.ndarray:
    from cryoves.engine.network.torch_unet import load_torch_unet, make_torch_logit_fn

    return expit(make_torch_logit_fn(load_torch_unet(None, device=device), half=half)(x))


@pytest.fixture
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the GPU path is checked on a GPU machine (benchmarks/gpu_session.sh)")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_stored_reference_is_the_keras_output():
    pytest.importorskip("keras", reason="Keras recomputes the stored reference; the GPU machines have none")
    x, probability = _stored()
    assert x.shape == SHAPE
    npt.assert_allclose(_keras_probability(x), probability, atol=1e-6)


def test_torch_float32_on_the_cpu_matches_keras():
    pytest.importorskip("torch")
    x, probability = _stored()
    npt.assert_allclose(_torch_probability(x, "cpu", half=False), probability, atol=1e-4)


@pytest.mark.gpu
def test_gpu_float32_without_tf32_matches_keras(cuda):
    x, probability = _stored()
    npt.assert_allclose(_torch_probability(x, "cuda", half=False), probability, atol=1e-4)


@pytest.mark.gpu
def test_gpu_float16_matches_keras(cuda):
    x, probability = _stored()
    npt.assert_allclose(_torch_probability(x, "cuda", half=True), probability, atol=2e-3)


@pytest.mark.gpu
def test_gpu_repeats_a_batch_bit_for_bit(cuda):
    """`cryoves run` and `cryoves segment` form the same batches; equal outputs need a deterministic GPU."""
    from cryoves.engine.network.torch_unet import load_torch_unet, make_torch_logit_fn

    x, _ = _stored()
    logit_fn = make_torch_logit_fn(load_torch_unet(None, device="cuda"))
    npt.assert_array_equal(logit_fn(x), logit_fn(x))


def _write_reference() -> None:
    from scipy.ndimage import gaussian_filter

    raw = np.random.default_rng(20261127).standard_normal(SHAPE[1:]).astype(np.float32)
    smooth = gaussian_filter(raw, 1.0)
    x = ((smooth - smooth.mean()) / smooth.std()).astype(np.float16)[None]
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, input=x, probability=_keras_probability(x.astype(np.float32)))


if __name__ == "__main__":
    _write_reference()
