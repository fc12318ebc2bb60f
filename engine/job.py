"""One tomogram from its file to its outputs, in the engine calls that every caller makes.

`prepare` reads and validates the file, identifies the result it would give (input, region,
parameters and weights, by checksum) and decides whether the outputs already there are that result.
`predict` makes the network input, predicts it tile batch by tile batch and assembles the
probability map on the input grid. `finish` post-processes, writes every output, scores against the
ground truth when there is one, and writes the run record last. `cryoves segment` runs them in turn
in one process (`segment_job`); `cryoves run` runs the same calls spread over Ray tasks and actors
(`network_input`, `predict_tiles` per batch, `probability_map`, `finish`); `cryoves bench` times them.

Between the calls, typed hand-offs: `Job` → `Prepared` → `NetworkInput` → `TileBatch` →
`ProbabilityMap` → `Finished`, with `Settings` (what a batch shares) and `OutputOptions`.
"""

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.checksum import file_sha256
from cryoves.engine.io.imod import rasterise_region
from cryoves.engine.io.mrc import Volume, read_volume, read_volume_sha256
from cryoves.engine.io.outputs import (
    begin_outputs,
    check_out_dir,
    companion_file,
    output_files,
    package_versions,
    params_digest,
    peak_memory_mb,
    read_run_record,
    tomogram_name,
    write_outputs,
    write_run_record,
)
from cryoves.engine.io.pages import release_pages
from cryoves.engine.io.pyto import write_pyto
from cryoves.engine.io.tables import active_mask
from cryoves.engine.network.inference import (
    InferenceParams,
    LogitFn,
    TilePlan,
    plan_inference,
    predict_batch,
    prepare_network_input,
)
from cryoves.engine.network.model import model_inference_params
from cryoves.engine.network.rescale import network_shape
from cryoves.engine.pipeline import STAGES, Progress, SegmentParams, fit_spheres, oriented, search_segments
from cryoves.engine.scoring.evaluate import TRUTH_SUFFIXES, write_metrics
from cryoves.engine.stages.overlaps import rendered_spheres
from cryoves.engine.stages.refine import Refiner
from cryoves.engine.warmup import start_kernel_warmup

log = logging.getLogger(__name__)

STEPS = ("prepare", *STAGES, "write")
"""The keys of a run record's `seconds`, in order: the compute time of each step, wherever it ran."""
REGION_SUFFIXES = (".region.mrc", ".mod")
"""How per-tomogram regions are named in a folder: NAME.region.mrc or NAME.mod."""
NETWORK_BYTES_PER_VOXEL = 12
"""Memory of the network step per voxel of the network grid: the resampled tomogram, its pre-filtered
copy and the probability map, float32 each."""


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """The optional outputs, beside the labels, IMOD model, vesicle table and run record."""

    probability: bool = False        # NAME.prob.mrc
    stages: bool = False             # NAME.global/local/sphere.mrc (post-processing keeps them in memory)
    pyto: bool = False               # NAME.pyto.mrc and NAME.pyto.mod; needs a region
    active_zone: Path | None = None  # IMOD model of the active-zone membrane, for pyto
    report: bool = True              # report/NAME.png: a view drawn from the written outputs, after the record


def segment_params(weights=None, *, tta: int = 1, prefilter_sigma_vox: float | None = None,
                   memory_gb: float | None = None, precision: str | None = None,
                   invert_contrast: bool = False) -> SegmentParams:
    """A run's parameters from what its user chose (the options of `segment`, `run` and `demo`, the napari
    widget): the model's own pre-processing with those changes; None keeps the model's or the default."""
    changes = {"tta": tta}
    if prefilter_sigma_vox is not None:
        changes["gaussian_sigma_vox"] = prefilter_sigma_vox
    if memory_gb is not None:
        changes["memory_gb"] = memory_gb
    if precision is not None:
        changes["precision"] = precision
    return SegmentParams(inference=model_inference_params(weights, **changes), invert_contrast=invert_contrast)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What every tomogram of a batch shares."""

    params: SegmentParams
    weights_sha256: str
    voxel_size_a: float | None = None  # overrides the MRC headers
    outputs: OutputOptions = field(default_factory=OutputOptions)
    force: bool = False                # redo tomograms whose outputs are complete and current


@dataclass(frozen=True, kw_only=True)
class Job:
    """One tomogram file and the files that go with it."""

    path: Path
    region: Path | None = None  # binary MRC mask on the tomogram grid or IMOD model of closed contours
    truth: Path | None = None   # label MRC or vesicle table: the outputs are scored into metrics/NAME.parquet

    @property
    def name(self) -> str:
        return tomogram_name(self.path)


def make_jobs(paths, regions=None, truth=None) -> list[Job]:
    """Jobs for tomogram files, each named by the path given (a symlink by its own name, not its
    target's), a path given twice once. `regions` and `truth` are each a file for every tomogram, or a
    folder holding NAME.region.mrc or NAME.mod, and NAME.labels.mrc or NAME.vesicles.parquet, per
    tomogram (a tomogram without one has none). Two files of one name would write the same outputs:
    refused."""
    given: dict[str, Path] = {}
    for path in paths:
        given.setdefault(os.path.abspath(path), Path(path))
    unique = list(given.values())
    by_name: dict[str, list[Path]] = {}
    for path in unique:
        by_name.setdefault(tomogram_name(path), []).append(path)
    clashes = {name: found for name, found in by_name.items() if len(found) > 1}
    if clashes:
        name, found = next(iter(clashes.items()))
        raise CryovesError(f"{len(clashes)} tomogram name(s) occur twice and would overwrite each other's "
                           f"outputs, e.g. {name}: {', '.join(map(str, found))}; rename or run them separately")
    return [Job(path=path, region=_companion(regions, tomogram_name(path), REGION_SUFFIXES),
                truth=_companion(truth, tomogram_name(path), TRUTH_SUFFIXES)) for path in unique]


def _companion(given, name: str, suffixes) -> Path | None:
    if given is None:
        return None
    given = Path(given)
    return companion_file(given, name, suffixes) if given.is_dir() else given


@dataclass(frozen=True, kw_only=True)
class Identity:
    """What decides a tomogram's result, by checksum: recorded in its run record, compared on resume."""

    input: str
    input_sha256: str
    region: str
    region_sha256: str
    voxel_size_a: float
    weights_sha256: str
    params_digest: str


@dataclass(frozen=True, kw_only=True, eq=False)
class Prepared:
    """A validated tomogram, what identifies its result, and whether its outputs are already that result.

    The voxels stay in the file: `volume` maps it (kept from `prepare` in its own process), and a
    Prepared sent to another process (a Ray task) travels without them and maps the file there.
    """

    job: Job
    identity: Identity
    shape: tuple[int, int, int]
    dtype: str       # of the file's voxels (`numpy.dtype.str`)
    done: bool       # outputs complete and current: nothing to do
    seconds: float   # reading, validating and checksumming

    @property
    def name(self) -> str:
        return self.job.name

    @cached_property
    def volume(self) -> Volume:
        # `prepare` checked every voxel (NaN or Inf): mapped again in another process, the file is not read whole
        return read_volume(self.job.path, self.identity.voxel_size_a, scan=False)

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "volume"}


def prepare(job: Job, settings: Settings, out_dir) -> Prepared:
    """Read and validate `job`'s files (the tomogram memory-mapped), identify its result, and decide
    whether the outputs in `out_dir` are already that result (never with `settings.force`); if not,
    check that the network step fits in memory and that `out_dir` can be written, before any work."""
    start = time.perf_counter()
    volume, input_sha256 = read_volume_sha256(job.path, settings.voxel_size_a)
    for what, path in (("region", job.region), ("ground truth", job.truth)):
        if path is not None and not Path(path).is_file():
            raise CryovesError(f"{path}: {what} file not found")
    outputs = settings.outputs
    if outputs.pyto and job.region is None:
        raise CryovesError(f"{job.name}: --pyto needs a region: Pyto's label file holds it as label 1")
    if outputs.active_zone is not None and not Path(outputs.active_zone).is_file():
        raise CryovesError(f"{outputs.active_zone}: active-zone model not found")
    identity = Identity(
        input=str(job.path.resolve()),
        input_sha256=input_sha256,
        region=str(job.region.resolve()) if job.region else "",
        region_sha256=file_sha256(job.region) if job.region else "",
        voxel_size_a=volume.voxel_size_a,
        weights_sha256=settings.weights_sha256,
        params_digest=params_digest(settings.params, volume.voxel_size_a, settings.weights_sha256),
    )
    done = not settings.force and is_current(read_run_record(out_dir, job.name), identity, wanted_files(job, outputs),
                                             out_dir)
    if not done:
        check_network_memory(job.path, volume.data.shape, volume.voxel_size_a, settings.params.inference)
        check_out_dir(out_dir)
    prepared = Prepared(job=job, identity=identity, shape=tuple(volume.data.shape), dtype=volume.data.dtype.str,
                        done=done, seconds=time.perf_counter() - start)
    prepared.__dict__["volume"] = volume  # the mapped file, so that `volume` does not map it again here
    return prepared


def wanted_files(job: Job, outputs: OutputOptions) -> dict[str, str]:
    """The output files `finish` writes for `job` with `outputs` (`output_files`), relative to the output
    folder, and the file each of the extra ones is made from: what a resumed run needs to find."""
    files = output_files(job.name, probability=outputs.probability, stages=outputs.stages, pyto=outputs.pyto,
                         metrics=job.truth is not None)
    sources = {"metrics": job.truth, "pyto_model": outputs.active_zone if outputs.pyto else None}
    return {relative: str(Path(sources[kind]).resolve()) if sources.get(kind) else "" for kind, relative in
            files.items()}


def is_current(record: dict | None, identity: Identity, wanted: dict[str, str], out_dir) -> bool:
    """True when `record` (a run record) is complete, for the same input, region and parameters, and
    lists every file of `wanted` (`wanted_files`: an output asked for is part of the work), made from
    the same source and still in `out_dir`."""
    if record is None or record.get("status") != "ok" or not record.get("files"):
        return False
    if any(record.get(key) != getattr(identity, key) for key in ("input_sha256", "region_sha256", "params_digest")):
        return False
    written = json.loads(record["files"])
    return all(written.get(relative) == source and (Path(out_dir) / relative).is_file()
               for relative, source in wanted.items())


def check_network_memory(path, shape, voxel_size_a: float, params: InferenceParams) -> None:
    """Refuse a tomogram whose network grid (the tomogram rescaled to the network's voxel size) cannot
    fit in this machine's memory (with the network's own budget, `memory_gb`), saying what it would need:
    a voxel size typed ten times too large asks for a thousand times the memory, and would otherwise die
    of it after the reading."""
    grid = network_shape(tuple(shape), voxel_size_a, params.network_voxel_size_a)
    needed = NETWORK_BYTES_PER_VOXEL * float(np.prod(grid, dtype=np.float64)) + params.memory_gb * 1e9
    available = physical_memory_bytes()
    if needed > available:
        raise CryovesError(
            f"{path}: at {voxel_size_a:g} Å the network grid is {' x '.join(map(str, grid))} voxels "
            f"({params.network_voxel_size_a:g} Å) and needs about {needed / 1e9:,.0f} GB of memory, this machine "
            f"has {available / 1e9:,.0f} GB; check the voxel size (header or --voxel-size, in Å)")


def physical_memory_bytes() -> float:
    """The memory of this machine, in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def load_region(path, shape, voxel_size_a: float) -> np.ndarray:
    """The segmentation region as a bool mask: a binary MRC on the tomogram grid or an IMOD model."""
    path = Path(path)
    if path.suffix.lower() == ".mod":
        return rasterise_region(path, shape)
    mask = read_volume(path, voxel_size_a).data  # on the tomogram grid, so with its voxel size
    if mask.shape != tuple(shape):
        raise CryovesError(f"{path}: region mask {mask.shape} does not match the tomogram grid {tuple(shape)}")
    return np.asarray(mask) > 0


# ---------------------------------------------------------------------------------------------- predict

@dataclass(frozen=True, eq=False)
class NetworkInput:
    """The tomogram on the network grid, pre-filtered and z-scored, and the seconds that took."""

    volume: np.ndarray
    seconds: float


@dataclass(frozen=True, eq=False)
class TileBatch:
    """The probabilities of the kept cores of the tile batch that starts at tile `first`."""

    first: int
    probabilities: list[np.ndarray]
    seconds: float


@dataclass(eq=False)
class ProbabilityMap:
    """The vesicle probability on the network grid (float32), and the seconds of the whole network step:
    network input, tile batches and assembly. `finish` takes the map out (`take`), so that it is freed after its
    last use."""

    probability: np.ndarray | None
    seconds: float

    def take(self) -> np.ndarray:
        """The map, which this hand-off then no longer holds."""
        probability, self.probability = self.probability, None
        if probability is None:
            raise RuntimeError("the probability map was taken before")
        return probability


def network_input(prepared: Prepared, params: SegmentParams) -> NetworkInput:
    """Resample, pre-filter and z-score the (oriented) tomogram for the network; the file's pages then leave this
    process's resident memory while the network runs (`release_pages`)."""
    start = time.perf_counter()
    volume = prepare_network_input(oriented(prepared.volume.data, params), prepared.identity.voxel_size_a,
                                   params.inference)
    release_pages(prepared.volume.data)
    return NetworkInput(volume, time.perf_counter() - start)


def network_grid(prepared: Prepared, params: InferenceParams) -> tuple[int, int, int]:
    """The shape of `prepared`'s network input."""
    return network_shape(prepared.shape, prepared.identity.voxel_size_a, params.network_voxel_size_a)


def tile_plan(prepared: Prepared, params: InferenceParams) -> TilePlan:
    """The tiles of `prepared`'s network input and how many go through the network at once."""
    return plan_inference(network_grid(prepared, params), params)


def batch_starts(plan: TilePlan) -> range:
    """The first tile of each batch: one `predict_tiles` call each."""
    return range(0, len(plan.tiles), plan.batch_size)


def predict_tiles(network_volume: np.ndarray, first: int, logit_fn: LogitFn, params: InferenceParams) -> TileBatch:
    """Predict the batch of tiles of `network_volume` that starts at tile `first`."""
    start = time.perf_counter()
    probabilities = predict_batch(network_volume, plan_inference(network_volume.shape, params), first, logit_fn,
                                  params)
    return TileBatch(first, probabilities, time.perf_counter() - start)


def probability_map(prepared: Prepared, network_seconds: float, batches: Iterable[TileBatch],
                    params: SegmentParams) -> ProbabilityMap:
    """Assemble every tile batch into the network-grid map (`search_segments` searches the segments on it).

    `network_seconds` is the network input's; the batches bring theirs. `batches` may be a generator:
    only the assembly's own time is added to theirs. A plan of one tile whose probabilities come as one contiguous
    array of the grid (`cryoves run`'s batches from Ray's object store, a window without a border) is the map itself,
    not copied: 326 MB of fresh memory and 0.6 s less at 1024x1024x261. Nothing writes into the map.
    """
    plan = tile_plan(prepared, params.inference)
    grid = network_grid(prepared, params.inference)
    prob_net = None
    seconds, written = network_seconds, 0
    for batch in batches:
        start = time.perf_counter()
        for tile, probability in zip(plan.tiles[batch.first:batch.first + plan.batch_size], batch.probabilities):
            if len(plan.tiles) == 1 and _is_whole_map(probability, grid):
                prob_net = probability
            else:
                if prob_net is None:
                    prob_net = np.empty(grid, np.float32)
                prob_net[tile.write] = probability
            written += 1
        seconds += batch.seconds + time.perf_counter() - start
    if written != len(plan.tiles):
        raise RuntimeError(f"assembled {written} of {len(plan.tiles)} tiles")
    return ProbabilityMap(prob_net, seconds)


def _is_whole_map(probability: np.ndarray, grid: tuple[int, int, int]) -> bool:
    return (probability.shape == tuple(grid) and probability.dtype == np.float32
            and probability.flags.c_contiguous)


def predict(prepared: Prepared, logit_fn: LogitFn, params: SegmentParams,
            progress: Progress | None = None) -> ProbabilityMap:
    """The probability map of a prepared tomogram, batch after batch in this process."""
    if progress is not None:
        progress("network")
    network = network_input(prepared, params)
    starts = batch_starts(tile_plan(prepared, params.inference))
    batches = (predict_tiles(network.volume, first, logit_fn, params.inference) for first in starts)
    return probability_map(prepared, network.seconds, batches, params)


# ----------------------------------------------------------------------------------------------- finish

@dataclass(frozen=True, eq=False)
class Finished:
    """What `finish` wrote (run record last) and the figures of its run record."""

    paths: dict[str, Path]
    n_vesicles: int
    threshold: float
    seconds: dict[str, float]  # per STEPS
    warnings: tuple[str, ...]



def _draw_report(out_dir, name: str) -> dict[str, Path]:
    """The QC report of a finished tomogram; a view that fails to draw never fails the complete outputs."""
    from cryoves.engine.report.tomogram import write_report

    try:
        return {"report": write_report(out_dir, name)}
    except Exception as error:  # noqa: BLE001 - the outputs are written; only the picture is missing
        log.warning(f"{name}: the QC report could not be drawn ({error}); the outputs are complete and "
                    f"`cryoves report {out_dir}` draws it again")
        return {}


def finish(prepared: Prepared, probability: ProbabilityMap, settings: Settings, out_dir, *,
           refiner: Refiner | None = None, progress: Progress | None = None) -> Finished:
    """Post-process (inside the job's region, if any), write every output, score it against the
    job's ground truth, and write the run record last, so that its presence means all is written.

    `refiner`: where sphere refinement runs (`refine.Refiner`; None: here). The map leaves `probability` (`take`)
    and is freed after the segments' search unless it is written: the spheres' refinement, the peak of `finish`,
    runs without it.
    """
    job, params, outputs = prepared.job, settings.params, settings.outputs
    volume = prepared.volume
    tomogram = oriented(volume.data, params)
    mask = None if job.region is None else load_region(job.region, prepared.shape, volume.voxel_size_a)
    segments = search_segments(tomogram, probability.take(), volume.voxel_size_a, params, mask, progress,
                               keep_stages=outputs.stages, keep_probability=outputs.probability)
    result = fit_spheres(tomogram, segments, volume.voxel_size_a, params, progress, refiner=refiner,
                         keep_stages=outputs.stages)
    del segments  # the segments' labels
    if progress is not None:
        progress("write")
    start = time.perf_counter()
    wanted = wanted_files(job, outputs)
    begin_outputs(out_dir, job.name, error_record(job, "interrupted while its outputs were written; run it again",
                                                  prepared), keep=wanted)
    paths = write_outputs(out_dir, job.name, volume, result, probability=outputs.probability,
                          stages=outputs.stages)
    if outputs.pyto:
        _, centers, radii = rendered_spheres(result.vesicles)
        region_model = job.region if job.region.suffix.lower() == ".mod" else None
        paths |= write_pyto(out_dir, job.name, volume, result.final_labels(), centers, radii, mask,
                            region_model, outputs.active_zone)
    if job.truth is not None:
        paths["metrics"] = write_metrics(out_dir, job.name, paths["labels"], job.truth)
    seconds = {"prepare": prepared.seconds, "network": probability.seconds} | result.seconds
    seconds["write"] = time.perf_counter() - start
    n_vesicles = int(active_mask(result.vesicles).sum())
    record = asdict(prepared.identity) | {
        "tomogram": job.name,
        "status": "ok",
        "error": "",
        "truth": str(job.truth.resolve()) if job.truth else "",
        "params": asdict(params),
        "outputs": asdict(outputs),
        "files": wanted,
        "threshold": result.threshold,
        "n_vesicles": n_vesicles,
        "seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "warnings": list(result.warnings),
        "peak_memory_mb": peak_memory_mb(),
        "versions": package_versions(),
    }
    assert {Path(out_dir) / relative for relative in wanted} == set(paths.values()), "finish wrote other files"
    paths["run"] = write_run_record(out_dir, job.name, record)
    if outputs.report:
        paths |= _draw_report(out_dir, job.name)
    return Finished(paths, n_vesicles, result.threshold, seconds, result.warnings)


def segment_job(prepared: Prepared, logit_fn: LogitFn, settings: Settings, out_dir,
                progress: Progress | None = None) -> Finished:
    """`predict` then `finish` in this process: what `cryoves segment` does per tomogram. The kernels of
    finish compile (first run after an install) while the network runs."""
    warmup = start_kernel_warmup()
    probability = predict(prepared, logit_fn, settings.params, progress)
    warmup.join()
    return finish(prepared, probability, settings, out_dir, progress=progress)


def error_record(job: Job, error: str, prepared: Prepared | None = None) -> dict:
    """The run record of a tomogram that failed (or whose outputs are being rewritten): the next run
    redoes it."""
    identity = {} if prepared is None else {"input_sha256": prepared.identity.input_sha256,
                                            "params_digest": prepared.identity.params_digest}
    return {"tomogram": job.name, "input": str(job.path), "status": "error", "error": error} | identity


def write_error_record(out_dir, job: Job, error: str, prepared: Prepared | None = None) -> Path:
    """Write `error_record`."""
    return write_run_record(out_dir, job.name, error_record(job, error, prepared))
