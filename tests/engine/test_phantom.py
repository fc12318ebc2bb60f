"""Known answers for the phantom: determinism, labels = table, no overlap, units, contrast, I/O, CLI."""

import json
from dataclasses import asdict

import numpy as np
import numpy.testing as npt
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.mrc import read_volume
from cryoves.engine.phantom import KINDS, PRESETS, Phantom, make_phantom, write_phantom

SHAPE = (32, 64, 64)
VOXEL_A = 22.0


@pytest.fixture(scope="session")
def small() -> Phantom:
    return make_phantom(SHAPE, VOXEL_A, seed=1)


@pytest.fixture(scope="session")
def medium() -> Phantom:
    return make_phantom((48, 96, 96), VOXEL_A, seed=2)


@pytest.fixture(scope="session")
def crowded() -> Phantom:
    return make_phantom((48, 96, 96), VOXEL_A, seed=3, preset="crowded")


def _columns(phantom: Phantom) -> dict[str, np.ndarray]:
    return {name: phantom.vesicles.column(name).to_numpy() for name in phantom.vesicles.column_names}


def _gaps_nm(phantom: Phantom) -> np.ndarray:
    """Surface-to-surface gaps (nm) of all vesicle pairs i < j."""
    v = _columns(phantom)
    centers = np.column_stack([v["center_z_nm"], v["center_y_nm"], v["center_x_nm"]])
    i, j = np.triu_indices(len(centers), k=1)
    return np.linalg.norm(centers[i] - centers[j], axis=1) - v["radius_nm"][i] - v["radius_nm"][j]


def test_types_and_columns(small):
    assert small.tomogram.dtype == np.float32 and small.tomogram.shape == SHAPE
    assert small.labels.dtype == np.uint16 and small.labels.shape == SHAPE
    assert small.voxel_size_a == VOXEL_A
    v = _columns(small)
    assert small.vesicles.num_rows > 0
    npt.assert_array_equal(v["id"], np.arange(1, small.vesicles.num_rows + 1))
    assert str(small.vesicles.schema.field("id").type) == "int32"
    assert set(v["kind"]) <= set(KINDS)
    metadata = small.vesicles.schema.metadata
    assert {b"voxel_size_a", b"seed", b"preset"} <= set(metadata)
    assert float(metadata[b"voxel_size_a"]) == VOXEL_A and int(metadata[b"seed"]) == 1


def test_same_seed_same_phantom_other_seed_differs(small):
    again = make_phantom(SHAPE, VOXEL_A, seed=1)
    npt.assert_array_equal(again.tomogram, small.tomogram)
    npt.assert_array_equal(again.labels, small.labels)
    assert again.vesicles.equals(small.vesicles)
    other = make_phantom(SHAPE, VOXEL_A, seed=2)
    assert not np.array_equal(other.tomogram, small.tomogram)
    assert not np.array_equal(other.labels, small.labels)


@pytest.mark.parametrize("fixture", ["small", "medium", "crowded"])
def test_labels_are_the_digital_balls_of_the_table(fixture, request):
    phantom = request.getfixturevalue(fixture)
    v = _columns(phantom)
    grid = np.indices(phantom.labels.shape, dtype=np.float64)
    voxel_nm = phantom.voxel_size_a / 10
    for k, label in enumerate(v["id"]):
        center = np.array([v["center_z_vox"][k], v["center_y_vox"][k], v["center_x_vox"][k]])
        npt.assert_allclose(center * voxel_nm, [v["center_z_nm"][k], v["center_y_nm"][k], v["center_x_nm"][k]])
        radius_vox = v["radius_nm"][k] / voxel_nm
        assert np.all(center - radius_vox >= 0) and np.all(center + radius_vox <= np.array(phantom.labels.shape) - 1)
        ball = sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius_vox**2
        mine = phantom.labels == label
        assert abs(int(mine.sum()) - int(ball.sum())) <= 0.02 * ball.sum()
        assert np.count_nonzero(mine & ball) >= 0.98 * ball.sum()
        assert abs(mine.sum() - 4 / 3 * np.pi * radius_vox**3) < 0.1 * mine.sum()
    assert np.count_nonzero(phantom.labels) == sum(np.count_nonzero(phantom.labels == i) for i in v["id"])


@pytest.mark.parametrize("fixture", ["small", "medium", "crowded"])
def test_vesicles_never_overlap_and_touching_is_bounded(fixture, request):
    phantom = request.getfixturevalue(fixture)
    gaps = _gaps_nm(phantom)
    min_gap = PRESETS["crowded" if fixture == "crowded" else "default"].min_gap_nm
    assert np.all(gaps >= 0)
    assert np.all((gaps < 0.5) | (gaps >= min_gap))


def test_crowded_has_many_touching_vesicles(crowded, medium):
    def touching_share(phantom):
        gaps = _gaps_nm(phantom)
        i, j = np.triu_indices(phantom.vesicles.num_rows, k=1)
        touching = np.union1d(i[gaps < 0.5], j[gaps < 0.5])
        return len(touching) / phantom.vesicles.num_rows

    assert 0.2 <= touching_share(crowded) <= 0.8
    assert touching_share(medium) <= 0.4
    assert crowded.vesicles.num_rows > medium.vesicles.num_rows


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_radii_and_thickness_within_preset_ranges(name):
    preset = PRESETS[name]
    v = _columns(make_phantom(SHAPE, VOXEL_A, seed=4, preset=name))
    assert len(v["id"]) > 0
    assert np.all((v["radius_nm"] >= preset.radius_min_nm) & (v["radius_nm"] <= preset.radius_max_nm))
    thickness = v["membrane_thickness_nm"]
    assert np.all((thickness >= preset.thickness_min_nm) & (thickness <= preset.thickness_max_nm))
    big = np.isin(v["kind"], ["large", "dense_core"])
    assert np.all(v["radius_nm"][big] >= preset.large_radius_min_nm)
    assert np.all(v["radius_nm"][~big] <= preset.large_radius_min_nm)


@pytest.mark.parametrize(("voxel_size_a", "shape"), [(11.0, (64, 128, 128)), (14.7, (48, 96, 96))])
def test_same_seed_gives_the_same_vesicles_in_nm_at_another_voxel_size(small, voxel_size_a, shape):
    fine = make_phantom(shape, voxel_size_a, seed=1)
    a, b = _columns(small), _columns(fine)
    for name in ("center_z_nm", "center_y_nm", "center_x_nm", "radius_nm", "membrane_thickness_nm"):
        npt.assert_allclose(b[name], a[name], rtol=1e-12)
    npt.assert_array_equal(b["kind"], a["kind"])
    npt.assert_allclose(b["center_x_vox"], a["center_x_vox"] * VOXEL_A / voxel_size_a, rtol=1e-12)
    radius_vox = b["radius_nm"] * 10 / voxel_size_a
    counts = np.bincount(fine.labels.ravel(), minlength=len(b["id"]) + 1)[1:]
    npt.assert_allclose(counts, 4 / 3 * np.pi * radius_vox**3, rtol=0.05)


def test_membranes_are_darker_than_lumen_and_background(medium):
    """Radial profile over all vesicles: the membrane shell is the darkest part (dense = dark)."""
    v = _columns(medium)
    voxel_nm = VOXEL_A / 10
    grid = np.indices(medium.tomogram.shape, dtype=np.float64)
    membrane, lumen, outside = [], [], []
    for k in range(len(v["id"])):
        center = np.array([v["center_z_vox"][k], v["center_y_vox"][k], v["center_x_vox"][k]])
        d_nm = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center))) * voxel_nm
        radius, thickness = v["radius_nm"][k], v["membrane_thickness_nm"][k]
        membrane.append(medium.tomogram[(d_nm >= radius - thickness) & (d_nm <= radius)])
        lumen.append(medium.tomogram[d_nm < radius - thickness - 3])
        outside.append(medium.tomogram[(d_nm > radius + 6) & (d_nm < radius + 12) & (medium.labels == 0)])
    membrane, lumen, outside = (np.concatenate(x).mean() for x in (membrane, lumen, outside))
    assert membrane < lumen - 0.3
    assert membrane < outside - 0.3
    assert membrane < medium.tomogram.mean() - 0.3


def test_write_phantom_round_trip(small, tmp_path):
    paths = write_phantom(tmp_path / "out", small, name="syn")
    assert paths == {"tomogram": tmp_path / "out" / "syn.mrc", "labels": tmp_path / "out" / "syn.labels.mrc",
                     "vesicles": tmp_path / "out" / "syn.vesicles.parquet"}
    tomogram = read_volume(paths["tomogram"], mmap=False)
    labels = read_volume(paths["labels"], mmap=False)
    assert tomogram.voxel_size_a == pytest.approx(VOXEL_A) and labels.voxel_size_a == pytest.approx(VOXEL_A)
    npt.assert_array_equal(tomogram.data, small.tomogram)
    npt.assert_array_equal(labels.data, small.labels)
    table = pq.read_table(paths["vesicles"])
    assert table.equals(small.vesicles)
    assert table.schema.metadata[b"preset"] == b"default"
    assert json.loads(table.schema.metadata[b"preset_params"]) == asdict(PRESETS["default"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["syn.labels.mrc", "syn.mrc", "syn.vesicles.parquet"]


def test_unknown_preset_and_bad_inputs_are_refused():
    with pytest.raises(CryovesError, match="preset 'nope' is unknown"):
        make_phantom(SHAPE, VOXEL_A, seed=0, preset="nope")
    with pytest.raises(CryovesError, match="at least 16 voxels"):
        make_phantom((8, 64, 64), VOXEL_A, seed=0)
    with pytest.raises(CryovesError, match="outside 1-40 Å"):
        make_phantom(SHAPE, 0.0, seed=0)


def test_cli_phantom_writes_the_three_files(tmp_path, capsys):
    assert main(["phantom", str(tmp_path), "--shape", "32", "64", "64", "--voxel-size", "22", "--seed", "1"]) == 0
    assert "vesicles" in capsys.readouterr().out
    for name in ("phantom.mrc", "phantom.labels.mrc", "phantom.vesicles.parquet"):
        assert (tmp_path / name).is_file()
    assert main(["phantom", str(tmp_path), "--shape", "32", "64", "64", "--preset", "nope"]) == 2


@pytest.mark.parametrize("shape", [(16, 16, 16), (48, 128, 128), (24, 200, 40)])
@pytest.mark.parametrize("preset", ["default", "distractors"])
def test_small_and_thin_volumes_are_generated(shape, preset):
    phantom = make_phantom(shape, 20.0, seed=3, preset=preset)
    assert phantom.tomogram.shape == shape and np.isfinite(phantom.tomogram).all()
