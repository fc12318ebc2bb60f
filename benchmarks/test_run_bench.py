"""Batch throughput (tomograms/min): `run_batch` on local Ray vs `segment_job` in-process, same run.

Small phantoms (32x64x64 at 22 Å, one tile each). Ray starts as on a CPU-only machine: one CPU
inference actor beside the CPU tasks; its time includes starting the actor and loading the model,
as a real batch does, while the in-process path gets a model loaded beforehand. Set
CRYOVES_BENCH_TOMOGRAMS to use more phantoms (default 4).
"""

import itertools
import os
import time

import pytest

from cryoves.engine.job import Job, Settings, prepare, segment_job
from cryoves.engine.network.model import bundled_model_dir, load_logit_fn
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom

ray = pytest.importorskip("ray")
from cryoves.cluster.run import run_batch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

N_TOMOGRAMS = int(os.environ.get("CRYOVES_BENCH_TOMOGRAMS", "4"))
SETTINGS = Settings(params=SegmentParams(), weights_sha256="bench")


@pytest.fixture(scope="module")
def weights():
    """The bundled model, as a folder path that both the engine and the command line take."""
    return str(bundled_model_dir())


@pytest.fixture(scope="module")
def tomograms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    for seed in range(N_TOMOGRAMS):
        write_phantom(folder, make_phantom((32, 64, 64), 22.0, seed=seed), name=f"phantom{seed}")
    return [folder / f"phantom{seed}.mrc" for seed in range(N_TOMOGRAMS)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.benchmark(group="batch throughput")
@pytest.mark.parametrize("path", ["in-process", "ray"])
def test_batch_throughput(benchmark, request, tmp_path, tomograms, weights, path):
    counter = itertools.count()
    if path == "in-process":
        logit_fn = load_logit_fn(weights)

        def run():
            out = tmp_path / f"out{next(counter)}"
            for tomogram in tomograms:
                segment_job(prepare(Job(path=tomogram), SETTINGS, out), logit_fn, SETTINGS, out)
            return ["ok"] * len(tomograms)
    else:
        request.getfixturevalue("local_ray")

        def run():
            out = tmp_path / f"out{next(counter)}"
            return run_batch([str(t) for t in tomograms], out, SETTINGS, weights=weights,
                             progress=lambda row: None)["status"].to_pylist()

    start = time.perf_counter()
    statuses = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    assert statuses == ["ok"] * len(tomograms)
    benchmark.extra_info["tomograms"] = len(tomograms)
    benchmark.extra_info["tomograms_per_min"] = round(len(tomograms) * 60 / seconds, 2)
