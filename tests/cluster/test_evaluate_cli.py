"""`cryoves evaluate` output a person can read (aligned columns, separate headers) and a script can parse (--json)."""

import json
import re

import numpy as np
import pyarrow.parquet as pq

from cryoves.cluster.cli import main
from cryoves.engine.io.mrc import write_labels
from cryoves.engine.scoring.evaluate import format_metrics

SHAPE = (24, 40, 40)
BALLS = [((8, 10, 12), 5), ((16, 28, 28), 6), ((12, 30, 9), 5)]


def _labels(balls):
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0)
    labels = np.zeros(SHAPE, np.uint16)
    for i, (center, radius) in enumerate(balls, start=1):
        labels[np.sum((grid - center) ** 2, axis=-1) <= radius**2] = i
    return labels


def _columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_format_metrics_aligns_every_column():
    rows = [{"prediction": "run/tomo.labels.mrc", "n_true_positive": 27, "n_false_positive": 0,
             "n_false_negative": 1, "precision": 1.0, "recall": 27 / 28, "f1": 54 / 55, "diameter_error": 0.0234,
             "center_residual_nm": 0.1234},
            {"prediction": "empty.mrc", "n_true_positive": 0, "n_false_positive": 0, "n_false_negative": 28,
             "precision": float("nan"), "recall": 0.0, "f1": 0.0, "diameter_error": float("nan"),
             "center_residual_nm": float("nan")}]
    header, first, second = format_metrics(rows).splitlines()
    assert _columns(header) == ["prediction", "TP", "FP", "FN", "precision", "recall", "F1", "diam. error",
                                "centre (nm)"]
    assert _columns(first) == ["run/tomo.labels.mrc", "27", "0", "1", "1.000", "0.964", "0.982", "0.023", "0.12"]
    assert _columns(second) == ["empty.mrc", "0", "0", "28", "-", "0.000", "0.000", "-", "-"]
    assert len(header) == len(first) == len(second)
    for title in _columns(header)[1:]:  # numbers end where their header ends
        end = header.index(title) + len(title)
        assert first[end - 1] != " " and second[end - 1] != " " and first[end:end + 1] in ("", " ")


def test_cli_table_and_json(tmp_path, capsys):
    truth = write_labels(tmp_path / "gt.mrc", _labels(BALLS), 20.0)
    pred = write_labels(tmp_path / "pred.mrc", _labels(BALLS[:2]), 20.0)
    empty = write_labels(tmp_path / "empty.mrc", _labels([]), 20.0)
    out = tmp_path / "metrics.parquet"
    assert main(["evaluate", str(pred), str(empty), str(truth), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _columns(lines[0])[:7] == ["prediction", "TP", "FP", "FN", "precision", "recall", "F1"]
    assert _columns(lines[1])[:7] == [str(pred), "2", "0", "1", "1.000", "0.667", "0.800"]
    assert _columns(lines[2])[:5] == [str(empty), "0", "0", "3", "-"]
    assert lines[-1] == f"metrics appended to {out}"

    assert main(["evaluate", str(pred), str(empty), str(truth), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["prediction"] for r in rows] == [str(pred), str(empty)]
    n_pred, n_truth = np.count_nonzero(_labels(BALLS[:2])), np.count_nonzero(_labels(BALLS))
    assert rows[0]["n_true_positive"] == 2 and rows[0]["recall"] == 2 / 3
    assert rows[0]["dice"] == (2 * n_pred + 1) / (n_pred + n_truth + 1)  # inside the truth; the reference's +1
    assert rows[1]["precision"] is None  # undefined without predictions: null, not NaN
    assert "metrics appended" in captured.err
    assert pq.read_table(out).num_rows == 4
