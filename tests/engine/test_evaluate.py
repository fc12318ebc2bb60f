import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import write_labels, write_volume
from cryoves.engine.scoring.evaluate import evaluate, load_spheres

SHAPE = (32, 48, 48)
BALLS = [((10, 12, 14), 5), ((20, 30, 30), 7), ((16, 36, 10), 6)]


def _render(balls, shape=SHAPE):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    labels = np.zeros(shape, np.uint16)
    for i, (center, radius) in enumerate(balls, start=1):
        labels[np.sum((grid - center) ** 2, axis=-1) <= radius**2] = i
    return labels


def _table(balls, voxel_size_a, outcome=None):
    table = pa.table({
        "center_z_vox": [float(c[0]) for c, _ in balls],
        "center_y_vox": [float(c[1]) for c, _ in balls],
        "center_x_vox": [float(c[2]) for c, _ in balls],
        "radius_nm": [r * voxel_size_a / 10 for _, r in balls],
    })
    if outcome:
        table = table.append_column("outcome", pa.array(outcome))
    return table.replace_schema_metadata({"voxel_size_a": str(voxel_size_a)})


def test_labels_against_table_with_a_missed_and_a_removed_vesicle(tmp_path):
    truth = tmp_path / "gt.parquet"
    pq.write_table(_table(BALLS, 20.0), truth)
    pred = tmp_path / "pred.mrc"
    write_labels(pred, _render([((11, 12, 14), 5), ((20, 30, 31), 7)]), 20.0)
    row = evaluate(load_spheres(pred), load_spheres(truth))
    assert (row["n_true_positive"], row["n_false_positive"], row["n_false_negative"]) == (2, 0, 1)
    assert row["center_residual_nm"] == pytest.approx(2.0)
    removed = tmp_path / "pred.parquet"
    pq.write_table(_table(BALLS, 20.0, outcome=["kept", "removed", "repaired"]), removed)
    row = evaluate(load_spheres(removed), load_spheres(truth))
    assert (row["n_true_positive"], row["n_false_negative"], row["diameter_error"]) == (2, 1, 0.0)


def test_dice_of_masks_and_probability(tmp_path):
    gt = write_labels(tmp_path / "gt.mrc", _render(BALLS), 20.0)
    row = evaluate(load_spheres(gt), load_spheres(gt), probability=(_render(BALLS) > 0).astype(np.float32))
    assert row["f1"] == 1.0 and row["dice"] == 1.0 and row["probability_dice"] == 1.0


def test_mismatched_grids_and_voxel_sizes_are_refused(tmp_path):
    gt = load_spheres(write_labels(tmp_path / "gt.mrc", _render(BALLS), 20.0))
    other = load_spheres(write_labels(tmp_path / "o.mrc", _render(BALLS, (32, 48, 50)), 20.0))
    with pytest.raises(CryovesError, match=r"prediction grid \(32, 48, 50\) differs"):
        evaluate(other, gt)
    coarse = load_spheres(write_labels(tmp_path / "c.mrc", _render(BALLS), 22.0))
    with pytest.raises(CryovesError, match="voxel sizes differ"):
        evaluate(coarse, gt)


def test_non_label_volume_is_refused(tmp_path, rng):
    path = write_volume(tmp_path / "tomo.mrc", rng.normal(size=(4, 4, 4)), 20.0)
    with pytest.raises(CryovesError, match="expected a label volume"):
        load_spheres(path)


def test_cli_prints_and_appends(tmp_path, capsys):
    gt = write_labels(tmp_path / "gt.mrc", _render(BALLS), 20.0)
    pred = write_labels(tmp_path / "pred.mrc", _render(BALLS[:2]), 20.0)
    out = tmp_path / "metrics.parquet"
    assert main(["evaluate", str(pred), str(gt), "--out", str(out)]) == 0
    assert main(["evaluate", str(gt), str(gt), "--out", str(out)]) == 0
    assert "pred.mrc" in capsys.readouterr().out
    table = pq.read_table(out).to_pylist()
    assert [r["n_false_negative"] for r in table] == [1, 0]
    assert main(["evaluate", str(gt)]) == 2
    assert main(["evaluate", str(tmp_path / "absent.mrc"), str(gt), "--out", str(out)]) == 2
