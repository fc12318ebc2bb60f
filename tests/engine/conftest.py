"""A hand-made output folder, as `cryoves segment --probability` leaves it, for the report and export tests:
exact vesicle positions, no network."""

import numpy as np
import pyarrow as pa
import pytest

from cryoves.engine.io.mrc import write_labels, write_volume
from cryoves.engine.io.outputs import write_run_record
from cryoves.engine.io.tables import VESICLE_SCHEMA, write_table

SHAPE = (24, 40, 56)
VOXEL_SIZE_A = 16.0
VESICLES = [  # (z, y, x) voxels, radius nm, thickness nm, profile correlation, outcome, stage
    ((8.25, 12.5, 20.75), 4.0, 3.1, 0.91, "kept", "final"),
    ((9.0, 14.0, 31.5), 4.8, 3.4, 0.85, "kept", "final"),
    ((15.5, 27.25, 40.0), 3.6, 2.9, 0.77, "repaired", "outliers"),
    ((12.0, 30.0, 12.0), 2.4, 5.2, 0.21, "removed", "outliers"),
    ((5.0, 5.0, 50.0), 2.0, 3.0, 0.60, "removed", "overlap"),
]


def _table(name: str) -> pa.Table:
    rows = []
    for i, (center, radius, thickness, correlation, outcome, stage) in enumerate(VESICLES):
        rows.append({"tomogram": name, "vesicle_id": i + 1,
                     **{f"center_{a}_vox": c for a, c in zip("zyx", center)},
                     **{f"center_{a}_nm": c * VOXEL_SIZE_A / 10 for a, c in zip("zyx", center)},
                     "radius_nm": radius, "membrane_thickness_nm": thickness, "membrane_density": -1.0,
                     "profile_correlation": correlation, "mahalanobis_d2": 1.0, "p_value": 0.5,
                     "outcome": outcome, "stage": stage})
    return pa.Table.from_pylist(rows, schema=VESICLE_SCHEMA)


def _labels() -> np.ndarray:
    grid = np.indices(SHAPE).transpose(1, 2, 3, 0).astype(np.float64)
    labels = np.zeros(SHAPE, np.uint16)
    for i, (center, radius, *_, outcome, _) in enumerate(VESICLES):
        if outcome != "removed":
            labels[np.linalg.norm(grid - center, axis=-1) <= radius * 10 / VOXEL_SIZE_A] = i + 1
    return labels


@pytest.fixture
def segmented_folder(tmp_path, rng):
    """make(names, failed=(), warnings={}) -> an output folder with those tomograms segmented (and those
    in `failed` as error rows, as `cryoves run` records them)."""

    def make(names=("alpha", "beta"), failed=(), warnings=None):
        out = tmp_path / "out"
        labels = _labels()
        for name in names:
            tomogram = write_volume(tmp_path / "in" / f"{name}.mrc", rng.normal(size=SHAPE), VOXEL_SIZE_A)
            write_labels(out / f"{name}.labels.mrc", labels, VOXEL_SIZE_A)
            write_volume(out / f"{name}.prob.mrc", (labels > 0).astype(np.float32), VOXEL_SIZE_A)
            write_table(out / "vesicles" / f"{name}.parquet", _table(name),
                        {"voxel_size_a": VOXEL_SIZE_A, "origin_a": [0.0, 0.0, 0.0]})
            write_run_record(out, name, {"input": str(tomogram), "voxel_size_a": VOXEL_SIZE_A, "tomogram": name,
                                         "status": "ok", "error": "", "threshold": 0.85, "n_vesicles": 3,
                                         "total_seconds": 1.5, "warnings": (warnings or {}).get(name, [])})
        for name in failed:
            write_run_record(out, name, {"tomogram": name, "input": f"/data/{name}.mrc", "status": "error",
                                         "error": "voxel size 1.0 Å looks unset; pass --voxel-size"})
        return out

    return make
