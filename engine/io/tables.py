"""Parquet tables: the documented vesicle schema and atomic writing with run metadata.

The README's "Vesicle table" section lists the same columns; a test keeps the two equal.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.io.atomic import atomic_output

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


def vesicle_table(vesicles: pa.Table, tomogram: str, voxel_size_a: float, origin_a) -> pa.Table:
    """The output table of one tomogram: refined vesicles plus name and centres in nm (origin applied)."""
    n = vesicles.num_rows
    columns = {"tomogram": pa.array([tomogram] * n, pa.string()),
               "vesicle_id": vesicles.column("id").cast(pa.int32())}
    for axis, origin in zip("zyx", origin_a):
        vox = vesicles.column(f"center_{axis}_vox").to_numpy().astype(np.float64)
        columns[f"center_{axis}_vox"] = vox
        columns[f"center_{axis}_nm"] = (vox * voxel_size_a + float(origin)) / 10.0
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
