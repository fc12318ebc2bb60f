"""`cryoves bench`'s engine: one record per run with every stage timed, and its text rendering."""

import json

import pytest

from cryoves.cluster.bench import (
    SIZES,
    TARGET_SHAPE,
    Node,
    fitted_exponent,
    format_bench,
    model_throughput,
    project,
    run_bench,
)
from cryoves.engine.errors import CryovesError
from cryoves.engine.pipeline import STAGES


@pytest.fixture(scope="module")
def record():
    """The small size on CPU, on a smaller phantom to keep the test fast (same code path)."""
    return run_bench("small", "cpu", shape=(32, 96, 96))


def test_record_has_every_stage_with_positive_times(record):
    assert list(record["stages"]) == list(STAGES)
    for name, stage in record["stages"].items():
        assert stage["seconds"] > 0 and stage["mvoxel_per_s"] > 0, name
        assert stage["grid"] == ("network" if name == "network" else "input")
    post = sum(record["stages"][name]["seconds"] for name in STAGES[1:])
    assert record["postprocess_seconds"] == pytest.approx(post)
    assert record["total_seconds"] == pytest.approx(post + record["stages"]["network"]["seconds"])
    assert record["shape"] == [32, 96, 96] and record["size"] == "small" and record["device"] == "cpu"
    assert record["n_vesicles_phantom"] > 0 and record["n_vesicles_found"] > 0


def test_record_is_json_with_hardware_and_versions(record):
    again = json.loads(json.dumps(record))
    assert again["hardware"]["cores"] >= 1 and again["hardware"]["cpu"]
    assert {"python", "numpy", "numba"} <= set(again["versions"])
    assert again["projection"]["network_shape"] == [174, 684, 684]
    assert again["projection"]["tomograms_per_hour"] > 0


def test_format_prints_stages_and_projection(record):
    text = format_bench(record)
    for name in STAGES:
        assert f"\n{name} " in text
    assert "projected:" in text and "tomograms/hour" in text and "1024x1024x261 voxels at 14.69 Å" in text


def test_projection_uses_network_grid_for_the_network_and_input_grid_after():
    stages = {"network": {"grid": "network", "mvoxel_per_s": 1.0}, "refine": {"grid": "input", "mvoxel_per_s": 2.0}}
    p = project(stages)
    assert p["network_seconds"] == pytest.approx(174 * 684 * 684 / 1e6)
    assert p["postprocess_seconds"] == pytest.approx(TARGET_SHAPE[0] * TARGET_SHAPE[1] * TARGET_SHAPE[2] / 2e6)
    assert p["tomograms_per_hour"] == pytest.approx(3600 / p["seconds_per_tomogram"])


def test_throughput_model_takes_the_slower_resource():
    """174x684x684 network voxels (81.4 M): 1 GPU at 81.4 Mvoxel/s does 3600 tomograms/h; 16 cores at 36
    core-seconds each do 1600/h; memory (128 GB x 0.7 / 8 GB = 11 at once) caps them at 1100/h."""
    net_mvoxel = 174 * 684 * 684 / 1e6
    common = {"gpu_mvoxel_s": net_mvoxel, "cpu_core_seconds": 36.0, "overhead": 0.0}
    roomy = model_throughput(Node(1, 16, 1024.0), 1, finish_gb=8.0, **common)
    assert roomy["gpu_per_hour"] == pytest.approx(3600) and roomy["cpu_per_hour"] == pytest.approx(1600)
    assert roomy["limit"] == "CPU cores" and roomy["tomograms_per_hour"] == pytest.approx(1600)
    tight = model_throughput(Node(1, 16, 128.0), 1, finish_gb=8.0, **common)
    assert tight["concurrent"] == 11 and tight["limit"] == "memory"
    capped = model_throughput(Node(1, 16, 1024.0), 1, finish_gb=8.0, max_in_flight=4, **common)
    assert capped["limit"] == "in-flight limit" and capped["cpu_per_hour"] == pytest.approx(400)
    gpu_bound = model_throughput(Node(1, 64, 1024.0), 4, finish_gb=8.0, **common | {"overhead": 0.1})
    assert gpu_bound["limit"] == "GPU" and gpu_bound["tomograms_per_hour"] == pytest.approx(4 * 3600 * 0.9)


def test_fitted_exponent_recovers_a_power_law():
    assert fitted_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)


@pytest.mark.parametrize("size, device", [("huge", "cpu"), ("small", "tpu")])
def test_unknown_size_or_device_is_refused(size, device):
    with pytest.raises(CryovesError, match="unknown"):
        run_bench(size, device)


def test_standard_sizes():
    assert SIZES == {"small": (64, 128, 128), "medium": (128, 256, 256), "large": (200, 512, 512)}


def test_gpu_without_cuda_is_refused():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(CryovesError, match="no CUDA GPU"):
        run_bench("small", "gpu")


def test_bench_and_gpu_script_imports_need_no_tensorflow():
    """benchmarks/gpu_inference.py runs where only torch, numpy, scipy, h5py, pyarrow, numba are installed."""
    import importlib.util
    import subprocess
    import sys

    modules = "cryoves.cluster.bench, cryoves.engine.pipeline"
    if importlib.util.find_spec("torch") is not None:  # the gpu extra
        modules += ", cryoves.engine.network.torch_unet"
    code = (f"import sys, {modules}\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
