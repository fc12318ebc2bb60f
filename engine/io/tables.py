"""Parquet tables: the documented vesicle schema, the one way to read centres, radii and the active
rows of any vesicle table, and atomic writing with run metadata.

The README's "Vesicle table" section lists the same columns; a test keeps the two equal.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.units import nm_to_vox

VESICLE_SCHEMA = pa.schema([
    ("tomogram", pa.string()),
    ("vesicle_id", pa.int32()),
    ("center_z_vox", pa.float64()),
    ("center_y_vox", pa.float64()),
    ("center_x_vox", pa.float64()),
    ("center_z_nm", pa.float64()),
    ("center_y_nm", pa.float64()),
    ("center_x_nm", pa.float64()),
    ("radius_nm", pa.float64()),
    ("membrane_thickness_nm", pa.float64()),
    ("membrane_density", pa.float64()),
    ("profile_correlation", pa.float64()),
    ("mahalanobis_d2", pa.float64()),
    ("p_value", pa.float64()),
    ("outcome", pa.string()),
    ("stage", pa.string()),
])
"""One row per vesicle found; `outcome` is kept, repaired or removed; `stage` is where that was decided."""

CENTER_COLUMNS = ("center_z_vox", "center_y_vox", "center_x_vox")
"""A vesicle's centre, voxels of the input grid (z, y, x), in every vesicle table."""
ACTIVE_OUTCOMES = ("kept", "repaired")
"""Outcomes of the vesicles that are drawn in the label volumes and counted as found."""


def centers_vox(table: pa.Table) -> np.ndarray:
    """(n, 3) float64 centres (z, y, x voxels) of every row."""
    return np.column_stack([table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                            for name in CENTER_COLUMNS]).reshape(-1, 3)


def radii_vox(table: pa.Table, voxel_size_a: float | None = None) -> np.ndarray:
    """(n,) float64 radii in voxels of every row: `radius_vox`, or `radius_nm` at `voxel_size_a` in a
    table without it (the output schema)."""
    if "radius_vox" in table.column_names:
        return table.column("radius_vox").to_numpy(zero_copy_only=False).astype(np.float64)
    if voxel_size_a is None:
        raise ValueError("a table without radius_vox needs voxel_size_a")
    return nm_to_vox(table.column("radius_nm").to_numpy(zero_copy_only=False).astype(np.float64), voxel_size_a)


def active_mask(table: pa.Table) -> np.ndarray:
    """Rows of the vesicles found: outcome kept or repaired, with a finite radius."""
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    radius = table.column("radius_nm").to_numpy(zero_copy_only=False).astype(np.float64)
    return np.isin(outcome, ACTIVE_OUTCOMES) & np.isfinite(radius)


def vesicle_table(vesicles: pa.Table, tomogram: str, voxel_size_a: float, origin_a) -> pa.Table:
    """The output table of one tomogram: refined vesicles plus name and centres in nm (origin applied)."""
    n = vesicles.num_rows
    columns = {"tomogram": pa.array([tomogram] * n, pa.string()),
               "vesicle_id": vesicles.column("id").cast(pa.int32())}
    centers = centers_vox(vesicles)
    for a, (column, origin) in enumerate(zip(CENTER_COLUMNS, origin_a)):
        columns[column] = centers[:, a]
        columns[column.replace("_vox", "_nm")] = (centers[:, a] * voxel_size_a + float(origin)) / 10.0  # origin in Å
    for field in VESICLE_SCHEMA:
        if field.name not in columns:
            columns[field.name] = vesicles.column(field.name).cast(field.type)
    return pa.table(columns, schema=VESICLE_SCHEMA)


def write_table(path, table: pa.Table, metadata: dict | None = None) -> Path:
    """Write a Parquet file atomically; `metadata` values are stored JSON-encoded in the schema."""
    if metadata:
        encoded = {key: json.dumps(value) for key, value in metadata.items()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **encoded})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_metadata(path) -> dict:
    """The JSON-encoded metadata that `write_table` stored."""
    raw = pq.read_schema(path).metadata or {}
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key.decode()] = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return decoded
