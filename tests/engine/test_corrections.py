"""Corrections saved back: a vesicle deleted, added or moved by hand is so in every output (labels, table,
IMOD model, Pyto files, scores, run record), a save without edits changes nothing, and an interrupted
save is never trusted."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io import corrections
from cryoves.engine.io.corrections import NEW_VESICLE, apply_corrections
from cryoves.engine.io.imod import read_vesicle_model
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.outputs import read_run_record, write_run_record
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.job import OutputOptions, ProbabilityMap, Settings, finish, make_jobs, prepare
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom
from cryoves.kernels.render import render_spheres

SHAPE = (40, 96, 96)
VOXEL_A = 22.0
ORIGIN_A = (110.0, -44.0, 66.0)  # z, y, x
SETTINGS = Settings(params=SegmentParams(), weights_sha256="sha",
                    outputs=OutputOptions(probability=True, pyto=True))


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, probability_from_truth):
    """The outputs of a phantom segmented in a region (x < 72), with Pyto files and scores (no network)."""
    folder = tmp_path_factory.mktemp("corrections")
    phantom = make_phantom(SHAPE, VOXEL_A, seed=4)
    write_phantom(folder, phantom, name="tomo")
    tomogram = read_volume(folder / "tomo.mrc")
    write_volume(folder / "tomo.mrc", np.asarray(tomogram.data), VOXEL_A, ORIGIN_A)
    region = np.zeros(SHAPE, np.uint8)
    region[:, :, :72] = 1
    write_volume(folder / "tomo.region.mrc", region, VOXEL_A)
    (job,) = make_jobs([folder / "tomo.mrc"], regions=folder, truth=folder)
    out = folder / "out"
    prepared = prepare(job, SETTINGS, out)
    probability = probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4)
    finish(prepared, ProbabilityMap(probability, 0.0), SETTINGS, out)
    return job, out


@pytest.fixture
def out(segmented, tmp_path):
    """A fresh copy of the segmented outputs, for one test to correct."""
    return shutil.copytree(segmented[1], tmp_path / "out")


def _read(out):
    """(labels, vesicle table, model centres, model radii, run record, metrics row) of tomo."""
    labels = np.asarray(read_volume(out / "tomo.labels.mrc").data)
    table = pq.read_table(out / "vesicles" / "tomo.parquet")
    points, sizes = read_vesicle_model(out / "tomo.mod")
    metrics = pq.read_table(out / "metrics" / "tomo.parquet").to_pylist()[0]
    return labels, table, points, sizes, read_run_record(out, "tomo"), metrics


def _kept(table):
    """(ids, centres, radii in voxels) of the kept and repaired vesicles, in label order."""
    active = active_mask(table)
    return (table.column("vesicle_id").to_numpy()[active], centers_vox(table)[active],
            radii_vox(table, VOXEL_A)[active])


def _assert_consistent(out, n_expected):
    """Every output says the same: labels drawn from the table's kept spheres, the model holds them,
    each vesicle_id is its label, Pyto's vesicles are the labels from 10, the record counts them."""
    labels, table, points, sizes, record, _ = _read(out)
    ids, centers, radii = _kept(table)
    assert len(ids) == n_expected and record["n_vesicles"] == n_expected and record["status"] == "ok"
    np.testing.assert_array_equal(ids, np.arange(1, n_expected + 1))
    np.testing.assert_array_equal(labels, render_spheres(SHAPE, centers, radii, ids))
    np.testing.assert_allclose(points, centers, atol=1e-4)
    np.testing.assert_allclose(sizes, radii, rtol=1e-6)
    pyto = np.asarray(read_volume(out / "tomo.pyto.mrc").data)
    np.testing.assert_array_equal(np.where(labels > 0, labels.astype(np.int64) + 9, 0), np.where(pyto >= 10, pyto, 0))
    nm = np.column_stack([table.column(c).to_numpy() for c in ("center_z_nm", "center_y_nm", "center_x_nm")])
    np.testing.assert_allclose(nm, (centers_vox(table) * VOXEL_A + np.array(ORIGIN_A)) / 10.0)
    return labels, table, record


def test_a_save_without_edits_changes_no_output(out):
    labels, table, points, sizes, record, metrics = _read(out)
    ids, centers, radii = _kept(table)
    result = apply_corrections(out, "tomo", ids, centers, radii, tool="test")
    assert (result.added, result.deleted, result.edited, result.n_vesicles) == (0, 0, 0, len(ids))
    after_labels, after_table, after_points, after_sizes, after_record, after_metrics = _read(out)
    np.testing.assert_array_equal(after_labels, labels)
    assert after_table.to_pandas().equals(table.to_pandas())  # NaN equal to NaN
    np.testing.assert_array_equal(after_points, points)
    assert after_metrics | {"prediction": ""} == metrics | {"prediction": ""}  # the copy's path differs
    assert json.loads(after_record["edits"]) == [{"time": json.loads(after_record["edits"])[0]["time"], "tool": "test",
                                                  "added": 0, "deleted": 0, "edited": 0, "n_vesicles": len(ids)}]


def test_a_deleted_vesicle_disappears_from_every_output(out, segmented):
    _, table, _, _, _, metrics = _read(out)
    ids, centers, radii = _kept(table)
    assert len(ids) >= 4
    gone = 2  # the third vesicle
    keep = np.arange(len(ids)) != gone
    result = apply_corrections(out, "tomo", ids[keep], centers[keep], radii[keep], tool="napari")
    assert (result.added, result.deleted, result.edited) == (0, 1, 0)

    labels, after, record = _assert_consistent(out, len(ids) - 1)
    z, y, x = np.rint(centers[gone]).astype(int)
    assert labels[z, y, x] == 0
    row = np.flatnonzero(np.all(np.isclose(centers_vox(after), centers[gone]), axis=1))
    assert len(row) == 1
    assert after.column("outcome")[row[0]].as_py() == "removed" and after.column("stage")[row[0]].as_py() == "deleted"
    points, _ = read_vesicle_model(out / "tomo.mod")
    assert not np.any(np.all(np.isclose(points, centers[gone], atol=1e-3), axis=1))
    assert json.loads(record["edits"])[-1]["deleted"] == 1 and json.loads(record["edits"])[-1]["tool"] == "napari"
    rescored = _read(out)[5]
    assert rescored["n_true_positive"] == metrics["n_true_positive"] - 1
    assert rescored["n_false_negative"] == metrics["n_false_negative"] + 1
    job, _ = segmented
    assert prepare(job, SETTINGS, out).done  # a rerun keeps the corrected outputs


def test_an_added_vesicle_appears_in_every_output_with_no_measurements(out):
    _, table, _, _, _, _ = _read(out)
    ids, centers, radii = _kept(table)
    labels = np.asarray(read_volume(out / "tomo.labels.mrc").data)
    free = np.argwhere(labels[10:30, 10:86, 10:60] == 0) + 10  # a background voxel inside the region
    new_center = free[len(free) // 2].astype(float) + 0.25
    new_radius = float(np.median(radii))
    result = apply_corrections(out, "tomo", np.append(ids, NEW_VESICLE), np.vstack([centers, new_center]),
                               np.append(radii, new_radius), tool="napari")
    assert (result.added, result.deleted, result.edited, result.n_vesicles) == (1, 0, 0, len(ids) + 1)

    labels, after, _ = _assert_consistent(out, len(ids) + 1)
    added = after.filter(after.column("stage").to_numpy(zero_copy_only=False) == "added").to_pylist()
    assert len(added) == 1 and added[0]["outcome"] == "kept"
    assert added[0]["radius_nm"] == pytest.approx(new_radius * VOXEL_A / 10)
    assert np.isnan([added[0][c] for c in corrections.MEASUREMENTS]).all()
    z, y, x = np.rint(new_center).astype(int)
    assert labels[z, y, x] == added[0]["vesicle_id"]


def test_a_moved_vesicle_moves_in_every_output_and_loses_its_measurements(out):
    _, table, _, _, _, _ = _read(out)
    ids, centers, radii = _kept(table)
    moved = centers.copy()
    moved[0] += (0.0, 2.0, -1.5)
    resized = radii.copy()
    resized[0] -= 1.0
    result = apply_corrections(out, "tomo", ids, moved, resized, tool="napari")
    assert (result.added, result.deleted, result.edited) == (0, 0, 1)

    _, after, _ = _assert_consistent(out, len(ids))
    _, after_centers, after_radii = _kept(after)
    np.testing.assert_allclose(after_centers, moved)
    np.testing.assert_allclose(after_radii, resized)
    stage = after.column("stage").to_numpy(zero_copy_only=False)[active_mask(after)]
    assert stage[0] == "edited" and "edited" not in stage[1:]
    row = after.filter(after.column("vesicle_id").to_numpy() == 1).to_pylist()[0]
    assert np.isnan([row[c] for c in corrections.MEASUREMENTS]).all()
    untouched = after.filter(after.column("vesicle_id").to_numpy() == 2).to_pylist()[0]
    assert not np.isnan([untouched[c] for c in corrections.MEASUREMENTS]).any()


def test_corrections_build_on_each_other(out):
    _, table, _, _, _, _ = _read(out)
    ids, centers, radii = _kept(table)
    apply_corrections(out, "tomo", ids[1:], centers[1:], radii[1:], tool="napari")
    ids, centers, radii = _kept(pq.read_table(out / "vesicles" / "tomo.parquet"))  # renumbered from 1
    apply_corrections(out, "tomo", ids[1:], centers[1:], radii[1:], tool="napari")
    _, after, record = _assert_consistent(out, len(ids) - 1)
    assert [edit["deleted"] for edit in json.loads(record["edits"])] == [1, 1]
    assert after.column("stage").to_pylist().count("deleted") == 2


def test_an_interrupted_save_is_not_trusted(out, segmented, monkeypatch):
    _, table, _, _, _, _ = _read(out)
    ids, centers, radii = _kept(table)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corrections, "write_vesicle_model", crash)
    with pytest.raises(OSError, match="disk full"):
        apply_corrections(out, "tomo", ids[1:], centers[1:], radii[1:], tool="napari")
    record = read_run_record(out, "tomo")
    assert record["status"] == "error" and "interrupted while saving corrections" in record["error"]
    job, _ = segmented
    assert not prepare(job, SETTINGS, out).done  # the next run redoes it
    with pytest.raises(CryovesError, match="no finished run"):
        apply_corrections(out, "tomo", ids, centers, radii, tool="napari")


def test_what_cannot_be_saved_is_refused_before_anything_is_written(out, tmp_path):
    _, table, _, _, _, _ = _read(out)
    ids, centers, radii = _kept(table)
    before = (out / "runs" / "tomo.parquet").read_bytes()
    with pytest.raises(CryovesError, match=r"has radius 0: give every vesicle a finite centre and a radius > 0"):
        apply_corrections(out, "tomo", ids, centers, np.where(ids == 1, 0.0, radii), tool="napari")
    removed = table.column("vesicle_id").to_numpy()[~active_mask(table)]
    with pytest.raises(ValueError, match="not kept or repaired vesicles"):
        apply_corrections(out, "tomo", np.append(ids, removed[:1] if len(removed) else [999]),
                          np.vstack([centers, centers[:1]]), np.append(radii, radii[0]), tool="napari")
    with pytest.raises(ValueError, match=r"listed more than once: \[1\]"):
        apply_corrections(out, "tomo", np.append(ids, 1), np.vstack([centers, centers[:1]]), np.append(radii, 1.0),
                          tool="napari")
    assert (out / "runs" / "tomo.parquet").read_bytes() == before
    with pytest.raises(CryovesError, match="no finished run"):
        apply_corrections(tmp_path, "tomo", ids, centers, radii, tool="napari")


def test_pyto_files_need_their_region_where_the_run_found_it(out, tmp_path):
    write_run_record(out, "tomo", read_run_record(out, "tomo") | {"region": str(tmp_path / "gone.mrc")})
    ids, centers, radii = _kept(pq.read_table(out / "vesicles" / "tomo.parquet"))
    with pytest.raises(CryovesError, match="gone.mrc: not found, and the Pyto files of tomo are drawn with it"):
        apply_corrections(out, "tomo", ids, centers, radii, tool="napari")
