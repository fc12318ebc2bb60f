"""The CARE/CSBDeep 3-D U-Net of CryoVesNet (method.md §2.5) and loading of its Keras 2 weights.

The one module that imports TensorFlow/Keras, and only inside the functions that build or run the
network: reading the weight file needs h5py alone, so the PyTorch port (`torch_unet`) shares it.
The rest of the engine sees the network only as a `LogitFn`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryoves.engine.errors import CryovesError

if TYPE_CHECKING:
    import keras

LogitFn = Callable[[np.ndarray], np.ndarray]
"""Maps float32 tiles (B, Z, Y, X) of the z-scored volume, sizes multiples of 4, to float32 logits
of the same shape (`make_logit_fn` here, `torch_unet.make_torch_logit_fn` for the GPU)."""

N_PARAMETERS = 250_641
POOLING_FACTOR = 4
"""Input sizes must be multiples of this (two 2x poolings); tile origins too, for tiling invariance."""

LOGIT_LAYER = "output"
BN_EPSILON = 1e-3


def conv_layers(n_filter_base: int = 16) -> list[tuple[str, int, int]]:
    """(csbdeep name, input channels, output channels) of the ten 3x3x3 conv+BN+ReLU blocks, in order."""
    f = n_filter_base
    return [
        ("down_level_0_no_0", 1, f), ("down_level_0_no_1", f, f),
        ("down_level_1_no_0", f, 2 * f), ("down_level_1_no_1", 2 * f, 2 * f),
        ("middle_0", 2 * f, 4 * f), ("middle_2", 4 * f, 2 * f),
        ("up_level_1_no_0", 4 * f, 2 * f), ("up_level_1_no_2", 2 * f, f),
        ("up_level_0_no_0", 2 * f, f), ("up_level_0_no_2", f, f),
    ]


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up messages (CUDA probing, oneDNN notes) kept off the
    terminal, where they look like errors to users; they are shown if the import itself fails."""
    if "tensorflow" in sys.modules:
        return
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing prints too
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _conv_bn_relu(x, name: str, n_filter: int, kernel_size: int):
    import keras

    x = keras.layers.Conv3D(n_filter, kernel_size, padding="same", name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def build_unet(*, n_filter_base: int = 16, kernel_size: int = 3) -> keras.Model:
    """The depth-2 U-Net with random weights; input (None, None, None, 1), sigmoid probability out.

    The sigmoid is its own layer after the 1x1x1 conv named `output`, so that logits can be taken
    out (`logit_model`) for averaging test-time augmentations in logit space.
    """
    import_tensorflow_quietly()
    import keras

    blocks = [(name, c_out) for name, _, c_out in conv_layers(n_filter_base)]
    inputs = keras.Input(shape=(None, None, None, 1), name="input")
    x = _conv_bn_relu(inputs, *blocks[0], kernel_size)
    skip0 = _conv_bn_relu(x, *blocks[1], kernel_size)
    x = keras.layers.MaxPooling3D(2, name="max_0")(skip0)
    x = _conv_bn_relu(x, *blocks[2], kernel_size)
    skip1 = _conv_bn_relu(x, *blocks[3], kernel_size)
    x = keras.layers.MaxPooling3D(2, name="max_1")(skip1)
    x = _conv_bn_relu(x, *blocks[4], kernel_size)
    x = _conv_bn_relu(x, *blocks[5], kernel_size)
    x = keras.layers.Concatenate(name="concat_1")([keras.layers.UpSampling3D(2, name="up_1")(x), skip1])
    x = _conv_bn_relu(x, *blocks[6], kernel_size)
    x = _conv_bn_relu(x, *blocks[7], kernel_size)
    x = keras.layers.Concatenate(name="concat_0")([keras.layers.UpSampling3D(2, name="up_0")(x), skip0])
    x = _conv_bn_relu(x, *blocks[8], kernel_size)
    x = _conv_bn_relu(x, *blocks[9], kernel_size)
    logits = keras.layers.Conv3D(1, 1, name=LOGIT_LAYER)(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(logits)
    return keras.Model(inputs, probability, name="cryovesnet_unet")


def _h5_layers(weights_path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(layer name, {weight name: array}) for every layer with weights, in the file's layer order."""
    import h5py

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    try:
        with h5py.File(weights_path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            layers = []
            for name in map(text, group.attrs["layer_names"]):
                names = [text(w) for w in group[name].attrs["weight_names"]]
                if names:
                    arrays = {w.split("/")[-1].split(":")[0]: np.asarray(group[name][w]) for w in names}
                    layers.append((name, arrays))
            return layers
    except (OSError, KeyError) as exc:
        raise CryovesError(
            f"{weights_path}: not a Keras HDF5 weight file ({exc}); pass the CryoVesNet weights.h5"
        ) from exc


def read_weights(weights_path: str | Path) -> dict[str, list[np.ndarray]]:
    """CryoVesNet's weights keyed by our layer names, in Keras order and layout.

    `<conv>`: [kernel (3,3,3,C_in,C_out), bias]; `<conv>_bn`: [gamma, beta, moving_mean,
    moving_variance]; `output`: [kernel (1,1,1,16,1), bias]. BN layers and the head are auto-named in
    those files, so they are matched by topological order (each BN follows its conv); conv names
    and every shape are checked.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise CryovesError(f"{weights_path}: weight file not found; pass the path of CryoVesNet's weights.h5")
    layers = _h5_layers(weights_path)
    convs = [(name, w) for name, w in layers if "kernel" in w]
    bns = [w for _, w in layers if "gamma" in w]
    blocks = conv_layers()
    if [n for n, _ in convs[:-1]] != [n for n, _, _ in blocks] or len(convs) != 11 or len(bns) != 10:
        raise CryovesError(
            f"{weights_path}: layers do not match the CryoVesNet U-Net (depth 2, 10 conv+BN blocks and a "
            f"1x1x1 head); found convolutions {[n for n, _ in convs]} and {len(bns)} batch-norm layers"
        )
    out: dict[str, list[np.ndarray]] = {}
    expected: dict[str, list[tuple[int, ...]]] = {}
    for (name, c_in, c_out), (_, w), bn in zip(blocks, convs[:-1], bns):
        out[name] = [w.get("kernel"), w.get("bias")]
        out[f"{name}_bn"] = [bn.get(k) for k in ("gamma", "beta", "moving_mean", "moving_variance")]
        expected[name] = [(3, 3, 3, c_in, c_out), (c_out,)]
        expected[f"{name}_bn"] = [(c_out,)] * 4
    out[LOGIT_LAYER] = [convs[-1][1].get("kernel"), convs[-1][1].get("bias")]
    expected[LOGIT_LAYER] = [(1, 1, 1, blocks[-1][2], 1), (1,)]
    for name, arrays in out.items():
        found = [None if a is None else a.shape for a in arrays]
        if found != expected[name]:
            raise CryovesError(
                f"{weights_path}: layer {name} has weight shapes {found}, the network needs "
                f"{expected[name]} (16 base filters, 3x3x3 kernels)"
            )
    return {name: [a.astype(np.float32) for a in arrays] for name, arrays in out.items()}


def load_unet(weights_path: str | Path) -> keras.Model:
    """The U-Net with CryoVesNet's weights (a Keras 2 full-model HDF5 save)."""
    weights = read_weights(weights_path)
    model = build_unet()
    for name, arrays in weights.items():
        model.get_layer(name).set_weights(arrays)
    return model


def logit_model(model: keras.Model) -> keras.Model:
    """The same network without the final sigmoid (shares the layers and weights)."""
    import keras

    return keras.Model(model.input, model.get_layer(LOGIT_LAYER).output)


def make_logit_fn(model: keras.Model) -> LogitFn:
    """A `LogitFn` running `model` in inference mode (BN with moving statistics, no dropout).

    One traced graph serves every input shape (`reduce_retracing`), so tiles of a few shapes do
    not recompile per call.
    """
    import tensorflow as tf

    net = logit_model(model)

    @tf.function(reduce_retracing=True)
    def _forward(x):
        return net(x, training=False)

    def logit_fn(tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or any(s % POOLING_FACTOR for s in tiles.shape[1:]):
            raise ValueError(f"tiles must be (B, Z, Y, X) with Z, Y, X multiples of 4, got {tiles.shape}")
        x = tf.convert_to_tensor(np.ascontiguousarray(tiles, dtype=np.float32)[..., None])
        return _forward(x).numpy()[..., 0]

    return logit_fn


BUNDLED_MODEL = "bundled_model"
"""The package-data folder of the default model, trained by `cryoves train` on synthetic tomograms."""
MODEL_WEIGHTS = "weights.npz"
MODEL_CONFIG = "config.json"


def bundled_model_dir() -> Path:
    """Where the default model lives inside the installed package."""
    from importlib.resources import files

    return Path(str(files("cryoves.engine.network") / BUNDLED_MODEL))


def save_model(model: keras.Model, out_dir, config: dict) -> Path:
    """Write a cryoves model folder: weights.npz (layer name -> arrays) and config.json."""
    import json

    from cryoves.engine.io.atomic import atomic_output

    out_dir = Path(out_dir)
    arrays = {f"{layer.name}/{i}": w for layer in model.layers for i, w in enumerate(layer.get_weights())}
    with atomic_output(out_dir / MODEL_WEIGHTS) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    with atomic_output(out_dir / MODEL_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=1))
    return out_dir


def read_model_weights(weights=None) -> dict[str, list[np.ndarray]]:
    """Weights by layer name from a cryoves model folder, a CryoVesNet .h5 file, or (None) the bundled model."""
    path = bundled_model_dir() if weights is None else Path(weights)
    if not path.is_dir():
        return read_weights(path)
    if not (path / MODEL_WEIGHTS).is_file():
        raise CryovesError(f"{path}: no {MODEL_WEIGHTS} in this folder; pass a cryoves model folder "
                           "(from `cryoves train`) or CryoVesNet's weights.h5")
    grouped: dict[str, dict[int, np.ndarray]] = {}
    try:
        with np.load(path / MODEL_WEIGHTS) as arrays:
            for key in arrays.files:
                name, index = key.rsplit("/", 1)
                grouped.setdefault(name, {})[int(index)] = arrays[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CryovesError(f"{path / MODEL_WEIGHTS}: not a readable weight file, truncated or damaged "
                           f"({type(error).__name__}: {error}); copy or train the model again") from error
    return {name: [by_index[i] for i in sorted(by_index)] for name, by_index in grouped.items()}


def load_model(weights=None) -> keras.Model:
    """The U-Net with the weights of `read_model_weights(weights)`."""
    model = build_unet()
    try:
        for name, arrays in read_model_weights(weights).items():
            model.get_layer(name).set_weights(arrays)
    except ValueError as error:
        raise CryovesError(f"{weights}: weights do not fit the cryoves U-Net ({error})") from error
    return model


def model_gaussian_sigma_vox(weights=None) -> float:
    """The Gaussian pre-filter (σ, network voxels) inference applies by default for a model.

    CryoVesNet's weights get its code's σ = 1: they were trained on NAD-denoised tomograms, and on raw,
    noisy input the filter stands in for that denoising (method.md §2.3; without it their probability
    Dice falls from 0.80 to 0.41 at 22 Å and to 0.006 at 14.7 Å on independently generated tomograms).
    cryoves model folders record theirs in config.json.
    """
    import json

    path = bundled_model_dir() if weights is None else Path(weights)
    config_path = path / MODEL_CONFIG
    config = json.loads(config_path.read_text()) if path.is_dir() and config_path.is_file() else {}
    return float(config.get("gaussian_sigma_vox", 1.0))


def load_logit_fn(weights=None, device: str = "cpu") -> LogitFn:
    """The network with the weights of `load_model(weights)` as a `LogitFn`: Keras on the CPU, or on
    "gpu" the PyTorch port in float16 (the optional `gpu` extra)."""
    if device == "cpu":
        return make_logit_fn(load_model(weights))
    try:
        from cryoves.engine.network.torch_unet import load_gpu_logit_fn
    except ImportError as error:
        raise CryovesError(f"--device gpu needs PyTorch ({error}); install it with: "
                           "pip install 'cryoves[gpu]'") from None
    return load_gpu_logit_fn(weights)


def weights_sha256(weights=None) -> str:
    """Checksum of the weights that `load_model(weights)` reads, for run records and resume."""
    from cryoves.engine.io.outputs import file_sha256

    path = bundled_model_dir() if weights is None else Path(weights)
    if path.is_dir():
        path = path / MODEL_WEIGHTS
    if not path.is_file():
        raise CryovesError(f"{path}: weights not found; pass a cryoves model folder (from `cryoves train`) "
                           "or CryoVesNet's weights.h5")
    return file_sha256(path)
