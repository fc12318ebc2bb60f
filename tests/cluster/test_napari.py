"""The napari plugin: the reader's layers (always), and, with napari installed, the plugin as napari finds it,
vesicles corrected in a Points layer and saved into every output, and the segment widget (headless: Qt
offscreen, napari's viewer model, which needs no OpenGL)."""

import os
import shutil
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.napari.reader import (
    LAYER_KEY,
    OUTCOME_COLORS,
    get_reader,
    read_outputs,
    read_tomogram,
    vesicle_points,
)
from cryoves.engine.io.corrections import apply_corrections
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.outputs import read_run_record, write_run_record
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.job import STEPS, OutputOptions, ProbabilityMap, Settings, finish, make_jobs, prepare
from cryoves.engine.pipeline import SegmentParams
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom

pytestmark = pytest.mark.filterwarnings(
    "ignore::pydantic.warnings.PydanticDeprecatedSince20")  # napari and npe2 use pydantic 1 idioms; not ours to fix
SHAPE = (40, 96, 96)
VOXEL_A = 22.0
ORIGIN_A = (220.0, 0.0, -110.0)  # z, y, x
SETTINGS = Settings(params=SegmentParams(), weights_sha256="sha", outputs=OutputOptions(probability=True))


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, probability_from_truth):
    """A phantom tomogram (origin set) and its outputs, from a map made from its ground truth (no network)."""
    folder = tmp_path_factory.mktemp("napari")
    write_phantom(folder, make_phantom(SHAPE, VOXEL_A, seed=4), name="tomo")
    write_volume(folder / "tomo.mrc", np.asarray(read_volume(folder / "tomo.mrc").data), VOXEL_A, ORIGIN_A)
    (job,) = make_jobs([folder / "tomo.mrc"])
    probability = probability_from_truth(np.asarray(read_volume(folder / "tomo.labels.mrc").data), 4)
    finish(prepare(job, SETTINGS, folder / "out"), ProbabilityMap(probability, 0.0), SETTINGS, folder / "out")
    return folder


@pytest.fixture
def out(segmented, tmp_path):
    """A copy of the outputs (the run record still names the tomogram beside the fixture's folder)."""
    return shutil.copytree(segmented / "out", tmp_path / "out")


def test_the_reader_opens_an_output_folder_as_layers_placed_in_nm(out, segmented):
    assert get_reader(out) is read_outputs
    layers = read_outputs(out)
    assert [(kwargs["name"], kind) for _, kwargs, kind in layers] == [
        ("tomo tomogram", "image"), ("tomo probability", "image"), ("tomo labels", "labels"),
        ("tomo vesicles", "points")]
    for _, kwargs, _ in layers:
        assert kwargs["scale"] == (2.2, 2.2, 2.2) and kwargs["translate"] == (22.0, 0.0, -11.0)
        assert kwargs["metadata"][LAYER_KEY]["out_dir"] == str(out.resolve())
    (tomogram, _, _), (probability, _, _), (labels, _, _), (points, kwargs, _) = layers
    np.testing.assert_array_equal(tomogram, read_volume(segmented / "tomo.mrc").data)
    np.testing.assert_array_equal(probability, read_volume(out / "tomo.prob.mrc").data)
    np.testing.assert_array_equal(labels, read_volume(out / "tomo.labels.mrc").data)
    table = pq.read_table(out / "vesicles" / "tomo.parquet")
    np.testing.assert_array_equal(points, centers_vox(table))
    np.testing.assert_allclose(kwargs["size"], 2 * radii_vox(table, VOXEL_A))
    np.testing.assert_array_equal(kwargs["features"]["vesicle_id"], table.column("vesicle_id").to_numpy())
    assert layers[0][1]["metadata"][LAYER_KEY]["path"] == str(segmented / "tomo.mrc")


def test_the_reader_opens_one_vesicle_table_and_mrc_files_and_leaves_the_rest(out, segmented, tmp_path):
    assert get_reader(out / "vesicles" / "tomo.parquet") is read_outputs
    assert [kwargs["name"] for _, kwargs, _ in read_outputs(out / "vesicles" / "tomo.parquet")][-1] == "tomo vesicles"
    (tmp_path / "empty").mkdir()
    for other in (tmp_path / "empty", out / "runs" / "tomo.parquet", out / "tomo.mod"):
        assert get_reader(other) is None
    assert get_reader([str(out)]) is None
    assert get_reader(segmented / "tomo.mrc") is read_tomogram
    ((data, kwargs, kind),) = read_tomogram(segmented / "tomo.mrc")
    assert kind == "image" and data.shape == SHAPE and kwargs["scale"] == (2.2, 2.2, 2.2)
    assert kwargs["translate"] == (22.0, 0.0, -11.0) and kwargs["metadata"][LAYER_KEY]["path"] == str(
        segmented / "tomo.mrc")


def test_the_reader_leaves_out_a_tomogram_that_is_no_longer_where_the_run_found_it(out, tmp_path):
    record = read_run_record(out, "tomo")
    write_run_record(out, "tomo", record | {"input": str(tmp_path / "moved.mrc")})
    assert [kind for _, _, kind in read_outputs(out)] == ["image", "labels", "points"]
    write_run_record(out, "tomo", record | {"status": "error"})
    assert get_reader(out) is None  # no finished run in it


def test_vesicle_points_show_every_finite_sphere_and_its_outcome():
    table = pa.table({"vesicle_id": pa.array([1, 2, 3, 4], pa.int32()),
                      "center_z_vox": [1.0, 2.0, 3.0, 4.0], "center_y_vox": [5.0, 6.0, 7.0, 8.0],
                      "center_x_vox": [9.0, 10.0, 11.0, np.nan], "radius_nm": [11.0, 22.0, 33.0, 11.0],
                      **{name: [0.5] * 4 for name in ("membrane_thickness_nm", "membrane_density",
                                                       "profile_correlation", "mahalanobis_d2", "p_value")},
                      "outcome": ["kept", "repaired", "removed", "removed"],
                      "stage": ["final", "final", "overlap", "refine"]})
    points, kwargs = vesicle_points(table, 22.0)
    np.testing.assert_array_equal(points, [[1, 5, 9], [2, 6, 10], [3, 7, 11]])
    np.testing.assert_allclose(kwargs["size"], [10.0, 20.0, 30.0])  # diameter in voxels of 2.2 nm
    assert list(kwargs["features"]["outcome"]) == ["kept", "repaired", "removed"]


# ------------------------------------------------------------------------------------------ with napari

@pytest.fixture
def viewer():
    """napari's viewer model with the installed plugins discovered (the Qt canvas needs OpenGL; the model does not)."""
    pytest.importorskip("napari", reason="napari is not installed (pip install 'cryoves[napari]')")
    import npe2
    from napari.components import ViewerModel

    npe2.PluginManager.instance().discover()
    return ViewerModel()


def _rgba(color: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(color)[0]


def _vesicles(viewer):
    (layer,) = [layer for layer in viewer.layers if layer.name == "tomo vesicles"]
    return layer


def test_napari_finds_the_plugin_and_opens_a_folder_with_it(viewer, out):
    from napari.layers import Image, Labels, Points

    table = pq.read_table(out / "vesicles" / "tomo.parquet")
    keep = active_mask(table) & (table.column("vesicle_id").to_numpy() != 2)
    apply_corrections(out, "tomo", table.column("vesicle_id").to_numpy()[keep], centers_vox(table)[keep],
                      radii_vox(table, VOXEL_A)[keep], tool="test")  # a removed vesicle, to be coloured as such
    viewer.open(out, plugin="cryoves")
    assert [(layer.name, type(layer)) for layer in viewer.layers] == [
        ("tomo tomogram", Image), ("tomo probability", Image), ("tomo labels", Labels), ("tomo vesicles", Points)]
    points = _vesicles(viewer)
    table = pq.read_table(out / "vesicles" / "tomo.parquet")
    np.testing.assert_allclose(points.data_to_world(points.data[0]), table.select(
        ["center_z_nm", "center_y_nm", "center_x_nm"]).to_pandas().to_numpy()[0])
    assert set(points.features["outcome"]) == {"kept", "removed"}
    for outcome, color in zip(points.features["outcome"], points.border_color):
        np.testing.assert_allclose(color, _rgba(OUTCOME_COLORS[outcome]))


def test_vesicles_deleted_added_and_moved_in_napari_are_saved_into_every_output(viewer, out):
    from cryoves.cluster.napari.widgets import CorrectionWidget

    viewer.open(out, plugin="cryoves")
    widget = CorrectionWidget(viewer)
    points = _vesicles(viewer)
    assert widget.vesicles.value is points
    table = pq.read_table(out / "vesicles" / "tomo.parquet")
    ids, radii = table.column("vesicle_id").to_numpy(), radii_vox(table, VOXEL_A)
    assert points.current_size == pytest.approx(np.median(2 * radii[active_mask(table)]))
    assert viewer.dims.margin_left == (pytest.approx(radii.max() * 2.2),) * 3  # every sphere's cross-section shows
    n = int(active_mask(table).sum())

    gone = np.flatnonzero(ids == 3)[0]
    gone_center = points.data[gone].copy()
    points.selected_data = {gone}
    points.remove_selected()
    points.selected_data = {0}  # napari gives a new point the features of the one selected last
    points.add(np.array([[20.0, 48.0, 30.0]]))
    assert points.features["outcome"].iloc[-1] == "added" and points.features["vesicle_id"].iloc[-1] == 0
    np.testing.assert_allclose(points.border_color[-1], _rgba(OUTCOME_COLORS["added"]))
    moved_row = np.flatnonzero(points.features["vesicle_id"].to_numpy() == 1)[0]
    data = points.data.copy()
    data[moved_row] += (0.0, 3.0, -2.0)
    points.data = data
    widget.save()
    assert widget.status.value.startswith("saved tomo: 1 added, 1 deleted, 1 moved or resized")

    after = pq.read_table(out / "vesicles" / "tomo.parquet")
    labels = np.asarray(read_volume(out / "tomo.labels.mrc").data)
    stage = after.column("stage").to_numpy(zero_copy_only=False)
    assert sorted(stage[stage != "final"]) == ["added", "deleted", "edited"]
    assert labels.max() == n == read_run_record(out, "tomo")["n_vesicles"]
    z, y, x = np.rint(gone_center).astype(int)
    assert labels[z, y, x] == 0
    added = after.filter(stage == "added").to_pylist()[0]
    assert labels[20, 48, 30] == added["vesicle_id"] and added["outcome"] == "kept"
    edited = after.filter(stage == "edited")
    np.testing.assert_allclose(centers_vox(edited)[0], data[moved_row])
    # the layers show what was saved: points renumbered with their outcomes, labels drawn anew
    np.testing.assert_array_equal(np.asarray(viewer.layers["tomo labels"].data), labels)
    np.testing.assert_array_equal(points.features["vesicle_id"], after.column("vesicle_id").to_numpy())
    assert "added" not in set(points.features["outcome"])


def test_a_pasted_copy_of_a_vesicle_is_a_new_vesicle(viewer, out):
    from cryoves.cluster.napari.widgets import correction_ids

    viewer.open(out, plugin="cryoves")
    points = _vesicles(viewer)
    features = points.features.copy()
    features.loc[len(features) - 1, "vesicle_id"] = features["vesicle_id"].iloc[0]  # as napari pastes a copy
    features.loc[1, "outcome"] = "removed"
    points.features = features
    rows, ids = correction_ids(points)
    assert 1 not in rows and list(ids[:2]) == [features["vesicle_id"].iloc[0], features["vesicle_id"].iloc[2]]
    assert ids[-1] == 0


def test_the_segment_widget_maps_its_fields_to_a_request(viewer, segmented, tmp_path):
    from cryoves.cluster.napari.widgets import OTHER_MODEL, SegmentWidget

    viewer.open(segmented / "tomo.mrc", plugin="cryoves")
    widget = SegmentWidget(viewer)
    request = widget.request()
    assert (request.path, request.out_dir) == (segmented / "tomo.mrc", segmented / "cryoves")
    assert (request.weights, request.tta, request.prefilter_sigma_vox, request.invert_contrast) == ("bundled", 1, None,
                                                                                                    False)
    (tmp_path / "mymodel").mkdir()
    widget.model.value, widget.weights.value = OTHER_MODEL, tmp_path / "mymodel" / "weights.npz"
    widget.model_prefilter.value, widget.prefilter_sigma.value = False, 0.5
    widget.tta.value, widget.invert_contrast.value = 4, True
    request = widget.request()
    assert (request.weights, request.tta, request.prefilter_sigma_vox, request.invert_contrast) == (
        str(tmp_path / "mymodel"), 4, 0.5, True)


@pytest.mark.slow
def test_the_segment_widget_segments_off_the_gui_thread_and_adds_the_result_layers(viewer, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QApplication

    from cryoves.cluster.napari import widgets

    write_phantom(tmp_path, make_phantom((32, 64, 64), VOXEL_A, seed=1), name="small")
    viewer.open(tmp_path / "small.mrc", plugin="cryoves")
    widget = widgets.SegmentWidget(viewer)
    threads, texts = [], []
    real_segment_job = widgets.segment_job

    def segment_job(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_segment_job(*args, **kwargs)

    monkeypatch.setattr(widgets, "segment_job", segment_job)
    widget._relay.text.connect(texts.append)
    finished = []
    for run in range(2):  # the second run finds the outputs current and loads them again
        widget.run()
        widget.worker.finished.connect(lambda: finished.append(True))
        deadline = time.monotonic() + 600
        while len(finished) == run and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        QApplication.processEvents()
        assert len(finished) == run + 1, "the segment worker did not finish"
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    assert texts == [*STEPS, "prepare"]
    assert [layer.name for layer in viewer.layers] == ["small", "small probability", "small labels",
                                                       "small vesicles"]
    assert widget.status.value.startswith("small: outputs already current")
    assert widget.progress.value == widget.progress.max
    out = tmp_path / "cryoves"
    assert read_run_record(out, "small")["status"] == "ok"
    np.testing.assert_array_equal(np.asarray(viewer.layers["small labels"].data),
                                  read_volume(out / "small.labels.mrc").data)
    assert viewer.layers["small vesicles"].scale.tolist() == viewer.layers["small"].scale.tolist()
