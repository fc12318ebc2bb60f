"""Overlap resolution (code vs tolerant), minimum radius and the final label volume."""

import numpy as np
import numpy.testing as npt
import pyarrow as pa
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.stages.overlaps import OverlapParams, render_labels, resolve_overlaps
from cryoves.engine.stages.refine import TABLE_SCHEMA

VOXEL_A = 10.0  # 1 nm voxels: radius_nm == radius_vox


def _table(centers, radii, outcome=None):
    n = len(radii)
    centers = np.asarray(centers, dtype=float)
    nan = np.full(n, np.nan)
    cols = {
        "id": pa.array(np.arange(1, n + 1, dtype=np.int32)),
        "center_z_vox": centers[:, 0], "center_y_vox": centers[:, 1], "center_x_vox": centers[:, 2],
        "radius_vox": np.asarray(radii, float), "radius_nm": np.asarray(radii, float),
        "membrane_thickness_nm": nan, "membrane_density": nan, "profile_correlation": nan,
        "mahalanobis_d2": nan, "p_value": nan,
        "outcome": pa.array(outcome or ["kept"] * n, type=pa.string()),
        "n_iterations": pa.array(np.ones(n, np.int32)), "box_radius_vox": pa.array(np.ones(n, np.int32)),
        "profile": pa.array([None] * n, type=pa.list_(pa.float64())),
    }
    return pa.table(cols, schema=TABLE_SCHEMA)


def test_code_rule_shrinks_touching_vesicles():
    # touching (distance 30 = 15 + 15): the reference shrinks both to floor(30 * 15 / 30) - 1 = 14
    table = _table([[20, 20, 20], [20, 20, 50]], [15.0, 15.0])
    out = resolve_overlaps(table, VOXEL_A, OverlapParams(rule="code", min_radius_nm=0))
    npt.assert_array_equal(out.column("radius_vox").to_numpy(), [14.0, 14.0])
    # unequal: d = ceil(25.5) = 26, r = floor(26 * 20 / 30) - 1 = 16, floor(26 * 10 / 30) - 1 = 7
    table = _table([[20, 20, 20], [20, 20, 45.5]], [20.0, 10.0])
    out = resolve_overlaps(table, VOXEL_A, OverlapParams(rule="code", min_radius_nm=0))
    npt.assert_array_equal(out.column("radius_vox").to_numpy(), [16.0, 7.0])


def test_tolerant_rule_keeps_touching_and_resolves_deep_overlap():
    params = OverlapParams(min_radius_nm=0)
    table = _table([[20, 20, 20], [20, 20, 49.5], [60, 60, 60]], [15.0, 15.0, 15.0])
    npt.assert_array_equal(resolve_overlaps(table, VOXEL_A, params).column("radius_vox").to_numpy(),
                           [15.0, 15.0, 15.0])
    table = _table([[20, 20, 20], [20, 20, 40], [20, 40, 20]], [15.0, 15.0, 15.0])
    radii = resolve_overlaps(table, VOXEL_A, params).column("radius_vox").to_numpy()
    npt.assert_allclose(radii, [10.5, 10.5, 10.5])  # (20 + 1) / 30 of 15 for every pair
    # chains: every pair overlaps by at most the tolerance afterwards
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 60, size=(40, 3))
    table = _table(centers, rng.uniform(5, 12, 40))
    radii = resolve_overlaps(table, VOXEL_A, params).column("radius_vox").to_numpy()
    dist = np.linalg.norm(centers[:, None] - centers[None], axis=2) + np.eye(40) * 1e9
    assert np.all(dist >= radii[:, None] + radii[None] - 1.0 - 1e-9)


def test_min_radius_and_inactive_rows():
    table = _table([[10, 10, 10], [40, 40, 40], [10, 40, 10], [40, 10, 40]], [12.0, 13.0, 20.0, 20.0],
                   ["kept", "repaired", "removed", "kept"])
    out = resolve_overlaps(table, VOXEL_A).to_pydict()
    assert out["outcome"] == ["removed", "repaired", "removed", "kept"]  # r <= 12 nm goes


def test_render_labels_consecutive_kept_and_repaired_only():
    table = _table([[10, 10, 10], [10, 10, 30], [10, 30, 10], [10, 30, 30]], [5.0, 5.0, 5.0, 5.0],
                   ["removed", "kept", "repaired", "kept"])
    labels = render_labels((21, 41, 41), table)
    assert labels.dtype == np.uint16
    npt.assert_array_equal(np.unique(labels), [0, 1, 2, 3])
    assert labels[10, 10, 30] == 1 and labels[10, 30, 10] == 2 and labels[10, 30, 30] == 3
    assert labels[10, 10, 10] == 0
    assert (labels == 1).sum() == 515


def test_render_labels_splits_touching_by_nearest_centre():
    table = _table([[10, 10, 10], [10, 10, 19]], [5.0, 5.0])
    labels = render_labels((21, 21, 30), table)
    assert np.all(labels[..., :15][labels[..., :15] > 0] == 1)
    assert np.all(labels[..., 15:][labels[..., 15:] > 0] == 2)


def test_overlap_params_errors():
    with pytest.raises(CryovesError, match="overlap rule"):
        OverlapParams(rule="shrink")
    with pytest.raises(CryovesError, match="voxel_size_a"):
        resolve_overlaps(_table([[1, 1, 1]], [1.0]), 0.0)
