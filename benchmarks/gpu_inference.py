"""GPU speed of the PyTorch U-Net and of the whole pipeline, without TensorFlow or Ray.

Needs only torch, numpy, scipy, h5py, pyarrow, numba (and cryoves installed or on the path).
`benchmarks/gpu_session.sh` runs it with the GPU tests in one command. On a GPU machine, from the
repository root:

    python benchmarks/gpu_inference.py --json gpu.json

measures (1) tiled inference in Mvoxel/s of a 174x684x684 volume at network resolution (22 Å), in
float32 and float16, and (2) the whole pipeline for a 1024x1024x261 phantom at 14.69 Å: the network
on the GPU (float16), post-processing on the CPU. `python benchmarks/results.py --gpu gpu.json`
puts the figures in RESULTS.md. Smoke check without a GPU (seconds):

    python benchmarks/gpu_inference.py --device cpu --size small

TensorFlow, Keras and Ray are blocked from being imported here: the run fails loudly if any module
on this path needs them. The network is the bundled model unless --weights names another.
"""

import argparse
import importlib.abc
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from math import prod
from pathlib import Path

_BLOCKED = ("tensorflow", "keras", "ray", "csbdeep")


class _BlockImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ImportError(f"{name}: gpu_inference.py runs without TensorFlow, Keras and Ray")
        return None


sys.meta_path.insert(0, _BlockImports())

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from cryoves.cluster.bench import (  # noqa: E402
    POST_STAGES,
    TARGET_SHAPE,
    TARGET_VOXEL_SIZE_A,
    WARMUP_SHAPE,
    hardware,
    time_pipeline,
)
from cryoves.engine.io.mrc import write_volume  # noqa: E402
from cryoves.engine.io.outputs import package_versions, peak_memory_mb  # noqa: E402
from cryoves.engine.network.inference import InferenceParams, plan_inference, predict_tiled  # noqa: E402
from cryoves.engine.network.rescale import network_shape  # noqa: E402
from cryoves.engine.network.torch_unet import load_torch_unet, make_torch_logit_fn  # noqa: E402
from cryoves.engine.pipeline import SegmentParams  # noqa: E402
from cryoves.engine.synthetic.phantom import make_phantom  # noqa: E402

SMALL = {"network_shape": (48, 96, 96), "tomogram_shape": (64, 128, 128), "voxel_size_a": 22.0}


def _network(weights, device: str, half: bool):
    """A fresh network per precision (make_torch_logit_fn converts the module in place)."""
    return make_torch_logit_fn(load_torch_unet(weights, device=device), half=half)


def _volume(shape, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(raw, 1.0)
    return (smooth - smooth.mean()) / smooth.std()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def inference_speed(volume, logit_fn, params: InferenceParams, device: str, repeats: int) -> dict:
    """Fastest of `repeats` tiled passes after one warm-up pass (cuDNN algorithm choice, allocations)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    prob = predict_tiled(volume, logit_fn, params)
    _sync(device)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_tiled(volume, logit_fn, params)
        _sync(device)
        times.append(time.perf_counter() - start)
    if not np.isfinite(prob).all():
        raise RuntimeError("the network produced non-finite probabilities")
    best = min(times)
    return {"seconds": best, "seconds_all": times, "first_call_seconds": first_s,
            "mvoxel_per_s": prod(volume.shape) / best / 1e6,
            "gpu_peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("full", "small"), default="full",
                        help="full: 174x684x684 network volume and a 1024x1024x261 tomogram; small: a smoke check")
    parser.add_argument("--weights", help="cryoves model folder or CryoVesNet weights.h5 (default: bundled model)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="tile batch budget (InferenceParams.memory_gb); default 16 on cuda, 2 on cpu")
    parser.add_argument("--precisions", default=None, help="comma-separated; default float32,float16 on cuda, "
                                                           "float32 on cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", type=Path, help="write the record here as well")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU; use --device cpu --size small for a smoke check")
    say = lambda message: print(f"[gpu_inference] {message}", file=sys.stderr, flush=True)  # noqa: E731

    memory_gb = args.memory_gb or (16.0 if args.device == "cuda" else 2.0)
    params = SegmentParams(inference=InferenceParams(memory_gb=memory_gb))
    if args.size == "full":
        tomo_shape, voxel_size_a = TARGET_SHAPE, TARGET_VOXEL_SIZE_A
        net_shape = network_shape(tomo_shape, voxel_size_a, params.inference.network_voxel_size_a)
    else:
        tomo_shape, voxel_size_a, net_shape = SMALL["tomogram_shape"], SMALL["voxel_size_a"], SMALL["network_shape"]
    precisions = (args.precisions or ("float32,float16" if args.device == "cuda" else "float32")).split(",")
    plan = plan_inference(net_shape, params.inference)
    record = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "network_shape": list(net_shape),
        "memory_gb": memory_gb,
        "plan": {"n_tiles": len(plan.tiles), "window_shape": list(plan.window_shape),
                 "batch_size": plan.batch_size, "redundancy": round(plan.redundancy, 3)},
        "inference": {},
    }

    say(f"network volume {'x'.join(map(str, net_shape))}: {len(plan.tiles)} tiles of "
        f"{'x'.join(map(str, plan.window_shape))}, {plan.batch_size} per call")
    volume = _volume(net_shape)
    for precision in precisions:
        logit_fn = _network(args.weights, args.device, half=precision == "float16")
        say(f"inference {precision}")
        record["inference"][precision] = inference_speed(volume, logit_fn, params.inference, args.device,
                                                         args.repeats)
        say(f"  {record['inference'][precision]['mvoxel_per_s']:.2f} Mvoxel/s")
    record["model"] = "bundled model" if args.weights is None else str(args.weights)
    del volume

    if not args.skip_pipeline:
        logit_fn = _network(args.weights, args.device, half=args.device == "cuda")
        with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as work:
            say("pipeline warm-up (numba compilation)")
            warm = write_volume(Path(work) / "warm.mrc", make_phantom(WARMUP_SHAPE, 22.0, seed=1).tomogram, 22.0)
            time_pipeline(warm, logit_fn, params, work)
            say(f"phantom {'x'.join(map(str, tomo_shape))} at {voxel_size_a:g} Å")
            start = time.perf_counter()
            phantom = make_phantom(tomo_shape, voxel_size_a, seed=0)
            record["phantom_seconds"] = time.perf_counter() - start
            say("pipeline (the job calls, as cryoves segment runs them)")
            tomogram = write_volume(Path(work) / "tomo.mrc", phantom.tomogram, voxel_size_a)
            seconds, n_found = time_pipeline(tomogram, logit_fn, params, work)
        record |= {"tomogram_shape": list(tomo_shape), "voxel_size_a": voxel_size_a, "stage_seconds": seconds,
                   "pipeline_seconds": sum(seconds.values()),
                   "postprocess_seconds": sum(seconds[name] for name in POST_STAGES),
                   "n_vesicles_phantom": phantom.vesicles.num_rows, "n_vesicles_found": n_found}

    record["peak_memory_mb"] = peak_memory_mb()
    record["hardware"] = hardware("gpu" if args.device == "cuda" else "cpu")
    record["versions"] = package_versions() | {"torch": torch.__version__}
    record["tensorflow_or_ray_imported"] = [name for name in _BLOCKED if name in sys.modules]
    text = json.dumps(record, indent=1, default=float)
    if args.json:
        args.json.write_text(text)
    print(text)
    for precision, r in record["inference"].items():
        print(f"inference {precision}: {r['mvoxel_per_s']:.2f} Mvoxel/s ({r['seconds']:.3f} s for "
              f"{'x'.join(map(str, net_shape))})", file=sys.stderr)
    if "pipeline_seconds" in record:
        print(f"pipeline {'x'.join(map(str, tomo_shape[::-1]))} at {voxel_size_a:g} Å: "
              f"{record['pipeline_seconds']:.2f} s "
              f"(network {record['stage_seconds']['network']:.2f} s, post-processing "
              f"{record['postprocess_seconds']:.2f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
