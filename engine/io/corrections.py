"""Vesicles corrected by hand (added, deleted, moved or resized), saved back into every output of a tomogram.

The corrected vesicles replace the kept ones: the vesicle table marks what changed (column `stage`:
`added`, `deleted` or `edited`), the labels and the IMOD model are drawn again from the kept spheres
(Pyto's files and the scores against the ground truth too, where the run made them), and the run
record counts the vesicles anew and lists each correction under `edits`. While the files are being
rewritten the run record says the run failed, so an interrupted save is redone by the next run
instead of being trusted half-written.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io import tables
from cryoves.engine.io.imod import write_vesicle_model
from cryoves.engine.io.mrc import Volume, read_volume
from cryoves.engine.io.outputs import number_vesicles, read_run_record, write_run_record, write_vesicle_labels
from cryoves.engine.io.pyto import write_pyto
from cryoves.engine.job import load_region
from cryoves.engine.scoring.evaluate import write_metrics
from cryoves.engine.stages.overlaps import render_labels, rendered_spheres
from cryoves.engine.units import vox_to_nm

EDIT_STAGES = ("added", "deleted", "edited")
"""`stage` of a row changed by hand: a vesicle added (outcome kept), deleted (outcome removed), or moved or
resized (outcome unchanged)."""
MEASUREMENTS = ("membrane_thickness_nm", "membrane_density", "profile_correlation", "mahalanobis_d2", "p_value")
"""Columns measured on the fitted sphere: NaN for a vesicle added, moved or resized by hand."""
EDIT_TOLERANCE_VOX = 1e-3
"""A centre or radius that moved by less than this (voxels) is unchanged: display round-off, not an edit."""
NEW_VESICLE = 0
"""The vesicle id that marks a vesicle added by hand."""


@dataclass(frozen=True)
class Correction:
    """What a saved correction changed, and the files it rewrote."""

    added: int
    deleted: int
    edited: int
    n_vesicles: int            # kept and repaired after the correction
    paths: dict[str, Path]


def corrected_table(table: pa.Table, vesicle_ids, centers_vox, radii_vox, voxel_size_a: float,
                    origin_a) -> tuple[pa.Table, dict[str, int]]:
    """The vesicle table (output schema) after a correction, and the count of each kind of edit.

    `vesicle_ids[i]` is the `vesicle_id` of a kept or repaired row, whose sphere becomes
    (`centers_vox[i]`, `radii_vox[i]`), or `NEW_VESICLE` for a vesicle added by hand (appended as kept).
    Kept and repaired rows not listed become removed; removed rows stay as they are. `vesicle_id` is
    renumbered as the pipeline numbers it: kept and repaired rows 1..n in table order, the rest after.
    """
    ids = np.asarray(vesicle_ids, dtype=np.int64).reshape(-1)
    centers = np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(radii_vox, dtype=np.float64).reshape(-1)
    if not len(ids) == len(centers) == len(radii):
        raise ValueError(f"{len(ids)} ids, {len(centers)} centres and {len(radii)} radii: one of each per vesicle")
    bad = ~(np.isfinite(centers).all(axis=1) & (radii > 0))
    if bad.any():
        raise CryovesError(f"vesicle at (z, y, x) {centers[bad][0].round(1).tolist()} voxels has radius "
                           f"{radii[bad][0]:g}: give every vesicle a finite centre and a radius > 0")
    existing = table.column("vesicle_id").to_numpy().astype(np.int64)
    active = tables.active_mask(table)
    listed = ids[ids != NEW_VESICLE]
    values, times = np.unique(listed, return_counts=True)
    if (times > 1).any():
        raise ValueError(f"vesicle ids listed more than once: {values[times > 1].tolist()}")
    unknown = np.setdiff1d(listed, existing[active])
    if unknown.size:
        raise ValueError(f"vesicle ids {unknown.tolist()} are not kept or repaired vesicles of the table")

    row_of = {int(vid): row for row, vid in enumerate(existing)}
    rows = np.array([row_of[int(vid)] for vid in listed], dtype=np.int64)
    given = ids != NEW_VESICLE
    old_centers, old_radii = tables.centers_vox(table), tables.radii_vox(table, voxel_size_a)
    moved = np.zeros(len(existing), dtype=bool)
    moved[rows] = (np.abs(centers[given] - old_centers[rows]).max(axis=1) > EDIT_TOLERANCE_VOX) | (
        np.abs(radii[given] - old_radii[rows]) > EDIT_TOLERANCE_VOX)
    new_centers, new_radii = old_centers.copy(), old_radii.copy()  # unchanged rows keep their values exactly
    new_centers[moved], new_radii[moved] = centers[given][moved[rows]], radii[given][moved[rows]]
    radius_nm = table.column("radius_nm").to_numpy(zero_copy_only=False).astype(np.float64)
    radius_nm[moved] = vox_to_nm(new_radii[moved], voxel_size_a)
    deleted = active & ~np.isin(existing, listed)
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    stage = np.asarray(table.column("stage").to_pylist(), dtype=object)
    outcome[deleted], stage[deleted], stage[moved] = "removed", "deleted", "edited"

    n_added = int((~given).sum())
    columns = {"id": np.concatenate([existing, np.zeros(n_added, np.int64)]).astype(np.int32),
               "radius_vox": np.concatenate([new_radii, radii[~given]]),
               "outcome": np.concatenate([outcome, ["kept"] * n_added]).tolist(),
               "stage": np.concatenate([stage, ["added"] * n_added]).tolist()}
    for axis, name in enumerate(tables.CENTER_COLUMNS):
        columns[name] = np.concatenate([new_centers[:, axis], centers[~given, axis]])
    columns["radius_nm"] = np.concatenate([radius_nm, vox_to_nm(radii[~given], voxel_size_a)])
    for name in MEASUREMENTS:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        values[moved] = np.nan
        columns[name] = np.concatenate([values, np.full(n_added, np.nan)])
    vesicles = number_vesicles(pa.table(columns))
    counts = {"added": n_added, "deleted": int(deleted.sum()), "edited": int(moved.sum())}
    return vesicles, counts


def apply_corrections(out_dir, name: str, vesicle_ids, centers_vox, radii_vox, *, tool: str) -> Correction:
    """Make the kept vesicles of tomogram `name` in `out_dir` the given spheres (see `corrected_table`)
    and rewrite its outputs to match: vesicle table, labels, IMOD model, Pyto files and scores where
    the run made them, and the run record last, with this correction appended to its `edits`.

    `tool` names what the correction was made with (recorded in the edit).
    """
    out_dir = Path(out_dir)
    record = read_run_record(out_dir, name)
    if record is None or record.get("status") != "ok":
        raise CryovesError(f"{out_dir}: tomogram {name} has no finished run (runs/{name}.parquet); segment it first")
    table_path, labels_path = out_dir / "vesicles" / f"{name}.parquet", out_dir / f"{name}.labels.mrc"
    for path in (table_path, labels_path):
        if not path.is_file():
            raise CryovesError(f"{path}: missing, although runs/{name}.parquet says the run finished")
    metadata = tables.read_metadata(table_path)
    voxel_size_a, origin_a = float(metadata["voxel_size_a"]), tuple(metadata["origin_a"])
    shape = read_volume(labels_path, voxel_size_a).data.shape
    outputs = json.loads(record.get("outputs") or "{}")
    region = _pyto_region(record, outputs, shape, voxel_size_a)

    vesicles, counts = corrected_table(pq.read_table(table_path), vesicle_ids, centers_vox, radii_vox,
                                       voxel_size_a, origin_a)
    _, centers, radii = rendered_spheres(vesicles)
    n_vesicles = len(radii)
    table = tables.vesicle_table(vesicles, name, voxel_size_a, origin_a)
    write_run_record(out_dir, name, record | {
        "status": "error", "error": f"interrupted while saving corrections made in {tool}; segment it again"})
    paths = {
        "labels": write_vesicle_labels(labels_path, shape, vesicles, voxel_size_a, origin_a),
        "model": write_vesicle_model(out_dir / f"{name}.mod", centers, radii, shape, voxel_size_a),
        "vesicles": tables.write_table(table_path, table, metadata),
    }
    if region is not None:  # Pyto's files are drawn from the whole label volume
        labels = render_labels(shape, vesicles)
        region_model = Path(record["region"]) if record["region"].lower().endswith(".mod") else None
        paths |= write_pyto(out_dir, name, Volume(labels, voxel_size_a, origin_a), labels, centers, radii, region,
                            region_model, outputs.get("active_zone"))
    paths |= _rescore(out_dir, name, labels_path, record.get("truth") or "")
    edit = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "tool": tool, **counts,
            "n_vesicles": n_vesicles}
    paths["run"] = write_run_record(out_dir, name, record | {
        "n_vesicles": n_vesicles, "edits": [*json.loads(record.get("edits") or "[]"), edit]})
    return Correction(**counts, n_vesicles=n_vesicles, paths=paths)


def _pyto_region(record: dict, outputs: dict, shape, voxel_size_a: float) -> np.ndarray | None:
    """The segmentation region, when the run wrote Pyto's files (which hold it); checked before any write."""
    if not outputs.get("pyto"):
        return None
    for path in (record.get("region"), outputs.get("active_zone")):
        if path and not Path(path).is_file():
            raise CryovesError(f"{path}: not found, and the Pyto files of {record['tomogram']} are drawn with it; "
                               "put it back where the run found it")
    return load_region(record["region"], shape, voxel_size_a)


def _rescore(out_dir: Path, name: str, labels_path: Path, truth: str) -> dict[str, Path]:
    """Score the corrected labels against the run's ground truth; a score whose truth has gone is deleted."""
    if truth and Path(truth).is_file():
        return {"metrics": write_metrics(out_dir, name, labels_path, truth)}
    (out_dir / "metrics" / f"{name}.parquet").unlink(missing_ok=True)
    return {}
