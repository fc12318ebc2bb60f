"""Post-processing end to end on phantoms with exact ground truth, from a probability map made from it."""

import mrcfile
import numpy as np
import pytest

from cryoves.engine import pipeline
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.pipeline import STAGES, SegmentParams, oriented, postprocess
from cryoves.engine.scoring.matching import match_vesicles
from cryoves.engine.synthetic.phantom import make_phantom


def truth_spheres(phantom):
    return centers_vox(phantom.vesicles), radii_vox(phantom.vesicles, phantom.voxel_size_a)


def found_spheres(vesicles):
    kept = active_mask(vesicles)
    return centers_vox(vesicles)[kept], radii_vox(vesicles)[kept]


@pytest.fixture(scope="module")
def scene(probability_from_truth):
    phantom = make_phantom((64, 160, 160), 22.0, seed=7, preset="crowded")
    return phantom, probability_from_truth(phantom.labels, seed=7)


@pytest.fixture(scope="module")
def result(scene):
    """The default post-processing of the scene, kept stages included: shared by the tests that read it."""
    phantom, probability = scene
    return postprocess(phantom.tomogram, probability, 22.0, SegmentParams())


def test_accuracy_from_a_truth_derived_map(scene, result):
    phantom, _ = scene
    m = match_vesicles(*found_spheres(result.vesicles), *truth_spheres(phantom), 22.0)
    assert phantom.vesicles.num_rows > 40
    assert m.f1 >= 0.95, m.as_row()
    assert m.center_residual_nm <= 1.5 and m.diameter_error <= 0.05, m.as_row()
    assert 0.8 <= result.threshold < 1.0
    assert list(result.seconds) == list(STAGES[1:])
    assert {"global", "local", "sphere"} == set(result.labels)
    for volume in (*result.labels.values(), result.final_labels()):
        assert volume.shape == phantom.tomogram.shape
    # merged touching vesicles are split: more local segments than global ones
    assert result.labels["local"].max() > result.labels["global"].max()


def test_without_kept_stages_only_the_final_labels_come_back_and_nothing_else_changes(scene, result):
    phantom, probability = scene
    lean = postprocess(phantom.tomogram, probability, 22.0, SegmentParams(), keep_stages=False)
    assert not lean.labels
    np.testing.assert_array_equal(lean.final_labels(), result.final_labels())
    np.testing.assert_equal(lean.vesicles.to_pydict(), result.vesicles.to_pydict())  # NaN == NaN


def test_a_mapped_tomogram_refined_in_bands_gives_the_same_result(scene, result, tmp_path, monkeypatch):
    """A tomogram mapped from its file is refined in bands of vesicles, its pages released after each
    (`pipeline.refine_in_bands`), and sampled for the polarity check from its file (`read_box`): the same vesicles,
    labels and warnings as in memory."""
    phantom, probability = scene
    mapped = read_volume(write_volume(tmp_path / "scene.mrc", phantom.tomogram, 22.0)).data
    bands = []
    real = pipeline.refine_batch
    monkeypatch.setattr(pipeline, "refine_batch", lambda *args: bands.append(len(args[1])) or real(*args))
    monkeypatch.setattr(pipeline, "_BAND_BYTES", mapped.nbytes // 5)
    lean = postprocess(mapped, probability, 22.0, SegmentParams(), keep_stages=False)
    assert len(bands) == 5 and sum(bands) == result.labels["local"].max()
    np.testing.assert_array_equal(lean.final_labels(), result.final_labels())
    np.testing.assert_equal(lean.vesicles.to_pydict(), result.vesicles.to_pydict())  # NaN == NaN
    assert lean.warnings == result.warnings
    polarity = pipeline.membrane_polarity(phantom.tomogram, result.vesicles)
    assert polarity > 0 and pipeline.membrane_polarity(mapped, result.vesicles) == pytest.approx(polarity, rel=1e-9)


def test_final_labels_are_the_kept_spheres_in_table_order(result):
    assert result.final_labels().max() == np.count_nonzero(active_mask(result.vesicles))
    stages = set(result.vesicles.column("stage").to_pylist())
    assert stages <= {"refine", "outliers", "overlap", "final"}


def test_nothing_above_threshold_gives_an_empty_result():
    phantom = make_phantom((32, 64, 64), 22.0, seed=1)
    result = postprocess(phantom.tomogram, np.zeros(phantom.tomogram.shape, np.float32), 22.0, SegmentParams())
    assert result.vesicles.num_rows == 0
    assert not result.final_labels().any()


def test_region_restricts_detection(scene):
    phantom, probability = scene
    region = np.zeros(probability.shape, bool)
    region[:, :, :80] = True
    result = postprocess(phantom.tomogram, probability, 22.0, SegmentParams(), region=region)
    centers, _ = found_spheres(result.vesicles)
    assert len(centers) and centers[:, 2].max() < 80


def test_single_vesicle(probability_from_truth):
    phantom = make_phantom((64, 160, 160), 22.0, seed=7, preset="crowded")
    labels = np.where(phantom.labels == 5, 5, 0)
    result = postprocess(phantom.tomogram, probability_from_truth(labels, 0), 22.0, SegmentParams())
    centers, radii = found_spheres(result.vesicles)
    truth_c, truth_r = truth_spheres(phantom)
    assert len(centers) == 1
    np.testing.assert_allclose(centers[0], truth_c[4], atol=1.0)
    assert abs(radii[0] - truth_r[4]) <= 1.0


def test_inverted_contrast_is_flagged_and_undone(scene, result):
    phantom, probability = scene
    inverted = -phantom.tomogram
    flagged = postprocess(inverted, probability, 22.0, SegmentParams())
    assert flagged.warnings and "--invert-contrast" in flagged.warnings[0]
    # --invert-contrast gives back the tomogram itself, so the result without warnings of `result`
    np.testing.assert_array_equal(oriented(inverted, SegmentParams(invert_contrast=True)), phantom.tomogram)
    assert result.warnings == ()


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_a_mapped_tomogram_is_oriented_by_parts(tmp_path, dtype, resident_mb, monkeypatch):
    """A mapped 16-bit or negated tomogram is copied to float32 by parts of sections, the file's pages released
    after each: the same numbers, and only the copy (16 MB) stays resident, not the file beside it too."""
    monkeypatch.setattr(pipeline, "_ORIENT_PART_VOXELS", 1 << 18)
    data = (np.random.default_rng(2).standard_normal((64, 256, 256)) * 100).astype(dtype)
    path = tmp_path / "tomo.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 10.0
    mapped = read_volume(path).data
    assert mapped.dtype == dtype
    for invert in (True, False):
        before = resident_mb()
        out = oriented(mapped, SegmentParams(invert_contrast=invert))
        assert resident_mb() - before < out.nbytes / 1e6 + 4 or out is mapped
        np.testing.assert_array_equal(out, -data.astype(np.float32) if invert else data.astype(np.float32))
        del out


def test_a_network_grid_map_finds_the_vesicles_that_its_input_grid_resampling_finds(probability_from_truth):
    """At 11 Å the network grid (22 Å) is half as fine: the segments are searched on it, the spheres fitted on the
    tomogram; the same vesicles as searching the map resampled to the tomogram's grid, stage labels on the input
    grid, and a region given on the input grid still restricts the search."""
    from cryoves.engine.network.inference import probability_on_input_grid
    from cryoves.engine.network.rescale import nearest_to_shape

    phantom = make_phantom((64, 160, 160), 11.0, seed=3, preset="crowded")
    net_grid = (32, 80, 80)
    probability = probability_from_truth(nearest_to_shape(phantom.labels, net_grid), seed=3)
    coarse = postprocess(phantom.tomogram, probability, 11.0, SegmentParams())
    fine = postprocess(phantom.tomogram, probability_on_input_grid(probability, phantom.tomogram.shape), 11.0,
                       SegmentParams())
    truth = truth_spheres(phantom)
    for result in (coarse, fine):
        m = match_vesicles(*found_spheres(result.vesicles), *truth, 11.0)
        assert m.f1 >= 0.95 and m.center_residual_nm <= 1.5, m.as_row()
    same = match_vesicles(*found_spheres(coarse.vesicles), *found_spheres(fine.vesicles), 11.0)
    assert same.f1 == 1.0 and same.center_residual_nm <= 0.5, same.as_row()
    assert coarse.probability.shape == net_grid
    assert {name: labels.shape for name, labels in coarse.labels.items()} == dict.fromkeys(
        ("global", "local", "sphere"), phantom.tomogram.shape)
    assert coarse.final_labels().shape == phantom.tomogram.shape
    region = np.zeros(phantom.tomogram.shape, bool)
    region[:, :, :80] = True
    inside = postprocess(phantom.tomogram, probability, 11.0, SegmentParams(), region=region, keep_stages=False)
    centers, _ = found_spheres(inside.vesicles)
    assert len(centers) and centers[:, 2].max() < 80
