import numpy as np
import pytest

from cryoves.engine.scoring.matching import dice, match_vesicles, spheres_from_labels

GT_CENTERS = np.array([[10.0, 10.0, 10.0], [10.0, 30.0, 10.0], [30.0, 30.0, 30.0]])
GT_RADII = np.array([5.0, 6.0, 8.0])


def test_shifted_spheres_give_exact_residual_and_diameter_error():
    shift = np.array([0.0, 3.0, 4.0])  # 5 voxels
    m = match_vesicles(GT_CENTERS + shift * [[0.2], [0.4], [0.6]], GT_RADII * [[0.9, 1.0, 1.25]], GT_CENTERS,
                       GT_RADII, voxel_size_a=20.0)
    assert (m.n_true_positive, m.n_false_positive, m.n_false_negative) == (3, 0, 0)
    assert m.f1 == 1.0
    assert m.center_residual_nm == pytest.approx(np.mean([1.0, 2.0, 3.0]) * 2.0)  # 20 Å = 2 nm voxels
    assert m.center_residual_std_nm == pytest.approx(np.std([2.0, 4.0, 6.0]))
    assert m.diameter_error == pytest.approx(np.mean([0.1, 0.0, 0.2]))


def test_centre_outside_the_true_sphere_is_not_a_match():
    m = match_vesicles(GT_CENTERS[:1] + [0, 0, 5.01], [5.0], GT_CENTERS[:1], [5.0], 10.0)
    assert (m.n_true_positive, m.n_false_positive, m.n_false_negative) == (0, 1, 1)
    assert m.f1 == 0.0 and np.isnan(m.diameter_error)


def test_missed_and_false_vesicles():
    pred = np.vstack([GT_CENTERS[:2], [[50.0, 50.0, 50.0]]])
    m = match_vesicles(pred, [5.0, 6.0, 7.0], GT_CENTERS, GT_RADII, 10.0)
    assert (m.n_true_positive, m.n_false_positive, m.n_false_negative) == (2, 1, 1)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.f1 == pytest.approx(2 / 3)
    assert sorted(map(tuple, m.pairs)) == [(0, 0), (1, 1)]


def test_split_vesicle_counts_one_true_and_one_false_positive():
    halves = GT_CENTERS[2] + np.array([[0.0, 0.0, -3.0], [0.0, 0.0, 3.5]])
    m = match_vesicles(halves, [4.0, 4.0], GT_CENTERS[2:], GT_RADII[2:], 10.0)
    assert (m.n_true_positive, m.n_false_positive, m.n_false_negative) == (1, 1, 0)
    assert tuple(m.pairs[0]) == (0, 0)  # the closer half is the match


def test_one_to_one_assignment_maximises_the_matches():
    gt = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]])
    pred = np.array([[0.0, 0.0, 3.2], [0.0, 0.0, 9.0]])
    m = match_vesicles(pred, [4, 4], gt, [4, 4], 10.0)
    # matching the closest pair first (pred 0 with gt 1, 2.8 voxels) would leave pred 1 unmatched
    assert m.n_true_positive == 2
    assert sorted(map(tuple, m.pairs)) == [(0, 0), (1, 1)]


def test_empty_inputs():
    m = match_vesicles(np.zeros((0, 3)), [], GT_CENTERS, GT_RADII, 10.0)
    assert (m.n_true_positive, m.n_false_negative, m.recall, m.f1) == (0, 3, 0.0, 0.0)
    assert np.isnan(m.precision)


def test_dice_binary_and_soft():
    truth = np.zeros((4, 4, 4), bool)
    truth[:2] = True
    assert dice(truth, truth) == 1.0
    half = np.zeros_like(truth)
    half[:1] = True
    assert dice(half, truth) == pytest.approx((2 * 16 + 1) / (32 + 16 + 1))
    prob = np.where(truth, 0.5, 0.0).astype(np.float32)
    assert dice(prob, truth) == pytest.approx((2 * 16 + 1) / (32 + 16 + 1))


def test_spheres_from_labels_recovers_digital_balls():
    grid = np.indices((40, 40, 40)).transpose(1, 2, 3, 0)
    labels = np.zeros((40, 40, 40), np.uint16)
    for i, (center, radius) in enumerate([((10, 12, 14), 5), ((25, 25, 25), 8)], start=1):
        labels[np.sum((grid - center) ** 2, axis=-1) <= radius**2] = i
    ids, centers, radii = spheres_from_labels(labels)
    assert list(ids) == [1, 2]
    np.testing.assert_allclose(centers, [[10, 12, 14], [25, 25, 25]], atol=1e-9)
    np.testing.assert_allclose(radii, [5, 8])
