"""`cryoves segment` and `cryoves demo` end to end on phantoms, through the command line."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.cli import main
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.scoring.evaluate import evaluate, load_spheres
from cryoves.engine.synthetic.phantom import make_phantom, write_phantom


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    paths = write_phantom(folder, make_phantom((64, 160, 160), 22.0, seed=11), name="tomo")
    return paths


def _segment(phantom_files, out, *extra):
    return main(["segment", str(phantom_files["tomogram"]), "--out", str(out), *extra])


def test_segment_with_the_bundled_model(phantom_files, tmp_path, capsys):
    assert _segment(phantom_files, tmp_path, "--probability", "--truth", str(phantom_files["vesicles"])) == 0
    labels = read_volume(tmp_path / "tomo.labels.mrc")
    truth = read_volume(phantom_files["labels"])
    assert labels.data.shape == truth.data.shape and labels.voxel_size_a == truth.voxel_size_a
    (row,) = pq.read_table(tmp_path / "metrics" / "tomo.parquet").to_pylist()
    assert row["ground_truth"] == str(phantom_files["vesicles"]) and row["f1"] >= 0.95, row
    assert row["center_residual_nm"] <= 1.5 and row["diameter_error"] <= 0.05, row
    for name in ("tomo.prob.mrc", "tomo.mod", "vesicles/tomo.parquet", "runs/tomo.parquet", "report/tomo.png",
                 "report/index.html"):
        assert (tmp_path / name).is_file()
    assert "vesicles, threshold" in capsys.readouterr().out
    assert _segment(phantom_files, tmp_path) == 0
    assert "skipped" in capsys.readouterr().out


def test_segment_with_cryovesnet_weights(phantom_files, tmp_path, cryovesnet_weights):
    # their default σ = 1 pre-filter (the reference's) costs a little on this smooth fft-imaged phantom:
    # F1 0.92 here, 0.95 with --prefilter-sigma 0; on raw tilt-series phantoms it is what keeps them working
    assert _segment(phantom_files, tmp_path, "--weights", str(cryovesnet_weights)) == 0
    row = evaluate(load_spheres(tmp_path / "tomo.labels.mrc"), load_spheres(phantom_files["vesicles"]))
    assert row["f1"] >= 0.9, row


def test_origin_and_voxel_size_override_are_carried(tmp_path):
    phantom = make_phantom((32, 64, 64), 22.0, seed=2)
    tomo = write_volume(tmp_path / "raw.mrc", phantom.tomogram, 1.0, origin_a=(5.0, 6.0, 7.0))  # looks unset
    assert main(["segment", str(tomo), "--out", str(tmp_path / "out"), "--voxel-size", "22", "--no-report"]) == 0
    assert not (tmp_path / "out" / "report").exists()
    labels = read_volume(tmp_path / "out" / "raw.labels.mrc")
    assert labels.voxel_size_a == 22.0 and labels.origin_a == (5.0, 6.0, 7.0)


def test_region_restricts_detection_and_a_new_region_is_recomputed(phantom_files, tmp_path, capsys):
    region = np.zeros((64, 160, 160), np.uint8)
    region[:, :, :80] = 1
    mask = write_volume(tmp_path / "region.mrc", region, 22.0)
    assert _segment(phantom_files, tmp_path / "out", "--region", str(mask)) == 0
    labels = np.asarray(read_volume(tmp_path / "out" / "tomo.labels.mrc").data)
    assert labels.any() and not labels[:, :, 100:].any()
    assert _segment(phantom_files, tmp_path / "out", "--region", str(mask)) == 0
    assert "skipped" in capsys.readouterr().out
    region[:, :, 80:] = 1
    write_volume(mask, region, 22.0)
    assert _segment(phantom_files, tmp_path / "out", "--region", str(mask)) == 0
    assert "skipped" not in capsys.readouterr().out
    assert np.asarray(read_volume(tmp_path / "out" / "tomo.labels.mrc").data)[:, :, 100:].any()


def test_demo_runs_and_scores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--shape", "48", "128", "128"]) == 0
    out = capsys.readouterr().out
    assert "F1" in out and (tmp_path / "metrics.parquet").is_file()
