"""Accuracy over a matrix of imaging conditions, for each model and pre-processing: benchmarks/ROBUSTNESS.md.

    python benchmarks/robustness.py --weights ../shared/models/cryovesnet/weights.h5 > benchmarks/ROBUSTNESS.md

Rows are conditions of the validation phantoms (seeds from VALIDATION_SEED, never trained on, never used to
choose a default; `--dev` scores the development seeds instead, where defaults are chosen); columns are the
bundled model and CryoVesNet's weights with cryoves' defaults, and CryoVesNet's weights with its reference
pre-processing (trilinear resampling with the anti-alias Gaussian, Gaussian pre-filter σ = 1), the network in
float32 and the segments searched on the tomogram's grid. Each cell:
final F1, Dice, diameter error δ_d and centre residual Δ_c.
`--resampling` adds the comparison of the network-input resamplers behind `InferenceParams.resampling`.
"""

import argparse
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np

from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.network.inference import InferenceParams, predict_probability, probability_on_input_grid
from cryoves.engine.network.model import load_logit_fn, model_inference_params, weights_sha256
from cryoves.engine.network.train import TRAINING_SEEDS_BELOW
from cryoves.engine.pipeline import SegmentParams, oriented, postprocess
from cryoves.engine.scoring.matching import dice, match_vesicles
from cryoves.engine.synthetic.phantom import PRESETS, make_phantom
from cryoves.engine.synthetic.tiltseries import TiltSeriesImaging, diffuse

VALIDATION_SEED = TRAINING_SEEDS_BELOW
"""Seeds of validation phantoms start here; training draws its phantoms below it (engine/network/train.py)."""
DEV_SEED = 800_000
"""Development phantoms, where defaults may be chosen; also never trained on (training seeds stay below 800,000)."""
FIELD_NM = (140.8, 352.0, 352.0)  # 64 x 160 x 160 voxels at 22 Å
REFERENCE = InferenceParams(gaussian_sigma_vox=1.0, resampling="linear", precision="float32")
"""CryoVesNet's code: trilinear resampling after an anti-alias Gaussian, then a σ = 1 Gaussian (method.md §2.2-2.3),
the network in float32; its segments are searched on the tomogram's grid (`score`)."""


@dataclass(frozen=True)
class Condition:
    """One row: a phantom family and preset, a voxel size and changes to the preset's imaging."""

    name: str
    imaging: str = "fft"
    preset: str = "default"
    voxel_size_a: float = 22.0
    changes: dict = field(default_factory=dict)
    denoised: bool = False  # anisotropic (Perona-Malik) diffusion, as tomograms often get before segmentation
    invert: bool = False


@dataclass(frozen=True)
class Score:
    f1: float
    precision: float
    recall: float
    dice: float
    diameter_error: float
    center_residual_nm: float
    n_found: int


def conditions(imaging: str) -> list[Condition]:
    """The matrix rows of one family: voxel sizes, SNR, tilt range, defocus, scenes, contrast."""
    rows = [Condition(f"default {v:g} Å", imaging, voxel_size_a=v) for v in (7.0, 10.0, 14.7, 22.0, 30.0)]
    rows += [
        Condition("high SNR", imaging, changes={"snr": 4.0}),
        Condition("low SNR", imaging, preset="low_snr"),
        Condition("tilt ±40°", imaging, changes={"tilt_max_deg": 40.0}),
        Condition("tilt ±70°", imaging, changes={"tilt_max_deg": 70.0}),
        Condition("defocus 8 µm", imaging, changes={"defocus_um": 8.0}),
        Condition("denoised", imaging, denoised=True),
        Condition("crowded", imaging, preset="crowded"),
        Condition("distractors", imaging, preset="distractors"),
        Condition("inverted contrast (--invert-contrast)", imaging, invert=True),
    ]
    return rows


def make_condition(condition: Condition, seed: int):
    preset = replace(PRESETS[condition.preset], **condition.changes)
    shape = tuple(round(f * 10.0 / condition.voxel_size_a) for f in FIELD_NM)
    tilt_series = condition.imaging == "tilt-series"
    imaging = TiltSeriesImaging(denoised=condition.denoised) if tilt_series else condition.imaging
    phantom = make_phantom(shape, condition.voxel_size_a, seed=seed, preset=preset, imaging=imaging)
    if condition.denoised and not tilt_series:
        phantom = replace(phantom, tomogram=diffuse(phantom.tomogram))
    if condition.invert:
        phantom = replace(phantom, tomogram=-phantom.tomogram)
    return phantom


def truth_spheres(phantom) -> tuple[np.ndarray, np.ndarray]:
    """Centres and radii (voxels) of a phantom's true vesicles."""
    return centers_vox(phantom.vesicles), radii_vox(phantom.vesicles, phantom.voxel_size_a)


def found_spheres(vesicles) -> tuple[np.ndarray, np.ndarray]:
    """Centres and radii (voxels) of the vesicles a segmentation kept."""
    active = active_mask(vesicles)
    return centers_vox(vesicles)[active], radii_vox(vesicles)[active]


def score(phantom, logit_fn, inference: InferenceParams, invert_contrast: bool = False, *,
          search_on_input_grid: bool = False) -> Score:
    """The whole method on one phantom, scored at the final stage against its exact ground truth;
    `search_on_input_grid` searches the segments on the map resampled to the tomogram's grid (the reference)."""
    params = SegmentParams(inference=inference, invert_contrast=invert_contrast)
    tomogram = oriented(phantom.tomogram, params)
    probability = predict_probability(tomogram, phantom.voxel_size_a, logit_fn, inference)
    if search_on_input_grid:
        probability = probability_on_input_grid(probability, tomogram.shape)
    result = postprocess(tomogram, probability, phantom.voxel_size_a, params, keep_stages=False)
    found = found_spheres(result.vesicles)
    m = match_vesicles(*found, *truth_spheres(phantom), phantom.voxel_size_a)
    return Score(m.f1, m.precision, m.recall, dice(result.final_labels(), phantom.labels), m.diameter_error,
                 m.center_residual_nm, len(found[0]))


def code_digest() -> str:
    """A digest of cryoves' engine and kernels sources: a cached cell is reused only for the code that scored it (a
    change that moves results by float rounding would otherwise keep the old cells)."""
    import hashlib

    import cryoves.engine
    import cryoves.kernels

    digest = hashlib.sha256()
    for package in (cryoves.engine, cryoves.kernels):
        root = Path(package.__path__[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cell(s: Score) -> str:
    return f"{s.f1:.3f} / {s.dice:.2f} / {s.diameter_error:.3f} / {s.center_residual_nm:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="CryoVesNet's weights.h5")
    parser.add_argument("--imaging", nargs="+", default=["tilt-series", "fft"], help="phantom families")
    parser.add_argument("--seeds", type=int, default=1, help="phantoms per condition (default: 1)")
    parser.add_argument("--dev", action="store_true",
                        help=f"use the development seeds (from {DEV_SEED}), where defaults may be chosen")
    parser.add_argument("--only", nargs="*", help="condition names to run (default: all)")
    parser.add_argument("--resampling", action="store_true", help="add the resampler comparison")
    parser.add_argument("--models", nargs="+", choices=("bundled", "cryovesnet"), default=["bundled", "cryovesnet"],
                        help="columns of these models only (default: both)")
    parser.add_argument("--cache", default="/tmp/cryoves-robustness.json",
                        help="JSON of scored cells, reused when code, model, parameters and phantom are the same")
    args = parser.parse_args()
    first_seed = DEV_SEED if args.dev else VALIDATION_SEED
    paths = {"bundled": None, "cryovesnet": args.weights}
    checksums = {model: weights_sha256(path) for model, path in paths.items()}
    code = code_digest()
    logit_fns = {}
    columns = {
        "bundled model": ("bundled", model_inference_params(None)),
        "CryoVesNet weights": ("cryovesnet", model_inference_params(args.weights)),
        "CryoVesNet weights, reference pre-processing": ("cryovesnet", REFERENCE),
    }
    if args.resampling:
        for name, (model, params) in list(columns.items())[:2]:
            other = "linear" if params.resampling == "fourier" else "fourier"
            columns[f"{name}, {other} resampling"] = (model, replace(params, resampling=other))
    columns = {name: column for name, column in columns.items() if column[0] in args.models}
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    print("# Robustness of accuracy over imaging conditions\n")
    print(f"Generated by `python benchmarks/robustness.py --weights … --imaging {' '.join(args.imaging)}"
          f"{' --dev' if args.dev else ''}{' --resampling' if args.resampling else ''}` on {date.today()}, "
          f"{platform.machine()}. {'Development' if args.dev else 'Validation'} phantoms (seeds from {first_seed}, "
          f"never trained on), field {FIELD_NM[0]:g} x {FIELD_NM[1]:g} x {FIELD_NM[2]:g} nm. cryoves' columns run the "
          f"network in {model_inference_params(None).precision} and search the segments on the network grid where it "
          "is coarser than the tomogram's, the reference column runs float32 and searches on the tomogram's grid. "
          "Each cell: final "
          "F1 / Dice / δ_d / Δ_c (nm), F1 with one-to-one matching; ⚠ marks a cryoves cell more than 0.02 F1 below "
          "the reference column.\n")
    print("| family | condition | " + " | ".join(columns) + " |")
    print("|---" * (2 + len(columns)) + "|", flush=True)
    worst = {name: (2.0, "") for name in columns}
    for imaging in args.imaging:
        for condition in conditions(imaging):
            if args.only and condition.name not in args.only:
                continue
            scores = {name: [] for name in columns}
            for seed in range(first_seed, first_seed + args.seeds):
                phantom = None
                for name, (model, params) in columns.items():
                    on_input_grid = params is REFERENCE
                    key = (f"{code}|{imaging}|{condition}|{seed}|{checksums[model]}|{SegmentParams(inference=params)}|"
                           f"{'input grid' if on_input_grid else 'map grid'}")
                    if key not in cache:
                        phantom = phantom or make_condition(condition, seed)
                        if (model, params.precision) not in logit_fns:
                            logit_fns[model, params.precision] = load_logit_fn(paths[model], "cpu", params.precision)
                        logit_fn = logit_fns[model, params.precision]
                        cache[key] = asdict(score(phantom, logit_fn, params, condition.invert,
                                                  search_on_input_grid=on_input_grid))
                        cache_path.write_text(json.dumps(cache))
                    scores[name].append(Score(**cache[key]))
            means = {name: Score(*(float(np.mean([getattr(s, f) for s in runs])) for f in Score.__dataclass_fields__))
                     for name, runs in scores.items()}
            reference = means["CryoVesNet weights, reference pre-processing"].f1 if "cryovesnet" in args.models else 0
            row = []
            for name, mean in means.items():
                below = name != "CryoVesNet weights, reference pre-processing" and mean.f1 < reference - 0.02
                row.append(("⚠ " if below else "") + _cell(mean))
                if mean.f1 < worst[name][0]:
                    worst[name] = (mean.f1, f"{imaging}: {condition.name}")
            print(f"| {imaging} | {condition.name} | " + " | ".join(row) + " |", flush=True)
    print("\nWorst case per column: " + "; ".join(f"{name} {f1:.3f} ({where})" for name, (f1, where) in worst.items()))


if __name__ == "__main__":
    main()
