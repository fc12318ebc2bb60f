"""The job calls: companions and identity, resume, the probability map from tile batches in any order,
and `finish` writing every output with the run record last."""

import dataclasses
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.outputs import read_run_record
from cryoves.engine.job import (
    STEPS,
    Job,
    OutputOptions,
    ProbabilityMap,
    Settings,
    batch_starts,
    finish,
    make_jobs,
    network_input,
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
SETTINGS = Settings(params=SegmentParams(inference=InferenceParams(tile_vox=32, memory_gb=0.6)),
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


def test_a_prepared_tomogram_travels_without_its_voxels_and_maps_the_file_again(folder, tmp_path):
    prepared = prepare(Job(path=folder / "tomo.mrc"), SETTINGS, tmp_path)
    sent = pickle.dumps(prepared)
    assert len(sent) < 4096 < prepared.volume.data.nbytes  # as a Ray task's argument or return value
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
                                 "pyto_labels", "pyto_model", "metrics", "run"}
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
    assert run_written >= max(p.stat().st_mtime_ns for k, p in result.paths.items() if k != "run")


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
