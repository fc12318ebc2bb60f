"""The job calls: companions, names and identity, resume (an output asked for is part of the work), what
is refused before any work, the probability map from tile batches in any order, and `finish` writing every
output as a set with the run record last."""

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.outputs import output_files, read_run_record, write_run_record
from cryoves.engine.job import (
    STEPS,
    Job,
    OutputOptions,
    ProbabilityMap,
    Settings,
    TileBatch,
    batch_starts,
    finish,
    make_jobs,
    network_input,
    physical_memory_bytes,
    predict,
    predict_tiles,
    prepare,
    probability_map,
    tile_plan,
)
from cryoves.engine.network.inference import InferenceParams, predict_probability, probability_on_input_grid
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom

SHAPE = (32, 64, 64)
# 4 tiles in 2 batches
SETTINGS = Settings(params=SegmentParams(inference=InferenceParams(tile_vox=16, memory_gb=0.2)),
                    weights_sha256="sha")


def pointwise(tiles: np.ndarray) -> np.ndarray:
    """A stand-in network that maps each voxel alone: any tiling gives the same map."""
    return np.asarray(tiles, np.float32) * np.float32(-2.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tomo.mrc with its ground truth (tomo.labels.mrc) and region (tomo.region.mrc: x < 40) beside it."""
    folder = tmp_path_factory.mktemp("job")
    write_phantom(folder, make_phantom(SHAPE, 22.0, seed=4), name="tomo")
    region = np.zeros(SHAPE, np.uint8)
    region[:, :, :40] = 1
    write_volume(folder / "tomo.region.mrc", region, 22.0)
    write_volume(folder / "other.mrc", np.zeros(SHAPE, np.float32), 22.0)
    return folder


def test_make_jobs_takes_a_file_for_all_or_a_folder_per_name(folder):
    tomo, other = make_jobs([folder / "tomo.mrc", folder / "other.mrc"], regions=folder, truth=folder)
    assert (tomo.name, tomo.region, tomo.truth) == ("tomo", folder / "tomo.region.mrc", folder / "tomo.labels.mrc")
    assert (other.name, other.region, other.truth) == ("other", None, None)
    both = make_jobs([folder / "tomo.mrc", folder / "other.mrc"], regions=folder / "tomo.region.mrc")
    assert [job.region for job in both] == [folder / "tomo.region.mrc"] * 2 and both[0].truth is None


def test_a_prepared_tomogram_travels_without_its_voxels_and_maps_the_file_again(folder, tmp_path, monkeypatch):
    """A Prepared sent to another process maps its file there, without reading it whole for NaN or Inf again
    (`prepare` checked every voxel)."""
    from cryoves.engine.io import mrc

    prepared = prepare(Job(path=folder / "tomo.mrc"), SETTINGS, tmp_path)
    sent = pickle.dumps(prepared)
    assert len(sent) < 4096 < prepared.volume.data.nbytes  # as a Ray task's argument or return value
    monkeypatch.setattr(mrc, "_count_nonfinite", lambda data: pytest.fail("the file was checked again"))
    received = pickle.loads(sent)
    assert received.identity == prepared.identity and received.shape == SHAPE and not received.done
    np.testing.assert_array_equal(received.volume.data, prepared.volume.data)
    assert received.volume.voxel_size_a == 22.0


def test_predict_equals_the_whole_volume_pass_and_batches_may_come_in_any_order(folder, tmp_path):
    params = SETTINGS.params
    prepared = prepare(Job(path=folder / "tomo.mrc"), SETTINGS, tmp_path)
    starts = batch_starts(tile_plan(prepared, params.inference))
    assert list(starts) == [0, 2]
    whole = probability_on_input_grid(predict_probability(read_volume(folder / "tomo.mrc").data, 22.0, pointwise,
                                                          params.inference), SHAPE)
    np.testing.assert_array_equal(predict(prepared, pointwise, params).probability, whole)
    network = network_input(prepared, params)
    batches = [predict_tiles(network.volume, first, pointwise, params.inference) for first in starts]
    reversed_map = probability_map(prepared, 1.5, batches[::-1], params)  # Ray's actors answer in any order
    np.testing.assert_array_equal(reversed_map.probability, whole)
    assert reversed_map.seconds >= 1.5 + sum(batch.seconds for batch in batches)
    with pytest.raises(RuntimeError, match="assembled 2 of 4 tiles"):
        probability_map(prepared, 0.0, batches[:1], params)


def test_one_tile_that_is_the_whole_map_is_not_copied(folder):
    """A plan of one tile: its contiguous probabilities are the map itself (Ray's object store hands them over
    read-only; nothing writes into the map), any other array is copied into a new one."""
    settings = dataclasses.replace(SETTINGS, params=SegmentParams(inference=InferenceParams(border_vox=0)))
    prepared = prepare(Job(path=folder / "tomo.mrc"), settings, folder)
    plan = tile_plan(prepared, settings.params.inference)
    assert len(plan.tiles) == 1
    whole = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    whole.flags.writeable = False
    assert probability_map(prepared, 0.0, [TileBatch(0, [whole], 0.0)], settings.params).probability is whole
    strided = np.pad(whole, 1)[1:-1, 1:-1, 1:-1]
    copied = probability_map(prepared, 0.0, [TileBatch(0, [strided], 0.0)], settings.params).probability
    assert copied is not strided and copied.flags.c_contiguous
    np.testing.assert_array_equal(copied, whole)


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory, probability_from_truth):
    """Every output of tomo.mrc, from a map made from its ground truth (no network), in a region."""
    out = tmp_path_factory.mktemp("out")
    settings = dataclasses.replace(SETTINGS, outputs=OutputOptions(probability=True, stages=True, pyto=True))
    (job,) = make_jobs([folder / "tomo.mrc"], regions=folder, truth=folder)
    prepared = prepare(job, settings, out)
    assert not prepared.done
    probability = probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4)
    return out, settings, finish(prepared, ProbabilityMap(probability, 0.25), settings, out)


def test_finish_writes_every_output_and_the_run_record_last(finished, folder):
    out, _, result = finished
    assert set(result.paths) == {"labels", "probability", "global", "local", "sphere", "model", "vesicles",
                                 "pyto_labels", "pyto_model", "metrics", "run", "report"}
    assert result.paths["report"] == out / "report" / "tomo.png" and result.paths["report"].stat().st_size > 0
    labels = np.asarray(read_volume(result.paths["labels"]).data)
    assert result.n_vesicles == labels.max() > 0 and not labels[:, :, 48:].any()  # inside the region (x < 40)
    record = read_run_record(out, "tomo")
    assert record["status"] == "ok" and record["n_vesicles"] == result.n_vesicles
    assert record["region"] == str(folder / "tomo.region.mrc") and record["truth"] == str(folder / "tomo.labels.mrc")
    seconds = json.loads(record["seconds"])
    assert list(seconds) == list(STEPS) == list(result.seconds) and seconds["network"] == 0.25
    assert record["total_seconds"] == pytest.approx(sum(seconds.values()))
    metrics = pq.read_table(result.paths["metrics"]).to_pylist()[0]
    assert metrics["tomogram"] == "tomo" and metrics["n_true_positive"] > 0
    run_written = result.paths["run"].stat().st_mtime_ns
    assert run_written >= max(p.stat().st_mtime_ns for k, p in result.paths.items() if k not in ("run", "report"))


def test_prepare_finds_the_outputs_current_only_for_the_same_input_region_and_parameters(finished, folder):
    out, settings, _ = finished
    (job,) = make_jobs([folder / "tomo.mrc"], regions=folder, truth=folder)
    assert prepare(job, settings, out).done
    assert not prepare(job, dataclasses.replace(settings, force=True), out).done
    other = dataclasses.replace(settings, params=SegmentParams())
    assert not prepare(job, other, out).done
    assert not prepare(dataclasses.replace(job, region=None), dataclasses.replace(settings, outputs=OutputOptions()),
                       out).done


def test_prepare_refuses_what_cannot_be_done(folder, tmp_path):
    pyto = dataclasses.replace(SETTINGS, outputs=OutputOptions(pyto=True))
    with pytest.raises(CryovesError, match="tomo: --pyto needs a region"):
        prepare(Job(path=folder / "tomo.mrc"), pyto, tmp_path)
    with pytest.raises(CryovesError, match="absent.mrc: ground truth file not found"):
        prepare(Job(path=folder / "tomo.mrc", truth=folder / "absent.mrc"), SETTINGS, tmp_path)
    with pytest.raises(CryovesError, match="az.mod: active-zone model not found"):
        prepare(Job(path=folder / "tomo.mrc", region=folder / "tomo.region.mrc"),
                dataclasses.replace(pyto, outputs=OutputOptions(pyto=True, active_zone=folder / "az.mod")), tmp_path)


def test_jobs_are_named_by_the_path_given_and_a_name_twice_is_refused(folder, tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    for name in ("a", "b"):
        (links / f"{name}.mrc").symlink_to(folder / "tomo.mrc")
    jobs = make_jobs([links / "a.mrc", links / "b.mrc", tmp_path / "links" / ".." / "links" / "a.mrc"])
    assert [job.name for job in jobs] == ["a", "b"]  # the link's name, not its target's; a path given twice once
    assert jobs[0].path == links / "a.mrc"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.mrc").write_bytes(b"")
    with pytest.raises(CryovesError, match=r"1 tomogram name\(s\) occur twice .* e.g. a: "):
        make_jobs([links / "a.mrc", tmp_path / "other" / "a.mrc"])


def test_a_network_grid_larger_than_memory_is_refused_with_what_it_needs(folder, tmp_path, monkeypatch):
    import cryoves.engine.job

    settings = dataclasses.replace(SETTINGS, voxel_size_a=44.0)  # 2x the network's 22 Å: 8x the voxels
    needed = cryoves.engine.job.NETWORK_BYTES_PER_VOXEL * (64 * 128 * 128) + SETTINGS.params.inference.memory_gb * 1e9
    monkeypatch.setattr(cryoves.engine.job, "physical_memory_bytes", lambda: needed - 1)
    with pytest.raises(CryovesError, match=r"tomo.mrc: at 44 Å the network grid is 64 x 128 x 128 voxels \(22 Å\) "
                                           r"and needs about \d+ GB of memory, this machine has \d+ GB"):
        prepare(Job(path=folder / "tomo.mrc"), settings, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(cryoves.engine.job, "physical_memory_bytes", lambda: needed)
    assert not prepare(Job(path=folder / "tomo.mrc"), settings, tmp_path / "out").done
    assert physical_memory_bytes() > 2**30


@pytest.mark.parametrize("asked", ["probability", "stages", "pyto", "truth", "deleted"])
def test_an_output_asked_for_and_missing_makes_the_work_not_done(finished, folder, tmp_path, asked):
    """`finished` wrote every output; a folder without one of them is not done when it is asked for."""
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    everything = finished[1]
    (job,) = make_jobs([folder / "tomo.mrc"], regions=folder, truth=folder)
    assert prepare(job, everything, out).done
    if asked == "deleted":  # a file of the record gone since
        (out / "tomo.local.mrc").unlink()
        assert not prepare(job, everything, out).done
        return
    record = read_run_record(out, "tomo")  # as an earlier run without the option left it
    fewer = dataclasses.replace(everything.outputs, **{asked: False}) if asked != "truth" else everything.outputs
    truth = job.truth if asked != "truth" else None
    files = {relative: source for relative, source in json.loads(record["files"]).items()
             if relative in output_files("tomo", probability=fewer.probability, stages=fewer.stages,
                                         pyto=fewer.pyto, metrics=truth is not None).values()}
    write_run_record(out, "tomo", record | {"files": files})
    assert not prepare(job, everything, out).done
    assert prepare(dataclasses.replace(job, truth=truth), dataclasses.replace(everything, outputs=fewer), out).done


def test_a_truth_changed_since_makes_the_scores_not_done(finished, folder, tmp_path):
    (job,) = make_jobs([folder / "tomo.mrc"], regions=folder, truth=folder)
    other_truth = tmp_path / "other.labels.mrc"
    shutil.copy(job.truth, other_truth)
    assert not prepare(dataclasses.replace(job, truth=other_truth), finished[1], finished[0]).done


def test_finish_removes_what_interrupted_writes_and_the_earlier_set_left(folder, tmp_path, probability_from_truth):
    """A SIGKILL mid-write leaves `.NAME.....part` files; an earlier run's outputs that the new set does not
    write would sit beside it as if they belonged to it. Another tomogram's files stay."""
    out = tmp_path / "out"
    (out / "vesicles").mkdir(parents=True)
    (out / "runs").mkdir()
    stale = [out / ".tomo.labels.mrc.k2j4h5g6.part", out / "vesicles" / ".tomo.parquet.abcd_123.part",
             out / "runs" / ".tomo.parquet.zz99zz99.part", out / "tomo.prob.mrc", out / "tomo.global.mrc"]
    others = [out / ".tomo2.labels.mrc.k2j4h5g6.part", out / ".tomo.labels.mrc.backup", out / "tomo2.prob.mrc"]
    for path in stale + others:
        path.write_bytes(b"x" * 100)
    prepared = prepare(Job(path=folder / "tomo.mrc"), SETTINGS, out)
    probability = probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4)
    result = finish(prepared, ProbabilityMap(probability, 0.0), SETTINGS, out)
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in others)
    assert sorted(result.paths) == ["labels", "model", "report", "run", "vesicles"]


@pytest.mark.parametrize("written", [False, True])
def test_finish_lets_the_probability_map_go_before_the_spheres_unless_it_writes_it(folder, tmp_path,
                                                                                  probability_from_truth, written):
    """The map (326 MB at 1024x1024x261) is freed after the segments' search: the spheres' refinement, the peak of
    `finish`, runs without it; kept when NAME.prob.mrc is written."""
    import weakref

    from cryoves.engine.pipeline import refine_in_bands

    probability = ProbabilityMap(probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4),
                                 0.0)
    alive = weakref.ref(probability.probability)
    at_refine = []

    def refiner(*args):
        at_refine.append(alive() is not None)
        return refine_in_bands(*args)

    settings = dataclasses.replace(SETTINGS, outputs=OutputOptions(probability=written, report=False))
    done = finish(prepare(Job(path=folder / "tomo.mrc"), settings, tmp_path), probability, settings, tmp_path,
                  refiner=refiner)
    assert at_refine == [written] and probability.probability is None
    assert ("probability" in done.paths) == written and done.n_vesicles > 0
    with pytest.raises(RuntimeError, match="taken before"):
        probability.take()


def test_an_interrupted_write_leaves_a_record_that_is_redone(folder, tmp_path, probability_from_truth, monkeypatch):
    import cryoves.engine.job

    out = tmp_path / "out"
    probability = probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4)
    job = Job(path=folder / "tomo.mrc")
    finish(prepare(job, SETTINGS, out), ProbabilityMap(probability, 0.0), SETTINGS, out)
    assert prepare(job, SETTINGS, out).done

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cryoves.engine.job, "write_pyto", interrupted)  # after labels, model and table
    pyto = dataclasses.replace(SETTINGS, outputs=OutputOptions(pyto=True))
    with pytest.raises(KeyboardInterrupt):
        finish(prepare(dataclasses.replace(job, region=folder / "tomo.region.mrc"), pyto, out),
               ProbabilityMap(probability, 0.0), pyto, out)
    record = read_run_record(out, "tomo")
    assert record["status"] == "error" and "interrupted while its outputs were written" in record["error"]
    assert not prepare(job, SETTINGS, out).done


def test_the_finishing_imports_wait_for_their_first_use_or_the_network():
    """imodmodel (pandas) takes about 0.5 s to import: not on the way to the network, then on a thread beside it
    (`import_in_background`), and the steps after it still work without that thread."""
    import subprocess
    import sys

    from cryoves.engine.warmup import FINISH_IMPORTS

    heavy = (*FINISH_IMPORTS, "pandas")
    code = ("import sys; import cryoves.engine.job, cryoves.engine.network.model, cryoves.cluster.cli; "
            f"heavy = {heavy!r}; print(sorted(m for m in heavy if m in sys.modules)); "
            "from cryoves.engine.warmup import import_in_background; import_in_background().join(); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    before, after = done.stdout.strip().splitlines()
    assert before == "[]", done.stderr[-2000:]
    assert after == str(sorted(heavy))
