"""QC reports: the geometry they draw (densest point, circles cut by a plane, stage counts) against exact
answers, and the PNGs and index.html they write over a hand-made output folder."""

import re

import numpy as np
import numpy.testing as npt
import pyarrow as pa
import pytest
from matplotlib.image import imread

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.pages import release_pages
from cryoves.engine.report import tomogram
from cryoves.engine.report.index import IndexRow, read_rows, with_checks, write_index
from cryoves.engine.report.tomogram import (
    circles_in_plane,
    densest_point,
    read_outputs,
    slab,
    stage_counts,
    write_report,
)


def test_densest_point_is_the_vesicle_with_most_neighbours():
    cluster = [(10, 10, 10), (10, 10, 16), (10, 16, 10), (16, 10, 10)]
    lonely = [(40, 40, 40), (5, 60, 60)]
    centers = np.array(lonely + cluster, dtype=float)
    assert densest_point(centers, np.full(len(centers), 2.0), (50, 70, 70)) == (10, 10, 10)
    assert densest_point(np.empty((0, 3)), np.empty(0), (50, 70, 71)) == (25, 35, 35)


def test_a_plane_draws_its_circles_coloured_by_outcome():
    """One collection of circles per plane: where the spheres cut it, kept solid, removed dashed, each in its
    outcome's colour."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from cryoves.engine.report.tomogram import OUTCOME_COLORS, _draw_plane, _Scene

    planes = {axis: np.zeros((20, 30)) for axis in range(3)}
    scene = _Scene(shape=(20, 20, 30), point=(10, 10, 15), background=planes, background_label="tomogram",
                   probability=None, centers_vox=np.array([[10.0, 5.0, 6.0], [11.0, 12.0, 20.0], [1.0, 5.0, 5.0]]),
                   radii_vox=np.array([3.0, 4.0, 2.0]), outcome=np.array(["kept", "removed", "kept"]),
                   voxel_size_a=10.0)
    ax = Figure().subplots()
    _draw_plane(ax, scene, planes, 0, "gray", None)
    (circles,) = ax.collections
    npt.assert_allclose(circles.get_offsets(), [[6, 5], [20, 12]])  # (x, y): the image's column and row
    npt.assert_allclose(circles.get_widths(), [6, 2 * np.sqrt(15)])  # where z = 10 cuts them
    npt.assert_allclose(circles.get_heights(), circles.get_widths())
    npt.assert_allclose(circles.get_edgecolor(), [to_rgba(OUTCOME_COLORS[o]) for o in ("kept", "removed")])
    solid, dashed = circles.get_linestyle()
    assert solid[1] is None and dashed[1] is not None


def test_circles_where_spheres_cut_a_plane():
    centers = np.array([[10.0, 20.0, 30.0], [30.0, 5.0, 6.0]])
    rows, in_plane, radii = circles_in_plane(centers, np.array([5.0, 2.0]), axis=0, index=13.0)
    assert rows.tolist() == [0]
    npt.assert_array_equal(in_plane, [[20.0, 30.0]])
    npt.assert_allclose(radii, [4.0])  # 3-4-5
    rows, in_plane, radii = circles_in_plane(centers, np.array([5.0, 2.0]), axis=2, index=6.0)
    assert rows.tolist() == [1]
    npt.assert_array_equal(in_plane, [[30.0, 5.0]])
    npt.assert_allclose(radii, [2.0])


def test_slab_is_the_mean_of_the_planes_clipped_to_the_volume():
    volume = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    npt.assert_array_equal(slab(volume, 0, 1, 1), volume[0:3].mean(axis=0))
    npt.assert_array_equal(slab(volume, 1, 0, 1), volume[:, 0:2].mean(axis=1))
    npt.assert_array_equal(slab(volume, 2, 1, 0), volume[:, :, 1])


def test_a_slab_of_a_mapped_tomogram_is_read_from_its_file(tmp_path, resident_mb, monkeypatch):
    """A plane across x of a mapped tomogram holds a few voxels of every row: read by groups of sections from the
    file, in parts of `_PART_BYTES`, the same numbers, and the 67 MB file stays out of resident memory (through
    the map, all of it became resident: +71 MB here, 1.1 GB at 1024x1024x261)."""
    monkeypatch.setattr(tomogram, "_PART_BYTES", 1 << 20)
    volume = np.random.default_rng(3).standard_normal((64, 512, 512)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", volume, 10.0)).data
    release_pages(mapped)
    before = resident_mb()
    planes = [slab(mapped, axis, 40, 1) for axis in range(3)]
    assert resident_mb() - before < 20  # the parts and planes (a few MB) in new memory
    for axis, plane in enumerate(planes):
        npt.assert_array_equal(plane, np.take(volume, [39, 40, 41], axis=axis).mean(axis=axis))


def test_stage_counts_follow_where_each_outcome_was_decided():
    table = pa.table({"outcome": ["kept", "removed", "removed", "repaired", "removed", "kept"],
                      "stage": ["final", "refine", "outliers", "outliers", "overlap", "final"],
                      "radius_nm": [20.0, np.nan, 18.0, 17.0, 9.0, 21.0]})
    counts = stage_counts(table)
    assert (counts.candidates, counts.after_sphere_fit, counts.after_outliers, counts.after_overlaps) == (6, 5, 4, 3)
    assert (counts.final, counts.repaired, counts.removed, counts.added, counts.deleted) == (3, 1, 3, 0, 0)
    assert [label for label, _ in counts.bars()][-1] == "after overlap check"


def test_stage_counts_with_edits_by_hand():
    table = pa.table({"outcome": ["kept", "removed", "removed", "kept", "kept", "removed"],
                      "stage": ["final", "refine", "deleted", "edited", "added", "overlap"],
                      "radius_nm": [20.0, np.nan, 18.0, 17.0, 19.0, 9.0]})
    counts = stage_counts(table)
    assert (counts.candidates, counts.after_sphere_fit, counts.after_outliers, counts.after_overlaps) == (5, 4, 4, 3)
    assert (counts.final, counts.removed, counts.added, counts.deleted) == (3, 3, 1, 1)
    assert counts.bars()[-1] == ("after edits by hand", 3)


def test_report_png_and_thumbnail(segmented_folder):
    out = segmented_folder(["alpha"])
    path = write_report(out, "alpha")
    assert path == out / "report" / "alpha.png"
    image, thumb = imread(path), imread(out / "report" / "alpha.thumb.png")
    assert image.shape[1] > 1000 and image.shape[0] > 800  # three rows of slices and the histograms
    assert thumb.shape[1] < 250
    assert np.std(image) > 0.05  # something is drawn


def test_report_without_the_input_tomogram_falls_back_to_the_probability_map(segmented_folder):
    out = segmented_folder(["alpha"])
    read_outputs(out, "alpha").tomogram_path.unlink()
    assert read_outputs(out, "alpha").tomogram_path is None
    assert write_report(out, "alpha").is_file()


def test_report_of_a_failed_or_unknown_tomogram_is_refused(segmented_folder):
    out = segmented_folder(["alpha"], failed=["gamma"])
    with pytest.raises(CryovesError, match="gamma: its run failed"):
        write_report(out, "gamma")
    with pytest.raises(CryovesError, match="no run record runs/delta.parquet"):
        write_report(out, "delta")


def test_checks_single_out_the_odd_tomogram():
    def row(name, n, radius=20.0, removed=0, threshold=0.85, warnings=()):
        return IndexRow(name, "ok", "", n, 0, removed, n + removed, radius, threshold, 1.0, warnings)

    rows = with_checks([row("a", 20), row("b", 22), row("c", 21), row("d", 5),
                        row("e", 20, radius=30.0, threshold=0.99), row("f", 20, removed=10, warnings=("inverted?",)),
                        IndexRow("g", "error", "unreadable", 0, 0, 0, 0, *[float("nan")] * 3, ())])
    checks = {r.name: r.checks for r in rows}
    assert checks["a"] == checks["b"] == checks["c"] == ()
    assert checks["d"] == ("5 vesicles against a run median of 20",)
    assert checks["e"] == ("median radius 30.0 nm against a run median of 20.0 nm",
                           "threshold 0.99 against a run median of 0.85")
    assert checks["f"] == ("inverted?", "10 of 30 candidates removed")
    assert checks["g"] == ("failed: unreadable",)


def test_index_lists_every_tomogram_offline(segmented_folder):
    out = segmented_folder(["alpha", "beta"], failed=["gamma"], warnings={"beta": ["the contrast looks inverted"]})
    for name in ("alpha", "beta"):
        write_report(out, name)
    page = write_index(out).read_text()
    assert [r.name for r in read_rows(out)] == ["alpha", "beta", "gamma"]
    rows = re.findall(r'<tr class="(\w*)">(.*?)</tr>', page)  # in name order: alpha, beta, gamma
    assert [css for css, _ in rows] == ["flagged", "flagged", "failed"]
    assert "2 of 5 candidates removed" in rows[0][1] and "inverted" not in rows[0][1]
    assert "the contrast looks inverted" in rows[1][1]
    assert "failed: voxel size 1.0 Å looks unset" in rows[2][1]
    assert 'src="alpha.thumb.png"' in page and 'href="beta.png"' in page
    assert "<script>" in page and "addEventListener" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from the network
    assert imread(out / "report" / "run.png").shape[1] > 800


def test_cli_report(segmented_folder, tmp_path, capsys):
    out = segmented_folder(["alpha", "beta"], failed=["gamma"])
    assert main(["report", str(out)]) == 0
    assert "3 tomograms; open" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "report").glob("*.png")) == [
        "alpha.png", "alpha.thumb.png", "beta.png", "beta.thumb.png", "run.png"]
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run records" in capsys.readouterr().err
