"""`cryoves run` on a local Ray instance with fake GPUs: the same files as `cryoves segment` with the same
options, resume, error rows."""

import dataclasses
import json

import mrcfile
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.cli import _settings, build_parser, main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.job import STEPS, Settings, make_jobs
from cryoves.engine.network.model import bundled_model_dir
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
GOOD = ("p0", "p1")
VESICLES_PER_TASK = 1  # sphere refinement of each tomogram spread over several tasks
TIMINGS = {"seconds", "total_seconds", "peak_memory_mb"}


def options(inputs) -> list[str]:
    """Every output and option `segment` and `run` share; --memory-gb 0.1 makes 4 tiles, one per batch, per
    tomogram, so each tomogram is spread over both actors."""
    return ["--probability", "--stages", "--pyto", "--truth", str(inputs), "--memory-gb", "0.1"]


def run_settings(weights, inputs, regions):
    """What `cryoves run ... OPTIONS` hands to `run_batch`."""
    args = build_parser().parse_args(["run", str(inputs), "--out", "unused", "--weights", weights,
                                      "--regions", str(regions), *options(inputs)])
    return _settings(args)


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
    for x_max, name in ((32, "p0"), (60, "p1")):  # regions, in a folder of their own
        region = np.zeros(SHAPE, np.uint8)
        region[:, :, :x_max] = 1
        write_volume(folder.parent / "regions" / f"{name}.region.mrc", region, VOXEL_A)
    with mrcfile.new(folder / "unset.mrc") as mrc:
        mrc.set_data(np.zeros((16, 16, 16), np.float32))
        mrc.voxel_size = 1.0
    return folder


@pytest.fixture(scope="module")
def regions(inputs):
    return inputs.parent / "regions"


@pytest.fixture(scope="module")
def reference(inputs, regions, weights, tmp_path_factory):
    """`cryoves segment` on the good tomograms, with every option."""
    out = tmp_path_factory.mktemp("in_process")
    assert main(["segment", *(str(inputs / f"{name}.mrc") for name in GOOD), "--out", str(out), "--weights", weights,
                 "--region", str(regions), *options(inputs)]) == 0
    return out


@pytest.fixture(scope="module")
def first_run(ray_instance, inputs, regions, weights, tmp_path_factory):
    """`cryoves run` with the same options, refinement spread over tasks of one vesicle."""
    out = tmp_path_factory.mktemp("ray_out")
    rows = []
    table = run_batch([str(inputs)], out, run_settings(weights, inputs, regions), weights=weights, regions=regions,
                      truth=inputs, num_gpu_actors=2, progress=rows.append, vesicles_per_task=VESICLES_PER_TASK)
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


def assert_same_files(ours, theirs, names) -> None:
    """Every output of `names` in folder `ours` equals the one in `theirs`: volumes voxel for voxel with their
    grid, IMOD models byte for byte, tables exactly, run records but for timings, metrics but for the path."""
    def listing(folder):
        return sorted(p.relative_to(folder) for p in folder.rglob("*")
                      if p.is_file() and p.name.split(".")[0] in names and p.parent.name != "report")  # a view

    files = listing(theirs)
    assert listing(ours) == files and len(files) >= 11 * len(names)
    for file in files:
        a, b = ours / file, theirs / file
        if file.suffix == ".mrc":
            x, y = read_volume(a), read_volume(b)
            np.testing.assert_array_equal(x.data, y.data, err_msg=str(file))
            assert (x.voxel_size_a, x.origin_a, x.data.dtype) == (y.voxel_size_a, y.origin_a, y.data.dtype)
        elif file.suffix == ".mod":
            assert a.read_bytes() == b.read_bytes(), file
        elif file.parts[0] == "vesicles":
            assert_tables_equal(pq.read_table(a), pq.read_table(b))
        else:
            ignore = TIMINGS if file.parts[0] == "runs" else {"prediction"}
            x, y = ({k: v for k, v in pq.read_table(f).to_pylist()[0].items() if k not in ignore} for f in (a, b))
            assert x == y, file


def test_run_writes_the_same_files_as_segment_with_the_same_options(first_run, reference):
    out, table, rows = first_run
    assert table["name"].to_pylist() == ["p0", "p1", "text", "unset"]  # input order, outputs excluded
    assert len(rows) == 4 and {r["name"] for r in rows} == set(table["name"].to_pylist())
    assert_same_files(out, reference, GOOD)
    assert pq.read_table(out / "vesicles" / "p1.parquet").num_rows > 2 * VESICLES_PER_TASK  # three or more chunks
    for name in GOOD:
        assert np.asarray(mrcfile.read(out / f"{name}.labels.mrc")).max() > 0
        record = pq.read_table(out / "runs" / f"{name}.parquet").to_pylist()[0]
        assert list(json.loads(record["seconds"])) == list(STEPS)  # the same steps, timed the same way
    assert not np.asarray(mrcfile.read(out / "p0.labels.mrc"))[:, :, 48:].any()  # region x < 32; spheres cross it
    metrics = pq.read_table(out / "metrics").to_pylist()
    assert sorted(row["tomogram"] for row in metrics) == list(GOOD)
    assert all(row["n_true_positive"] > 0 for row in metrics)


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


def test_resume_skips_done_tomograms_and_recomputes_on_a_new_parameter(first_run, inputs, regions, weights):
    out, _, _ = first_run
    settings = run_settings(weights, inputs, regions)
    stamp = (out / "p0.labels.mrc").stat().st_mtime_ns
    again = run_batch([str(inputs)], out, settings, weights=weights, regions=regions, truth=inputs)
    assert _status(again) == {"p0": "skipped", "p1": "skipped", "text": "error", "unset": "error"}
    assert (out / "p0.labels.mrc").stat().st_mtime_ns == stamp
    changed = dataclasses.replace(settings, params=dataclasses.replace(settings.params,
                                                                       threshold=ThresholdParams(lo=0.85)))
    good = [str(inputs / f"{name}.mrc") for name in GOOD]
    redone = run_batch(good, out, changed, weights=weights, regions=regions, num_gpu_actors=1, max_in_flight=1)
    assert _status(redone) == {"p0": "ok", "p1": "ok"}
    assert set(redone["actors"].to_pylist()) == {"0"}
    assert (out / "p0.labels.mrc").stat().st_mtime_ns != stamp


def test_a_model_that_does_not_load_stops_the_batch_with_one_message(ray_instance, inputs, tmp_path):
    not_weights = tmp_path / "weights.h5"
    not_weights.write_text("not weights")
    settings = Settings(params=SegmentParams(), weights_sha256="sha")
    with pytest.raises(CryovesError, match="could not load the model: .*weights.h5: not a Keras HDF5"):
        run_batch([str(inputs / "p0.mrc")], tmp_path / "out", settings, weights=str(not_weights))
    with pytest.raises(CryovesError, match="model not found"):
        run_batch([str(inputs / "p0.mrc")], tmp_path / "out", settings, weights=str(tmp_path / "missing.h5"))


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
    assert [p.name for p in expand_inputs([str(listing), str(folder)])] == ["t3.mrc", "t1.mrc", "t1.mrc", "t2.mrc"]
    assert [job.name for job in make_jobs(expand_inputs([str(listing), str(folder)]))] == ["t3", "t1", "t2"]
    with pytest.raises(CryovesError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.mrc")])
    with pytest.raises(CryovesError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.rec")])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "t1.mrc").write_bytes(b"")
    with pytest.raises(CryovesError, match="overwrite"):
        make_jobs(expand_inputs([str(folder), str(tmp_path / "c")]))


def test_inputs_are_named_by_the_path_given(tmp_path):
    """links/a.mrc -> ../x/tomogram.mrc is `a`, as in `cryoves segment`; two links to one file are two names."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "tomogram.mrc").write_bytes(b"")
    (tmp_path / "links").mkdir()
    for name in ("a", "b"):
        (tmp_path / "links" / f"{name}.mrc").symlink_to("../x/tomogram.mrc")
    jobs = make_jobs(expand_inputs([str(tmp_path / "links"), str(tmp_path / "links" / "a.mrc")]))
    assert [(job.name, job.path) for job in jobs] == [(name, tmp_path / "links" / f"{name}.mrc") for name in "ab"]


def test_cli_run_segments_the_good_and_exits_2_for_the_bad(ray_instance, inputs, regions, weights, reference,
                                                          tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(inputs / "p1.mrc"), str(inputs / "text.mrc"), "--out", str(out), "--weights", weights,
                 "--regions", str(regions), *options(inputs)]) == 2
    captured = capsys.readouterr()
    assert "2 tomograms: 1 segmented, 0 already complete (skipped), 1 failed" in captured.out
    assert "cryoves: error: 1 of 2 tomograms failed" in captured.err
    assert_same_files(out, reference, ["p1"])


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not-replaced"])
def test_a_node_dies_during_the_batch_and_nothing_is_lost_or_duplicated(inputs, regions, weights, reference,
                                                                         tmp_path, monkeypatch, replaced):
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
        table = run_batch([str(inputs)], tmp_path, run_settings(weights, inputs, regions), weights=weights,
                          regions=regions, truth=inputs, address=cluster.address, max_in_flight=2,
                          progress=rows.append)
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
    from cryoves.cluster.run import finish_memory_bytes
    from cryoves.engine.network.rescale import network_shape

    # resident growth of `_finish` with the report (cluster/run.py, RESULTS.md), plain and with --stages
    measured = {((128, 256, 256), 22.0): (0.13e9, 0.15e9), ((200, 512, 512), 22.0): (0.52e9, 0.62e9),
                ((256, 768, 768), 22.0): (1.47e9, 1.88e9), ((200, 512, 512), 14.7): (0.19e9, 0.43e9),
                ((261, 1024, 1024), 14.69): (0.87e9, None)}
    for (shape, voxel_size_a), (plain, stages) in measured.items():
        n, n_network = int(np.prod(shape)), int(np.prod(network_shape(shape, voxel_size_a)))
        assert plain < finish_memory_bytes(n, n_network, 1e12) < 2 * plain + 0.3e9
        assert stages is None or stages < finish_memory_bytes(n, n_network, 1e12, stages=True) < 2 * stages + 0.3e9
    for (shape, voxel_size_a), copied in {((200, 512, 512), 22.0): 0.73e9, ((200, 512, 512), 14.7): 0.41e9}.items():
        n, n_network = int(np.prod(shape)), int(np.prod(network_shape(shape, voxel_size_a)))  # --invert-contrast
        assert copied < finish_memory_bytes(n, n_network, 1e12, copied=True) < 2 * copied + 0.3e9
    assert finish_memory_bytes(1024 * 1024 * 261, 174 * 684 * 684, 1e9) == 10**9
