"""One tomogram file to its outputs, skipping work whose outputs are complete and current.

`cryoves segment` runs `segment_file` per tomogram in-process; `cryoves run` composes the same
pieces (`prepare_job`, `is_done`, the stage functions, `write_outputs`) across Ray workers.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.imod import rasterise_region
from cryoves.engine.io.mrc import Volume, read_volume
from cryoves.engine.io.outputs import file_sha256, params_digest, read_run_record, tomogram_name, write_outputs
from cryoves.engine.io.pyto import write_pyto
from cryoves.engine.network.inference import LogitFn
from cryoves.engine.pipeline import Progress, SegmentParams, segment
from cryoves.engine.stages.overlaps import rendered_spheres


@dataclass(frozen=True)
class Job:
    """A validated tomogram and everything that identifies its result."""

    path: Path
    name: str
    volume: Volume
    record: dict  # input path and checksum, parameters and their digest: compared on resume


def prepare_job(path, params: SegmentParams, weights_sha256: str, voxel_size_a: float | None = None,
                region=None) -> Job:
    """Read and validate a tomogram (memory-mapped) and describe the run that would segment it.

    `region` (an MRC mask or IMOD model of the segmentation region) is part of what identifies the result.
    """
    path = Path(path)
    volume = read_volume(path, voxel_size_a)
    if region is not None and not Path(region).is_file():
        raise CryovesError(f"{region}: region file not found; pass a binary MRC mask or an IMOD model")
    record = {
        "input": str(path.resolve()),
        "input_sha256": file_sha256(path),
        "region": str(region or ""),
        "region_sha256": file_sha256(region) if region else "",
        "voxel_size_a": volume.voxel_size_a,
        "weights_sha256": weights_sha256,
        "params": asdict(params),
        "params_digest": params_digest(params, volume.voxel_size_a, weights_sha256),
    }
    return Job(path, tomogram_name(path), volume, record)


def is_done(out_dir, job: Job) -> bool:
    """True when a complete run record exists for the same input, region and parameters (checksums)."""
    previous = read_run_record(out_dir, job.name)
    return (previous is not None and previous.get("status") == "ok"
            and all(previous.get(key) == job.record[key] for key in ("input_sha256", "region_sha256", "params_digest")))


REGION_SUFFIXES = (".region.mrc", ".mod")
"""How a batch's per-tomogram regions are named in their folder: NAME.region.mrc or NAME.mod."""


def load_region(path, shape, voxel_size_a: float) -> np.ndarray:
    """The segmentation region as a bool mask: a binary MRC on the tomogram grid or an IMOD model."""
    path = Path(path)
    if path.suffix.lower() == ".mod":
        return rasterise_region(path, shape)
    mask = read_volume(path, voxel_size_a).data  # on the tomogram grid, so with its voxel size
    if mask.shape != tuple(shape):
        raise CryovesError(f"{path}: region mask {mask.shape} does not match the tomogram grid {tuple(shape)}")
    return np.asarray(mask) > 0


def segment_file(job: Job, out_dir, logit_fn: LogitFn, params: SegmentParams, *,
                 write_probability: bool = False, write_stages: bool = False, pyto: bool = False,
                 active_zone=None, progress: Progress | None = None) -> dict:
    """Segment one prepared tomogram (inside the job's region, if any) and write its outputs; returns
    the paths written.

    `pyto` (needs a region) adds the Pyto label volume and merged IMOD model; `active_zone` is an
    IMOD model of the active-zone membrane for it.
    """
    region = job.record["region"] or None
    if pyto and region is None:
        raise CryovesError("--pyto needs --region: Pyto's label file holds the segmentation region as label 1")
    start = time.perf_counter()
    tomogram = np.asarray(job.volume.data, dtype=np.float32)
    mask = None if region is None else load_region(region, tomogram.shape, job.volume.voxel_size_a)
    result = segment(tomogram, job.volume.voxel_size_a, logit_fn, params, mask, progress, keep_stages=write_stages)
    paths = {}
    if pyto:
        _, centers, radii = rendered_spheres(result.vesicles)
        region_model = region if Path(region).suffix.lower() == ".mod" else None
        paths |= write_pyto(out_dir, job.name, job.volume, result.labels["final"], centers, radii, mask,
                            region_model, active_zone)
    record = job.record | {"total_seconds": time.perf_counter() - start}
    return paths | write_outputs(out_dir, job.name, job.volume, result, record,
                                 write_probability=write_probability, write_stages=write_stages)
