"""refine_spheres on synthetic vesicles with known float centres and outer radii."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.stages.refine import (
    RefineParams,
    average_ranks,
    correlation_radius,
    estimate_radius,
    profile_correlation,
    refine_spheres,
    segment_spheres,
)

VOXEL_A = 12.0


def vesicle_volume(shape, centers, radii, thickness_vox, *, halo=0.4, noise=0.3, seed=0):
    """Background 0; dark Gaussian membrane (FWHM = thickness) whose outer edge is at `radius`,
    bright Fresnel halo just outside; Gaussian noise. float32."""
    z, y, x = np.indices(shape, dtype=np.float64)
    volume = np.zeros(shape)
    sigma = thickness_vox / 2.3548
    for c, r in zip(centers, radii):
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        volume -= np.exp(-0.5 * ((d - (r - thickness_vox / 2)) / sigma) ** 2)
        volume += halo * np.exp(-0.5 * ((d - (r + thickness_vox / 2)) / sigma) ** 2)
    volume += np.random.default_rng(seed).normal(0.0, noise, shape)
    return volume.astype(np.float32)


def ball_labels(shape, centers, radii, shift=(0, 0, 0), dr=0.0):
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, np.uint32)
    for i, (c, r) in enumerate(zip(centers, radii)):
        c = np.asarray(c) + shift
        labels[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= (r + dr) ** 2] = i + 1
    return labels


SHAPE = (48, 96, 96)
CENTERS = np.array([[24.3, 24.6, 23.8], [23.7, 24.2, 71.4], [24.1, 70.9, 24.5], [4.5, 71.2, 70.6]])
RADII = np.array([14.3, 16.8, 12.6, 15.2])  # vesicle 4 is cut by the z = 0 face
THICKNESS_VOX = 3.75  # 4.5 nm


@pytest.fixture(scope="module")
def scene():
    return vesicle_volume(SHAPE, CENTERS, RADII, THICKNESS_VOX)


def _centers(table):
    d = table.to_pydict()
    return np.column_stack([d["center_z_vox"], d["center_y_vox"], d["center_x_vox"]])


@pytest.mark.parametrize("shift, dr", [((2, 0, 0), -2.0), ((0, 2, -2), 3.0)])
def test_refine_recovers_centre_and_outer_radius(scene, shift, dr):
    labels = ball_labels(SHAPE, CENTERS, RADII, shift, dr)
    table = refine_spheres(scene, labels, VOXEL_A, RefineParams())
    d = table.to_pydict()
    assert d["outcome"] == ["kept"] * 4
    assert d["id"] == [1, 2, 3, 4]
    residual = np.linalg.norm(_centers(table) - CENTERS, axis=1)
    assert residual.max() < 1.0
    assert residual.max() * VOXEL_A / 10 <= 1.5  # nm
    radius = np.array(d["radius_vox"])
    npt.assert_allclose(radius, RADII, atol=1.0)
    diameter_p, diameter_gt = 2 * np.round(radius) + 1, 2 * np.round(RADII) + 1
    assert np.mean(1 - np.minimum(diameter_p, diameter_gt) / np.maximum(diameter_p, diameter_gt)) <= 0.05
    npt.assert_allclose(d["radius_nm"], radius * VOXEL_A / 10)
    npt.assert_allclose(d["membrane_thickness_nm"], THICKNESS_VOX * VOXEL_A / 10, atol=1.0)
    assert np.all(np.array(d["membrane_density"]) < -0.3)  # membranes are dark
    assert np.all(np.array(d["profile_correlation"]) > 0.8)
    assert all(1 <= n <= 10 for n in d["n_iterations"])
    assert all(len(p) == 100 for p in d["profile"])
    assert np.all(np.isnan(d["mahalanobis_d2"]))


def test_code_rule_and_paper_era_settings_run(scene):
    labels = ball_labels(SHAPE, CENTERS, RADII, (2, 0, 0))
    params = RefineParams(radius_rule="code", include_halo_index=True, box_margin_vox=5,
                          profile_window_hi=0.75, subvoxel=False)
    table = refine_spheres(scene, labels, VOXEL_A, params)
    d = table.to_pydict()
    assert d["outcome"] == ["kept"] * 4
    # integer shifts only: about a voxel (the face-cut vesicle a little more)
    npt.assert_array_less(np.linalg.norm(_centers(table) - CENTERS, axis=1), [1.0, 1.0, 1.0, 1.5])
    assert np.all(np.abs(np.array(d["radius_vox"]) - RADII) < 3.0)


def test_units_follow_the_voxel_size(scene):
    labels = ball_labels(SHAPE, CENTERS[:1], RADII[:1], (1, 1, 1))
    a = refine_spheres(scene, labels, 12.0).to_pydict()
    b = refine_spheres(scene, labels, 24.0).to_pydict()
    npt.assert_allclose(a["radius_vox"], b["radius_vox"])
    npt.assert_allclose(np.array(b["radius_nm"]), 2 * np.array(a["radius_nm"]))
    # raw int16 tomograms are used as they are (no normalisation, no float copy by the caller)
    c = refine_spheres(np.round(scene * 1000).astype(np.int16), labels, 12.0).to_pydict()
    npt.assert_allclose(c["radius_vox"], a["radius_vox"], atol=0.05)
    npt.assert_allclose(c["membrane_density"], 1000 * np.array(a["membrane_density"]), rtol=0.01)


def test_flat_region_is_removed_not_an_error():
    volume = np.zeros((20, 20, 20), np.float32)
    labels = np.zeros((20, 20, 20), np.uint32)
    labels[8:12, 8:12, 8:12] = 5
    d = refine_spheres(volume, labels, 10.0).to_pydict()
    assert d["outcome"] == ["removed"] and d["id"] == [5]
    assert np.isnan(d["radius_vox"][0]) and d["profile"] == [None]


def test_estimate_radius_on_known_profile():
    k = np.arange(30) + 0.5
    profile = -np.exp(-0.5 * ((k - 12.0) / 1.5) ** 2) + 0.5 * np.exp(-0.5 * ((k - 16.0) / 1.5) ** 2)
    est = estimate_radius(profile[None], np.array([30]), RefineParams())
    assert est.ok[0]
    npt.assert_allclose(est.membrane_center_vox, [12.0], atol=0.1)
    # 40 % of the way from the minimum (-1) to the halo maximum (~0.5): the outer membrane edge
    assert 12.5 < est.radius_vox[0] < 15.0
    npt.assert_allclose(est.thickness_vox, 2 * (est.radius_vox - est.membrane_center_vox))


def test_segment_spheres_initialisation():
    labels = np.zeros((10, 12, 14), np.uint32)
    labels[2:5, 3:9, 4:6] = 3
    ids, centers, r0 = segment_spheres(labels)
    npt.assert_array_equal(ids, [3])
    npt.assert_allclose(centers, [[3.0, 5.5, 4.5]])
    npt.assert_array_equal(r0, [3.0])


def test_segments_on_a_coarser_grid_give_the_same_spheres(scene):
    """Segments found on a grid half as fine (the network grid of a 11 Å tomogram) seed the same spheres: centres
    and radii mapped to the tomogram's voxels, pixel centres aligned."""
    fine = refine_spheres(scene, ball_labels(SHAPE, CENTERS, RADII), VOXEL_A, RefineParams())
    half = tuple(n // 2 for n in SHAPE)
    coarse = ball_labels(half, (CENTERS + 0.5) / 2 - 0.5, RADII / 2)
    table = refine_spheres(scene, coarse, VOXEL_A, RefineParams())
    assert table.column("outcome").to_pylist() == ["kept"] * 4
    assert np.linalg.norm(_centers(table) - CENTERS, axis=1).max() < 1.0
    npt.assert_allclose(_centers(table), _centers(fine), atol=0.5)
    npt.assert_allclose(table.column("radius_vox").to_numpy(), fine.column("radius_vox").to_numpy(), atol=0.5)
    ids, centers, r0 = segment_spheres(coarse, (2.0, 2.0, 2.0))
    npt.assert_allclose(centers[:3], CENTERS[:3], atol=0.75)  # the balls' centroids in the tomogram's voxels (the
    #                                                            fourth is cut by a face)


def test_errors_and_progress(scene):
    with pytest.raises(CryovesError, match="box_margin_vox must be"):
        RefineParams(box_margin_vox=0)
    with pytest.raises(CryovesError, match="radius_rule"):
        RefineParams(radius_rule="inner")
    with pytest.raises(CryovesError, match="on the tomogram's grid or a coarser one"):
        refine_spheres(scene, np.zeros((96, 2, 2), np.uint32), VOXEL_A)
    with pytest.raises(CryovesError, match="must be 3-D"):
        refine_spheres(scene, np.zeros((2, 2), np.uint32), VOXEL_A)
    calls = []
    labels = ball_labels(SHAPE, CENTERS[:1], RADII[:1])
    refine_spheres(scene, labels, VOXEL_A, progress=lambda i, n: calls.append((i, n)))
    assert calls and calls[0] == (1, 10)
    empty = refine_spheres(scene, np.zeros(SHAPE, np.uint32), VOXEL_A)
    assert empty.num_rows == 0


@pytest.mark.parametrize("chunk", [1, 3])
def test_refining_chunks_of_vesicles_and_joining_them_is_the_same_table(scene, chunk):
    """`cryoves run` refines a tomogram's vesicles in chunks (`Refiner`): the table must not change."""
    from cryoves.engine.stages.refine import concat_refine_results, refine_batch, z_ordered_parts

    labels = ball_labels(SHAPE, CENTERS, RADII)

    def chunked(tomogram, centers, radii, params):
        return concat_refine_results([refine_batch(tomogram, centers[i:i + chunk], radii[i:i + chunk], params)
                                      for i in range(0, len(centers), chunk)])

    def in_z_order(tomogram, centers, radii, params):  # chunks of the vesicles in z order, rows put back
        order, parts = z_ordered_parts(centers, -(-len(centers) // chunk))
        assert not np.array_equal(order, np.arange(len(order))) and max(map(len, parts)) <= chunk
        assert np.array_equal(np.concatenate(parts), order) and np.all(np.diff(centers[order, 0]) >= 0)
        return concat_refine_results([refine_batch(tomogram, centers[rows], radii[rows], params)
                                      for rows in parts], order)

    whole = refine_spheres(scene, labels, VOXEL_A).to_pydict()
    npt.assert_equal(refine_spheres(scene, labels, VOXEL_A, refiner=chunked).to_pydict(), whole)  # NaN == NaN
    npt.assert_equal(refine_spheres(scene, labels, VOXEL_A, refiner=in_z_order).to_pydict(), whole)
    npt.assert_equal(refine_spheres(scene, labels, VOXEL_A, refiner=refine_batch).to_pydict(), whole)


@pytest.mark.parametrize("kept_bytes", [0, 300_000])
def test_boxes_read_again_past_the_kept_bytes_give_the_same_table(scene, kept_bytes, monkeypatch):
    """Refinement keeps each vesicle's box between its profile and its correlation up to `_KEPT_BOX_BYTES`, and
    reads the others again: none kept, some (about two boxes of 31-35 voxels) or all give the same table."""
    from cryoves.engine.stages import refine

    labels = ball_labels(SHAPE, CENTERS, RADII)
    whole = refine_spheres(scene, labels, VOXEL_A).to_pydict()
    monkeypatch.setattr(refine, "_KEPT_BOX_BYTES", kept_bytes)
    npt.assert_equal(refine_spheres(scene, labels, VOXEL_A).to_pydict(), whole)  # NaN == NaN


def test_ranks_and_correlation_match_scipy_stats():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(300, 100)).round(1)  # many ties; more rows than one ranked part
    npt.assert_array_equal(average_ranks(rows), rankdata(rows, axis=1))
    npt.assert_array_equal(average_ranks([2.0, 1.0, 2.0, 2.0]), [3.0, 1.0, 3.0, 3.0])
    mean = rows.mean(axis=0)
    expected = [spearmanr(row, mean).statistic for row in rows]
    rows[7, 3] = np.nan
    correlation = profile_correlation(rows, mean)
    expected[7] = np.nan
    npt.assert_allclose(correlation, expected, rtol=1e-12)
    assert np.isnan(profile_correlation(rows[:2], np.full(100, np.nan))).all()


def test_correlation_boxes_have_the_next_edge_pocketfft_transforms_fast():
    def largest_prime_factor(n):
        factor, largest = 2, 1
        while n > 1:
            while n % factor == 0:
                n, largest = n // factor, factor
            factor += 1
        return largest

    edges = {2 * r + 1: 2 * correlation_radius(r) + 1 for r in range(1, 40)}
    assert [edges[e] for e in (3, 25, 29, 31, 33, 37, 41, 43, 47, 53, 59, 61)] == \
        [3, 25, 33, 33, 33, 39, 45, 45, 49, 55, 63, 63]
    for edge, fast in edges.items():
        assert largest_prime_factor(fast) <= 13
        assert all(largest_prime_factor(e) > 13 for e in range(edge, fast, 2))
