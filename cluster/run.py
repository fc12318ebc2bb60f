"""`cryoves run`: screen many tomograms on Ray, with the same engine calls as `cryoves segment`.

This module only schedules `cryoves.engine.job`'s calls (scatter, engine call, gather), pipelined
across tomograms:

1. `_prepare` (CPU task): `prepare` (validate, checksum, skip when the outputs are complete and
   current), then `network_input`.
2. `Predictor` actors (one per GPU, or CPU actors on a machine without GPUs) each load the model
   once and run `predict_tiles` on batches of tiles (`batch_starts`), so one large tomogram is
   spread over several actors.
3. `_finish` (CPU task): `probability_map` from the batches, then `finish`, whose sphere refinement
   goes to `_refine_chunk` tasks over chunks of vesicles, each of which maps the tomogram's file (or
   reads it from the object store: `chunked_refiner`), so one large tomogram also uses the cluster's cores.

The driver keeps at most `max_in_flight` tomograms between 1 and 3 (backpressure through
`ray.wait`; by default as many as the cluster has CPUs, at least 4), so memory stays flat however
many files are listed, and each `_finish` task asks Ray for the memory its tomogram needs
(`finish_memory_bytes`), so a node runs only as many at once as it can hold. A file that fails
becomes an error row (and an error run record) and the batch goes on; tasks and actors are retried
when a worker, an actor or a node dies, and outputs are written atomically, so a retry gives the same
files. When a lost node leaves too few GPUs for every actor, the actors that cannot restart are given
up and their tomograms are submitted again to the others (`PredictorPool.fit_cluster`).

On a cluster, every node needs cryoves installed and `out_dir` and the inputs on a shared filesystem.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from cryoves.cluster.local_ray import local_ray
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.outputs import check_out_dir
from cryoves.engine.io.pages import MappedFile, mapped_file
from cryoves.engine.job import (
    Finished,
    Job,
    Prepared,
    Settings,
    batch_starts,
    finish,
    make_jobs,
    network_grid,
    network_input,
    predict_tiles,
    prepare,
    probability_map,
    tile_plan,
    write_error_record,
)
from cryoves.engine.network.inference import InferenceParams, TilePlan
from cryoves.engine.pipeline import refine_in_bands
from cryoves.engine.stages.refine import (
    RefineParams,
    Refiner,
    RefineResult,
    concat_refine_results,
    refine_batch,
    z_ordered_parts,
)
from cryoves.engine.warmup import start_kernel_warmup

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")
"""A file with one of these suffixes lists inputs, one per line; any other file is a tomogram."""
TOMOGRAM_GLOB = "*.mrc"
OUTPUT_SUFFIXES = (".labels.mrc", ".prob.mrc")
"""cryoves outputs (and phantom ground truth) that sit beside tomograms: never inputs."""
TASK_RETRIES = 3
ACTOR_RESTARTS = 3
CLUSTER_CHECK_S = 5.0
"""How often the driver checks that the cluster can still hold every inference actor."""
FINISH_BASE_BYTES = 200_000_000
FINISH_BYTES_PER_NETWORK_VOXEL = 9
FINISH_BYTES_PER_VOXEL = 1
"""Memory a `_finish` task asks Ray for: the base, this per voxel of the network grid (where the probability map,
the search and the segments lie) and this per input voxel (the label file's slabs, the report's parts: no volume on
the input grid is held whole). Its resident memory grew by 10.0 bytes per voxel on 200x512x512 at 22 Å (float32 or
int16 files, where the two grids are one), 1.47 GB on 256x768x768 at 22 Å, 0.19 GB on 200x512x512 at 14.7 Å
(float32 or int16), 0.87 GB on 1024x1024x261 at 14.69 Å (with the probability map's assembly), and by 0.13 GB on
128x256x256 at 22 Å (the kernels and libraries it loads). Ray then runs no more post-processing tasks on a node
than its memory holds. Measured again since `finish` frees the map after the segments' search and no longer copies
a map of one tile (2026-11-30, after the kernels' warm-up): 3.2-3.5 bytes per voxel at 22 Å with one tile, 7.2 with
the map assembled from several (200x512x512, a 0.5 GB network budget), 0.09 GB on 200x512x512 at 14.7 Å, 0.49-0.50 GB
on 1024x1024x261 at 14.69 Å: the request, fitted to the earlier figures, holds them with room to spare."""
FINISH_BYTES_PER_COPIED_VOXEL = 4
"""The more per input voxel when post-processing works on a float32 copy of the tomogram (a 16-bit file, or
--invert-contrast): 13.9 bytes per voxel measured at 22 Å with --invert-contrast, 0.41 GB at 14.7 Å."""
FINISH_BYTES_PER_VOXEL_WITH_STAGES = 7
"""The same per input voxel when the earlier stages' labels are kept for `--stages` (three label volumes on the
input grid: 11.9 bytes per voxel measured at 22 Å, 0.43 GB for 200x512x512 at 14.7 Å)."""
MIN_IN_FLIGHT = 4
VESICLES_PER_TASK = 256
"""Sphere refinement of a tomogram with more vesicles than this is spread over tasks of this many."""

RESULT_SCHEMA = pa.schema([
    ("name", pa.string()),
    ("input", pa.string()),
    ("status", pa.string()),      # ok, skipped, error
    ("error", pa.string()),
    ("seconds", pa.float64()),    # wall time from preparation to outputs written (or to the failure)
    ("n_vesicles", pa.int64()),   # null unless ok
    ("node", pa.string()),        # IP of the node(s) whose actors predicted it, comma-separated
    ("actors", pa.string()),      # index of the actor(s) that predicted it, comma-separated
    ("gpu_ids", pa.string()),     # GPU id(s) of those actors; empty for CPU actors
])

Progress = Callable[[dict], None]
"""Called with each tomogram's result row as it finishes."""


# ---------------------------------------------------------------------------------------------- inputs

def expand_inputs(inputs) -> list[Path]:
    """MRC files, folders (their *.mrc, without cryoves outputs), glob patterns (files or folders) and list files
    (`.txt`/`.lst`/`.list`, one input per line, `#` comments, paths relative to the list) → files, as
    absolute paths without resolving symlinks (a tomogram is named by the path given: `make_jobs`).

    Order is kept; a missing input or an empty folder or pattern raises CryovesError.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        found += _expand_one(str(item), allow_list=True)
    if not found:
        raise CryovesError("no input tomograms given")
    return [Path(os.path.abspath(path)) for path in found]


def _is_output(path: Path) -> bool:
    return path.name.lower().endswith(OUTPUT_SUFFIXES)


def _expand_one(item: str, *, allow_list: bool, base: Path | None = None) -> list[Path]:
    path = Path(item).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        files = sorted(p for p in path.glob(TOMOGRAM_GLOB) if p.is_file() and not _is_output(p))
        if not files:
            raise CryovesError(f"{path}: folder holds no {TOMOGRAM_GLOB} tomograms")
        return files
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            if not allow_list:
                raise CryovesError(f"{path}: a list file inside a list file; list tomograms, folders or patterns")
            lines = [line.strip() for line in path.read_text().splitlines()]
            entries = [line for line in lines if line and not line.startswith("#")]
            if not entries:
                raise CryovesError(f"{path}: list file names no inputs")
            return [p for line in entries for p in _expand_one(line, allow_list=False, base=path.parent)]
        return [path]
    if glob.has_magic(str(path)):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [f for p in matches for f in (_expand_one(str(p), allow_list=False) if p.is_dir() else [p])
                 if f.is_file() and not _is_output(f) and f.suffix.lower() not in LIST_SUFFIXES]
        if not files:
            raise CryovesError(f"{item}: pattern matches no files")
        return files
    raise CryovesError(f"{path}: no such file, folder or pattern")


# ------------------------------------------------------------------------------------------ Ray work

@ray.remote
class Predictor:
    """Holds the model (loaded once) and predicts batches of tiles of network-grid volumes."""

    def __init__(self, index: int, weights: str | None, device: str, precision: str) -> None:
        from cryoves.engine.network.model import load_logit_fn  # TensorFlow loads in the actor, not the driver

        self.index = index
        start_kernel_warmup()  # fills Numba's cache for the finishing tasks while this actor predicts
        self.logit_fn = load_logit_fn(weights, device, precision)
        self.where = {"actor": str(index), "node": ray.util.get_node_ip_address(),
                      "node_id": ray.get_runtime_context().get_node_id(),
                      "gpu_ids": ",".join(map(str, ray.get_gpu_ids()))}

    def ready(self) -> dict:
        return self.where

    def predict(self, volume: np.ndarray, first: int, params: InferenceParams):
        return self.where, predict_tiles(volume, first, self.logit_fn, params)


@ray.remote(num_returns=3, max_retries=TASK_RETRIES)
def _prepare(job: Job, settings: Settings, out_dir: str):
    """`prepare`, then (unless the outputs are done) `network_input`: (prepared, network volume, its seconds)."""
    prepared = prepare(job, settings, out_dir)
    if prepared.done:
        return prepared, None, 0.0
    network = network_input(prepared, settings.params)
    return prepared, network.volume, network.seconds


@ray.remote(max_retries=TASK_RETRIES)
def _refine_chunk(tomogram: np.ndarray | MappedFile, centers: np.ndarray, radii: np.ndarray,
                  params: RefineParams) -> RefineResult:
    """`refine_batch` as a task, for some of a tomogram's vesicles: the tomogram from the object store, or mapped
    from its file here."""
    return refine_batch(tomogram.open() if isinstance(tomogram, MappedFile) else tomogram, centers, radii, params)


def chunked_refiner(vesicles_per_task: int) -> Refiner:
    """A `Refiner` that refines chunks of `vesicles_per_task` vesicles, in z order, in `_refine_chunk` tasks; a
    tomogram with no more vesicles is refined here (`refine_in_bands`, as `segment` does). A tomogram mapped from
    its file is mapped again by each task (the inputs are on a shared filesystem), whose chunk reads a band of it;
    any other is put once into the object store (a mapped one put there made all its pages resident here and took
    its size in the store)."""
    def refine(tomogram: np.ndarray, centers: np.ndarray, radii: np.ndarray, params: RefineParams) -> RefineResult:
        if len(centers) <= vesicles_per_task:
            return refine_in_bands(tomogram, centers, radii, params)
        shared = mapped_file(tomogram) or ray.put(tomogram)
        order, chunks = z_ordered_parts(centers, -(-len(centers) // vesicles_per_task))
        radii = np.asarray(radii)
        return concat_refine_results(ray.get([_refine_chunk.remote(shared, centers[rows], radii[rows], params)
                                              for rows in chunks]), order)

    return refine


@ray.remote(max_retries=TASK_RETRIES)
def _finish(prepared: Prepared, settings: Settings, out_dir: str, vesicles_per_task: int, network_seconds: float,
            *batches) -> Finished:
    """`probability_map` of the predicted batches, then `finish` with refinement spread over tasks."""
    probability = probability_map(prepared, network_seconds, batches, settings.params)
    return finish(prepared, probability, settings, out_dir, refiner=chunked_refiner(vesicles_per_task))


class PredictorPool:
    """The inference actors and the one function that hands them work (`submit`).

    Not ray.util.ActorPool: it returns values, not object references, which would route every
    probability map through the driver, and it allows a single call per actor. Here each batch goes to
    the actor with the fewest queued tiles; the references flow straight into the `_finish` task.

    A killed actor restarts by itself (`max_restarts`), on its node or on a node that replaces it.
    When a node is lost and the cluster no longer has the GPUs (or CPUs) for every actor, a restarting
    actor would wait for ever: `fit_cluster` gives such actors up, and their tomograms fail with
    `ray.exceptions.RayActorError`, which the batch answers by submitting them again.
    """

    def __init__(self, weights: str | None, device: str, precision: str, n_actors: int, gpus: bool) -> None:
        # GPU actors reserve no CPU (else they can take every CPU and starve the CPU tasks they feed)
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
        self.gpus = gpus
        self.actors = {i: Predictor.options(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES,
                                            **options).remote(i, weights, device, precision) for i in range(n_actors)}
        self.queued = dict.fromkeys(self.actors, 0)
        try:  # a model that does not load stops the batch here, with one clear message
            where = ray.get([actor.ready.remote() for actor in self.actors.values()])
        except Exception as exc:  # noqa: BLE001
            self.shutdown()
            raise CryovesError(f"the inference actors could not load the model: {_error_text(exc)}") from None
        self.node_id = {i: w["node_id"] for i, w in zip(self.actors, where)}

    def capacity(self) -> int:
        """How many actors the live cluster can hold: its GPUs, or its CPUs less one for the CPU tasks."""
        resources = ray.cluster_resources()
        return int(resources.get("GPU", 0)) if self.gpus else max(int(resources.get("CPU", 0)) - 1, 0)

    def fit_cluster(self) -> None:
        """Give up actors the cluster can no longer place, those last seen on dead nodes first."""
        excess = len(self.actors) - self.capacity()
        if excess <= 0:
            return
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        for i in sorted(self.actors, key=lambda i: (self.node_id[i] in alive, -i))[:excess]:
            ray.kill(self.actors.pop(i), no_restart=True)
            del self.queued[i], self.node_id[i]
        log.warning("the cluster lost %d inference actor(s); %d remain", excess, len(self.actors))

    def submit(self, volume_ref, plan: TilePlan, params: InferenceParams) -> list[tuple]:
        """One call per batch of tiles of a tomogram → [(actor index, tiles, where ref, batch ref)]."""
        if not self.actors:
            raise CryovesError(f"no {'GPU' if self.gpus else 'CPU'} is left in the cluster for inference; "
                               "rerun the same command when it has one again to finish the batch")
        calls = []
        for first in batch_starts(plan):
            i = min(self.actors, key=lambda k: self.queued[k])
            n = min(plan.batch_size, len(plan.tiles) - first)
            self.queued[i] += n
            where, batch = self.actors[i].predict.options(num_returns=2).remote(volume_ref, first, params)
            calls.append((i, n, where, batch))
        return calls

    def done(self, calls, where=()) -> None:
        """Forget the calls' queued tiles and note on which node each actor answered."""
        for i, n, _, _ in calls:
            if i in self.queued:
                self.queued[i] -= n
        for (i, *_), w in zip(calls, where):
            if i in self.node_id:
                self.node_id[i] = w["node_id"]

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


def finish_memory_bytes(n_voxels: int, n_network_voxels: int, largest_node_bytes: float, *, stages: bool = False,
                        copied: bool = False) -> int:
    """Memory to reserve for post-processing a tomogram of `n_voxels` whose network grid has `n_network_voxels`
    (keeping the earlier stages' labels with `stages`; on a float32 copy of it when `copied`), at most what the
    largest node offers (a larger request could never be scheduled and would wait for ever)."""
    per_voxel = FINISH_BYTES_PER_VOXEL_WITH_STAGES if stages else FINISH_BYTES_PER_VOXEL
    per_voxel += FINISH_BYTES_PER_COPIED_VOXEL if copied else 0
    needed = FINISH_BASE_BYTES + FINISH_BYTES_PER_NETWORK_VOXEL * n_network_voxels + per_voxel * n_voxels
    return int(min(needed, largest_node_bytes))


def _largest_node_memory() -> float:
    return max((node["Resources"].get("memory", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)


def _consume(ref) -> None:
    """Fetch a failed task's other return so Ray does not also log its error as unhandled."""
    try:
        ray.get(ref)
    except Exception:  # noqa: BLE001 - the same error, already reported
        pass


def _error_text(exc: BaseException) -> str:
    """One line: a CryovesError's message as is, else the exception type and its last line."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    lines = str(exc).strip().splitlines() or [""]
    if isinstance(exc, CryovesError):
        return lines[0]
    last = lines[-1]
    marker = f"{CryovesError.__module__}.{CryovesError.__name__}: "
    return last.split(marker, 1)[1] if marker in last else f"{type(exc).__name__}: {last}"


# ------------------------------------------------------------------------------------------ the batch

def run_batch(inputs, out_dir, settings: Settings, *, weights: str | None, device: str = "cpu", regions=None,
              truth=None, address: str | None = None, num_gpu_actors: int | None = None,
              max_in_flight: int | None = None, vesicles_per_task: int = VESICLES_PER_TASK,
              progress: Progress | None = None) -> pa.Table:
    """Segment every tomogram of `inputs` (see `expand_inputs`) on Ray into `out_dir`.

    `regions` and `truth` are as `make_jobs` takes them (a folder of NAME.region.mrc or NAME.mod, and
    of NAME.labels.mrc or NAME.vesicles.parquet). `weights` and `device` are the model's (the
    actors load it). `address`: None starts a local Ray instance (or uses the one this process
    already runs); "auto" or "HOST:PORT" joins a cluster. `num_gpu_actors`: inference actors, default
    one per GPU in the cluster, or 1 CPU actor where there are no GPUs. `max_in_flight`: tomograms
    between preparation and outputs at once, default the cluster's CPUs (at least 4).
    `vesicles_per_task`: sphere refinement runs in tasks of at most this many vesicles. `progress`:
    called with each result row; without it a tqdm bar over tomograms is shown on a terminal.
    Returns one row per input, in input order (RESULT_SCHEMA); failures are rows with status
    "error", never exceptions.
    """
    if max_in_flight is not None and max_in_flight < 1:
        raise CryovesError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if vesicles_per_task < 1:
        raise CryovesError(f"vesicles_per_task must be >= 1, got {vesicles_per_task}")
    if num_gpu_actors is not None and num_gpu_actors < 1:
        raise CryovesError(f"num_gpu_actors must be >= 1, got {num_gpu_actors}")
    if weights is not None and not Path(weights).exists():
        raise CryovesError(f"{weights}: model not found; pass a cryoves model folder or CryoVesNet weights.h5")
    jobs = make_jobs(expand_inputs(inputs), regions, truth)
    out_dir = check_out_dir(Path(out_dir).resolve())
    with _connect(address):
        batch = _Batch(jobs, out_dir, settings, weights=weights, device=device, num_gpu_actors=num_gpu_actors,
                       max_in_flight=max_in_flight, vesicles_per_task=vesicles_per_task, progress=progress)
        return batch.run()


@contextmanager
def _connect(address: str | None):
    """Join `address` for the block, or start a local instance that ends with it (and with this process,
    however that ends: `local_ray`), unless this process is already connected."""
    if ray.is_initialized():
        yield
    elif address is None:
        with local_ray(os.cpu_count()):
            yield
    else:
        ray.init(address=address, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@dataclass
class _InFlight:
    """One tomogram between its `_prepare` task and its result row."""

    index: int
    job: Job
    attempt: int
    start: float
    prepared_ref: object = None
    volume_ref: object = None
    seconds_ref: object = None
    prepared: Prepared | None = None
    calls: list = field(default_factory=list)
    finish_ref: object = None


class _Batch:
    """The driver of one `run_batch`: scatters `_prepare` tasks, hands their tiles to the actors and their
    batches to `_finish` tasks, and gathers one row per tomogram."""

    def __init__(self, jobs: list[Job], out_dir: Path, settings: Settings, *, weights: str | None, device: str,
                 num_gpu_actors: int | None, max_in_flight: int | None, vesicles_per_task: int,
                 progress: Progress | None) -> None:
        resources = ray.cluster_resources()
        n_gpus, n_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        self.n_actors = num_gpu_actors or max(1, n_gpus)
        if n_gpus and self.n_actors > n_gpus:
            raise CryovesError(f"num_gpu_actors={self.n_actors} but the cluster has {n_gpus} GPUs")
        if not n_gpus and self.n_actors >= n_cpus:
            raise CryovesError(f"{self.n_actors} CPU inference actor(s) need more than the cluster's {n_cpus} CPUs, "
                               "which also run preparation and post-processing; lower num_gpu_actors")
        self.gpus = n_gpus > 0
        self.max_in_flight = max_in_flight or max(MIN_IN_FLIGHT, n_cpus)
        self.out_dir, self.settings, self.weights, self.device = out_dir, settings, weights, device
        self.vesicles_per_task, self.progress = vesicles_per_task, progress
        self.pool: PredictorPool | None = None  # started when the first tomogram needs the network
        self.rows: dict[int, dict] = {}
        self.flying: dict[object, _InFlight] = {}  # the reference awaited → its tomogram
        self.pending = [(index, job, 0) for index, job in enumerate(jobs)][::-1]  # (index, job, attempt)
        self.n_jobs = len(jobs)
        self.bar = None
        self.t0 = time.perf_counter()

    def run(self) -> pa.Table:
        from tqdm import tqdm

        self.bar = tqdm(total=self.n_jobs, unit="tomogram", disable=None) if self.progress is None else None
        last_check = time.perf_counter()
        try:
            while self.pending or self.flying:
                while self.pending and len(self.flying) < self.max_in_flight:
                    self._scatter(*self.pending.pop())
                ready, _ = ray.wait(list(self.flying), num_returns=1, timeout=CLUSTER_CHECK_S)
                if self.pool is not None and time.perf_counter() - last_check >= CLUSTER_CHECK_S:
                    self.pool.fit_cluster()  # the tomograms of actors given up fail below and are submitted again
                    last_check = time.perf_counter()
                if ready:
                    item = self.flying.pop(ready[0])
                    if item.finish_ref is None:
                        self._predict(item)
                    else:
                        self._gather(item)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.pool is not None:
                self.pool.shutdown()
        return pa.Table.from_pylist([self.rows[i] for i in sorted(self.rows)], schema=RESULT_SCHEMA)

    def _scatter(self, index: int, job: Job, attempt: int) -> None:
        """Start a tomogram: its `_prepare` task."""
        item = _InFlight(index, job, attempt, time.perf_counter())
        item.prepared_ref, item.volume_ref, item.seconds_ref = _prepare.remote(job, self.settings, str(self.out_dir))
        self.flying[item.prepared_ref] = item

    def _predict(self, item: _InFlight) -> None:
        """A tomogram prepared: skip it, or send its tiles to the actors and its `_finish` task after them."""
        try:
            item.prepared = ray.get(item.prepared_ref)
        except Exception as exc:  # noqa: BLE001 - a bad file is a row, the batch goes on
            _consume(item.volume_ref)
            _consume(item.seconds_ref)
            self._row(item, "error", _error_text(exc))
            return
        if item.prepared.done:
            self._row(item, "skipped")
            return
        if self.pool is None:
            self.pool = PredictorPool(self.weights, self.device, self.settings.params.inference.precision,
                                      self.n_actors, gpus=self.gpus)
        params = self.settings.params
        try:
            item.calls = self.pool.submit(item.volume_ref, tile_plan(item.prepared, params.inference),
                                          params.inference)
        except CryovesError as exc:
            self._row(item, "error", str(exc))
            return
        params = self.settings.params
        memory = finish_memory_bytes(int(np.prod(item.prepared.shape)),
                                     int(np.prod(network_grid(item.prepared, params.inference))),
                                     _largest_node_memory(), stages=self.settings.outputs.stages,
                                     copied=np.dtype(item.prepared.dtype) != np.float32 or params.invert_contrast)
        item.finish_ref = _finish.options(memory=memory).remote(
            item.prepared_ref, self.settings, str(self.out_dir), self.vesicles_per_task, item.seconds_ref,
            *[batch for _, _, _, batch in item.calls])
        item.volume_ref = None
        self.flying[item.finish_ref] = item

    def _gather(self, item: _InFlight) -> None:
        """A tomogram's outputs written, or a failure in its tiles or post-processing."""
        try:
            finished = ray.get(item.finish_ref)
            where = ray.get([w for _, _, w, _ in item.calls])
        except ray.exceptions.RayActorError as exc:  # an actor given up or out of restarts
            self.pool.done(item.calls)
            if item.attempt < TASK_RETRIES:
                self.pending.append((item.index, item.job, item.attempt + 1))
            else:
                self._row(item, "error", _error_text(exc))
            return
        except Exception as exc:  # noqa: BLE001
            self.pool.done(item.calls)
            self._row(item, "error", _error_text(exc))
            return
        self.pool.done(item.calls, where)
        self._row(item, "ok", n_vesicles=finished.n_vesicles, where=where)

    def _row(self, item: _InFlight, status: str, error: str = "", n_vesicles: int | None = None,
             where=()) -> None:
        """The tomogram's result row (and, for a failure, its error run record)."""
        row = {"name": item.job.name, "input": str(item.job.path), "status": status, "error": error,
               "seconds": time.perf_counter() - item.start, "n_vesicles": n_vesicles,
               "node": ",".join(sorted({w["node"] for w in where})),
               "actors": ",".join(sorted({w["actor"] for w in where}, key=int)),
               "gpu_ids": ",".join(sorted({w["gpu_ids"] for w in where} - {""}))}
        if status == "error":
            try:
                write_error_record(self.out_dir, item.job, error, item.prepared)
            except CryovesError as unwritable:  # this tomogram's error too, not the batch's
                row["error"] = f"{error} (and its run record could not be written: {unwritable})"
            log.warning("%s", row["error"])
        self.rows[item.index] = row
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{len(self.rows) * 60 / (time.perf_counter() - self.t0):.1f} tomograms/min")
        else:
            self.progress(row)
