"""The CARE/CSBDeep 3-D U-Net of CryoVesNet (method.md §2.5) and loading of its Keras 2 weights.

The one module that imports Keras, and only inside the functions that build the network; running it takes
TensorFlow's operations from `tensorflow_ops`. Reading the weight file needs h5py alone, so the PyTorch port
(`torch_unet`) shares it.
The rest of the engine sees the network only as a `LogitFn`.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryoves.engine.errors import CryovesError
from cryoves.engine.network.tensorflow_ops import import_tensorflow_quietly, tensorflow_ops

if TYPE_CHECKING:
    import keras

    from cryoves.engine.network.inference import InferenceParams

LogitFn = Callable[[np.ndarray], np.ndarray]
"""Maps float32 tiles (B, Z, Y, X) of the z-scored volume, sizes multiples of 4, to float32 logits
of the same shape (`make_logit_fn` here, `torch_unet.make_torch_logit_fn` for the GPU)."""

N_PARAMETERS = 250_641
POOLING_FACTOR = 4
"""Input sizes must be multiples of this (two 2x poolings); tile origins too, for tiling invariance."""

LOGIT_LAYER = "output"
BN_EPSILON = 1e-3
PRECISIONS = ("float32", "bfloat16")
"""Arithmetic of the network on the CPU (`make_logit_fn`); the GPU port runs float16."""


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), which TensorFlow's
    oneDNN convolutions use; elsewhere bfloat16 is emulated, slower than float32."""
    from llvmlite.binding import get_host_cpu_features

    try:
        features = get_host_cpu_features()
    except RuntimeError:  # LLVM knows no features for this host
        return False
    return bool(features.get("avx512bf16") or features.get("amx-bf16"))


def check_device_precision(device: str, precision: str) -> None:
    """Refuse a precision asked of the GPU port ("auto" aside), which runs float16 only."""
    if device == "gpu" and precision != "auto":
        raise CryovesError("--precision applies to --device cpu; the GPU runs the network in float16")


def default_precision() -> str:
    """bfloat16 where the CPU has it (the network nearly twice as fast, at the same vesicles and radii:
    benchmarks/PRECISION.md), else float32."""
    return "bfloat16" if cpu_has_bfloat16() else "float32"


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
    for (name, _, _), (_, w), bn in zip(blocks, convs[:-1], bns):
        out[name] = [w.get("kernel"), w.get("bias")]
        out[f"{name}_bn"] = [bn.get(k) for k in ("gamma", "beta", "moving_mean", "moving_variance")]
    out[LOGIT_LAYER] = [convs[-1][1].get("kernel"), convs[-1][1].get("bias")]
    check_weight_shapes(out, weights_path)
    return {name: [a.astype(np.float32) for a in arrays] for name, arrays in out.items()}


def check_weight_shapes(weights: dict[str, list[np.ndarray]], source) -> None:
    """Refuse weights (by layer name, Keras layout) that are not those of this U-Net, naming the first
    layer that differs."""
    expected: dict[str, list[tuple[int, ...]]] = {}
    for name, c_in, c_out in conv_layers():
        expected[name] = [(3, 3, 3, c_in, c_out), (c_out,)]
        expected[f"{name}_bn"] = [(c_out,)] * 4
    expected[LOGIT_LAYER] = [(1, 1, 1, conv_layers()[-1][2], 1), (1,)]
    for name, shapes in expected.items():
        found = [None if a is None else np.shape(a) for a in weights.get(name, [])]
        if found != shapes:
            raise CryovesError(
                f"{source}: layer {name} has weight shapes {found}, the network needs {shapes} "
                "(16 base filters, 3x3x3 kernels)"
            )


def layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """A Keras model's weights by layer name, as `read_model_weights` gives them."""
    return {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}


def logit_model(model: keras.Model) -> keras.Model:
    """The same network without the final sigmoid (shares the layers and weights)."""
    import keras

    return keras.Model(model.input, model.get_layer(LOGIT_LAYER).output)


STEP_VOXELS = 1 << 19
"""Full-resolution voxels a layer of the streamed forward (`make_logit_fn`) computes per step, as whole z-rows
of the window (a power of two within STEP_ROWS): fewer, larger steps cost less overhead, smaller ones less
memory (on 2 cores, steps of 2 rows of 264 x 264 ran about 1.3 times as long as one whole-window pass, 4 rows
about as long)."""
STEP_ROWS = (2, 16)
STREAM_BYTES = (2_300, 1_400)
"""Memory of the streamed forward per voxel of a window's y·x section: fixed (the rows the deeper levels need
ahead, about 22) and per row of a step (measured: 5.1, 7.9, 11.5 and 19.9 KB for steps of 2, 4, 8 and 16 rows)."""


def step_rows(section_voxels: int) -> int:
    """z-rows per step of the streamed forward for windows of `section_voxels` y·x voxels."""
    return int(np.clip(1 << int(np.log2(max(1, STEP_VOXELS // max(1, section_voxels)))), *STEP_ROWS))


def streamed_bytes(window_shape: tuple[int, int, int]) -> float:
    """Peak memory of `make_logit_fn`'s forward of one (z, y, x) window, beyond the window and its logits."""
    section = window_shape[1] * window_shape[2]
    return section * (STREAM_BYTES[0] + STREAM_BYTES[1] * step_rows(section))


_GRAPH = (
    # (layer, level, inputs): level l has 2^-l of the input's rows along each axis; an input is (layer or
    # "input", how): "same" level, "pool" (2x2x2 maximum of the level above) or "up" (nearest 2x of the level below)
    ("down_level_0_no_0", 0, (("input", "same"),)),
    ("down_level_0_no_1", 0, (("down_level_0_no_0", "same"),)),
    ("down_level_1_no_0", 1, (("down_level_0_no_1", "pool"),)),
    ("down_level_1_no_1", 1, (("down_level_1_no_0", "same"),)),
    ("middle_0", 2, (("down_level_1_no_1", "pool"),)),
    ("middle_2", 2, (("middle_0", "same"),)),
    ("up_level_1_no_0", 1, (("middle_2", "up"), ("down_level_1_no_1", "same"))),
    ("up_level_1_no_2", 1, (("up_level_1_no_0", "same"),)),
    ("up_level_0_no_0", 0, (("up_level_1_no_2", "up"), ("down_level_0_no_1", "same"))),
    ("up_level_0_no_2", 0, (("up_level_0_no_0", "same"),)),
)


def folded_weights(weights: dict[str, list[np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) per convolution with its batch normalisation (moving statistics) folded in, and the
    head's; `weights` as `read_model_weights` gives them."""
    out = {}
    for name, _, _ in _GRAPH:
        kernel, bias = weights[name]
        gamma, beta, mean, variance = weights[f"{name}_bn"]
        scale = gamma / np.sqrt(variance + BN_EPSILON)
        out[name] = ((kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32))
    out[LOGIT_LAYER] = tuple(np.asarray(a, np.float32) for a in weights[LOGIT_LAYER])
    return out


class _Rows:
    """One layer's output along z, computed as consumers ask for it (at most `step` rows at a time) and dropped
    once every consumer has moved past it (each asks for ranges that never move back)."""

    def __init__(self, step: int, compute, consumers) -> None:
        self.step, self.compute = step, compute
        self.chunks: list = []  # (first row, tensor (rows, y, x, channels)), in order
        self.stop = 0
        self.marks = dict.fromkeys(consumers, 0)

    def get(self, lo: int, hi: int, consumer: str):
        while self.stop < hi:  # exactly the missing rows, at most `step` at a time
            stop = min(self.stop + self.step, hi)
            self.chunks.append((self.stop, self.compute(self.stop, stop)))
            self.stop = stop
        self.marks[consumer] = lo
        floor = min(self.marks.values())
        self.chunks = [(s, t) for s, t in self.chunks if s + t.shape[0] > floor]
        parts = [t[max(lo - s, 0):hi - s] for s, t in self.chunks if s < hi and s + t.shape[0] > lo]
        return parts[0] if len(parts) == 1 else tensorflow_ops().concat(parts, axis=0)


def _upsample(x):
    """Nearest 2x along z, y and x of a (rows, y, x, channels) tensor."""
    tf = tensorflow_ops()
    r, h, w, c = x.shape
    x = tf.broadcast_to(tf.reshape(x, (r, h, 1, w, 1, c)), (r, h, 2, w, 2, c))
    return tf.reshape(tf.broadcast_to(tf.reshape(x, (r, 1, 4 * h * w * c)), (r, 2, 4 * h * w * c)),
                      (2 * r, 2 * h, 2 * w, c))


_COMPILED: dict[str, dict] = {}
"""`_convolve` compiled for every shape, by precision: "partial" (a merge's first input), "relu" and "merge" (with
the partial sum); filled by `make_logit_fn`."""


def _convolve(part, kernel, bias, partial=None):
    """relu(conv(part, kernel) + bias [+ partial]) over z-rows with one neighbour row on each side (zeros beyond
    the window), zeros padding y and x as the network's "same" padding; no bias, no relu when `bias` is None (the
    first input of a merge). Padding, bias, sum and relu are written around the 5-D convolution, with a constant
    padding, so that TensorFlow fuses them into it (oneDNN; a quarter faster than apart)."""
    tf = tensorflow_ops()
    out = tf.conv3d(tf.pad(part[None], [[0, 0], [0, 0], [1, 1], [1, 1], [0, 0]]), kernel, [1] * 5, "VALID")
    if bias is None:
        return out[0]
    out = tf.bias_add(out, bias)
    if partial is not None:
        out += partial[None]
    return tf.relu(out)[0]


def _streamed_logits(window: np.ndarray, layers: dict, head: tuple, rows: int, logits: np.ndarray,
                     precision: str) -> None:
    """Logits of one (z, y, x) window into `logits`, layer outputs computed a few z-rows at a time in `precision`
    (see `make_logit_fn`)."""
    tf = tensorflow_ops()
    n_z = window.shape[0]
    consumers: dict[str, list[str]] = {"input": [], "head": []}
    for name, _, inputs in _GRAPH:
        consumers[name] = []
        for source, _ in inputs:
            consumers[source].append(name)
    consumers[_GRAPH[-1][0]].append("head")
    cache = {"input": _Rows(n_z, lambda p, q: tf.cast(window[p:q, ..., None], precision), consumers["input"])}

    def gather(source: str, how: str, lo: int, hi: int, me: str):
        if how == "same":
            return cache[source].get(lo, hi, me)
        if how == "pool":
            return tf.max_pool3d(cache[source].get(2 * lo, 2 * hi, me)[None], 2, 2, "VALID")[0]
        start = lo % 2
        return _upsample(cache[source].get(lo // 2, (hi + 1) // 2, me))[start:start + hi - lo]

    def neighbourhood(source: str, how: str, p: int, q: int, n: int, me: str):
        """Rows p-1 to q of an input of a layer of n rows, zeros beyond the window (the "same" padding in z)."""
        part = gather(source, how, max(p - 1, 0), min(q + 1, n), me)
        if p == 0 or q == n:
            part = tf.pad(part, [[int(p == 0), int(q == n)], [0, 0], [0, 0], [0, 0]])
        return part

    compiled = _COMPILED[precision]

    def step(p: int, q: int, name: str, inputs, n: int):
        kernels, bias = layers[name]
        # a merge convolves its inputs one after the other, so that only one padded input exists at a time
        partial = None
        for (source, how), kernel in zip(inputs[:-1], kernels):
            partial = compiled["partial"](neighbourhood(source, how, p, q, n, name), kernel)
        part = neighbourhood(*inputs[-1], p, q, n, name)
        if partial is None:
            return compiled["relu"](part, kernels[-1], bias)
        return compiled["merge"](part, kernels[-1], bias, partial)

    for name, level, inputs in _GRAPH:
        n = n_z >> level
        # fewer rows per step at deeper levels: as many rows at every level ran 3-5 % faster on one window but
        # held 30-40 MB more in `cryoves segment` of 128x256x256 at 22 Å, whose peak is at the memory goal
        cache[name] = _Rows(max(1, rows >> level),
                            lambda p, q, name=name, inputs=inputs, n=n: step(p, q, name, inputs, n), consumers[name])
    kernel, bias = head
    try:
        for start in range(0, n_z, rows):
            last = cache[_GRAPH[-1][0]].get(start, min(start + rows, n_z), "head")
            last = tf.cast(last, tf.float32)
            logits[start:start + last.shape[0]] = (tf.tensordot(last, kernel, 1) + bias).numpy()[..., 0]
    finally:
        # the rows' compute functions refer back to `cache`: without this the cycle would hold the window
        # (and its batch) and the kept layer outputs until Python's next garbage collection
        cache.clear()


def make_logit_fn(weights: dict[str, list[np.ndarray]], rows: int | None = None,
                  precision: str = "float32") -> LogitFn:
    """A `LogitFn` running the U-Net with `weights` (by layer name: `read_model_weights`, `layer_weights`) in
    inference mode (batch normalisation folded into the convolutions), one window at a time and streamed along
    z: each layer computes its output `rows` z-rows at a time (None: `step_rows` of the window's section) as the
    next layer asks for them and keeps only what a consumer still needs, so memory grows with a window's y·x
    section (`streamed_bytes`), not its volume. Equals one whole-window pass (the same zero padding at every
    face), without its activations for the whole window (about 300 bytes per voxel).

    `precision` "bfloat16" convolves and keeps the layer outputs in bfloat16 (float32 sums inside each
    convolution, the head in float32): on a CPU with bfloat16 instructions nearly twice as fast, at half the
    memory of the layer outputs (`default_precision`)."""
    tf = tensorflow_ops()
    if precision not in PRECISIONS:
        raise CryovesError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in _COMPILED:  # traced once per process and precision, for every shape
        slab, vector = tf.TensorSpec([None] * 4, precision), tf.TensorSpec([None], precision)
        kernel = tf.TensorSpec([3, 3, 3, None, None], precision)
        _COMPILED[precision] = {
            "partial": tf.function(lambda part, k: _convolve(part, k, None), input_signature=[slab, kernel]),
            "relu": tf.function(_convolve, input_signature=[slab, kernel, vector]),
            "merge": tf.function(_convolve, input_signature=[slab, kernel, vector, slab]),
        }
    weights = folded_weights(weights)
    layers = {}
    for name, _, inputs in _GRAPH:
        kernel, bias = weights[name]
        # a merge's kernel, split by input: conv(concat(a, b)) = conv_a(a) + conv_b(b), no concatenated copy
        sizes = [weights[source][0].shape[-1] if source in weights else 1 for source, _ in inputs]
        kernel = tf.constant(kernel, precision)
        kernels = tf.split(kernel, sizes, axis=3) if len(sizes) > 1 else [kernel]
        layers[name] = (kernels, tf.constant(bias, precision))
    head = tuple(tf.constant(a.reshape(a.shape[-2], -1) if a.ndim > 1 else a) for a in weights[LOGIT_LAYER])

    def logit_fn(tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or any(s % POOLING_FACTOR for s in tiles.shape[1:]):
            raise ValueError(f"tiles must be (B, Z, Y, X) with Z, Y, X multiples of 4, got {tiles.shape}")
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)
        logits = np.empty(tiles.shape, np.float32)
        for tile, out in zip(tiles, logits):
            _streamed_logits(tile, layers, head, rows or step_rows(tile.shape[1] * tile.shape[2]), out, precision)
        return logits

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
        return read_weights(path)  # checked as it is read
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
    layers = {name: [by_index[i] for i in sorted(by_index)] for name, by_index in grouped.items()}
    check_weight_shapes(layers, path / MODEL_WEIGHTS)
    return layers


def load_model(weights=None) -> keras.Model:
    """The U-Net with the weights of `read_model_weights(weights)`."""
    model = build_unet()
    for name, arrays in read_model_weights(weights).items():
        model.get_layer(name).set_weights(arrays)
    return model


def model_inference_params(weights=None, **changes) -> InferenceParams:
    """The network-input preparation a model was trained with, which inference applies by default, with
    `changes` (e.g. tta, memory_gb, or a user's gaussian_sigma_vox) applied.

    CryoVesNet's weights get its code's pre-processing: trilinear resampling and a σ = 1 Gaussian. They were
    trained on NAD-denoised tomograms, and on raw, noisy input the filter stands in for that denoising
    (method.md §2.3; without it their probability Dice falls from 0.80 to 0.41 at 22 Å and to 0.006 at
    14.7 Å on independently generated tomograms). cryoves model folders record theirs in config.json
    (models from before band-limited resampling were trained on the trilinear one), and may record the
    reflected border measured best for them (the bundled model: none, benchmarks/BORDERS.md).
    """
    import json

    from cryoves.engine.network.inference import InferenceParams

    path = bundled_model_dir() if weights is None else Path(weights)
    config_path = path / MODEL_CONFIG
    config = json.loads(config_path.read_text()) if path.is_dir() and config_path.is_file() else {}
    trained = {"gaussian_sigma_vox": float(config.get("gaussian_sigma_vox", 1.0)),
               "resampling": config.get("resampling", "linear")}
    if "border_vox" in config:
        trained["border_vox"] = int(config["border_vox"])
    return InferenceParams(**(trained | changes))


def load_logit_fn(weights=None, device: str = "cpu", precision: str = "float32") -> LogitFn:
    """The network with the weights of `read_model_weights(weights)` as a `LogitFn`: TensorFlow on the CPU
    (without Keras) in `precision`, or on "gpu" the PyTorch port in float16 (the optional `gpu` extra)."""
    if device == "cpu":
        if precision == "bfloat16" and not cpu_has_bfloat16():
            raise CryovesError("precision bfloat16: this CPU has no bfloat16 instructions (AVX512-BF16 or "
                               "AMX-BF16) and would run the network slower than float32; use --precision float32")
        return make_logit_fn(read_model_weights(weights), precision=precision)
    try:
        from cryoves.engine.network.torch_unet import load_gpu_logit_fn
    except ImportError as error:
        raise CryovesError(f"--device gpu needs PyTorch ({error}); install it with: "
                           "pip install 'cryoves[gpu]'") from None
    return load_gpu_logit_fn(weights)


def weights_sha256(weights=None) -> str:
    """Checksum of the weights that `load_model(weights)` reads, for run records and resume."""
    from cryoves.engine.io.checksum import file_sha256

    path = bundled_model_dir() if weights is None else Path(weights)
    if path.is_dir():
        path = path / MODEL_WEIGHTS
    if not path.is_file():
        raise CryovesError(f"{path}: weights not found; pass a cryoves model folder (from `cryoves train`) "
                           "or CryoVesNet's weights.h5")
    return file_sha256(path)
