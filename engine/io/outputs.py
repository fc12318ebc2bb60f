"""What one segmented tomogram leaves in the output folder, each file written atomically.

Per tomogram NAME: `NAME.labels.mrc` (final vesicles on the input grid), optionally `NAME.prob.mrc`
and the earlier stages' labels, `NAME.mod` (IMOD points with radii), `vesicles/NAME.parquet` (the
vesicle table; the folder reads as one Parquet dataset) and, written last by `cryoves.engine.job`,
`runs/NAME.parquet`: the run record whose presence, input checksum and parameter digest tell a
resumed run that the outputs are complete and current.

The outputs of a tomogram change as a set: `begin_outputs` marks the run record failed before the
first new file lands, so a rewrite interrupted anywhere (Ctrl-C, a full disk, SIGKILL) is redone by
the next run instead of trusted, and removes what the new set will not overwrite.
"""

import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
from collections.abc import Collection
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import remove_stale_parts
from cryoves.engine.io.imod import write_vesicle_model
from cryoves.engine.io.mrc import Volume, write_label_sections, write_labels, write_volume
from cryoves.engine.io.tables import vesicle_table, write_table
from cryoves.engine.network.inference import probability_on_input_grid
from cryoves.engine.stages.overlaps import label_slabs, rendered_spheres

STAGE_LABELS = ("global", "local", "sphere")
"""The label volumes of the earlier stages, written as NAME.STAGE.mrc when asked for."""
_PACKAGES = ("cryoves", "numpy", "scipy", "numba", "tensorflow", "keras", "pyarrow", "mrcfile")


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


def params_digest(params, voxel_size_a: float, weights_sha256: str) -> str:
    """A digest of everything besides the input that decides the result; the memory budget only decides
    the tiling, which the map does not depend on, and its default differs between machines."""
    decisive = asdict(params)
    decisive["inference"].pop("memory_gb", None)
    text = json.dumps({"params": decisive, "voxel_size_a": voxel_size_a, "weights": weights_sha256},
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


def output_files(name: str, *, probability: bool = False, stages: bool = False, pyto: bool = False,
                 metrics: bool = False) -> dict[str, str]:
    """The files of tomogram `name` by kind, relative to the output folder, for the outputs asked for
    (the run record aside): what `cryoves.engine.job.finish` writes and a resumed run looks for."""
    files = {"labels": f"{name}.labels.mrc"}
    if probability:
        files["probability"] = f"{name}.prob.mrc"
    for stage in STAGE_LABELS if stages else ():
        files[stage] = f"{name}.{stage}.mrc"
    files |= {"model": f"{name}.mod", "vesicles": f"vesicles/{name}.parquet"}
    if pyto:
        files |= {"pyto_labels": f"{name}.pyto.mrc", "pyto_model": f"{name}.pyto.mod"}
    if metrics:
        files["metrics"] = f"metrics/{name}.parquet"
    return files


RUNS = "runs"
"""The folder of the run records, runs/NAME.parquet."""


def check_out_dir(out_dir) -> Path:
    """`out_dir`, created if missing, once a file could be written into it (and into its existing runs/
    and vesicles/ folders): an output folder that is a file, lies under one or is read-only is refused in
    one line before any work, not after it."""
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is a file, not a folder" if folder == out_dir else f"lies under the file {folder}"
                raise CryovesError(f"{out_dir}: the output folder {where}; pass a folder for --out")
            break
    for folder in (out_dir, out_dir / RUNS, out_dir / "vesicles"):
        if folder != out_dir and not folder.exists():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".cryoves-write-check.", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise CryovesError(f"{folder}: cannot write into this folder ({error.strerror or error}); "
                               "check its permissions and free space, or pass another --out") from error
    return out_dir


def begin_outputs(out_dir, name: str, record: dict, keep: Collection[str]) -> None:
    """Before the first file of a new output set of tomogram `name` lands: replace its run record by
    `record` (a failed one, so that whatever an interruption leaves is redone, never trusted), remove
    the temporary files that interrupted writes left, and remove its earlier outputs that are not in
    `keep` (`output_files` of the new set), which would otherwise sit beside it as if they belonged."""
    out_dir = Path(out_dir)
    write_run_record(out_dir, name, record)
    every = output_files(name, probability=True, stages=True, pyto=True, metrics=True)
    for relative in every.values():
        remove_stale_parts(out_dir / relative)
        if relative not in keep:
            (out_dir / relative).unlink(missing_ok=True)
    remove_stale_parts(run_record_path(out_dir, name))


def write_outputs(out_dir, name: str, volume: Volume, result, *, probability: bool = False,
                  stages: bool = False) -> dict[str, Path]:
    """Write the volumes, IMOD model and vesicle table of one segmented tomogram
    (`cryoves.engine.pipeline.Segmentation`) under their `output_files` names; the run record is the
    caller's to write, last.

    `probability` adds NAME.prob.mrc (resampled to the input grid); `stages` the label volumes of the earlier stages
    (NAME.global/local/sphere.mrc), for per-stage evaluation.
    """
    out_dir = Path(out_dir)
    files = {kind: out_dir / relative
             for kind, relative in output_files(name, probability=probability, stages=stages).items()}
    vesicles = number_vesicles(result.vesicles)
    _, centers, radii = rendered_spheres(vesicles)
    shape = volume.data.shape
    paths = {"labels": write_vesicle_labels(files["labels"], shape, vesicles, volume.voxel_size_a, volume.origin_a)}
    if probability:
        on_input_grid = probability_on_input_grid(result.probability, shape)
        paths["probability"] = write_volume(files["probability"], on_input_grid, volume.voxel_size_a, volume.origin_a)
    for stage in STAGE_LABELS if stages else ():
        paths[stage] = write_labels(files[stage], result.labels[stage], volume.voxel_size_a, volume.origin_a)
    table = vesicle_table(vesicles, name, volume.voxel_size_a, volume.origin_a)
    paths["model"] = write_vesicle_model(files["model"], centers, radii, shape, volume.voxel_size_a)
    paths["vesicles"] = write_table(files["vesicles"], table,
                                    {"voxel_size_a": volume.voxel_size_a, "origin_a": list(volume.origin_a)})
    return paths


def write_vesicle_labels(path, shape, vesicles: pa.Table, voxel_size_a: float, origin_a) -> Path:
    """The label file of the kept and repaired `vesicles` (labels 1..n, `render_labels`), rendered and written by
    z-slabs (`label_slabs`): the volume never exists whole."""
    n_labels = len(rendered_spheres(vesicles)[2])
    return write_label_sections(path, shape, n_labels, label_slabs(shape, vesicles), voxel_size_a, origin_a)


def number_vesicles(vesicles: pa.Table) -> pa.Table:
    """Renumber `id` so the rendered (kept/repaired) rows are 1..n in table order, their value in the
    label volume, and removed rows follow (they appear in no label volume)."""
    rendered, _, _ = rendered_spheres(vesicles)
    ids = np.empty(len(rendered), np.int32)
    ids[rendered] = np.arange(1, rendered.sum() + 1)
    ids[~rendered] = np.arange(rendered.sum() + 1, len(rendered) + 1)
    return vesicles.set_column(vesicles.schema.get_field_index("id"), "id", pa.array(ids))


def run_record_path(out_dir, name: str) -> Path:
    return Path(out_dir) / RUNS / f"{name}.parquet"


def write_run_record(out_dir, name: str, row: dict) -> Path:
    """One row in `runs/NAME.parquet`; nested values (parameters, timings, versions) as JSON text."""
    flat = {key: json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else value
            for key, value in row.items()}
    return write_table(run_record_path(out_dir, name), pa.Table.from_pylist([flat]))


def read_run_record(out_dir, name: str) -> dict | None:
    """The run record of tomogram `name`, or None when there is none (or none that can be read)."""
    path = run_record_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).to_pylist()[0]
    except (OSError, ValueError, IndexError):  # not a record cryoves wrote whole: nothing is known to be done
        return None
