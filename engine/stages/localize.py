"""Segments of the probability map: connected components (method.md §2.10), adaptive local
thresholding (§2.11) and the discarding rules (§2.12).

Per-segment work runs on the segment's sub-box only; the full volume is passed over a fixed number
of times (statistics before and after, one relabelling), never once per segment or per threshold.
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy import ndimage
from skimage.segmentation import watershed

from cryoves.engine.errors import CryovesError
from cryoves.engine.units import nm_to_vox
from cryoves.kernels.components import component_counts, deep_maxima, label_above
from cryoves.kernels.labels import LabelStats, check_labels, label_dtype, present_labels, relabel

_STRUCTURE = {6: ndimage.generate_binary_structure(3, 1), 26: ndimage.generate_binary_structure(3, 3)}

# The local threshold passes of the split step: (start, step); each runs while t < 1.
_SPLIT_PASSES = ((None, 0.01), (0.99, 0.001), (0.999, 0.0001))
_MAX_SPLIT_DEPTH = 8  # a split piece is split again at most this many times (split_regrow)


def label_segments(probability: np.ndarray, threshold: float, connectivity: int = 6) -> np.ndarray:
    """Connected components of ``{P > threshold}`` (float64 comparison), ids 1..n in raster order
    (`label_dtype(n)`: uint16 unless there are more than 65,535).

    ``connectivity`` is 6 (faces; current code) or 26 (faces, edges, corners; paper-era code).
    """
    probability = np.asarray(probability)
    if probability.ndim != 3:
        raise ValueError(f"probability must be 3-D (z, y, x), got shape {probability.shape}")
    return label_above(probability, threshold, connectivity)[0]


def segment_stats(labels: np.ndarray) -> pa.Table:
    """One row per segment present in ``labels`` (ascending id).

    Columns: ``label``, ``volume_vox``, ``bbox_volume_vox``, ``extent`` (= volume / bbox volume),
    ``bbox_lo_{z,y,x}_vox`` (inclusive), ``bbox_hi_{z,y,x}_vox`` (exclusive), ``centroid_{z,y,x}_vox``.
    """
    s = present_labels(labels)
    columns = {
        "label": pa.array(s.ids, pa.uint32()),
        "volume_vox": pa.array(s.volume, pa.int64()),
        "bbox_volume_vox": pa.array(s.bbox_volume, pa.int64()),
        "extent": pa.array(s.extent, pa.float64()),
    }
    for a, axis in enumerate("zyx"):
        columns[f"bbox_lo_{axis}_vox"] = pa.array(s.lo[:, a], pa.int64())
    for a, axis in enumerate("zyx"):
        columns[f"bbox_hi_{axis}_vox"] = pa.array(s.hi[:, a], pa.int64())
    for a, axis in enumerate("zyx"):
        columns[f"centroid_{axis}_vox"] = pa.array(s.centroid[:, a], pa.float64())
    return pa.table(columns)


@dataclass(frozen=True, kw_only=True)
class LocalizeParams:
    """Adaptive local thresholding and discarding rules (method.md §2.10-2.12, §2.23)."""

    connectivity: int = 6  # global labelling (label_segments): 6 current code, 26 paper-era
    split: bool = True
    split_max_extent: float = 0.5  # candidates have extent below this: code 0.5, paper text 0.25
    # ... and a volume z-score above this (code and paper: 1.0). None: any volume. On phantoms half of
    # the merged touching pairs have z < 1 because vesicle sizes vary (README, "Accuracy").
    split_min_volume_z: float | None = None
    # Pieces reclaim the candidate's voxels by watershed and are split again (see _split); the
    # reference keeps only the pieces above the raised threshold and splits once.
    split_regrow: bool = True
    # A candidate that no raised threshold splits (a saturated map: P = 1 through the contact) is cut
    # at the necks of its distance transform, between maxima at least this much deeper than the neck
    # (touching spheres). None: the reference's threshold split only. Measured on tilt-series development
    # phantoms: merged pairs show 2 maxima down to 3 voxels' depth, single vesicles never more than 1.
    split_neck_depth_nm: float | None = 3.0
    grow: bool = False  # paper-era on, current off
    grow_small_factor: float = 1.0  # p: segments with V < p * V_min are small
    grow_target_factor: float = 4.0  # q: a component is taken if its volume >= q * V_min
    grow_step: float = 0.025  # t = t* - step, t* - 2 step, ... while t > grow_min_threshold
    grow_min_threshold: float = 0.80
    min_extent: float = 0.25
    max_extent: float = 0.75
    min_radius_nm: float = 12.0  # V_min = 4/3 pi r_min^3

    def __post_init__(self) -> None:
        if self.connectivity not in (6, 26) or isinstance(self.connectivity, bool):
            raise CryovesError(f"connectivity must be 6 or 26, got {self.connectivity!r}")
        for name in ("split", "grow", "split_regrow"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise CryovesError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.split_min_volume_z is not None and not (
                isinstance(self.split_min_volume_z, numbers.Real) and math.isfinite(self.split_min_volume_z)):
            raise CryovesError(f"split_min_volume_z must be a finite number or None, got {self.split_min_volume_z!r}")
        if self.split_neck_depth_nm is not None and not (
                isinstance(self.split_neck_depth_nm, numbers.Real) and self.split_neck_depth_nm > 0):
            raise CryovesError(f"split_neck_depth_nm must be a number > 0 nm or None, got {self.split_neck_depth_nm!r}")
        numbers_ = ("split_max_extent", "grow_small_factor", "grow_target_factor",
                    "grow_step", "grow_min_threshold", "min_extent", "max_extent", "min_radius_nm")
        for name in numbers_:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise CryovesError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.split_max_extent <= 1:
            raise CryovesError(f"split_max_extent must be in (0, 1], got {self.split_max_extent}")
        if not 0 <= self.min_extent <= self.max_extent <= 1:
            raise CryovesError(
                f"extent limits must satisfy 0 <= min_extent <= max_extent <= 1, "
                f"got {self.min_extent} and {self.max_extent}"
            )
        for name in ("grow_small_factor", "grow_target_factor", "grow_step"):
            if getattr(self, name) <= 0:
                raise CryovesError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.grow_min_threshold < 1:
            raise CryovesError(f"grow_min_threshold must be in [0, 1), got {self.grow_min_threshold}")
        if self.min_radius_nm < 0:
            raise CryovesError(f"min_radius_nm must be >= 0 nm, got {self.min_radius_nm}")


def localize(probability: np.ndarray, labels: np.ndarray, threshold: float, voxel_size_a: float,
             params: LocalizeParams, progress: Callable[[int, int], None] | None = None, *,
             overwrite: bool = False) -> np.ndarray:
    """Split merged segments by raising the threshold locally, optionally grow small ones, then
    discard by extent and volume; returns labels numbered 1..n (ascending former id), `label_dtype(n)`.

    ``labels`` are the global labels of ``{P > threshold}`` (`label_segments`); ``progress(done, total)``
    is called after each split candidate. With ``overwrite``, ``labels`` are worked on and usually become the
    result, for a caller that has no more use for them: no copy of the volume (two of 163 MB at 1024x1024x261).
    """
    probability = np.asarray(probability)
    labels = check_labels(labels)
    if probability.shape != labels.shape:
        raise ValueError(f"labels shape {labels.shape} differs from probability shape {probability.shape}")
    if not (isinstance(voxel_size_a, numbers.Real) and math.isfinite(voxel_size_a) and voxel_size_a > 0):
        raise CryovesError(f"voxel size must be a positive number of Å, got {voxel_size_a!r}")
    r_min_vox = nm_to_vox(params.min_radius_nm, voxel_size_a)
    v_min_vox = 4.0 / 3.0 * math.pi * r_min_vox**3

    in_place = overwrite and labels.flags.c_contiguous and labels.flags.writeable
    out = labels if in_place else np.array(labels, order="C", copy=True)  # widened if new ids need it
    stats = present_labels(out)
    if params.split:
        neck_depth_vox = None if params.split_neck_depth_nm is None else nm_to_vox(params.split_neck_depth_nm,
                                                                                    voxel_size_a)
        out = _split(probability, out, stats, float(threshold), params, progress, v_min_vox, neck_depth_vox)
    if params.grow:
        _grow(probability, out, present_labels(out), float(threshold), v_min_vox, params)
    stats = present_labels(out)
    keep = ((stats.extent >= params.min_extent) & (stats.extent <= params.max_extent)
            & (stats.volume >= v_min_vox))
    return _relabel(out, stats.ids[keep], int(stats.ids[-1]) if stats.ids.shape[0] else 0)


def split_thresholds(threshold: float) -> np.ndarray:
    """The local thresholds tried, in order: t* + 0.01 k, then 0.99 + 0.001 k, then 0.999 + 0.0001 k, all < 1."""
    values = []
    for start, step in _SPLIT_PASSES:
        start = threshold if start is None else start
        n = max(0, math.ceil((1.0 - start) / step - 1e-9))
        ts = np.round(start + step * np.arange(n), 10)
        values.append(ts[ts < 1.0])
    return np.concatenate(values)


# ----------------------------------------------------------------------------------------------------


def _split(probability, out, stats: LabelStats, threshold: float, params: LocalizeParams, progress,
           v_min_vox: float, neck_depth_vox: float | None) -> np.ndarray:
    """Split step on ``out``, in place unless fresh ids outgrow its type (then on a uint32 copy, returned):
    pieces get fresh ids above every id present.

    With ``params.split_regrow`` a split counts only pieces of at least V_min/8 voxels (noise specks
    do not split a vesicle), the pieces reclaim all of the candidate's voxels by a watershed on P
    (so they keep their full size instead of the shrunken cores above the raised threshold), and
    pieces that are still candidates are split again (chains of touching vesicles).
    """
    if stats.ids.shape[0] == 0:
        return out
    candidates = stats.extent < params.split_max_extent
    if params.split_min_volume_z is not None:
        volume = stats.volume.astype(np.float64)
        std = volume.std()
        z = (volume - volume.mean()) / std if std > 0 else np.zeros_like(volume)  # all equal: none is large
        candidates &= z > params.split_min_volume_z
    # The candidate's own bounding box: the reference widens it by a margin (10, paper-era 1)
    # and wraps at index 0, but outside the candidate P is zeroed, so a margin changes nothing.
    queue = [(int(stats.ids[k]), tuple(slice(a, b) for a, b in zip(stats.lo[k], stats.hi[k])), 0)
             for k in np.flatnonzero(candidates)]
    n_candidates = len(queue)
    min_piece_vox = v_min_vox / 8.0 if params.split_regrow else 0.0
    next_id = int(stats.ids[-1]) + 1
    done = 0
    while queue:
        seg, box, depth = queue.pop()
        lab_box = out[box]  # a view: pieces are written straight into `out`
        own = lab_box == seg
        pieces, n_pieces = _split_one(np.where(own, probability[box], 0), own, threshold, params, min_piece_vox)
        if not n_pieces and neck_depth_vox is not None:
            pieces, n_pieces = _split_at_necks(own, neck_depth_vox, min_piece_vox)
        if n_pieces:
            if next_id + n_pieces - 1 > np.iinfo(out.dtype).max:
                out = out.astype(np.uint32)
                lab_box = out[box]
            lab_box[own] = 0
            lab_box[pieces > 0] = (pieces[pieces > 0] + (next_id - 1)).astype(out.dtype)
            if params.split_regrow and depth < _MAX_SPLIT_DEPTH:
                for k, piece_box in enumerate(ndimage.find_objects(pieces)):
                    piece = pieces[piece_box] == k + 1
                    if piece.mean() < params.split_max_extent:
                        whole = tuple(slice(b.start + p.start, b.start + p.stop) for b, p in zip(box, piece_box))
                        queue.append((next_id + k, whole, depth + 1))
            next_id += n_pieces
        if depth == 0:
            done += 1
            if progress is not None:
                progress(done, n_candidates)
    return out


def _split_one(sub, own, threshold: float, params: LocalizeParams, min_piece_vox: float):
    """Labels (1..n) of the pieces of one candidate, or n = 0 when no raised threshold splits it."""
    sub_max = float(sub.max())
    schedule = split_thresholds(threshold)
    schedule = schedule[np.r_[True, np.diff(schedule) != 0]]  # 0.99 and 0.999 start two passes each
    # t >= max gives an empty mask, t <= t* the whole candidate: neither can split it
    schedule = schedule[(schedule < sub_max) & (schedule > threshold)]
    # pieces (26-connected, at least min_piece_vox) at t* and at every raised t, in one pass
    counts = component_counts(sub, np.r_[threshold, schedule], min_piece_vox)
    raised = np.flatnonzero(counts[1:] > counts[0])
    if not raised.size:
        return None, 0
    mask = sub > schedule[raised[0]]  # the first raised threshold that splits it
    pieces, n_pieces = ndimage.label(mask, structure=_STRUCTURE[6])
    if params.split_regrow:
        sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
        seeds = np.where(sizes[pieces] >= min_piece_vox, pieces, 0)
        seeds, n_pieces = ndimage.label(seeds > 0, structure=_STRUCTURE[6])
        pieces = watershed(-sub, markers=seeds, mask=own)
    return pieces, n_pieces


def _split_at_necks(own, depth_vox: float, min_piece_vox: float):
    """Pieces (1..n) of a segment cut at its necks, or n = 0: a watershed of the distance transform from
    its maxima that stand more than ``depth_vox`` above the saddle to any higher one; a touching sphere
    pair has two, a sphere or an ellipsoid one. Pieces under ``min_piece_vox`` voxels are not counted."""
    # padded: the segment ends at its box's faces, where the transform would otherwise see no background
    distance = ndimage.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1, 1:-1]
    peaks = deep_maxima(distance, depth_vox)
    if peaks.size < 2:
        return None, 0
    markers = np.zeros(own.shape, np.int32)
    markers.flat[peaks] = np.arange(1, peaks.size + 1)
    pieces = watershed(-distance, markers=markers, mask=own)
    sizes = np.bincount(pieces.ravel(), minlength=peaks.size + 1)[1:]
    large = sizes >= min_piece_vox
    if np.count_nonzero(large) < 2:
        return None, 0
    if not large.all():  # specks give their voxels to the large pieces around them
        markers.flat[peaks[~large]] = 0
        markers, n = ndimage.label(markers > 0, structure=_STRUCTURE[26])
        return watershed(-distance, markers=markers, mask=own), n
    return pieces, peaks.size


def _grow(probability, out, stats: LabelStats, threshold: float, v_min_vox: float, params: LocalizeParams) -> None:
    """Grow step in place on ``out`` (method.md §2.11): small segments take the component of a lower
    threshold under their centroid if it is large enough; small segments never grown are deleted.

    Components at lower thresholds nest, so the component at the lowest threshold that holds a
    centroid bounds every later one: one full-volume labelling, then boxes only.
    """
    small = np.flatnonzero(stats.volume < params.grow_small_factor * v_min_vox)
    if small.shape[0] == 0:
        return
    n_steps = max(0, math.ceil((threshold - params.grow_min_threshold) / params.grow_step - 1e-9))
    ts = np.round(threshold - params.grow_step * np.arange(1, n_steps + 1), 10)
    ts = ts[ts > params.grow_min_threshold]
    fixed = np.zeros(small.shape[0], bool)
    if ts.shape[0]:
        structure26 = _STRUCTURE[26]
        lowest, _ = label_above(probability, ts[-1], 26)
        centres = stats.centroid[small].astype(np.int64)  # truncated, as the reference does
        comp = lowest[centres[:, 0], centres[:, 1], centres[:, 2]]
        boxes = ndimage.find_objects(lowest)
        del lowest
        target = params.grow_target_factor * v_min_vox
        for t in ts:
            labelled = {}  # component box -> labels of {P > t} in it, computed once per threshold
            for j in np.flatnonzero(~fixed):
                if comp[j] == 0:
                    continue  # background at the lowest threshold: background at every higher one
                box = boxes[comp[j] - 1]
                if comp[j] not in labelled:
                    labelled[comp[j]] = ndimage.label(probability[box] > t, structure=structure26)[0]
                local = labelled[comp[j]]
                c = tuple(centres[j] - [s.start for s in box])
                cid = local[c]
                if cid == 0:
                    continue
                component = local == cid
                if np.count_nonzero(component) >= target:
                    out[box][component] = stats.ids[small[j]]
                    fixed[j] = True
            if fixed.all():
                break
    for j in np.flatnonzero(~fixed):
        box = tuple(slice(a, b) for a, b in zip(stats.lo[small[j]], stats.hi[small[j]]))
        view = out[box]
        view[view == stats.ids[small[j]]] = 0


def _relabel(labels: np.ndarray, keep: np.ndarray, max_id: int) -> np.ndarray:
    """Keep the ids in ``keep`` (ascending), renumbered 1..n; everything else becomes 0. Written into ``labels`` (a
    copy, or the caller's to overwrite) where its dtype is the result's."""
    if keep.shape[0] == 0:
        return np.zeros(labels.shape, label_dtype(0))
    lut = np.zeros(max_id + 1, label_dtype(keep.shape[0]))
    lut[keep] = np.arange(1, keep.shape[0] + 1)
    return relabel(labels, lut, overwrite=True)

