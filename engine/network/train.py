"""Training the U-Net on tomogram/label pairs, with the same input preparation as inference.

Unlike the reference (method.md §3), patches are cut at the network voxel size after the same
resampling, Gaussian and whole-volume z-score that inference applies, and augmented with flips,
90° rotations about z (the missing wedge stays along z) and intensity jitter.
"""

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.network.inference import InferenceParams, prepare_network_input
from cryoves.engine.network.model import POOLING_FACTOR
from cryoves.engine.network.rescale import network_shape

LAST_NAME = "last.keras"  # the latest epoch with its optimizer state, for resuming


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    """Patch sampling, augmentation and optimisation."""

    epochs: int = 30
    batch_size: int = 16
    patch_vox: int = 32                # cube edge at the network voxel size, multiple of 4
    patches_per_tomogram: int = 48     # drawn afresh every epoch
    vesicle_patch_share: float = 0.75  # the rest are drawn anywhere (distractors, background)
    min_vesicle_vox: int = 1000        # a "vesicle patch" holds more vesicle voxels than this
    learning_rate: float = 1e-3
    loss: str = "bce_dice"             # "bce" (paper), "weighted_bce" (current weights), "bce_dice"
    validation_fraction: float = 0.15  # of the tomograms, held out whole
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_vox <= 0 or self.patch_vox % POOLING_FACTOR:
            raise CryovesError(f"patch_vox must be a positive multiple of {POOLING_FACTOR} voxels, "
                               f"got {self.patch_vox}")
        if self.loss not in ("bce", "weighted_bce", "bce_dice"):
            raise CryovesError(f"loss must be bce, weighted_bce or bce_dice, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patches_per_tomogram < 1:
            raise CryovesError("epochs, batch_size and patches_per_tomogram must be >= 1")
        if not 0 <= self.validation_fraction < 1 or not 0 <= self.vesicle_patch_share <= 1:
            raise CryovesError("validation_fraction must be in [0, 1) and vesicle_patch_share in [0, 1]")


@dataclass(frozen=True, eq=False)
class TrainingPair:
    """One tomogram and its vesicle mask, both on the network grid (input already z-scored)."""

    image: np.ndarray   # float32
    mask: np.ndarray    # float32, 0 or 1
    source: str


def prepare_pair(tomogram: np.ndarray, labels: np.ndarray, voxel_size_a: float, source: str,
                 inference: InferenceParams = InferenceParams()) -> TrainingPair:
    """Bring a tomogram and its labels to the network grid exactly as inference prepares its input."""
    if tomogram.shape != labels.shape:
        raise CryovesError(f"{source}: tomogram {tomogram.shape} and labels {labels.shape} differ in shape")
    if not np.any(labels):
        raise CryovesError(f"{source}: the label volume is empty; training needs labelled vesicles")
    image = prepare_network_input(tomogram, voxel_size_a, inference)
    shape = network_shape(tomogram.shape, voxel_size_a, inference.network_voxel_size_a)
    grids = [(np.arange(n_out) + 0.5) * n_in / n_out - 0.5 for n_in, n_out in zip(labels.shape, shape)]
    index = [np.clip(np.round(g).astype(np.int64), 0, n - 1) for g, n in zip(grids, labels.shape)]
    mask = (np.asarray(labels)[np.ix_(*index)] > 0).astype(np.float32)
    return TrainingPair(image, mask, source)


SYNTHETIC_FIELD_NM = (140.8, 352.0, 352.0)  # 64 x 160 x 160 voxels at 22 Å
TRAINING_SEEDS_BELOW = 900_000
"""Training phantoms take seeds below this; validation phantoms (benchmarks/robustness.py) start here."""


@dataclass(frozen=True, kw_only=True)
class Randomisation:
    """Ranges synthetic training tomograms are drawn from (domain randomisation), so the model does not
    learn one voxel size, noise level or imaging; (low, high) pairs, drawn log-uniformly where marked."""

    voxel_size_a: tuple[float, float] = (7.0, 30.0)         # log-uniform; rescaled as inference does
    snr_factor: tuple[float, float] = (0.25, 4.0)           # × the preset's SNR, log-uniform
    defocus_um: tuple[float, float] = (2.0, 8.0)
    b_factor_nm2: tuple[float, float] = (5.0, 120.0)        # log-uniform
    tilt_max_deg: tuple[float, float] = (40.0, 70.0)
    amplitude_contrast: tuple[float, float] = (0.04, 0.15)
    denoised_share: float = 0.3                             # share smoothed as a denoiser would (NAD-like input)
    denoise_sigma_nm: tuple[float, float] = (1.0, 3.0)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def synthetic_pairs(n: int, seed: int, inference: InferenceParams = InferenceParams(),
                    randomisation: Randomisation = Randomisation(),
                    progress: Callable[[int, int], None] | None = None) -> list[TrainingPair]:
    """`n` phantoms of the fft imaging family, presets cycled, every imaging parameter drawn from
    `randomisation`, brought to the network grid as inference prepares its input.

    Phantom seeds are `(seed + 1) * 10_000 + i`, below TRAINING_SEEDS_BELOW; the tilt-series family and
    seeds from TRAINING_SEEDS_BELOW on are the validation set, never trained on.
    """
    from scipy import ndimage

    from cryoves.engine.synthetic.phantom import PRESETS, make_phantom

    if (seed + 1) * 10_000 + n > TRAINING_SEEDS_BELOW:
        raise CryovesError(f"seed {seed} with {n} tomograms reaches the validation seeds ({TRAINING_SEEDS_BELOW})")
    r = randomisation
    rng = np.random.default_rng(seed)
    names = sorted(PRESETS)
    pairs = []
    for i in range(n):
        voxel_size_a = _log_uniform(rng, r.voxel_size_a)
        name = names[i % len(names)]
        base = PRESETS[name]
        preset = replace(base, snr=base.snr * _log_uniform(rng, r.snr_factor),
                         defocus_um=float(rng.uniform(*r.defocus_um)),
                         b_factor_nm2=_log_uniform(rng, r.b_factor_nm2),
                         tilt_max_deg=float(rng.uniform(*r.tilt_max_deg)),
                         amplitude_contrast=float(rng.uniform(*r.amplitude_contrast)))
        shape = tuple(round(f * 10.0 / voxel_size_a) for f in SYNTHETIC_FIELD_NM)
        phantom_seed = (seed + 1) * 10_000 + i
        phantom = make_phantom(shape, voxel_size_a, seed=phantom_seed, preset=preset)
        tomogram = phantom.tomogram
        denoise_nm = float(rng.uniform(*r.denoise_sigma_nm)) if rng.random() < r.denoised_share else 0.0
        if denoise_nm:
            tomogram = ndimage.gaussian_filter(tomogram, denoise_nm * 10.0 / voxel_size_a, output=np.float32)
        source = (f"phantom seed {phantom_seed} ({name}, {voxel_size_a:.1f} Å, SNR {preset.snr:.2f}, "
                  f"defocus {preset.defocus_um:.1f} µm, B {preset.b_factor_nm2:.0f} nm², "
                  f"tilt ±{preset.tilt_max_deg:.0f}°, denoised σ {denoise_nm:.1f} nm)")
        pairs.append(prepare_pair(tomogram, phantom.labels, voxel_size_a, source, inference))
        if progress is not None:
            progress(i + 1, n)
    return pairs


def paired_files(folder) -> list[tuple[Path, Path]]:
    """(TOMO.mrc, TOMO.labels.mrc) pairs in a folder; a tomogram without labels is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CryovesError(f"{folder}: not a folder; --data takes folders of TOMO.mrc + TOMO.labels.mrc")
    pairs = []
    for label_path in sorted(folder.glob("*.labels.mrc")):
        image_path = label_path.with_name(label_path.name.removesuffix(".labels.mrc") + ".mrc")
        if not image_path.is_file():
            raise CryovesError(f"{label_path}: no tomogram {image_path.name} beside it")
        pairs.append((image_path, label_path))
    if not pairs:
        raise CryovesError(f"{folder}: no *.labels.mrc files; name each label volume TOMO.labels.mrc beside TOMO.mrc")
    return pairs


def sample_patches(pairs: list[TrainingPair], params: TrainParams, rng: np.random.Generator):
    """Patches (N, P, P, P) from every pair: mostly around vesicles, some anywhere, augmented."""
    p = params.patch_vox
    images, masks = [], []
    for pair in pairs:
        if min(pair.image.shape) < p:
            raise CryovesError(f"{pair.source}: {pair.image.shape} at the network voxel size is smaller "
                               f"than a {p}³ training patch")
        fg = np.argwhere(pair.mask > 0)
        n_vesicle = round(params.patches_per_tomogram * params.vesicle_patch_share)
        for k in range(params.patches_per_tomogram):
            for _ in range(20):  # a vesicle patch must hold enough vesicle voxels
                if k < n_vesicle and len(fg):
                    centre = fg[rng.integers(len(fg))]
                    start = np.clip(centre - p // 2 + rng.integers(-p // 4, p // 4 + 1, 3), 0,
                                    np.array(pair.image.shape) - p)
                else:
                    start = rng.integers(0, np.array(pair.image.shape) - p + 1)
                box = tuple(slice(s, s + p) for s in start)
                if k >= n_vesicle or pair.mask[box].sum() > params.min_vesicle_vox:
                    break
            images.append(pair.image[box])
            masks.append(pair.mask[box])
    return augment(np.stack(images), np.stack(masks), rng)


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
    """Random flips of each axis, 90° rotations in the y-x plane, intensity scale and offset."""
    images, masks = images.copy(), masks.copy()
    for i in range(len(images)):
        for axis in range(3):
            if rng.random() < 0.5:
                images[i], masks[i] = np.flip(images[i], axis), np.flip(masks[i], axis)
        turns = int(rng.integers(4))
        images[i], masks[i] = np.rot90(images[i], turns, (1, 2)), np.rot90(masks[i], turns, (1, 2))
        images[i] = images[i] * rng.uniform(0.8, 1.25) + rng.normal(0.0, 0.1)
    return images, masks


def train(pairs: list[TrainingPair], params: TrainParams, out_dir, *, init_weights=None, description: dict,
          inference: InferenceParams = InferenceParams(),
          progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train, keep the best checkpoint by validation loss, and write the model folder.

    `inference` is the input preparation the pairs were made with; the model folder records it.

    Resumes from `out_dir/last.keras` when it exists (an interrupted run). Returns the model config.
    """
    from cryoves.engine.network.model import MODEL_CONFIG, build_unet, load_model, save_model
    from cryoves.engine.network.tensorflow_ops import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(params.seed)
    keras.utils.set_random_seed(params.seed)
    order = rng.permutation(len(pairs))
    n_val = math.ceil(params.validation_fraction * len(pairs)) if len(pairs) > 1 and params.validation_fraction else 0
    val_pairs = [pairs[i] for i in order[:n_val]]
    train_pairs = [pairs[i] for i in order[n_val:]]
    val_rng = np.random.default_rng(params.seed + 1)
    val_x, val_y = sample_patches(val_pairs, params, val_rng) if val_pairs else (None, None)

    state_path = out_dir / "state.json"
    if (out_dir / LAST_NAME).is_file() and state_path.is_file():
        model = keras.models.load_model(out_dir / LAST_NAME, compile=True, custom_objects=_losses())
        state = json.loads(state_path.read_text())
    else:
        model = load_model(init_weights) if init_weights else build_unet()
        model.compile(optimizer=keras.optimizers.Adam(params.learning_rate), loss=_losses()[params.loss],
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
        state = {"epoch": 0, "best_loss": None, "history": []}
    for epoch in range(state["epoch"], params.epochs):
        x, y = sample_patches(train_pairs, params, np.random.default_rng([params.seed, epoch]))
        fit = model.fit(x[..., None], y[..., None], batch_size=params.batch_size, epochs=1, shuffle=True, verbose=0)
        row = {"epoch": epoch + 1, "loss": float(fit.history["loss"][-1])}
        if val_x is not None:
            row["val_loss"] = float(model.evaluate(val_x[..., None], val_y[..., None], batch_size=params.batch_size,
                                                   verbose=0, return_dict=True)["loss"])
            row["val_dice"] = _dice(model.predict(val_x[..., None], batch_size=params.batch_size, verbose=0)[..., 0],
                                    val_y)
        score = row.get("val_loss", row["loss"])
        if state["best_loss"] is None or score < state["best_loss"]:
            state["best_loss"] = score
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        state["history"].append(row)
        if state["best_epoch"] == epoch + 1:
            save_model(model, out_dir, _config(params, state, description, inference))
        model.save(out_dir / LAST_NAME)
        with atomic_output(state_path) as tmp:
            tmp.write_text(json.dumps(state))
        if progress is not None:
            progress(epoch + 1, row)
    config = _config(params, state, description, inference)
    with atomic_output(out_dir / MODEL_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=1))
    return config


def _config(params: TrainParams, state: dict, description: dict, inference: InferenceParams) -> dict:
    """What `config.json` records beside the weights: architecture, input preparation, training."""
    return {
        "architecture": "cryovesnet-unet-depth2-16",
        "network_voxel_size_a": InferenceParams().network_voxel_size_a,
        "normalisation": f"resample to the network voxel size ({inference.resampling}), Gaussian pre-filter, "
                         "whole-volume z-score",
        "gaussian_sigma_vox": inference.gaussian_sigma_vox,
        "resampling": inference.resampling,
        "train_params": asdict(params),
        "best_epoch": state.get("best_epoch"),
        "best_loss": state["best_loss"],
        "history": state["history"],
        "data": description,
    }


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float((2 * np.sum(prediction * truth) + 1) / (np.sum(prediction) + np.sum(truth) + 1))


def _losses() -> dict:
    import keras
    from keras import ops

    def weighted_bce(y_true, y_pred):
        """The current CryoVesNet weights' loss: BCE with weight 10 on vesicle voxels."""
        bce = keras.losses.binary_crossentropy(y_true, y_pred)
        return ops.mean(bce * (1.0 + 9.0 * ops.squeeze(y_true, -1)))

    def bce_dice(y_true, y_pred):
        """BCE plus soft Dice loss over the batch: the Dice term keeps small vesicles weighted."""
        overlap = ops.sum(y_true * y_pred)
        dice = (2.0 * overlap + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
        return ops.mean(keras.losses.binary_crossentropy(y_true, y_pred)) + (1.0 - dice)

    return {"bce": keras.losses.BinaryCrossentropy(), "weighted_bce": weighted_bce, "bce_dice": bce_dice}

