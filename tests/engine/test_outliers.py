"""Outlier rules on a scene of spheres with two planted non-vesicles and one too-small segment."""

import numpy as np
import numpy.testing as npt
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from cryoves.engine.errors import CryovesError
from cryoves.engine.stages.outliers import OutlierParams, detect_outliers, mahalanobis
from cryoves.engine.stages.refine import refine_spheres

VOXEL_A = 20.0
SHAPE = (64, 96, 96)
N_SPHERES = 16  # rows 0..15; row 15's segment is far too small; 16: dark blob; 17: flat membrane


def _ball(shape, center, radius):
    z, y, x = np.indices(shape)
    return (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius ** 2


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    slots = np.array([[z, y, x] for z in (16, 48) for y in (16, 48, 80) for x in (16, 48, 80)], float)
    slots += rng.uniform(-1, 1, slots.shape)
    radii = rng.uniform(9, 12, N_SPHERES)
    thickness = 2.3  # voxels (4.6 nm)
    sigma = thickness / 2.3548
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    volume = rng.normal(0.0, 0.3, SHAPE)
    labels = np.zeros(SHAPE, np.uint32)
    for i, (c, r) in enumerate(zip(slots[:N_SPHERES], radii)):
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        volume += -np.exp(-0.5 * ((d - r + thickness / 2) / sigma) ** 2) \
            + 0.4 * np.exp(-0.5 * ((d - r - thickness / 2) / sigma) ** 2)
        seg_r, shift = (4.0, (1, 1, 1)) if i == N_SPHERES - 1 else (r - 1, (2, 0, -2))
        labels[_ball(SHAPE, c + shift, seg_r)] = i + 1
    blob = _ball(SHAPE, slots[16], 7)
    volume[blob] -= 1.0
    labels[_ball(SHAPE, slots[16], 8)] = 17
    c = slots[17]
    lateral = (np.abs(y - c[1]) < 12) & (np.abs(x - c[2]) < 12)
    volume -= np.exp(-0.5 * (z - c[0]) ** 2) * lateral
    labels[(np.abs(z - c[0]) <= 2) & (np.abs(y - c[1]) < 10) & (np.abs(x - c[2]) < 10)] = 18
    volume = volume.astype(np.float32)
    return volume, refine_spheres(volume, labels, VOXEL_A), radii


def test_code_rule_flags_planted_non_vesicles(scene):
    volume, table, radii = scene
    default = detect_outliers(volume, table, VOXEL_A, OutlierParams(rule="code")).to_pydict()
    assert default["outcome"][:15] == ["kept"] * 15 and default["outcome"][15:] == ["removed"] * 3
    # the classical covariance is inflated by the planted objects themselves (D^2 about 12);
    # the robust one is not, and flags them by distance alone
    out = detect_outliers(volume, table, VOXEL_A, OutlierParams(rule="code", robust=True))
    d = out.to_pydict()
    assert d["outcome"][:15] == ["kept"] * 15
    assert d["outcome"][15:] == ["removed"] * 3  # the small segment already failed in refinement
    d2 = np.array(d["mahalanobis_d2"])
    assert np.all(d2[:15] < 16) and np.all(d2[16:] > 16)  # D < 4 keeps
    assert np.isnan(d2[15])
    npt.assert_allclose(d["p_value"][:15], np.exp(-d2[:15] / 2))  # chi2 sf with 2 dof
    assert out.schema.metadata[b"outlier_params"].startswith(b"{'rule': 'code'")


def test_paper_rule_removes_planted_and_repairs_small_box(scene):
    volume, table, radii = scene
    d = detect_outliers(volume, table, VOXEL_A, OutlierParams(rule="paper")).to_pydict()
    assert d["outcome"][16:] == ["removed", "removed"]
    assert d["outcome"][15] == "repaired"
    assert abs(d["radius_vox"][15] - radii[15]) < 1.0
    assert d["p_value"][15] >= 0.3
    kept = [i for i, o in enumerate(d["outcome"]) if o == "kept"]
    assert all(d["p_value"][i] >= 0.3 for i in kept)
    # p < 0.3 with 2 dof flags many genuine vesicles (method.md §2.19); they stay in the table
    assert len(d["outcome"]) == 18


def test_too_few_vesicles_are_not_tested(scene):
    volume, table, _ = scene
    out = detect_outliers(volume, table.slice(0, 4), VOXEL_A).to_pydict()
    assert out["outcome"] == ["kept"] * 4
    assert np.all(np.isnan(out["mahalanobis_d2"]))


def test_mahalanobis_classical_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)) * [1.0, 5.0, 0.1]
    d2 = mahalanobis(x, robust=False)
    inv = np.linalg.inv(np.cov(x, rowvar=False))
    want = [scipy_mahalanobis(row, x.mean(axis=0), inv) ** 2 for row in x]
    npt.assert_allclose(d2, want, rtol=1e-8)


def test_mahalanobis_robust_singular_and_small():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    x[0] = [30.0, -30.0, 30.0]
    robust = mahalanobis(x)
    assert robust[0] > 100 * np.median(robust)
    assert robust[0] > mahalanobis(x, robust=False)[0]
    x[:, 2] = 7.0  # a constant feature: singular covariance, still finite for everyone
    assert np.all(np.isfinite(mahalanobis(x)))
    assert np.all(np.isnan(mahalanobis(x[:4])))
    x[5, 1] = np.nan
    d2 = mahalanobis(x)
    assert np.isnan(d2[5]) and np.isfinite(np.delete(d2, 5)).all()


def test_params_errors():
    with pytest.raises(CryovesError, match="outlier rule"):
        OutlierParams(rule="both")
    with pytest.raises(CryovesError, match="grow_step_vox must be an even"):
        OutlierParams(grow_step_vox=3)
