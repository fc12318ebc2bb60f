"""What one segmented tomogram leaves in the output folder, each file written atomically.

Per tomogram NAME: `NAME.labels.mrc` (final vesicles on the input grid), optionally `NAME.prob.mrc`
and the earlier stages' labels, `NAME.mod` (IMOD points with radii), `vesicles/NAME.parquet` (the
vesicle table; the folder reads as one Parquet dataset) and, written last by `cryoves.engine.job`,
`runs/NAME.parquet`: the run record whose presence, input checksum and parameter digest tell a
resumed run that the outputs are complete and current.
"""

import hashlib
import json
import platform
import resource
import sys
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.io.imod import write_vesicle_model
from cryoves.engine.io.mrc import Volume, write_labels, write_volume
from cryoves.engine.io.tables import vesicle_table, write_table
from cryoves.engine.stages.overlaps import rendered_spheres

STAGE_LABELS = ("global", "local", "sphere")
"""The label volumes of the earlier stages, written as NAME.STAGE.mrc when asked for."""
_PACKAGES = ("cryoves", "numpy", "scipy", "numba", "tensorflow", "keras", "pyarrow", "mrcfile")
_CHUNK_BYTES = 1 << 24


def tomogram_name(path) -> str:
    """The file name without its last extension: `tomo.rec.mrc` -> `tomo.rec`."""
    return Path(path).name.rsplit(".", 1)[0]


def companion_file(folder, name: str, suffixes) -> Path | None:
    """The first of NAME + suffix that exists in `folder` (ground truth, region masks beside a batch)."""
    for suffix in suffixes:
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def file_sha256(path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def params_digest(params, voxel_size_a: float, weights_sha256: str) -> str:
    """A digest of everything besides the input that decides the result."""
    text = json.dumps({"params": asdict(params), "voxel_size_a": voxel_size_a, "weights": weights_sha256},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the result."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


def write_outputs(out_dir, name: str, volume: Volume, result, *, probability: bool = False,
                  stages: bool = False) -> dict[str, Path]:
    """Write the volumes, IMOD model and vesicle table of one segmented tomogram
    (`cryoves.engine.pipeline.Segmentation`); the run record is the caller's to write, last.

    `probability` adds NAME.prob.mrc; `stages` the label volumes of the earlier stages
    (NAME.global/local/sphere.mrc), for per-stage evaluation.
    """
    out_dir = Path(out_dir)
    paths = {"labels": write_labels(out_dir / f"{name}.labels.mrc", result.labels["final"],
                                    volume.voxel_size_a, volume.origin_a)}
    if probability:
        paths["probability"] = write_volume(out_dir / f"{name}.prob.mrc", result.probability,
                                            volume.voxel_size_a, volume.origin_a)
    for stage in STAGE_LABELS if stages else ():
        paths[stage] = write_labels(out_dir / f"{name}.{stage}.mrc", result.labels[stage],
                                    volume.voxel_size_a, volume.origin_a)
    vesicles = number_vesicles(result.vesicles)
    table = vesicle_table(vesicles, name, volume.voxel_size_a, volume.origin_a)
    _, centers, radii = rendered_spheres(vesicles)
    paths["model"] = write_vesicle_model(out_dir / f"{name}.mod", centers, radii, volume.data.shape,
                                         volume.voxel_size_a)
    paths["vesicles"] = write_table(out_dir / "vesicles" / f"{name}.parquet", table,
                                    {"voxel_size_a": volume.voxel_size_a, "origin_a": list(volume.origin_a)})
    return paths


def number_vesicles(vesicles: pa.Table) -> pa.Table:
    """Renumber `id` so the rendered (kept/repaired) rows are 1..n in table order, their value in the
    label volume, and removed rows follow (they appear in no label volume)."""
    rendered, _, _ = rendered_spheres(vesicles)
    ids = np.empty(len(rendered), np.int32)
    ids[rendered] = np.arange(1, rendered.sum() + 1)
    ids[~rendered] = np.arange(rendered.sum() + 1, len(rendered) + 1)
    return vesicles.set_column(vesicles.schema.get_field_index("id"), "id", pa.array(ids))


def write_run_record(out_dir, name: str, row: dict) -> Path:
    """One row in `runs/NAME.parquet`; nested values (parameters, timings, versions) as JSON text."""
    flat = {key: json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else value
            for key, value in row.items()}
    return write_table(Path(out_dir) / "runs" / f"{name}.parquet", pa.Table.from_pylist([flat]))


def read_run_record(out_dir, name: str) -> dict | None:
    """The run record of tomogram `name`, or None when there is none."""
    path = Path(out_dir) / "runs" / f"{name}.parquet"
    if not path.is_file():
        return None
    return pq.read_table(path).to_pylist()[0]
