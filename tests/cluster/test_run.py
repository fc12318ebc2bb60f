"""`run_batch` on a local Ray instance with fake GPUs: same outputs as `segment_file`, resume, error rows."""

import dataclasses

import mrcfile
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import write_volume
from cryoves.engine.job import prepare_job, segment_file
from cryoves.engine.network.inference import InferenceParams
from cryoves.engine.network.model import bundled_model_dir, load_logit_fn
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.stages.threshold import ThresholdParams
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom

ray = pytest.importorskip("ray")
from cryoves.cluster.run import expand_inputs, run_batch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

SHAPE, VOXEL_A = (32, 64, 64), 22.0
# 4 tiles in 2 batches per tomogram: each tomogram is spread over both actors
PARAMS = SegmentParams(inference=InferenceParams(tile_vox=32, memory_gb=0.6))
GOOD = ("p0", "p1")
VESICLES_PER_TASK = 1  # sphere refinement of each tomogram spread over several tasks


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights():
    """The bundled model, as a folder path that both the engine and the command line take."""
    return str(bundled_model_dir())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tomograms")
    for seed, name in enumerate(GOOD):
        write_phantom(folder, make_phantom(SHAPE, VOXEL_A, seed=seed), name=name)  # + .labels.mrc: not inputs
    (folder / "text.mrc").write_text("not a tomogram\n")
    with mrcfile.new(folder / "unset.mrc") as mrc:
        mrc.set_data(np.zeros((16, 16, 16), np.float32))
        mrc.voxel_size = 1.0
    return folder


@pytest.fixture(scope="module")
def reference(inputs, weights, tmp_path_factory):
    """The in-process path (`cryoves segment`) on the good tomograms."""
    out = tmp_path_factory.mktemp("in_process")
    logit_fn = load_logit_fn(weights)
    for name in GOOD:
        segment_file(prepare_job(inputs / f"{name}.mrc", PARAMS, "sha"), out, logit_fn, PARAMS,
                     write_probability=True)
    return out


@pytest.fixture(scope="module")
def first_run(ray_instance, inputs, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray_out")
    rows = []
    table = run_batch([str(inputs)], out, PARAMS, weights=weights, weights_sha256="sha", num_gpu_actors=2,
                      progress=rows.append, write_probability=True, vesicles_per_task=VESICLES_PER_TASK)
    return out, table, rows


def _status(table: pa.Table) -> dict[str, str]:
    return dict(zip(table["name"].to_pylist(), table["status"].to_pylist()))


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    """Exact equality, NaN equal to NaN."""
    assert a.schema.equals(b.schema, check_metadata=True)
    for name in a.column_names:
        x, y = a[name].to_numpy(zero_copy_only=False), b[name].to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x.tolist() == y.tolist(), name


def test_results_equal_the_in_process_path(first_run, reference):
    out, table, rows = first_run
    assert table["name"].to_pylist() == ["p0", "p1", "text", "unset"]  # input order, outputs excluded
    assert len(rows) == 4 and {r["name"] for r in rows} == set(table["name"].to_pylist())
    for name in GOOD:
        ours, theirs = mrcfile.read(out / f"{name}.labels.mrc"), mrcfile.read(reference / f"{name}.labels.mrc")
        np.testing.assert_array_equal(ours, theirs)
        assert ours.max() > 0
        np.testing.assert_array_equal(mrcfile.read(out / f"{name}.prob.mrc"),
                                      mrcfile.read(reference / f"{name}.prob.mrc"))
        vesicles = pq.read_table(out / "vesicles" / f"{name}.parquet")
        assert vesicles.num_rows > 2 * VESICLES_PER_TASK  # refined in three or more chunks
        assert_tables_equal(vesicles, pq.read_table(reference / "vesicles" / f"{name}.parquet"))
        assert (out / f"{name}.mod").read_bytes() == (reference / f"{name}.mod").read_bytes()
        ours_run = pq.read_table(out / "runs" / f"{name}.parquet").to_pylist()[0]
        theirs_run = pq.read_table(reference / "runs" / f"{name}.parquet").to_pylist()[0]
        timing = {"seconds", "total_seconds", "peak_memory_mb"}
        assert {k: v for k, v in ours_run.items() if k not in timing} == \
               {k: v for k, v in theirs_run.items() if k not in timing}


def test_actors_sit_on_the_fake_gpus_and_share_each_tomogram(first_run):
    _, table, _ = first_run
    ok = table.filter(pc.equal(table["status"], "ok"))
    assert ok.num_rows == 2
    for actors, gpus in zip(ok["actors"].to_pylist(), ok["gpu_ids"].to_pylist()):
        assert actors == "0,1" and sorted(gpus.split(",")) == ["0", "1"]
    assert all(n > 0 for n in ok["n_vesicles"].to_pylist())


def test_corrupt_inputs_are_error_rows_beside_good_results(first_run):
    out, table, _ = first_run
    assert _status(table) == {"p0": "ok", "p1": "ok", "text": "error", "unset": "error"}
    errors = dict(zip(table["name"].to_pylist(), table["error"].to_pylist()))
    assert "not a valid MRC file" in errors["text"] and "looks unset" in errors["unset"]
    for name in ("text", "unset"):
        record = pq.read_table(out / "runs" / f"{name}.parquet").to_pylist()[0]
        assert record["status"] == "error" and record["error"] == errors[name]


def test_resume_skips_done_tomograms_and_recomputes_on_a_new_parameter(first_run, inputs, weights):
    out, _, _ = first_run
    stamp = (out / "p0.labels.mrc").stat().st_mtime_ns
    again = run_batch([str(inputs)], out, PARAMS, weights=weights, weights_sha256="sha")
    assert _status(again) == {"p0": "skipped", "p1": "skipped", "text": "error", "unset": "error"}
    assert (out / "p0.labels.mrc").stat().st_mtime_ns == stamp
    changed = dataclasses.replace(PARAMS, threshold=ThresholdParams(lo=0.85))
    good = [str(inputs / f"{name}.mrc") for name in GOOD]
    redone = run_batch(good, out, changed, weights=weights, weights_sha256="sha", num_gpu_actors=1,
                       max_in_flight=1)
    assert _status(redone) == {"p0": "ok", "p1": "ok"}
    assert set(redone["actors"].to_pylist()) == {"0"}
    assert (out / "p0.labels.mrc").stat().st_mtime_ns != stamp


def test_a_model_that_does_not_load_stops_the_batch_with_one_message(ray_instance, inputs, tmp_path):
    not_weights = tmp_path / "weights.h5"
    not_weights.write_text("not weights")
    with pytest.raises(CryovesError, match="could not load the model: .*weights.h5: not a Keras HDF5"):
        run_batch([str(inputs / "p0.mrc")], tmp_path / "out", PARAMS, weights=str(not_weights),
                  weights_sha256="sha")
    with pytest.raises(CryovesError, match="model not found"):
        run_batch([str(inputs / "p0.mrc")], tmp_path / "out", PARAMS, weights=str(tmp_path / "missing.h5"),
                  weights_sha256="sha")

def test_expand_inputs(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    for name in ("t1.mrc", "t2.mrc", "t1.labels.mrc", "t2.prob.mrc", "notes.md"):
        (folder / name).write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "t3.mrc").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# tomograms\nb/t3.mrc\n\na/t1.mrc\n")
    assert [p.name for p in expand_inputs([str(folder)])] == ["t1.mrc", "t2.mrc"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*" / "t*.mrc")])] == ["t1.mrc", "t2.mrc", "t3.mrc"]
    assert [p.name for p in expand_inputs([str(tmp_path / "?")])] == ["t1.mrc", "t2.mrc", "t3.mrc"]
    assert [p.name for p in expand_inputs([str(listing), str(folder)])] == ["t3.mrc", "t1.mrc", "t2.mrc"]
    with pytest.raises(CryovesError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.mrc")])
    with pytest.raises(CryovesError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.rec")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "t1.mrc").write_bytes(b"")
    with pytest.raises(CryovesError, match="overwrite"):
        expand_inputs([str(folder), str(tmp_path / "c")])


def test_cli_run_segments_the_good_and_exits_2_for_the_bad(ray_instance, inputs, weights, reference, tmp_path,
                                                          capsys):
    from cryoves.cluster.cli import main

    regions = tmp_path / "regions"
    region = np.zeros(SHAPE, np.uint8)
    region[:, :, :32] = 1
    write_volume(regions / "p0.region.mrc", region, VOXEL_A)
    out = tmp_path / "out"
    assert main(["run", str(inputs), "--out", str(out), "--weights", weights, "--truth", str(inputs),
                 "--regions", str(regions)]) == 2
    captured = capsys.readouterr()
    assert "4 tomograms: 2 segmented, 0 already complete (skipped), 2 failed" in captured.out
    assert "cryoves: error: 2 of 4 tomograms failed" in captured.err
    for name in GOOD:
        assert (out / f"{name}.labels.mrc").is_file()
    whole = np.asarray(mrcfile.read(reference / "p0.labels.mrc"))
    assert whole[:, :, 48:].any()
    assert not np.asarray(mrcfile.read(out / "p0.labels.mrc"))[:, :, 48:].any()  # spheres may cross the edge
    records = {r["tomogram"]: r for r in pq.read_table(out / "runs").to_pylist()}
    assert records["p0"]["region"] == str(regions / "p0.region.mrc") and records["p1"]["region"] == ""
    metrics = pq.read_table(out / "metrics").to_pylist()
    assert sorted(row["tomogram"] for row in metrics) == list(GOOD)
    assert all(row["n_true_positive"] + row["n_false_negative"] > 0 for row in metrics)


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not-replaced"])
def test_a_node_dies_during_the_batch_and_nothing_is_lost_or_duplicated(inputs, weights, reference, tmp_path,
                                                                         monkeypatch, replaced):
    """Two nodes with one (fake) GPU each; the worker node is killed as soon as both actors hold the model,
    with the first tiles on their way to it. Either a new node joins (as an autoscaler would bring it) and
    the actor restarts there, or none does and the batch goes on with the one GPU left: tasks are
    retried, tiles resubmitted, and the outputs still equal the in-process path."""
    from ray.cluster_utils import Cluster

    import cryoves.cluster.run

    ray.shutdown()  # this test runs its own cluster; it comes last, after the module's local instance
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1)]
    cluster.wait_for_nodes()

    class PoolLosingANode(cryoves.cluster.run.PredictorPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            cluster.remove_node(nodes[0])
            if replaced:
                nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))

    monkeypatch.setattr(cryoves.cluster.run, "PredictorPool", PoolLosingANode)
    monkeypatch.setattr(cryoves.cluster.run, "CLUSTER_CHECK_S", 1.0)
    rows = []
    try:
        table = run_batch([str(inputs)], tmp_path, PARAMS, weights=weights, weights_sha256="sha",
                          address=cluster.address, max_in_flight=2, progress=rows.append,
                          write_probability=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(nodes) == 1 + replaced
    actors = {row["actors"] for row in rows if row["status"] == "ok"}
    assert actors == {"0,1"} if replaced else len(actors) == 1 and "," not in actors.pop()
    assert sorted(r["name"] for r in rows) == table["name"].to_pylist() == ["p0", "p1", "text", "unset"]
    assert _status(table) == {"p0": "ok", "p1": "ok", "text": "error", "unset": "error"}
    for name in GOOD:
        for suffix in ("labels", "prob"):
            np.testing.assert_array_equal(mrcfile.read(tmp_path / f"{name}.{suffix}.mrc"),
                                          mrcfile.read(reference / f"{name}.{suffix}.mrc"))



def test_finish_asks_for_its_measured_memory_but_never_more_than_a_node_has():
    from cryoves.cluster.run import FINISH_BYTES_PER_VOXEL, finish_memory_bytes

    assert finish_memory_bytes(1000, 1e12) == 1000 * FINISH_BYTES_PER_VOXEL
    assert finish_memory_bytes(10**9, 8e9) == 8 * 10**9
