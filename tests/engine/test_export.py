"""STAR and copick export: files read back with the same libraries give the vesicle table's centres."""

import sys

import numpy as np
import numpy.testing as npt
import pyarrow.parquet as pq
import pytest
import starfile

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.export import write_copick, write_star

SHAPE_XYZ = np.array([56.0, 40.0, 24.0])  # the fixture's (z, y, x) grid, as x, y, z
VOXEL_SIZE_A = 16.0
ATOL = 5e-7  # starfile writes six decimals


def _kept(out, name):
    table = pq.read_table(out / "vesicles" / f"{name}.parquet").to_pandas()
    return table[table.outcome != "removed"].reset_index(drop=True)


def _xyz(table):
    return table[["center_x_vox", "center_y_vox", "center_z_vox"]].to_numpy()


def test_relion5_star_holds_centred_angstrom(segmented_folder):
    out = segmented_folder(["alpha", "beta"])
    [path] = write_star(out, out / "export", "relion5")
    assert path.name == "vesicles.relion5.star"
    particles = starfile.read(path)
    assert list(particles.columns) == ["rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                                       "rlnCenteredCoordinateZAngst"]
    for name in ("alpha", "beta"):
        mine = particles[particles.rlnTomoName == name]
        centred = mine[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
        npt.assert_allclose(centred / VOXEL_SIZE_A + SHAPE_XYZ / 2, _xyz(_kept(out, name)), rtol=0, atol=ATOL)
    # the first vesicle, by hand: x 20.75 voxels is (20.75 - 28) * 16 Å from the centre
    npt.assert_allclose(particles.iloc[0, 1:].to_numpy(float), [-116.0, -120.0, -60.0], atol=ATOL)


def test_relion4_star_holds_pixels_and_the_voxel_size(segmented_folder):
    out = segmented_folder(["alpha", "beta"])
    paths = write_star(out, out / "export", "relion4", per_tomogram=True, include_removed=True)
    assert [p.name for p in paths] == ["alpha.relion4.star", "beta.relion4.star"]
    particles = starfile.read(paths[1])
    table = pq.read_table(out / "vesicles" / "beta.parquet").to_pandas()
    assert len(particles) == len(table) == 5  # removed ones too
    npt.assert_allclose(particles[[f"rlnCoordinate{a}" for a in "XYZ"]].to_numpy(), _xyz(table), rtol=0, atol=ATOL)
    npt.assert_array_equal(particles.rlnDetectorPixelSize * 1e4 / particles.rlnMagnification, VOXEL_SIZE_A)
    assert set(particles.rlnMicrographName) == {"beta.mrc"} and set(particles.rlnTomoName) == {"beta"}


def test_star_style_and_empty_folder_are_checked(segmented_folder, tmp_path):
    out = segmented_folder(["alpha"], failed=["gamma"])
    with pytest.raises(ValueError, match="style must be one of"):
        write_star(out, out / "export", "relion6")
    with pytest.raises(CryovesError, match="nothing to export"):
        write_star(tmp_path / "nothing", tmp_path / "export")


def test_copick_picks_round_trip(segmented_folder, tmp_path):
    copick = pytest.importorskip("copick")
    out = segmented_folder(["alpha", "beta"])
    config = tmp_path / "project" / "copick.json"
    write_copick(out, config)
    write_copick(out, config)  # a rerun replaces cryoves's picks
    root = copick.from_file(str(config))
    vesicle = root.get_object("synaptic-vesicle")
    assert vesicle.is_particle and vesicle.radius == pytest.approx(40.0)  # median of 4.0, 4.8, 3.6 nm
    for name in ("alpha", "beta"):
        run = root.get_run(name)
        assert run.get_voxel_spacing(VOXEL_SIZE_A) is not None
        [picks] = run.get_picks("synaptic-vesicle", user_id="cryoves", session_id="0")
        positions, _ = picks.numpy()
        kept = _kept(out, name)
        npt.assert_allclose(positions / VOXEL_SIZE_A, _xyz(kept), rtol=1e-12)
        npt.assert_array_equal(picks.instance_ids(), kept.vesicle_id)
        npt.assert_allclose(picks.scores(), kept.profile_correlation)


def test_copick_adds_to_an_existing_project(segmented_folder, tmp_path):
    copick = pytest.importorskip("copick")
    config = tmp_path / "existing.json"
    copick.new_config(str(config), overlay_root=str(tmp_path / "overlay"))
    write_copick(segmented_folder(["alpha"]), config)
    root = copick.from_file(str(config))
    assert [o.name for o in root.pickable_objects] == ["synaptic-vesicle"]
    assert len(root.get_run("alpha").get_picks("synaptic-vesicle")[0].points) == 3


def test_copick_missing_says_how_to_install(segmented_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "copick", None)  # import copick raises ImportError
    with pytest.raises(CryovesError, match=r"pip install 'cryoves\[copick\]'"):
        write_copick(segmented_folder(["alpha"]), "project.json")


def test_cli_export(segmented_folder, tmp_path, capsys):
    out = segmented_folder(["alpha", "beta"])
    assert main(["export", str(out), "--relion", "4", "--per-tomogram"]) == 0
    assert sorted(p.name for p in (out / "export").iterdir()) == ["alpha.relion4.star", "beta.relion4.star"]
    assert main(["export", str(out), "--out", str(tmp_path / "stars")]) == 0
    assert len(starfile.read(tmp_path / "stars" / "vesicles.relion5.star")) == 6
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "nothing to export" in capsys.readouterr().err


def test_cli_export_copick(segmented_folder, capsys):
    pytest.importorskip("copick")
    out = segmented_folder(["alpha"])
    assert main(["export", str(out), "--format", "copick"]) == 0
    assert (out / "export" / "copick" / "copick.json").is_file()
    assert "copick project" in capsys.readouterr().out
