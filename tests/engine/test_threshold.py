"""Global threshold search on tomograms whose dark membranes sit at a known radius."""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.stages.localize import LocalizeParams, label_segments, localize, segment_stats
from cryoves.engine.stages.threshold import ThresholdParams, ThresholdResult, global_threshold

SHAPE = (48, 96, 96)
SLOPE = 0.01  # P = 1 - SLOPE * d: the boundary of {P > t} is the sphere of radius (1 - t) / SLOPE
CENTRES = [(24.3, 28.6, 27.2), (23.8, 66.1, 68.9), (24.0, 27.5, 70.4)]


def membrane_scene(membrane_radius, centres=CENTRES, noise=0.05, seed=3):
    """Tomogram with a dark Gaussian membrane (sigma 0.6 voxels) at `membrane_radius` around each centre."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    d = np.full(SHAPE, np.inf)
    for c in centres:
        d = np.minimum(d, np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2))
    probability = np.clip(1.0 - SLOPE * d, 0.0, 1.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    tomogram = -np.exp(-((d - membrane_radius) ** 2) / (2 * 0.6**2)) + rng.normal(0, noise, SHAPE)
    return tomogram.astype(np.float32), probability


def expected_threshold(membrane_radius):
    """The inner 1-voxel shell of a ball of radius rho lies at distances [rho - 1, rho), centred near
    rho - 0.5; the scanned t whose shell centre is on the membrane has rho(t) = membrane_radius + 0.5."""
    return round(1.0 - SLOPE * (membrane_radius + 0.5), 2)


@pytest.mark.parametrize("membrane_radius", [6.5, 9.5, 12.5])
def test_shell_lands_on_membrane(membrane_radius):
    tomogram, probability = membrane_scene(membrane_radius)
    result = global_threshold(tomogram, probability, ThresholdParams())
    assert result.searched
    assert result.threshold == expected_threshold(membrane_radius)
    npt.assert_array_equal(result.thresholds, [round(0.80 + 0.01 * k, 2) for k in range(20)])
    assert result.mean_intensity.shape == (20,) and result.n_shell_vox.shape == (20,)
    assert np.all(result.n_shell_vox > 0)
    assert np.nanargmin(result.mean_intensity) == list(result.thresholds).index(result.threshold)


def test_int16_tomogram():
    tomogram, probability = membrane_scene(9.5)
    tomogram = np.round(tomogram * 1000).astype(np.int16)
    assert global_threshold(tomogram, probability, ThresholdParams()).threshold == 0.90


def test_finer_scan():
    """A finer step finds the same membrane (rho(t) steps by 0.5 voxel here)."""
    tomogram, probability = membrane_scene(9.5)
    result = global_threshold(tomogram, probability, ThresholdParams(lo=0.85, hi=0.95, step=0.005))
    assert result.thresholds.shape == (20,)
    assert result.threshold in (0.895, 0.9, 0.905)


def test_empty_shells_are_ignored():
    tomogram, probability = membrane_scene(9.5)
    np.minimum(probability, np.float32(0.955), out=probability)  # nothing above 0.96 .. 0.99
    result = global_threshold(tomogram, probability, ThresholdParams())
    assert np.all(np.isnan(result.mean_intensity[-4:])) and np.all(result.n_shell_vox[-4:] == 0)
    assert result.threshold == 0.90


def test_ties_take_the_first_valid_threshold():
    _, probability = membrane_scene(9.5)
    probability = np.maximum(probability, np.float32(0.845))  # whole volume above 0.80..0.84: no shell
    tomogram = np.ones(SHAPE, np.int16)
    result = global_threshold(tomogram, probability, ThresholdParams())
    assert np.all(np.isnan(result.mean_intensity[:5]))
    npt.assert_array_equal(result.mean_intensity[5:], 1.0)
    assert result.threshold == 0.85


@pytest.mark.parametrize("value", [0.3, 0.995, 1.0])
def test_all_shells_empty_gives_nothing_above(value):
    """Nothing above any threshold, or everything above every one: not an error, an empty result."""
    probability = np.full((8, 9, 10), value, np.float32)
    tomogram = np.zeros(probability.shape, np.float32)
    result = global_threshold(tomogram, probability, ThresholdParams())
    assert np.all(np.isnan(result.mean_intensity))
    assert not np.any(probability > result.threshold)
    assert label_segments(probability, result.threshold).max() == 0


def test_user_threshold_is_used_directly():
    result = global_threshold(np.zeros((2, 2, 2)), np.zeros((3, 3, 3)), ThresholdParams(threshold=0.93))
    assert isinstance(result, ThresholdResult)
    assert result.threshold == 0.93 and not result.searched
    assert result.thresholds.shape == (0,)


def test_shape_mismatch_is_user_error():
    with pytest.raises(CryovesError, match="coarser than the probability map"):
        global_threshold(np.zeros((2, 2, 3)), np.zeros((2, 3, 2)), ThresholdParams())


def test_default_thresholds_are_exact():
    ts = ThresholdParams().thresholds()
    assert ts.tolist() == [0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.87, 0.88, 0.89,
                           0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
    fine = ThresholdParams(lo=0.99, step=0.001).thresholds()
    assert fine.shape == (10,) and fine[-1] == 0.999


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lo": 0.9, "hi": 0.9}, "0 <= lo < hi <= 1"),
        ({"hi": 1.2}, "0 <= lo < hi <= 1"),
        ({"step": 0.0}, "step must be > 0"),
        ({"step": 1e-9}, "more than 1,000,000 thresholds"),
        ({"lo": float("nan")}, "lo must be a finite number"),
        ({"threshold": 1.0}, r"threshold must be a number in \[0, 1\)"),
        ({"threshold": "0.9"}, r"threshold must be a number in \[0, 1\)"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(CryovesError, match=match):
        ThresholdParams(**kwargs)


def test_threshold_label_localize_pipeline():
    """Touching vesicles merge at t*; the local step separates them at their centres."""
    pair = [(24, 22, 22), (24, 35, 35)]  # 18.4 voxels apart, {P > 0.90} has radius 10: merged
    singles = [(24, 22, 76), (24, 76, 22), (24, 76, 76)]
    tomogram, probability = membrane_scene(9.5, centres=pair + singles)
    t_star = global_threshold(tomogram, probability, ThresholdParams()).threshold
    assert t_star == 0.90
    labels = label_segments(probability, t_star, 6)
    assert labels.max() == 4
    local = localize(probability, labels, t_star, 40.0, LocalizeParams())
    table = segment_stats(local)
    found = np.stack([table[f"centroid_{a}_vox"].to_numpy() for a in "zyx"], axis=1)
    assert found.shape == (5, 3)
    expected = np.array(pair + singles, float)
    nearest = np.linalg.norm(found[:, None] - expected[None], axis=2).argmin(axis=0)
    assert sorted(nearest) == list(range(5))
    npt.assert_allclose(found[nearest], expected, atol=0.05)  # watershed halves of the merged pair


def test_the_search_on_a_coarser_map_reads_the_tomogram_resampled_there():
    """A tomogram finer than the map is resampled to the map's grid at the shells only: the same curve, bit for bit,
    as on the whole resampled tomogram."""
    from cryoves.engine.network.rescale import resample_to_shape

    rng = np.random.default_rng(5)
    probability = np.clip(rng.normal(0.9, 0.08, (12, 20, 24)), 0, 1).astype(np.float32)
    tomogram = rng.normal(size=(18, 30, 36)).astype(np.float32)
    finer = global_threshold(tomogram, probability, ThresholdParams())
    whole = global_threshold(resample_to_shape(tomogram, probability.shape), probability, ThresholdParams())
    assert finer.threshold == whole.threshold
    np.testing.assert_array_equal(finer.mean_intensity, whole.mean_intensity)
    np.testing.assert_array_equal(finer.n_shell_vox, whole.n_shell_vox)
