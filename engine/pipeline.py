"""One tomogram array through the whole method: probability map, threshold, segments, spheres, outliers.

`postprocess` is every stage after the network, in two halves that `cryoves.engine.job.finish` runs for `segment`
and `run` alike: `search_segments` (threshold, labels, splitting, on the probability map's grid) and `fit_spheres`
(refinement, outliers, overlaps, on the tomogram), the map free between them. `segment` adds the network
in-process, for arrays already in memory (benchmarks, tests). No state is kept between calls.
"""

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy import ndimage

from cryoves.engine.io.pages import is_mapped, read_box, release_pages
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.network.inference import InferenceParams, LogitFn, predict_probability, probability_on_input_grid
from cryoves.engine.network.rescale import nearest_to_shape, resample_to_shape, z_slabs
from cryoves.engine.stages.localize import LocalizeParams, label_segments, localize
from cryoves.engine.stages.outliers import OutlierParams, detect_outliers
from cryoves.engine.stages.overlaps import OverlapParams, render_labels, resolve_overlaps
from cryoves.engine.stages.refine import (
    RefineParams,
    Refiner,
    RefineResult,
    concat_refine_results,
    refine_batch,
    refine_spheres,
    z_ordered_parts,
)
from cryoves.engine.stages.threshold import ThresholdParams, ThresholdResult, global_threshold
from cryoves.engine.units import nm_to_vox

log = logging.getLogger(__name__)

STAGES = ("network", "threshold", "label", "localize", "refine", "outliers", "overlap")
"""Stage names, in order; the label volumes of the paper's per-stage evaluation are global, local, sphere, final."""


@dataclass(frozen=True, kw_only=True)
class SegmentParams:
    """Every parameter of the method, grouped by stage; defaults are the measured best (docs)."""

    inference: InferenceParams = field(default_factory=InferenceParams)
    threshold: ThresholdParams = field(default_factory=ThresholdParams)
    localize: LocalizeParams = field(default_factory=LocalizeParams)
    refine: RefineParams = field(default_factory=RefineParams)
    outliers: OutlierParams = field(default_factory=OutlierParams)
    overlap: OverlapParams = field(default_factory=OverlapParams)
    invert_contrast: bool = False  # for tomograms with bright membranes: the method needs them dark


@dataclass(frozen=True, eq=False)
class Segmentation:
    """The result for one tomogram, its label volumes on the input grid."""

    shape: tuple[int, int, int]      # the input grid's
    probability: np.ndarray | None   # float32, on the grid of the segments' search (the network's or the input's),
                                     # when kept (`search_segments`)
    threshold: float                 # the global threshold t*
    labels: dict[str, np.ndarray]    # the earlier stages' labels: "global", "local", "sphere" (unless not kept)
    vesicles: pa.Table               # one row per fitted sphere; final label k = k-th kept/repaired row
    seconds: dict[str, float]        # wall time per stage
    warnings: tuple[str, ...] = ()   # what a user should check (also in the run record)

    def final_labels(self) -> np.ndarray:
        """The final labels: the kept and repaired spheres rendered on the input grid (`render_labels`), made when
        asked for (a label file is written from them by slabs, `label_slabs`: 547 MB at 1024x1024x261)."""
        return render_labels(self.shape, self.vesicles)


Progress = Callable[[str], None]


_ORIENT_PART_VOXELS = 1 << 23


def oriented(tomogram: np.ndarray, params: SegmentParams) -> np.ndarray:
    """The tomogram as float32 with dark membranes: negated when `params.invert_contrast`.

    A mapped file that needs a copy (16-bit, or negated) is copied by parts of z-sections of `_ORIENT_PART_VOXELS`,
    its pages released after each: the whole file stayed resident beside the copy (`_finish` grew 17.6 instead of
    9.7 bytes per voxel with --invert-contrast)."""
    if not is_mapped(tomogram) or tomogram.ndim != 3 or (tomogram.dtype == np.float32 and not params.invert_contrast):
        tomogram = np.asarray(tomogram, dtype=np.float32)
        return np.negative(tomogram) if params.invert_contrast else tomogram
    out = np.empty(tomogram.shape, np.float32)
    for source, target in zip(z_slabs(tomogram, _ORIENT_PART_VOXELS), z_slabs(out, _ORIENT_PART_VOXELS)):
        if params.invert_contrast:
            np.negative(source, out=target, dtype=np.float32)
        else:
            np.copyto(target, source)
        release_pages(tomogram)
    return out


def segment(tomogram: np.ndarray, voxel_size_a: float, logit_fn: LogitFn, params: SegmentParams,
            region: np.ndarray | None = None, progress: Progress | None = None, *,
            keep_stages: bool = True) -> Segmentation:
    """Predict the probability map of `tomogram` and post-process it (`postprocess`)."""
    tomogram = oriented(tomogram, params)
    seconds: dict[str, float] = {}
    with _timed("network", seconds, progress):
        probability = predict_probability(tomogram, voxel_size_a, logit_fn, params.inference)
    result = postprocess(tomogram, probability, voxel_size_a, params, region, progress, keep_stages=keep_stages)
    result.seconds.update(seconds)
    return result


def postprocess(tomogram: np.ndarray, probability: np.ndarray, voxel_size_a: float, params: SegmentParams,
                region: np.ndarray | None = None, progress: Progress | None = None, *,
                refiner: Refiner | None = None, keep_stages: bool = True) -> Segmentation:
    """All stages after the network: the segments' search on the grid of `probability` (`search_segments`), then the
    spheres on the raw tomogram intensities (`fit_spheres`); the result keeps the map."""
    segments = search_segments(tomogram, probability, voxel_size_a, params, region, progress, keep_stages=keep_stages)
    return fit_spheres(tomogram, segments, voxel_size_a, params, progress, refiner=refiner, keep_stages=keep_stages)


@dataclass(frozen=True, eq=False)
class Segments:
    """The segments' search, on the grid of its probability map: what the spheres are fitted from."""

    labels: np.ndarray               # `localize`'s, on the search grid
    search: ThresholdResult          # the global threshold's
    voxel_size_a: float              # the search grid's spacing, up to rounding
    n_above_half: int                # voxels of the map above 0.5 (`quality_warnings`)
    probability: np.ndarray | None   # the map searched, when kept
    stages: dict[str, np.ndarray]    # "global": the global labels on the input grid, when kept
    seconds: dict[str, float]        # wall time per stage


def search_segments(tomogram: np.ndarray, probability: np.ndarray, voxel_size_a: float, params: SegmentParams,
                    region: np.ndarray | None = None, progress: Progress | None = None, *, keep_stages: bool = True,
                    keep_probability: bool = True) -> Segments:
    """Threshold, label and split the segments of `probability`; nothing after this reads the map, which the result
    keeps only with `keep_probability` (`finish` lets it go here unless it writes it: 326 MB at 1024x1024x261).

    `probability` lies on the network grid or on the tomogram's (the same field of view, centres aligned). The
    search runs on the coarser of the two: a map finer than the tomogram is resampled to it, and on a coarser
    map the threshold's shell criterion reads the tomogram resampled to the map (benchmarks/ACCURACY.md: the
    same vesicles, the search 2-21 times faster at 7-15 Å). `tomogram` is already `oriented` (dark membranes).
    A tomogram mapped from its file (`read_volume`) is read by parts, its pages released after each (`release_pages`:
    the threshold's resample at the coarser map's shells, refinement in bands of vesicles, the polarity check).
    `region` (bool, input grid) restricts detection to the presynaptic cytoplasm (method.md §2.8). Without
    `keep_stages` the global labels are not returned, and `localize` splits them in place.
    """
    if probability.ndim != 3 or tomogram.ndim != 3:
        raise ValueError(f"probability {probability.shape} and tomogram {tomogram.shape} must be 3-D")
    if any(m > n for m, n in zip(probability.shape, tomogram.shape)):
        probability = probability_on_input_grid(probability, tomogram.shape)
    grid = probability.shape
    scale = np.divide(tomogram.shape, grid)
    search_voxel_size_a = voxel_size_a * float(np.mean(scale))  # the network grid's spacing, up to rounding
    if region is not None:
        inside = region if grid == region.shape else resample_to_shape(region.astype(np.float32), grid) >= 0.5
        probability = np.where(inside, probability, np.float32(0))
    seconds: dict[str, float] = {}
    with _timed("threshold", seconds, progress):
        search = global_threshold(tomogram, probability, params.threshold)
    release_pages(tomogram)  # a mapped file's: every later stage reads parts of it
    with _timed("label", seconds, progress):
        global_labels = label_segments(probability, search.threshold, params.localize.connectivity)
    with _timed("localize", seconds, progress):
        local_labels = localize(probability, global_labels, search.threshold, search_voxel_size_a, params.localize,
                                overwrite=not keep_stages)
    stages = {"global": nearest_to_shape(global_labels, tomogram.shape)} if keep_stages else {}
    n_above_half = sum(int(np.count_nonzero(slab > 0.5)) for slab in z_slabs(probability))  # no whole-map mask
    return Segments(local_labels, search, search_voxel_size_a, n_above_half, probability if keep_probability else None,
                    stages, seconds)


def fit_spheres(tomogram: np.ndarray, segments: Segments, voxel_size_a: float, params: SegmentParams,
                progress: Progress | None = None, *, refiner: Refiner | None = None,
                keep_stages: bool = True) -> Segmentation:
    """Spheres refined from the segments on the raw intensities, outliers, overlaps, and the warnings of the whole.
    `refiner`: see `refine.Refiner`. Without `keep_stages` no earlier stage's labels are returned. The final labels
    are the table's spheres, rendered when asked for (`Segmentation.final_labels`)."""
    seconds = dict(segments.seconds)
    stages = dict(segments.stages)
    with _timed("refine", seconds, progress):
        spheres = refine_spheres(tomogram, segments.labels, voxel_size_a, params.refine,
                                 refiner=refine_in_bands if refiner is None else refiner)
        if keep_stages:
            stages |= {"local": nearest_to_shape(segments.labels, tomogram.shape),
                       "sphere": render_labels(tomogram.shape, spheres)}
    with _timed("outliers", seconds, progress):
        checked = detect_outliers(tomogram, spheres, voxel_size_a, params.outliers, params.refine)
    with _timed("overlap", seconds, progress):
        final = resolve_overlaps(checked, voxel_size_a, params.overlap)
    vesicles = final.append_column("stage", pa.array(_deciding_stage(spheres, checked, final), pa.string()))
    warnings = quality_warnings(tomogram, segments.n_above_half, segments.search, vesicles, segments.voxel_size_a,
                                params.overlap.min_radius_nm)
    for message in warnings:
        log.warning(message)
    return Segmentation(tuple(tomogram.shape), segments.probability, float(segments.search.threshold), stages,
                        vesicles, seconds, warnings)


CHECK = ("check the voxel size, the contrast (--invert-contrast), the pre-filter (--prefilter-sigma) "
         "and the model (--weights)")


_BAND_BYTES = 1 << 23  # 128x256x256 at 22 Å in 4 bands: 10 ms more refine, 50 MB less peak (the file's pages)
_MAX_BANDS = 8  # each band costs about 25 ms of smaller batches: 1024x1024x261 at 14.69 Å, 32 bands took 0.8 s more


def refine_in_bands(tomogram: np.ndarray, centers: np.ndarray, radii: np.ndarray, params: RefineParams) -> RefineResult:
    """`refine_batch` of a mapped tomogram over bands of vesicles ordered by z (`_BAND_BYTES` of the tomogram each, at
    most `_MAX_BANDS`), its pages released after each band: the spheres' boxes cover most of the tomogram, whose
    pages would otherwise all become resident (250 MB at 200x512x512). Rows are independent: the same result as one
    batch, which is what a tomogram in memory gets."""
    n_bands = int(min(len(centers), _MAX_BANDS, max(1, tomogram.nbytes // _BAND_BYTES)))
    if n_bands <= 1 or not is_mapped(tomogram):
        return refine_batch(tomogram, centers, radii, params)
    order, bands = z_ordered_parts(centers, n_bands)
    parts = []
    for rows in bands:
        parts.append(refine_batch(tomogram, centers[rows], np.asarray(radii)[rows], params))
        release_pages(tomogram)
    return concat_refine_results(parts, order)


def quality_warnings(tomogram: np.ndarray, n_above_half: int, search: ThresholdResult, vesicles: pa.Table,
                     voxel_size_a: float, min_radius_nm: float) -> tuple[str, ...]:
    """One line per sign that the result cannot be trusted, each saying what to check; never a silent empty result.
    `n_above_half` counts the voxels of the probability map above 0.5, `voxel_size_a` is the spacing of its grid.

    - the map holds less vesicle than one smallest vesicle (sphere of `min_radius_nm`): the network saw none;
    - the threshold search ends at the top of its range: the best boundary may lie beyond it (a very
      confident map does this too: CryoVesNet's on tilt-series phantoms);
    - the vesicles' radial profiles have a bright peak rather than a dark dip: membranes look white;
    - no vesicle is kept.
    """
    messages = []
    v_min = 4 / 3 * np.pi * float(nm_to_vox(min_radius_nm, voxel_size_a)) ** 3
    if n_above_half < v_min:
        messages.append(f"the probability map holds almost no vesicle ({n_above_half} voxels above 0.5, less than one "
                        f"{min_radius_nm:g} nm vesicle): {CHECK}")
    if search.searched and search.thresholds.size > 1 and search.threshold >= search.thresholds[-1]:
        messages.append(f"the global threshold search ended at the top of its range ({search.threshold:.2f}); "
                        f"if the membranes are white, rerun with --invert-contrast; else {CHECK}")
    if membrane_polarity(tomogram, vesicles) < 0:
        messages.append("the vesicles' radial profiles peak where they should dip: the membranes look white "
                        "(inverted contrast); if so, rerun with --invert-contrast")
    if not np.any(active_mask(vesicles)):
        messages.append(f"no vesicles found: {CHECK}")
    return tuple(messages)


_POLARITY_DIRECTIONS = 64
_POLARITY_VESICLES = 128  # a median's sign needs no more; 1927 vesicles of a 1024x1024x261 tomogram took 1 s


def membrane_polarity(tomogram: np.ndarray, vesicles: pa.Table) -> float:
    """Median over the vesicles found (at most `_POLARITY_VESICLES`, evenly spread over the table) of
    log(dip / peak) of each one's radial profile (0 to 1.5 radii): the largest excursion below the profile's
    median against the largest above it. Dark membranes dip (> 0), white ones peak (< 0): a sign test that
    needs no calibration; NaN with fewer than 3 vesicles."""
    active = np.flatnonzero(active_mask(vesicles))
    if active.size < 3:
        return float("nan")
    active = active[np.linspace(0, active.size - 1, min(active.size, _POLARITY_VESICLES)).round().astype(int)]
    centers, radii = centers_vox(vesicles)[active], radii_vox(vesicles)[active]
    golden = np.pi * (3 - np.sqrt(5))  # a Fibonacci sphere: evenly spread directions
    z = np.linspace(1 - 1 / _POLARITY_DIRECTIONS, 1 / _POLARITY_DIRECTIONS - 1, _POLARITY_DIRECTIONS)
    ring = np.sqrt(1 - z**2)
    turns = golden * np.arange(_POLARITY_DIRECTIONS)
    directions = np.column_stack([z, ring * np.sin(turns), ring * np.cos(turns)])
    fractions = np.linspace(0.0, 1.5, 31)
    points = (centers[:, None, None, :]
              + (fractions[None, :, None, None] * radii[:, None, None, None]) * directions[None, None, :, :])
    samples = np.empty(points.shape[:3])
    for i, vesicle in enumerate(points.reshape(len(points), -1, 3)):  # from each one's box, which a mapped tomogram
        # reads from its file (`read_box`): through the map, 128 vesicles would make much of the tomogram resident
        lo = np.clip(np.floor(vesicle.min(axis=0)).astype(int), 0, None)
        hi = np.minimum(np.floor(vesicle.max(axis=0)).astype(int) + 2, tomogram.shape)  # the linear interpolation's
        box = read_box(tomogram, tuple(slice(a, b) for a, b in zip(lo, hi)))  # neighbours; the tomogram's faces
        samples[i] = ndimage.map_coordinates(box, (vesicle - lo).T, order=1,  # where it ends there ("nearest")
                                             mode="nearest").reshape(samples[i].shape)
    profiles = samples.mean(axis=2)
    median = np.median(profiles, axis=1)
    dip, peak = median - profiles.min(axis=1), profiles.max(axis=1) - median
    return float(np.median(np.log((dip + 1e-12) / (peak + 1e-12))))


def _deciding_stage(spheres: pa.Table, checked: pa.Table, final: pa.Table) -> list[str]:
    """Where each vesicle's outcome was last changed: refine, outliers, overlap, or final (kept as fitted)."""
    fitted, tested, resolved = (np.asarray(t.column("outcome").to_pylist(), dtype=object)
                                for t in (spheres, checked, final))
    stage = np.full(len(fitted), "final", dtype=object)
    stage[tested != fitted] = "outliers"
    stage[resolved != tested] = "overlap"
    stage[fitted == "removed"] = "refine"
    return stage.tolist()


@contextmanager
def _timed(stage: str, seconds: dict[str, float], progress: Progress | None):
    """Report `stage` as it starts and record its wall time in `seconds`."""
    if progress is not None:
        progress(stage)
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start
