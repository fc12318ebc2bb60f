"""`cryoves bench`'s engine: the job calls timed as `segment` runs them, one record per run with every
step rated, and its text rendering."""

import json

import pytest

from cryoves.cluster.bench import (
    POST_STAGES,
    TARGET_SHAPE,
    Node,
    fitted_exponent,
    format_bench,
    model_throughput,
    project,
    run_bench,
    time_pipeline,
)
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.outputs import read_run_record
from cryoves.engine.job import STEPS
from cryoves.engine.network.model import load_logit_fn, model_inference_params
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.synthetic.phantom import make_phantom

SHAPE = (32, 96, 96)  # at 22 Å: the network grid is the input grid
REPEATS = 3


@pytest.fixture(scope="module")
def record():
    """A record from scripted timings: run k (0 the warm-up) takes (k + 1) x (step's index + 1) x 0.1 s,
    except that the second timed run is the fastest network pass (0.05 s)."""
    import cryoves.cluster.bench as bench

    calls = []

    def scripted(tomogram, logit_fn, params, out_dir):
        k = len(calls)
        calls.append(read_volume(tomogram).data.shape)
        seconds = {step: (k + 1) * (i + 1) * 0.1 for i, step in enumerate(STEPS)}
        return seconds | ({"network": 0.05} if k == 2 else {}), 7

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "time_pipeline", scripted)
        patch.setattr(bench, "load_logit_fn", lambda weights, device, precision: None)
        patch.setattr(bench, "kernel_first_use", lambda: {"compile_seconds": 9.5, "cached_seconds": 0.8})
        result = run_bench("small", "cpu", shape=SHAPE, repeats=REPEATS)
    assert calls == [SHAPE] * (1 + REPEATS)  # a warm-up pass on the phantom itself, then the timed runs
    return result


def test_record_rates_the_fastest_of_the_timed_runs(record):
    assert list(record["stages"]) == list(STEPS)
    n_voxels = 32 * 96 * 96
    for i, (name, stage) in enumerate(record["stages"].items()):
        expected = 0.05 if name == "network" else 2 * (i + 1) * 0.1  # run 1 (the first timed) is the fastest
        assert stage["seconds"] == pytest.approx(expected), name
        assert stage["mvoxel_per_s"] == pytest.approx(n_voxels / expected / 1e6)
        assert stage["grid"] == ("network" if name == "network" else "input")
    assert record["postprocess_seconds"] == pytest.approx(sum(0.2 * (STEPS.index(s) + 1) for s in POST_STAGES))
    assert record["total_seconds"] == pytest.approx(sum(stage["seconds"] for stage in record["stages"].values()))
    assert record["shape"] == list(SHAPE) and record["size"] == "small" and record["device"] == "cpu"
    assert record["n_vesicles_found"] == 7 and record["repeats"] == REPEATS


def test_record_is_json_with_hardware_and_versions(record):
    again = json.loads(json.dumps(record))
    assert again["hardware"]["cores"] >= 1 and again["hardware"]["cpu"]
    assert {"python", "numpy", "numba"} <= set(again["versions"])
    assert again["projection"]["network_shape"] == [174, 684, 684]


def test_format_prints_stages_and_projection(record):
    text = format_bench(record)
    for name in STEPS:
        assert f"\n{name} " in text
    assert "projected:" in text and "tomograms/hour" in text and "1024x1024x261 voxels at 14.69 Å" in text
    assert "the kernels compile in 9.5 s" in text and "load them in 0.8 s" in text


def test_time_pipeline_segments_the_file_as_segment_does(tmp_path):
    """One real pass of the job calls: every step timed, and the vesicle count is the written labels'."""
    phantom = make_phantom((32, 64, 64), 22.0, seed=1)
    tomogram = write_volume(tmp_path / "tomo.mrc", phantom.tomogram, 22.0)
    params = SegmentParams(inference=model_inference_params(None))
    seconds, n_found = time_pipeline(tomogram, load_logit_fn(None), params, tmp_path / "out")
    assert list(seconds) == list(STEPS)
    assert n_found == read_volume(tmp_path / "out" / "tomo.labels.mrc").data.max() > 0
    assert read_run_record(tmp_path / "out", "tomo")["n_vesicles"] == n_found


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
