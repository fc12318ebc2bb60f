"""Labelling, statistics and adaptive local thresholding on probability maps built from exact spheres."""

import math

import numpy as np
import numpy.testing as npt
import pyarrow as pa
import pytest
from scipy.optimize import linear_sum_assignment

from cryoves.engine.errors import CryovesError
from cryoves.engine.stages.localize import (
    LocalizeParams,
    label_segments,
    localize,
    segment_stats,
    split_thresholds,
)

# 12 nm at 40 Å is r_min = 3 voxels, V_min = 113.1 voxels.
VOXEL_SIZE_A = 40.0
V_MIN = 4.0 / 3.0 * math.pi * 3.0**3
SHAPE = (40, 96, 96)
WIDTH = 2.0  # P falls from 1 to 0 over a few voxels around the radius
RADIUS = 10.0  # {P > t} is the union of balls of radius RADIUS - WIDTH * logit(t): 7.2 at t = 0.8
T_STAR = 0.8
SINGLES = [(20, 12, 84), (20, 84, 12), (20, 84, 84)]


def union_probability(centres, shape=SHAPE, radius=RADIUS, width=WIDTH):
    """P = sigmoid(-s / width), s = signed distance to the union of balls: {P > t} is a union of balls.

    Two balls closer than twice the level-set radius merge; raising t shrinks the balls and splits them.
    """
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    s = np.full(shape, np.inf)
    for c in centres:
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        s = np.minimum(s, d - radius)
    return (1.0 / (1.0 + np.exp(np.clip(s / width, -60, 60)))).astype(np.float32)


def run(probability, threshold=T_STAR, params=None, **kwargs):
    params = params or LocalizeParams(**kwargs)
    labels = label_segments(probability, threshold, params.connectivity)
    return labels, localize(probability, labels, threshold, VOXEL_SIZE_A, params)


def centroids(labels):
    table = segment_stats(labels)
    return np.stack([table[f"centroid_{a}_vox"].to_numpy() for a in "zyx"], axis=1)


def assert_same_centres(found, expected, atol=1e-9):
    """Each expected centre has its own found centre within `atol` (one-to-one, nearest pairing)."""
    found, expected = np.asarray(found, float), np.asarray(expected, float)
    assert found.shape == expected.shape, f"found {len(found)} segments, expected {len(expected)}"
    rows, cols = linear_sum_assignment(np.linalg.norm(found[:, None] - expected[None], axis=2))
    npt.assert_allclose(found[rows], expected[cols], atol=atol)


# -- label_segments and segment_stats ------------------------------------------------------------------


def test_label_connectivity():
    p = np.zeros((3, 3, 3))
    p[0, 0, 0] = p[1, 1, 1] = 1.0  # corner neighbours
    assert label_segments(p, 0.5, 6).max() == 2
    assert label_segments(p, 0.5, 26).max() == 1
    labels = label_segments(p, 0.5)
    assert labels.dtype == np.uint16  # up to 65,535 segments
    with pytest.raises(ValueError, match="connectivity must be 6 or 26"):
        label_segments(p, 0.5, 18)


def test_label_beyond_65535_segments_is_uint32():
    p = np.zeros((1, 600, 600), np.float32)
    p[0, ::2, ::2] = 1.0  # 90,000 isolated voxels
    labels = label_segments(p, 0.5)
    assert labels.dtype == np.uint32 and labels.max() == 90_000


def test_label_strict_threshold_in_float64():
    p = np.full((1, 1, 3), np.float32(0.8))
    p[0, 0, 1] = 0.0
    # float32(0.8) = 0.800000011920929 > 0.8: consistent with the threshold search
    npt.assert_array_equal(label_segments(p, 0.8).ravel(), [1, 0, 2])
    assert label_segments(p, float(np.float32(0.8))).max() == 0


def test_segment_stats_known_boxes():
    labels = np.zeros((10, 11, 12), np.uint16)
    labels[2:4, 3:6, 4:8] = 1
    labels[9, 10, 11] = 5  # ids need not be consecutive
    table = segment_stats(labels)
    assert table.column_names == [
        "label", "volume_vox", "bbox_volume_vox", "extent",
        "bbox_lo_z_vox", "bbox_lo_y_vox", "bbox_lo_x_vox",
        "bbox_hi_z_vox", "bbox_hi_y_vox", "bbox_hi_x_vox",
        "centroid_z_vox", "centroid_y_vox", "centroid_x_vox",
    ]
    rows = table.to_pylist()
    assert [r["label"] for r in rows] == [1, 5]
    assert rows[0]["volume_vox"] == 24 and rows[0]["bbox_volume_vox"] == 24 and rows[0]["extent"] == 1.0
    assert (rows[0]["bbox_lo_z_vox"], rows[0]["bbox_lo_y_vox"], rows[0]["bbox_lo_x_vox"]) == (2, 3, 4)
    assert (rows[0]["bbox_hi_z_vox"], rows[0]["bbox_hi_y_vox"], rows[0]["bbox_hi_x_vox"]) == (4, 6, 8)
    assert (rows[0]["centroid_z_vox"], rows[0]["centroid_y_vox"], rows[0]["centroid_x_vox"]) == (2.5, 4.0, 5.5)
    assert (rows[1]["centroid_z_vox"], rows[1]["centroid_y_vox"], rows[1]["centroid_x_vox"]) == (9, 10, 11)


def test_segment_stats_matches_naive_loop():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 9, size=(7, 9, 11)).astype(np.int32)
    labels[labels == 4] = 0  # an absent id
    table = segment_stats(labels[:, ::-1])  # non-contiguous input
    labels = labels[:, ::-1]
    for row in table.to_pylist():
        coords = np.argwhere(labels == row["label"])
        assert row["volume_vox"] == len(coords)
        lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
        assert row["bbox_volume_vox"] == np.prod(hi - lo)
        npt.assert_allclose(row["extent"], len(coords) / np.prod(hi - lo))
        npt.assert_allclose([row[f"centroid_{a}_vox"] for a in "zyx"], coords.mean(axis=0))
    assert table["label"].to_pylist() == [1, 2, 3, 5, 6, 7, 8]


def test_segment_stats_empty():
    table = segment_stats(np.zeros((3, 4, 5), np.uint32))
    assert table.num_rows == 0 and table.schema.field("centroid_x_vox").type == pa.float64()


# -- localize ------------------------------------------------------------------------------------------


def test_split_thresholds_schedule():
    ts = split_thresholds(0.95)
    npt.assert_allclose(ts[:5], [0.95, 0.96, 0.97, 0.98, 0.99])
    npt.assert_allclose(ts[5:15], 0.99 + 0.001 * np.arange(10))
    npt.assert_allclose(ts[15:], 0.999 + 0.0001 * np.arange(10))
    assert ts.max() < 1.0


def test_single_sphere_kept():
    centre = (20, 40, 50)
    labels, local = run(union_probability([centre]))
    assert labels.max() == 1 and local.max() == 1
    assert_same_centres(centroids(local), [centre])


def test_nothing_above_threshold_is_empty_not_error():
    p = np.full(SHAPE, 0.3, np.float32)
    labels, local = run(p)
    assert labels.max() == 0 and local.max() == 0 and local.dtype == np.uint16
    assert segment_stats(local).num_rows == 0


def test_merged_pair_is_split_with_right_centres():
    """The reference's split: the pieces are what lies above the raised threshold."""
    pair = [(20, 40, 40), (20, 49, 49)]  # 12.7 voxels apart: one segment at t = 0.8, two above ~0.86
    p = union_probability(pair + SINGLES)
    labels, local = run(p, split_regrow=False)
    assert labels.max() == 4  # the pair is merged by the global threshold
    assert local.max() == 5
    assert_same_centres(centroids(local), pair + SINGLES)
    # the singles keep their global-threshold shape; the pieces are smaller balls
    single_volume = np.count_nonzero(label_segments(union_probability(SINGLES[:1]), T_STAR))
    volumes = np.sort(segment_stats(local)["volume_vox"].to_numpy())
    npt.assert_array_equal(volumes[2:], single_volume)
    assert np.all(volumes[:2] < single_volume) and volumes[0] == volumes[1]


def test_split_off_leaves_pair_merged_and_then_discarded_only_if_rules_say():
    pair = [(20, 40, 40), (20, 49, 49)]
    p = union_probability(pair + SINGLES)
    _, local = run(p, split=False)
    assert local.max() == 4  # extent of the pair (~0.35) passes the rules


def test_no_split_below_volume_z_score():
    pair = [(20, 40, 40), (20, 49, 49)]
    p = union_probability(pair + SINGLES)
    _, local = run(p, split_min_volume_z=5.0)  # the pair's z-score is sqrt(3)
    assert local.max() == 4
    _, local = run(p, split_min_volume_z=1.0)  # the reference's rule splits this pair
    assert local.max() == 5
    _, local = run(p, split_max_extent=0.25)  # paper value: the pair's extent is ~0.35
    assert local.max() == 4


@pytest.mark.parametrize("regrow", [False, True])
def test_two_candidates_get_distinct_fresh_ids(regrow):
    pairs = [(20, 12, 12), (20, 21, 21), (20, 60, 60), (20, 69, 69)]
    singles = [(20, 12, 84), (20, 84, 12), (20, 84, 84), (20, 40, 84), (20, 84, 40)]
    _, local = run(union_probability(pairs + singles), split_regrow=regrow)
    assert local.max() == 9
    assert_same_centres(centroids(local), pairs + singles, atol=0.1 if regrow else 1e-9)


def test_fresh_ids_beyond_the_labels_type_widen_the_working_labels():
    """Localize works in the labels' own type (uint16 for most tomograms) and moves to uint32 only when the
    pieces' fresh ids need it: the same segments as from uint32 labels."""
    pairs = [(20, 12, 12), (20, 21, 21), (20, 60, 60), (20, 69, 69)]
    p = union_probability(pairs + SINGLES)
    labels = label_segments(p, T_STAR)
    assert labels.dtype == np.uint16
    top = np.where(labels > 0, labels + (np.iinfo(np.uint16).max - labels.max()), 0)  # ids up to 65,535
    expected = localize(p, top.astype(np.uint32), T_STAR, VOXEL_SIZE_A, LocalizeParams())
    found = localize(p, top.astype(np.uint16), T_STAR, VOXEL_SIZE_A, LocalizeParams())
    assert found.max() == 7
    npt.assert_array_equal(found, expected)


@pytest.mark.parametrize("widen", [False, True])
def test_overwrite_gives_the_same_labels_in_the_caller_s_array(widen):
    """With `overwrite` localize works in the labels it is given (split, grown, discarded, renumbered) and returns
    that array, unless fresh ids outgrow its type; without, the caller's labels are left as they were."""
    pairs = [(20, 12, 12), (20, 21, 21), (20, 60, 60), (20, 69, 69)]
    p = union_probability(pairs + SINGLES)
    labels = label_segments(p, T_STAR)
    if widen:
        labels = np.where(labels > 0, labels + (np.iinfo(np.uint16).max - labels.max()), 0).astype(np.uint16)
    kept = labels.copy()
    expected = localize(p, labels, T_STAR, VOXEL_SIZE_A, LocalizeParams())
    npt.assert_array_equal(labels, kept)
    found = localize(p, labels, T_STAR, VOXEL_SIZE_A, LocalizeParams(), overwrite=True)
    assert found.max() == 7
    npt.assert_array_equal(found, expected)
    assert (found is labels) is not widen  # ids past 65,535 move the work to a uint32 copy


def test_regrown_pieces_keep_every_voxel_of_the_merged_segment():
    pair = [(20, 40, 40), (20, 49, 49)]
    labels, local = run(union_probability(pair + SINGLES))
    assert local.max() == 5
    np.testing.assert_array_equal(local > 0, labels > 0)  # nothing lost to the raised threshold
    volumes = np.sort(segment_stats(local)["volume_vox"].to_numpy())
    single_volume = np.count_nonzero(label_segments(union_probability(SINGLES[:1]), T_STAR))
    assert volumes[0] > 0.8 * single_volume
    assert_same_centres(centroids(local), pair + SINGLES, atol=0.6)  # halves of a lens-shaped union


@pytest.mark.parametrize("regrow", [False, True])
def test_five_in_a_row_split_into_five(regrow):
    chain = [(20, 12 + 9 * k, 12 + 9 * k) for k in range(5)]
    p = union_probability(chain + SINGLES)
    labels, local = run(p, split_regrow=regrow)
    stats = segment_stats(labels).to_pylist()
    assert labels.max() == 4 and min(r["extent"] for r in stats) < 0.25  # chain would be discarded
    assert local.max() == 8
    assert_same_centres(centroids(local), chain + SINGLES, atol=0.6 if regrow else 1e-9)


def test_segment_cut_at_index_0_is_split():
    """A segment touching z = 0 is split inside its own box (the reference's widened box wraps there)."""
    pair = [(3, 40, 40), (3, 49, 49)]
    p = union_probability(pair + SINGLES)
    labels, local = run(p)
    assert labels.max() == 4 and local.max() == 5
    found = centroids(local)
    assert_same_centres(found[:, 1:], [c[1:] for c in pair + SINGLES], atol=0.6)


def test_pair_at_far_faces_is_split():
    pair = [(SHAPE[0] - 4, SHAPE[1] - 20, SHAPE[2] - 20), (SHAPE[0] - 4, SHAPE[1] - 11, SHAPE[2] - 11)]
    singles = [(20, 12, 12), (20, 12, 60), (20, 60, 12)]
    _, local = run(union_probability(pair + singles))
    assert local.max() == 5


def saturated(centres, semi_axes=(7.2, 7.2, 7.2), shape=SHAPE):
    """P = 1 inside a union of ellipsoids and 0 outside, as float32 maps saturate: no raised threshold splits it."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    a = np.asarray(semi_axes, float)
    inside = np.zeros(shape, bool)
    for c in centres:
        inside |= ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2 <= 1.0
    return inside.astype(np.float32)


def test_saturated_pair_is_cut_at_its_neck():
    """Touching vesicles with P = 1 through the contact: the threshold split cannot part them, the neck cut does."""
    pair = [(20, 40, 40), (20, 49, 49)]
    p = saturated(pair + SINGLES)
    labels, local = run(p)
    assert labels.max() == 4 and local.max() == 5
    np.testing.assert_array_equal(local > 0, labels > 0)
    assert_same_centres(centroids(local), pair + SINGLES, atol=0.5)
    _, reference = run(p, split_neck_depth_nm=None)  # the reference's split alone keeps the pair whole
    assert reference.max() == 4


def test_saturated_chain_is_cut_into_its_vesicles():
    chain = [(20, 12 + 9 * k, 12 + 9 * k) for k in range(4)]
    _, local = run(saturated(chain + SINGLES))
    assert local.max() == 7
    assert_same_centres(centroids(local), chain + SINGLES, atol=0.6)


@pytest.mark.parametrize("semi_axes", [(7.2, 7.2, 7.2), (11.0, 7.0, 7.0), (7.0, 10.0, 6.0)])
def test_single_sphere_or_ellipsoid_is_never_cut(semi_axes):
    """A lone vesicle, also stretched along z by the missing wedge, has one distance maximum: no cut."""
    _, local = run(saturated([(20, 48, 48)], semi_axes), split_max_extent=1.0)  # every segment a candidate
    assert local.max() == 1


def test_discarding_rules():
    singles = [(20, 20, 20), (20, 20, 70), (20, 70, 70)]
    p = union_probability(singles)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    tiny = (z - 30) ** 2 + (y - 70) ** 2 + (x - 20) ** 2 <= 2.5**2  # 81 voxels < V_min
    slab = np.zeros(SHAPE, bool)
    slab[2:5, 40:80, 40:60] = True  # a box: extent 1 > 0.75
    rod = (np.abs(y - x - 20) <= 2) & (z >= 30) & (z < 35) & (y >= 30) & (y < 70)  # extent ~0.09
    assert tiny.sum() < V_MIN and rod.sum() > V_MIN
    for mask in (tiny, slab, rod):
        p[mask] = 0.95
    labels, local = run(p)
    assert labels.max() == 6
    assert local.max() == 3
    assert_same_centres(centroids(local), singles)
    # relaxed rules keep them
    _, local = run(p, min_extent=0.0, max_extent=1.0, min_radius_nm=0.0)
    assert local.max() == 6


def test_min_radius_scales_with_voxel_size():
    p = union_probability([(20, 40, 40)])
    labels = label_segments(p, T_STAR)
    volume = int(np.count_nonzero(labels))  # ball of radius ~7.2: ~1560 voxels
    r_keep = 0.99 * (3 * volume / (4 * math.pi)) ** (1 / 3)
    params = LocalizeParams(min_radius_nm=r_keep)  # r_keep voxels at 10 Å
    assert localize(p, labels, T_STAR, 10.0, params).max() == 1
    assert localize(p, labels, T_STAR, 10.0 / 1.05, params).max() == 0  # radius now 5 % more voxels


def test_grow_small_partial_vesicle():
    """A vesicle whose core alone passes t* is grown to the component of a lower threshold."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    d = np.sqrt((z - 20) ** 2 + (y - 40) ** 2 + (x - 40) ** 2)
    p = np.where(d <= 2.0, 0.95, np.where(d <= 7.0, 0.86, 0.1)).astype(np.float32)
    d2 = np.sqrt((z - 20) ** 2 + (y - 40) ** 2 + (x - 80) ** 2)
    p[d2 <= 2.0] = 0.95  # a small core with nothing around: never grown, deleted
    threshold = 0.9
    labels = label_segments(p, threshold)
    assert labels.max() == 2
    grown = localize(p, labels, threshold, VOXEL_SIZE_A, LocalizeParams(grow=True))
    assert grown.max() == 1
    npt.assert_array_equal(grown > 0, d <= 7.0)
    plain = localize(p, labels, threshold, VOXEL_SIZE_A, LocalizeParams())
    assert plain.max() == 0  # both are smaller than V_min without growing
    # from t* = 0.9 the grow thresholds are 0.875, 0.85, 0.825 (t > 0.80): P = 0.81 is never reached
    p2 = np.where(d <= 2.0, 0.95, np.where(d <= 7.0, 0.81, 0.1)).astype(np.float32)
    labels2 = label_segments(p2, threshold)
    assert localize(p2, labels2, threshold, VOXEL_SIZE_A, LocalizeParams(grow=True)).max() == 0
    lower = LocalizeParams(grow=True, grow_min_threshold=0.7)  # now 0.80 and 0.775 are tried too
    npt.assert_array_equal(localize(p2, labels2, threshold, VOXEL_SIZE_A, lower) > 0, d <= 7.0)


def test_progress_is_called():
    pair = [(20, 40, 40), (20, 49, 49)]
    p = union_probability(pair + SINGLES)
    labels = label_segments(p, T_STAR)
    calls = []
    params = LocalizeParams(split_min_volume_z=1.0)  # only the pair is a candidate
    localize(p, labels, T_STAR, VOXEL_SIZE_A, params, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 1)]


def test_input_labels_not_modified():
    pair = [(20, 40, 40), (20, 49, 49)]
    p = union_probability(pair + SINGLES)
    labels = label_segments(p, T_STAR)
    before = labels.copy()
    localize(p, labels, T_STAR, VOXEL_SIZE_A, LocalizeParams())
    npt.assert_array_equal(labels, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"connectivity": 8}, "connectivity must be 6 or 26"),
        ({"split_max_extent": 0.0}, "split_max_extent must be in"),
        ({"min_extent": 0.8}, "extent limits"),
        ({"grow_step": 0.0}, "grow_step must be > 0"),
        ({"min_radius_nm": -1.0}, "min_radius_nm must be >= 0 nm"),
        ({"split_min_volume_z": float("nan")}, "split_min_volume_z must be a finite number or None"),
        ({"split": "yes"}, "split must be True or False"),
        ({"split_neck_depth_nm": 0.0}, "split_neck_depth_nm must be a number > 0 nm or None"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(CryovesError, match=match):
        LocalizeParams(**kwargs)


def test_bad_voxel_size():
    p = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(CryovesError, match="voxel size must be a positive number"):
        localize(p, np.zeros(p.shape, np.uint32), 0.8, 0.0, LocalizeParams())
