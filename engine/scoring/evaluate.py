"""`cryoves evaluate`: load predictions and ground truth (label MRCs or vesicle tables) and score them."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.tables import active_mask, write_table
from cryoves.engine.scoring.matching import dice, match_vesicles, spheres_from_labels
from cryoves.engine.units import nm_to_vox

VOXEL_SIZE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Spheres:
    """Vesicles as spheres on a voxel grid; `labels` is set when they came from a label volume."""

    centers_vox: np.ndarray
    radii_vox: np.ndarray
    voxel_size_a: float
    labels: np.ndarray | None = None


def load_spheres(path, voxel_size_a: float | None = None) -> Spheres:
    """Read vesicles from a label MRC or a vesicle table (.parquet; rows marked removed are skipped)."""
    path = Path(path)
    if path.suffix == ".parquet" or path.is_dir():
        return _spheres_from_table(path, voxel_size_a)
    volume = read_volume(path, voxel_size_a)
    labels = np.asarray(volume.data)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise CryovesError(f"{path}: holds non-integer values; expected a label volume (0 background, 1..n vesicles)")
    labels = labels.astype(np.int64)
    _, centers, radii = spheres_from_labels(labels)
    return Spheres(centers, radii, volume.voxel_size_a, labels)


def evaluate(prediction: Spheres, truth: Spheres, probability: np.ndarray | None = None) -> dict:
    """Object-wise metrics, plus the Dice of the masks and of the probability map when available."""
    if abs(prediction.voxel_size_a - truth.voxel_size_a) > VOXEL_SIZE_TOLERANCE * truth.voxel_size_a:
        raise CryovesError(
            f"voxel sizes differ: prediction {prediction.voxel_size_a:g} Å, ground truth {truth.voxel_size_a:g} Å; "
            "evaluate on the same grid"
        )
    row = match_vesicles(prediction.centers_vox, prediction.radii_vox, truth.centers_vox, truth.radii_vox,
                         truth.voxel_size_a).as_row()
    if prediction.labels is not None and truth.labels is not None:
        _check_same_grid(prediction.labels.shape, truth.labels.shape, "prediction")
        row["dice"] = dice(prediction.labels, truth.labels)
    if probability is not None:
        if truth.labels is None:
            raise CryovesError("probability-map Dice needs the ground truth as a label MRC")
        _check_same_grid(probability.shape, truth.labels.shape, "probability map")
        row["probability_dice"] = dice(np.asarray(probability, dtype=np.float32), truth.labels)
    return row


METRIC_COLUMNS = (
    ("n_true_positive", "TP", "d"),
    ("n_false_positive", "FP", "d"),
    ("n_false_negative", "FN", "d"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("f1", "F1", ".3f"),
    ("diameter_error", "diam. error", ".3f"),
    ("center_residual_nm", "centre (nm)", ".2f"),
    ("dice", "Dice", ".3f"),
    ("probability_dice", "prob. Dice", ".3f"),
)
"""(key of an `evaluate` row, column header, number format) in the order `format_metrics` prints them."""
METRICS_LEGEND = ("TP, FP, FN: true positives, false positives, false negatives (one-to-one matching); "
                  "diam. error: mean relative diameter error over TPs; centre: mean centre distance over TPs")


def format_metrics(rows: list[dict]) -> str:
    """Metric rows as an aligned text table: the `prediction` column, then each metric that some row has
    (headers right-aligned over their numbers, two spaces apart; '-' where a value is missing or undefined)."""
    shown = [(key, header, spec) for key, header, spec in METRIC_COLUMNS if any(key in row for row in rows)]
    table = [["prediction", *(header for _, header, _ in shown)]]
    for row in rows:
        table.append([str(row["prediction"]), *(_format_value(row.get(key), spec) for key, _, spec in shown)])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:]))])
             for line in table]
    return "\n".join(lines)


def _format_value(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


TRUTH_SUFFIXES = (".labels.mrc", ".vesicles.parquet")
"""How ground truth is named beside a batch: NAME.labels.mrc, else NAME.vesicles.parquet (as `phantom` writes)."""


def write_metrics(out_dir, name: str, prediction_path, truth_path) -> Path:
    """Score one tomogram's labels against its ground truth into `metrics/NAME.parquet`."""
    row = {"tomogram": name, "prediction": str(prediction_path), "ground_truth": str(truth_path)}
    row |= evaluate(load_spheres(prediction_path), load_spheres(truth_path))
    return write_table(Path(out_dir) / "metrics" / f"{name}.parquet", pa.Table.from_pylist([row]))


def _check_same_grid(shape, truth_shape, what: str) -> None:
    if tuple(shape) != tuple(truth_shape):
        raise CryovesError(f"{what} grid {tuple(shape)} differs from the ground truth grid {tuple(truth_shape)}")


def _spheres_from_table(path: Path, voxel_size_a: float | None) -> Spheres:
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as error:
        raise CryovesError(f"{path}: not a readable Parquet table ({error})") from error
    metadata = table.schema.metadata or {}
    if voxel_size_a is None:
        if b"voxel_size_a" not in metadata:
            raise CryovesError(f"{path}: the table does not record its voxel size; pass --voxel-size in Å")
        voxel_size_a = float(metadata[b"voxel_size_a"])
    needed = ["center_z_vox", "center_y_vox", "center_x_vox", "radius_nm"]
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise CryovesError(f"{path}: missing columns {', '.join(missing)}; expected a cryoves vesicle table")
    if "tomogram" in table.column_names and len(set(table.column("tomogram").to_pylist())) > 1:
        raise CryovesError(f"{path}: holds several tomograms; evaluate one tomogram's table at a time")
    if "outcome" in table.column_names:
        table = table.filter(active_mask(table))
    centers = np.column_stack([table.column(name).to_numpy() for name in needed[:3]]).astype(np.float64)
    radii = nm_to_vox(table.column("radius_nm").to_numpy().astype(np.float64), voxel_size_a)
    return Spheres(centers.reshape(-1, 3), radii, voxel_size_a)
