"""Phantom known answers: determinism, labels = table, no overlap, units, contrast, noise, distractors, I/O, CLI."""

import json
from dataclasses import asdict, replace

import numpy as np
import numpy.testing as npt
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.synthetic import phantom as phantom_module
from cryoves.engine.synthetic.imaging import PM_THICKNESS_NM
from cryoves.engine.synthetic.phantom import KINDS, PRESETS, Phantom, make_phantom, write_phantom

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


@pytest.fixture(scope="module")
def distractors():
    """A distractors phantom and the scene make_phantom laid out for it (organelles and filaments in nm)."""
    layout, scenes = phantom_module._layout, []

    def recording_layout(*args):
        scenes.append(layout(*args))
        return scenes[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(phantom_module, "_layout", recording_layout)
        phantom = make_phantom((48, 160, 160), VOXEL_A, seed=0, preset="distractors")
    return phantom, scenes[0]


def _columns(phantom: Phantom) -> dict[str, np.ndarray]:
    return {name: phantom.vesicles.column(name).to_numpy() for name in phantom.vesicles.column_names}


def _gaps_nm(phantom: Phantom) -> np.ndarray:
    """Surface-to-surface gaps (nm) of all vesicle pairs i < j."""
    v = _columns(phantom)
    centers = np.column_stack([v["center_z_nm"], v["center_y_nm"], v["center_x_nm"]])
    i, j = np.triu_indices(len(centers), k=1)
    return np.linalg.norm(centers[i] - centers[j], axis=1) - v["radius_nm"][i] - v["radius_nm"][j]


def _surface_distance_nm(organelle, shape) -> np.ndarray:
    """Signed distance (nm) of every voxel from an organelle's outer surface, as the renderer computes it."""
    grid = np.indices(shape, dtype=np.float64) * VOXEL_A / 10
    return organelle.distance_nm(*(g - c for g, c in zip(grid, organelle.center_nm)))


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


def test_noise_variance_follows_snr():
    """Same scene and noise draws at two SNRs: signal/noise variance of the tomogram is `snr` (on the 22 Å grid)."""
    def render(snr):
        return make_phantom(SHAPE, VOXEL_A, seed=1, preset=replace(PRESETS["default"], snr=snr)).tomogram.astype(float)

    clean = render(1e12)  # noise std 1e-6 of the signal's
    measured = {}
    for snr in (1.0, 0.25):
        noisy = render(snr)
        gain = np.vdot(noisy, clean) / np.vdot(clean, clean)
        measured[snr] = gain**2 * clean.var() / (noisy - gain * clean).var()
    # Sampling error: the noise fills at least half of the n modes (wedge), so its sample correlation rho with
    # the signal has sd <= sqrt(2/n) and its sample variance a relative sd <= sqrt(4/n); the fit reads
    # realized signal/noise * (1 + 2 rho / sqrt(snr)). Both SNRs share the noise draws: their ratio keeps only rho.
    n = np.prod(SHAPE)
    sd_rho = np.sqrt(2 / n)
    assert measured[1.0] / measured[0.25] == pytest.approx(4.0, rel=4 * 2 * sd_rho * (1 / np.sqrt(0.25) - 1))
    for snr, value in measured.items():
        sd = np.sqrt(4 / n + 4 * sd_rho**2 / snr)
        # + 1/nx: the x = 0 and Nyquist planes of the half spectrum keep half their noise (irfftn takes their real part)
        assert value == pytest.approx(snr, rel=4 * sd + 1 / SHAPE[2])


def test_distractor_organelles_are_dark_membranes_and_never_labelled(distractors):
    """The mitochondrion and endosomes are imaged as dark membranes where the scene puts them, and carry no label."""
    phantom, scene = distractors
    assert sorted(o.kind for o in scene.organelles) == ["endosome"] * 3 + ["mitochondrion"]
    for organelle in scene.organelles:
        s = _surface_distance_nm(organelle, phantom.labels.shape)
        membrane = phantom.tomogram[(s >= -PM_THICKNESS_NM) & (s <= 0)].mean()
        around = phantom.tomogram[(s > 8) & (s < 14) & (phantom.labels == 0)].mean()
        assert membrane < around - 0.2, organelle.kind
        assert not phantom.labels[s < 1].any(), organelle.kind


def test_distractor_filaments_are_dark_lines(distractors):
    """Voxels on the filament axes, outside vesicles and organelles, are far darker than the rest of the cytoplasm."""
    phantom, scene = distractors
    shape = phantom.labels.shape
    assert len(scene.filaments_nm) == PRESETS["distractors"].n_filaments
    axis = np.zeros(shape, dtype=bool)
    for start, end in scene.filaments_nm:
        points = start + np.linspace(0, 1, int(np.linalg.norm(end - start)) + 1)[:, None] * (end - start)
        index = np.round(points / (VOXEL_A / 10)).astype(int)
        axis[tuple(index[np.all((index >= 0) & (index < shape), axis=1)].T)] = True
    z_nm = np.arange(shape[0]) * VOXEL_A / 10
    cytoplasm = (phantom.labels == 0) & ((z_nm > scene.slab_nm[0] + 5) & (z_nm < scene.slab_nm[1] - 5))[:, None, None]
    for organelle in scene.organelles:
        cytoplasm &= _surface_distance_nm(organelle, shape) > 1
    assert np.count_nonzero(axis & cytoplasm) > 500
    assert phantom.tomogram[axis & cytoplasm].mean() < phantom.tomogram[cytoplasm & ~axis].mean() - 0.5


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
