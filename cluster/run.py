"""`cryoves run`: screen many tomograms on Ray, with the same result as `cryoves segment` per file.

Per tomogram, three kinds of work, pipelined across tomograms:

1. `_prepare` (CPU task): validate and checksum the file (`prepare_job`), skip it when its outputs
   are complete and current (`is_done`), else make the network input (`prepare_network_input`).
2. `Predictor` actors (one per GPU, or CPU actors on a machine without GPUs) each load the model
   once and predict batches of tiles: exactly the batches `predict_tiled` forms, so one large
   tomogram is spread over several actors and the probability map is bit-identical.
3. `_finish` (CPU task): assemble the map, `probability_on_input_grid`, `postprocess`, `write_outputs`;
   its sphere refinement goes to `_refine_chunk` tasks over chunks of vesicles, which share the
   tomogram through the object store (`refine.Refiner`), so one large tomogram also uses the
   cluster's cores.

The driver keeps at most `max_in_flight` tomograms between 1 and 3 (backpressure through
`ray.wait`; by default as many as the cluster has CPUs, at least 4), so memory stays flat however
many files are listed, and each `_finish` task asks Ray for the memory its tomogram needs
(`finish_memory_bytes`), so a node runs only as many at once as it can hold. A file that fails becomes an error
row (and an error run record) and the batch goes on; tasks and actors are retried when a worker,
an actor or a node dies, and outputs are written atomically, so a retry gives the same files. When a
lost node leaves too few GPUs for every actor, the actors that cannot restart are given up and their
tomograms are submitted again to the others (`PredictorPool.fit_cluster`).

On a cluster, every node needs cryoves installed and `out_dir` and the inputs on a shared filesystem.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.outputs import companion_file, tomogram_name, write_outputs, write_run_record
from cryoves.engine.job import REGION_SUFFIXES, Job, is_done, load_region, prepare_job
from cryoves.engine.network.inference import (
    InferenceParams,
    plan_inference,
    predict_batch,
    prepare_network_input,
    probability_on_input_grid,
)
from cryoves.engine.pipeline import SegmentParams, oriented, postprocess
from cryoves.engine.scoring.evaluate import TRUTH_SUFFIXES, write_metrics
from cryoves.engine.stages.overlaps import rendered_spheres
from cryoves.engine.stages.refine import RefineParams, Refiner, RefineResult, concat_refine_results, refine_batch

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
FINISH_BYTES_PER_VOXEL = 18
"""Memory a `_finish` task asks Ray for, per input voxel: its resident memory grows by 16-17.5 bytes
per voxel on 128x256x256 and 200x512x512 phantoms at 22 Å and by 16 (4.4 GB) on 1024x1024x261 at
14.69 Å. Ray then runs no more post-processing tasks on a node than its memory holds."""
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
    (`.txt`/`.lst`/`.list`, one input per line, `#` comments, paths relative to the list) → files.

    Order is kept, duplicates dropped; a missing input, an empty folder or pattern, or two files
    that would write the same outputs (same name) raise CryovesError.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for item in inputs:
        found += _expand_one(str(item), allow_list=True)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    by_name: dict[str, list[Path]] = {}
    for path in unique:
        by_name.setdefault(tomogram_name(path), []).append(path)
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise CryovesError(f"{len(clashes)} tomogram name(s) occur twice and would overwrite each other's "
                           f"outputs, e.g. {name}: {', '.join(map(str, paths))}; rename or run them separately")
    if not unique:
        raise CryovesError("no input tomograms given")
    return unique


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


# ------------------------------------------------------------------------------------------ tiles

def assemble(shape, params: InferenceParams, batches) -> np.ndarray:
    """The network-grid probability map from `predict_batch` results, given as (first, probabilities)."""
    plan = plan_inference(tuple(shape), params)
    output = np.empty(tuple(shape), dtype=np.float32)
    written = 0
    for first, probabilities in batches:
        for tile, probability in zip(plan.tiles[first:first + plan.batch_size], probabilities):
            output[tile.write] = probability
            written += 1
    if written != len(plan.tiles):
        raise RuntimeError(f"assembled {written} of {len(plan.tiles)} tiles")
    return output


# ------------------------------------------------------------------------------------------ Ray work

@ray.remote
class Predictor:
    """Holds the model (loaded once) and predicts batches of tiles of network-grid volumes."""

    def __init__(self, index: int, weights: str | None) -> None:
        from cryoves.engine.network.model import load_logit_fn  # TensorFlow loads in the actor, not the driver

        self.index = index
        self.logit_fn = load_logit_fn(weights)
        self.where = {"actor": str(index), "node": ray.util.get_node_ip_address(),
                      "node_id": ray.get_runtime_context().get_node_id(),
                      "gpu_ids": ",".join(map(str, ray.get_gpu_ids()))}

    def ready(self) -> dict:
        return self.where

    def predict(self, volume: np.ndarray, first: int, params: InferenceParams):
        start = time.perf_counter()
        probabilities = predict_batch(volume, plan_inference(volume.shape, params), first, self.logit_fn, params)
        return self.where, {"first": first, "probabilities": probabilities,
                            "seconds": time.perf_counter() - start}


@ray.remote(num_returns=2, max_retries=TASK_RETRIES)
def _prepare(path: str, out_dir: str, params: SegmentParams, weights_sha256: str,
             voxel_size_a: float | None, region_dir: str | None):
    """(meta, network input): meta says skipped or gives what the driver needs to dispatch tiles."""
    start = time.perf_counter()
    region = companion_file(region_dir, tomogram_name(path), REGION_SUFFIXES) if region_dir else None
    job = prepare_job(path, params, weights_sha256, voxel_size_a, region)
    meta = {"name": job.name, "record": job.record}
    if is_done(out_dir, job):
        return meta | {"skipped": True}, None
    tomogram = oriented(job.volume.data, params)
    network_input = prepare_network_input(tomogram, job.volume.voxel_size_a, params.inference)
    plan = plan_inference(network_input.shape, params.inference)
    meta |= {"skipped": False, "n_voxels": int(tomogram.size), "network_shape": network_input.shape,
             "n_tiles": len(plan.tiles),
             "batch_size": plan.batch_size, "prepare_seconds": time.perf_counter() - start}
    return meta, network_input


_refine_chunk = ray.remote(max_retries=TASK_RETRIES)(refine_batch)
"""`refine_batch` as a task, for some of a tomogram's vesicles."""


def chunked_refiner(tomogram: np.ndarray, vesicles_per_task: int) -> Refiner:
    """A `Refiner` that refines chunks of `vesicles_per_task` vesicles of `tomogram` in `_refine_chunk`
    tasks, the tomogram put once into the object store; a tomogram with no more vesicles is refined here."""
    def refine(centers: np.ndarray, radii: np.ndarray, params: RefineParams) -> RefineResult:
        if len(centers) <= vesicles_per_task:
            return refine_batch(tomogram, centers, radii, params)
        shared = ray.put(tomogram)
        chunks = [_refine_chunk.remote(shared, centers[i:i + vesicles_per_task], radii[i:i + vesicles_per_task],
                                       params) for i in range(0, len(centers), vesicles_per_task)]
        return concat_refine_results(ray.get(chunks))

    return refine


@ray.remote(max_retries=TASK_RETRIES)
def _finish(path: str, out_dir: str, meta: dict, params: SegmentParams, voxel_size_a: float | None,
            write_probability: bool, truth_dir: str | None, vesicles_per_task: int, *batches) -> int:
    """Assemble the map, post-process and write every output, as `segment_file` does; → vesicle count."""
    start = time.perf_counter()
    volume = read_volume(path, voxel_size_a)
    job = Job(Path(path), meta["name"], volume, meta["record"])
    prob_net = assemble(meta["network_shape"], params.inference,
                        [(b["first"], b["probabilities"]) for b in batches])
    tomogram = oriented(job.volume.data, params)
    probability = probability_on_input_grid(prob_net, tomogram.shape)
    region = job.record["region"]
    mask = load_region(region, tomogram.shape, job.volume.voxel_size_a) if region else None
    refiner = chunked_refiner(tomogram, vesicles_per_task)
    result = postprocess(tomogram, probability, job.volume.voxel_size_a, params, mask, refiner=refiner,
                         keep_stages=False)
    result.seconds["network"] = sum(b["seconds"] for b in batches) + meta["prepare_seconds"]
    total = time.perf_counter() - start + result.seconds["network"]
    record = job.record | {"total_seconds": total}
    paths = write_outputs(out_dir, job.name, job.volume, result, record, write_probability=write_probability)
    truth = companion_file(truth_dir, job.name, TRUTH_SUFFIXES) if truth_dir else None
    if truth is not None:
        write_metrics(out_dir, job.name, paths["labels"], truth)
    return int(rendered_spheres(result.vesicles)[0].sum())


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

    def __init__(self, weights: str | None, n_actors: int, gpus: bool) -> None:
        # GPU actors reserve no CPU (else they can take every CPU and starve the CPU tasks they feed)
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
        self.gpus = gpus
        self.actors = {i: Predictor.options(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES,
                                            **options).remote(i, weights) for i in range(n_actors)}
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

    def submit(self, volume_ref, meta: dict, params: InferenceParams) -> list[tuple]:
        """One call per batch of tiles of a tomogram → [(actor index, tiles, where ref, result ref)]."""
        if not self.actors:
            raise CryovesError(f"no {'GPU' if self.gpus else 'CPU'} is left in the cluster for inference; "
                               "rerun the same command when it has one again to finish the batch")
        calls = []
        for first in range(0, meta["n_tiles"], meta["batch_size"]):
            i = min(self.actors, key=lambda k: self.queued[k])
            n = min(meta["batch_size"], meta["n_tiles"] - first)
            self.queued[i] += n
            where, result = self.actors[i].predict.options(num_returns=2).remote(volume_ref, first, params)
            calls.append((i, n, where, result))
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


def finish_memory_bytes(n_voxels: int, largest_node_bytes: float) -> int:
    """Memory to reserve for post-processing a tomogram of `n_voxels`, at most what the largest node
    offers (a larger request could never be scheduled and would wait for ever)."""
    return int(min(FINISH_BYTES_PER_VOXEL * n_voxels, largest_node_bytes))


def _largest_node_memory() -> float:
    return max((node["Resources"].get("memory", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)


@dataclass
class _InFlight:
    index: int
    path: Path
    attempt: int
    start: float
    meta_ref: object = None
    volume_ref: object = None
    meta: dict | None = None
    calls: list = field(default_factory=list)
    finish_ref: object = None


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

def run_batch(inputs, out_dir, params: SegmentParams, *, weights: str | None, weights_sha256: str,
              address: str | None = None, num_gpu_actors: int | None = None,
              voxel_size_a: float | None = None, max_in_flight: int | None = None,
              progress: Progress | None = None,
              write_probability: bool = False, truth_dir: str | None = None,
              region_dir: str | None = None, vesicles_per_task: int = VESICLES_PER_TASK) -> pa.Table:
    """Segment every tomogram of `inputs` (see `expand_inputs`) on Ray into `out_dir`.

    `address`: None starts a local Ray instance (or uses the one this process already runs);
    "auto" or "HOST:PORT" joins a cluster. `num_gpu_actors`: inference actors, default one per GPU
    in the cluster, or 1 CPU actor where there are no GPUs. `max_in_flight`: tomograms between
    preparation and outputs at once, default the cluster's CPUs (at least 4). `progress`: called with each result row;
    without it a tqdm bar over tomograms is shown on a terminal. Returns one row per input, in input
    order (RESULT_SCHEMA); failures are rows with status "error", never exceptions. With `truth_dir`,
    tomograms whose ground truth is there (NAME.labels.mrc or NAME.vesicles.parquet) are scored into
    `out_dir/metrics/NAME.parquet`. With `region_dir`, tomograms whose region is there
    (NAME.region.mrc or NAME.mod, see `cryoves segment --region`) are segmented inside it.
    `vesicles_per_task`: sphere refinement runs in tasks of at most this many vesicles.
    """
    if max_in_flight is not None and max_in_flight < 1:
        raise CryovesError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if vesicles_per_task < 1:
        raise CryovesError(f"vesicles_per_task must be >= 1, got {vesicles_per_task}")
    if num_gpu_actors is not None and num_gpu_actors < 1:
        raise CryovesError(f"num_gpu_actors must be >= 1, got {num_gpu_actors}")
    if weights is not None and not Path(weights).exists():
        raise CryovesError(f"{weights}: model not found; pass a cryoves model folder or CryoVesNet weights.h5")
    paths = expand_inputs(inputs)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started_ray = _connect(address)
    try:
        return _run(paths, out_dir, params, weights, weights_sha256, num_gpu_actors, voxel_size_a,
                    max_in_flight, progress, write_probability, truth_dir, region_dir, vesicles_per_task)
    finally:
        if started_ray:
            ray.shutdown()


def _connect(address: str | None) -> bool:
    """Join `address`, or start a local instance unless this process is already connected; → started."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def _run(paths, out_dir, params, weights, weights_sha256, num_gpu_actors, voxel_size_a, max_in_flight,
         progress, write_probability, truth_dir, region_dir, vesicles_per_task) -> pa.Table:
    from tqdm import tqdm

    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    n_actors = num_gpu_actors or max(1, n_gpus)
    if n_gpus and n_actors > n_gpus:
        raise CryovesError(f"num_gpu_actors={n_actors} but the cluster has {n_gpus} GPUs")
    n_cpus = int(ray.cluster_resources().get("CPU", 0))
    max_in_flight = max_in_flight or max(MIN_IN_FLIGHT, n_cpus)
    if not n_gpus and n_actors >= n_cpus:
        raise CryovesError(f"{n_actors} CPU inference actor(s) need more than the cluster's {n_cpus} CPUs, "
                           "which also run preparation and post-processing; lower num_gpu_actors")
    pool: PredictorPool | None = None  # started when the first tomogram needs the network
    rows: dict[int, dict] = {}
    flying: dict[object, _InFlight] = {}  # the reference awaited → its tomogram
    pending = [(index, path, 0) for index, path in enumerate(paths)][::-1]  # (index, path, attempt)
    bar = tqdm(total=len(paths), unit="tomogram", disable=None) if progress is None else None
    t0 = last_check = time.perf_counter()

    def finish_row(item: _InFlight, status: str, error: str = "", n_vesicles=None, where=()) -> None:
        name = item.meta["name"] if item.meta else tomogram_name(item.path)
        row = {"name": name, "input": str(item.path), "status": status, "error": error,
               "seconds": time.perf_counter() - item.start, "n_vesicles": n_vesicles,
               "node": ",".join(sorted({w["node"] for w in where})),
               "actors": ",".join(sorted({w["actor"] for w in where}, key=int)),
               "gpu_ids": ",".join(sorted({w["gpu_ids"] for w in where} - {""}))}
        if status == "error":
            log.warning("%s", error)
            write_run_record(out_dir, name, {"tomogram": name, "input": str(item.path), "status": "error",
                                             "error": error} | ({"input_sha256": item.meta["record"]["input_sha256"],
                                                                 "params_digest": item.meta["record"]["params_digest"]}
                                                                if item.meta else {}))
        rows[item.index] = row
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{len(rows) * 60 / (time.perf_counter() - t0):.1f} tomograms/min")
        else:
            progress(row)

    try:
        while pending or flying:
            while pending and len(flying) < max_in_flight:
                index, path, attempt = pending.pop()
                item = _InFlight(index, path, attempt, time.perf_counter())
                item.meta_ref, item.volume_ref = _prepare.remote(str(path), str(out_dir), params,
                                                                 weights_sha256, voxel_size_a,
                                                                 region_dir and str(region_dir))
                flying[item.meta_ref] = item
            ready, _ = ray.wait(list(flying), num_returns=1, timeout=CLUSTER_CHECK_S)
            if pool is not None and time.perf_counter() - last_check >= CLUSTER_CHECK_S:
                pool.fit_cluster()  # the tomograms of actors given up fail below and are submitted again
                last_check = time.perf_counter()
            if not ready:
                continue
            item = flying.pop(ready[0])
            if item.finish_ref is None:  # preparation done
                try:
                    item.meta = ray.get(item.meta_ref)
                except Exception as exc:  # noqa: BLE001 - a bad file is a row, the batch goes on
                    _consume(item.volume_ref)
                    finish_row(item, "error", _error_text(exc))
                    continue
                if item.meta["skipped"]:
                    finish_row(item, "skipped")
                    continue
                if pool is None:
                    pool = PredictorPool(weights, n_actors, gpus=n_gpus > 0)
                try:
                    item.calls = pool.submit(item.volume_ref, item.meta, params.inference)
                except CryovesError as exc:
                    finish_row(item, "error", str(exc))
                    continue
                memory = finish_memory_bytes(item.meta["n_voxels"], _largest_node_memory())
                item.finish_ref = _finish.options(memory=memory).remote(
                    str(item.path), str(out_dir), item.meta, params, voxel_size_a, write_probability,
                    truth_dir and str(truth_dir), vesicles_per_task, *[result for _, _, _, result in item.calls])
                item.volume_ref = None
                flying[item.finish_ref] = item
            else:  # outputs written, or a failure in its tiles or post-processing
                where = []
                try:
                    n_vesicles = ray.get(item.finish_ref)
                    where = ray.get([w for _, _, w, _ in item.calls])
                except ray.exceptions.RayActorError as exc:  # an actor given up or out of restarts
                    pool.done(item.calls)
                    if item.attempt < TASK_RETRIES:
                        pending.append((item.index, item.path, item.attempt + 1))
                    else:
                        finish_row(item, "error", _error_text(exc))
                    continue
                except Exception as exc:  # noqa: BLE001
                    pool.done(item.calls)
                    finish_row(item, "error", _error_text(exc))
                    continue
                pool.done(item.calls, where)
                finish_row(item, "ok", n_vesicles=n_vesicles, where=where)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown()
    return pa.Table.from_pylist([rows[i] for i in sorted(rows)], schema=RESULT_SCHEMA)
