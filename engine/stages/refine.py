"""Per-vesicle sphere model: radial profile, radius, back-projection and cross-correlation (§2.13-2.18).

Every step runs on all still-active vesicles at once (one kernel call per step and iteration, FFTs
batched by box size), never a Python loop per vesicle. Centres and radii are floats (sub-voxel).

Differences from the reference, each behind :class:`RefineParams` where it matters:

- boxes are clipped to the volume instead of shrunk symmetrically (kernels/radial.py);
- the initial centre is the float centroid; the centre moves by the sub-voxel correlation peak;
- profile bins are placed at their centres ``(k + 1/2) w``, and extrema are parabola-refined;
- ``radius_rule="code"`` is the smoothed second-difference minimum with the reference's one-voxel
  offset fixed; ``radius_rule="outer"`` (default) is the outer membrane edge: where the profile has
  climbed ``edge_level`` (0.4) of the way from the membrane minimum to the outer (Fresnel)
  maximum. The reference's radii come out 1-3 nm inside the outer edge that annotators draw;
- the loop stops when the total shift exceeds half the diagonal of the initial box (paper);
- the cross-correlation reads the box of the next edge >= 2R + 1 without a prime factor above 13
  (`correlation_radius`: 31 -> 33, 41 -> 45; prime edges cost pocketfft 2-4x per voxel), the model
  zero past the profile; the profile itself comes from the box of half-edge R;
- features come from the final box (final centre *and* final radius), and the membrane density is
  the mean profile over ``[d_m - t_m/2, d_m + t_m/2]`` (paper), not the single minimum (code).
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from scipy import ndimage

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.tables import CENTER_COLUMNS
from cryoves.engine.units import vox_to_nm
from cryoves.kernels.labels import present_labels
from cryoves.kernels.radial import back_project, box_offsets, box_profiles, boxes_by_radius, extract_boxes, xcorr_shift
from cryoves.kernels.threads import fft_batch_voxels

__all__ = ["RefineParams", "RadiusEstimate", "RefineResult", "estimate_radius", "measure_spheres", "refine_batch",
           "refine_spheres", "segment_spheres", "profile_correlation", "average_ranks", "build_table", "TABLE_SCHEMA"]

_KEPT_BOX_BYTES = 1 << 26  # boxes of raw data kept between a profile and the correlation that reads them again

TABLE_SCHEMA = pa.schema([
    ("id", pa.int32()),
    *((name, pa.float64()) for name in CENTER_COLUMNS),
    ("radius_vox", pa.float64()), ("radius_nm", pa.float64()),
    ("membrane_thickness_nm", pa.float64()), ("membrane_density", pa.float64()),
    ("profile_correlation", pa.float64()), ("mahalanobis_d2", pa.float64()), ("p_value", pa.float64()),
    ("outcome", pa.string()), ("n_iterations", pa.int32()),
    ("box_radius_vox", pa.int32()),
    ("profile", pa.list_(pa.float64())),
])


@dataclass(frozen=True, kw_only=True)
class RefineParams:
    """Sphere refinement of each vesicle from its radial profile (method.md §2.13-2.18)."""

    box_margin_vox: int = 2            # box half-edge R = ceil(r) + margin; paper-era code: 5
    max_iterations: int = 10
    profile_window_lo: float = 0.10    # radius search window [lo K, hi K) of the K profile bins
    profile_window_hi: float = 0.70    # paper-era code: 0.75
    radius_rule: str = "outer"         # "outer" membrane edge, or "code" (second-difference minimum)
    include_halo_index: bool = False   # "code" rule: search [k_m, k_h] (paper-era) not [k_m, k_h)
    edge_level: float = 0.4            # "outer" rule: edge where the profile has climbed this share
                                       # of the way from the membrane minimum to the outer maximum
    subvoxel: bool = True              # sub-voxel centre shift and parabola-refined extrema
    bin_width_vox: float = 1.0         # shell width of the radial profile
    n_profile_points: int = 100        # resampled profile used for the Spearman correlation
    profile_extent: float = 1.25       # ... sampled over [0, extent * r]

    def __post_init__(self) -> None:
        if int(self.box_margin_vox) != self.box_margin_vox or self.box_margin_vox < 1:
            raise CryovesError(f"box_margin_vox must be a whole number >= 1 voxel, got {self.box_margin_vox}")
        if self.max_iterations < 1:
            raise CryovesError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if not 0 <= self.profile_window_lo < self.profile_window_hi <= 1:
            raise CryovesError("profile window must satisfy 0 <= profile_window_lo < profile_window_hi"
                               f" <= 1, got {self.profile_window_lo}, {self.profile_window_hi}")
        if self.radius_rule not in ("outer", "code"):
            raise CryovesError(f"radius_rule must be 'outer' or 'code', got {self.radius_rule!r}")
        if not 0 < self.edge_level < 1:
            raise CryovesError(f"edge_level must be in (0, 1), got {self.edge_level}")
        if not self.bin_width_vox > 0:
            raise CryovesError(f"bin_width_vox must be > 0 voxels, got {self.bin_width_vox}")
        if self.n_profile_points < 3 or not self.profile_extent > 0:
            raise CryovesError("n_profile_points must be >= 3 and profile_extent > 0, got "
                               f"{self.n_profile_points}, {self.profile_extent}")


class RadiusEstimate(NamedTuple):
    """Per-vesicle result of §2.15 (positions in voxels from the centre); NaN where not ok."""

    radius_vox: np.ndarray
    membrane_center_vox: np.ndarray   # d_m
    thickness_vox: np.ndarray         # t_m = 2 (r - d_m)
    ok: np.ndarray                    # False: empty window or no halo above the minimum


def _fill_nan(profiles):
    """Fill empty shells by linear interpolation along the radius (nearest value at the ends)."""
    out = profiles.copy()
    bad = ~np.isfinite(out)
    if not bad.any():
        return out
    kk = np.arange(out.shape[1])
    for i in np.flatnonzero(bad.any(axis=1) & ~bad.all(axis=1)):  # only rows with holes
        good = ~bad[i]
        out[i, bad[i]] = np.interp(kk[bad[i]], kk[good], out[i, good])
    return out


def _parabola(values, idx):
    """Sub-bin offset of the extremum of a parabola through values[idx-1 .. idx+1] (0 at the ends)."""
    n, m = values.shape
    rows = np.arange(n)
    inner = (idx > 0) & (idx < m - 1)
    i0 = np.clip(idx, 1, m - 2)
    vm, v0, vp = values[rows, i0 - 1], values[rows, i0], values[rows, i0 + 1]
    denom = vm - 2 * v0 + vp
    ok = inner & (denom != 0) & np.isfinite(denom)
    delta = np.divide(0.5 * (vm - vp), denom, out=np.zeros(n), where=ok)
    return np.clip(delta, -0.5, 0.5)


def n_window_bins(box_radius_vox, bin_width_vox):
    """K = floor(sqrt(3) R / w) + 1, the profile length the window fractions refer to (§2.14)."""
    return np.floor(np.sqrt(3.0) * np.asarray(box_radius_vox) / bin_width_vox).astype(np.int64) + 1


def estimate_radius(profiles, n_bins_valid, params: RefineParams) -> RadiusEstimate:
    """Membrane centre, thickness and radius from radial profiles (§2.15), vectorised over rows."""
    profiles = np.asarray(profiles, dtype=np.float64)
    n, nb = profiles.shape
    w = params.bin_width_vox
    k_valid = np.minimum(np.asarray(n_bins_valid), nb)
    lo = np.round(params.profile_window_lo * k_valid)[:, None]
    hi = np.round(params.profile_window_hi * k_valid)[:, None]
    kk = np.arange(nb)[None, :]
    filled = _fill_nan(profiles)
    in_win = (kk >= lo) & (kk < hi) & np.isfinite(profiles)
    ok = in_win.any(axis=1)
    km = np.argmin(np.where(in_win, profiles, np.inf), axis=1)
    halo_win = in_win & (kk >= km[:, None])
    kh = np.argmax(np.where(halo_win, profiles, -np.inf), axis=1)
    ok &= kh > km
    rows = np.arange(n)
    sub = params.subvoxel
    dm_bin = km + (_parabola(filled, km) if sub else 0.0)
    if params.radius_rule == "code":
        d2 = filled[:, 2:] - 2.0 * filled[:, 1:-1] + filled[:, :-2] if nb >= 3 else np.zeros((n, 1))
        smooth = ndimage.gaussian_filter1d(d2, 1.0, axis=1, mode="reflect", truncate=4.0)
        jj = np.arange(smooth.shape[1])[None, :]
        upper = kh + (1 if params.include_halo_index else 0)
        win = (jj >= km[:, None]) & (jj < upper[:, None])
        ok &= win.any(axis=1)
        j = np.argmin(np.where(win, smooth, np.inf), axis=1)
        # D2[j] is centred on bin j + 1: the reference forgets this and lands one voxel inside
        edge_bin = j + 1 + (_parabola(smooth, j) if sub else 0.0)
    else:
        level = filled[rows, km] + params.edge_level * (filled[rows, kh] - filled[rows, km])
        cross = (filled >= level[:, None]) & (kk > km[:, None]) & (kk <= kh[:, None])
        k1 = np.maximum(np.argmax(cross, axis=1), 1)
        below, above = filled[rows, k1 - 1], filled[rows, k1]
        frac = np.divide(level - below, above - below, out=np.ones(n), where=above > below)
        edge_bin = k1 - 1 + (np.clip(frac, 0.0, 1.0) if sub else np.round(np.clip(frac, 0.0, 1.0)))
    radius = (edge_bin + 0.5) * w  # bin k holds [k w, (k+1) w): its centre is (k + 1/2) w
    d_m = (dm_bin + 0.5) * w
    ok &= radius > d_m
    nan = np.where(ok, 1.0, np.nan)
    return RadiusEstimate(radius * nan, d_m * nan, 2.0 * (radius - d_m) * nan, ok)


def _profile_bins(box_radius, params) -> int:
    """Profile length for a batch of boxes: every shell the largest can reach from a sub-voxel centre."""
    return int(n_window_bins(np.max(box_radius) + 1, params.bin_width_vox)) if len(box_radius) else 1


_FFT_PRIMES = (2, 3, 5, 7, 11, 13)
"""Prime factors that pocketfft transforms at full speed: an edge with a larger one (29, 31, 37, 41, 43, 47 ...) costs
2-4 times as much per voxel (Bluestein)."""


def correlation_radius(box_radius: int) -> int:
    """The half-edge of the box the cross-correlation reads for a vesicle whose profile box has `box_radius`: the
    smallest R >= it whose edge 2R + 1 has only prime factors in `_FFT_PRIMES` (31 -> 33, 41 -> 45)."""
    edge = 2 * int(box_radius) + 1
    while True:
        rest = edge
        for prime in _FFT_PRIMES:
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return (edge - 1) // 2
        edge += 2


def _central(boxes: np.ndarray, r: int) -> np.ndarray:
    """The central boxes of half-edge `r` of a stack of larger ones (a view)."""
    d = (boxes.shape[1] - 1) // 2 - r
    return boxes[:, d:boxes.shape[1] - d, d:boxes.shape[2] - d, d:boxes.shape[3] - d]


class _Boxes:
    """Each vesicle's box of raw data (`extract_boxes`) at its centre, of the correlation's half-edge
    (`correlation_radius` of its box radius), kept until a new one replaces it (at most `_KEPT_BOX_BYTES` of them),
    and the radial profile taken from its central box of the box radius (`box_profiles`, the tomogram's own profile
    bit for bit). A cycle's profile and correlation read the same box, and a box depends only on the voxel nearest
    the centre (its anchor) and the box radius: the profile after a sub-voxel move, the next cycle's and the final
    one are taken from the kept box unless it moved to another voxel, grew or shrank (half the reads of the
    1024x1024x261 tomogram). Row i depends on vesicle i alone, so a kept row is the row a new read would give."""

    def __init__(self, tomogram, n: int, params: RefineParams) -> None:
        self._tomogram, self._params = tomogram, params
        self._centers = np.full((n, 3), np.nan)
        self._box = np.full(n, -1, dtype=np.int64)
        self._rows = np.full((n, 1), np.nan)
        self._boxes: list[np.ndarray | None] = [None] * n
        self._kept_bytes = 0

    def profiles(self, centers, box, idx, *, keep: bool = True) -> np.ndarray:
        """Profiles of vesicles `idx` at `centers` and `box`, reading the boxes that changed (kept when `keep`)."""
        stale = idx[(self._box[idx] != box[idx]) | np.any(self._centers[idx] != centers[idx], axis=1)]
        same = np.array([self._boxes[i] is not None for i in stale], dtype=bool) & (self._box[stale] == box[stale])
        same &= np.all(np.floor(self._centers[stale] + 0.5) == np.floor(centers[stale] + 0.5), axis=1)
        kept = stale[same]
        for r in np.unique(box[kept]):
            part = kept[box[kept] == r]
            self._profile(part, centers, box, _central(np.stack([self._boxes[i] for i in part]), int(r)))
        moved = stale[~same]
        for r in np.unique(box[moved]):
            group = moved[box[moved] == r]
            read_r = correlation_radius(r) if keep else int(r)
            for rows, boxes in boxes_by_radius(self._tomogram, centers[group], np.full(group.size, read_r)):
                part = group[rows]
                self._profile(part, centers, box, _central(boxes, int(r)))
                self._drop(part)
                for i, one in zip(part, boxes):
                    if keep and self._kept_bytes + one.nbytes <= _KEPT_BOX_BYTES:
                        self._boxes[i], self._kept_bytes = one, self._kept_bytes + one.nbytes
        self._centers[stale], self._box[stale] = centers[stale], box[stale]
        return self._rows[idx, :_profile_bins(box[idx], self._params)]

    def _profile(self, part, centers, box, boxes) -> None:
        """Store the profiles of vesicles `part` (one box radius) from their `boxes` of that radius."""
        fresh = box_profiles(boxes, box_offsets(centers[part]), _profile_bins(box[part], self._params),
                             bin_width_vox=self._params.bin_width_vox)
        width = max(self._rows.shape[1], fresh.shape[1])  # bins past a box's reach are NaN
        if width > self._rows.shape[1]:
            self._rows = np.pad(self._rows, ((0, 0), (0, width - self._rows.shape[1])), constant_values=np.nan)
        self._rows[part] = np.nan
        self._rows[part, :fresh.shape[1]] = fresh

    def boxes(self, centers, r: int, idx) -> np.ndarray:
        """The correlation boxes (half-edge `correlation_radius(r)`) of vesicles `idx` at `centers`, stacked: kept
        ones, the others read again."""
        missing = [i for i in idx if self._boxes[i] is None]
        read = dict(zip(missing, extract_boxes(self._tomogram, centers[missing], correlation_radius(r)))) \
            if missing else {}
        return np.stack([read[i] if self._boxes[i] is None else self._boxes[i] for i in idx])

    def _drop(self, idx) -> None:
        """Forget the kept boxes of vesicles `idx` (their profiles stay)."""
        for i in idx:
            if self._boxes[i] is not None:
                self._kept_bytes -= self._boxes[i].nbytes
                self._boxes[i] = None


def _shifts(boxes: _Boxes, centers, profiles, box_radius, idx, params):
    """Cross-correlation displacement of vesicles `idx` (their kept boxes), FFTs batched by box size: each box of
    its `correlation_radius`, the model back-projected from the profile over the same box (zero past the profile)."""
    shifts = np.zeros((len(idx), 3))
    offsets = box_offsets(centers[idx])
    for r in np.unique(box_radius):
        rows = np.flatnonzero(box_radius == r)
        xr = correlation_radius(r)
        step = max(1, fft_batch_voxels() // (2 * xr + 1) ** 3)
        for start in range(0, rows.size, step):
            part = rows[start:start + step]
            models = back_project(profiles[part], xr, offsets[part], bin_width_vox=params.bin_width_vox)
            shifts[part] = xcorr_shift(boxes.boxes(centers, int(r), idx[part]), models, subvoxel=params.subvoxel)
    return shifts


class RefineResult(NamedTuple):
    """Output of :func:`refine_batch`, one row per vesicle."""

    centers: np.ndarray
    box_radius: np.ndarray
    estimate: RadiusEstimate
    profiles: np.ndarray
    n_iterations: np.ndarray


Refiner = Callable[[np.ndarray, np.ndarray, np.ndarray, RefineParams], RefineResult]
"""(tomogram, centres, starting radii, params) → `refine_batch`'s result: the seam where `cryoves run`
spreads the vesicles of one tomogram over tasks (`concat_refine_results` joins them)."""


def z_ordered_parts(centers_vox: np.ndarray, n_parts: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The vesicles in z order, and that order split into `n_parts` consecutive parts of sizes differing by at most
    one: refined part by part, each reads one band of the tomogram; `concat_refine_results(parts, order)` joins them."""
    order = np.argsort(np.asarray(centers_vox)[:, 0], kind="stable")
    return order, np.array_split(order, n_parts)


def concat_refine_results(parts: list[RefineResult], order: np.ndarray | None = None) -> RefineResult:
    """One RefineResult from results over consecutive chunks of vesicles, in order; with `order`, the parts are
    over the vesicles `order` lists (split in turn), and the rows are put back in the vesicles' own order.

    Profiles are as long as the largest box of their batch needs; shorter ones are padded with NaN,
    as the empty shells beyond a smaller box are in a batch that holds a larger one.
    """
    n_bins = max(part.profiles.shape[1] for part in parts)
    profiles = [np.pad(part.profiles, ((0, 0), (0, n_bins - part.profiles.shape[1])), constant_values=np.nan)
                for part in parts]
    rows = slice(None) if order is None else np.argsort(order)
    return RefineResult(np.concatenate([part.centers for part in parts])[rows],
                        np.concatenate([part.box_radius for part in parts])[rows],
                        RadiusEstimate(*(np.concatenate(fields)[rows] for fields in
                                         zip(*(part.estimate for part in parts)))),
                        np.concatenate(profiles)[rows],
                        np.concatenate([part.n_iterations for part in parts])[rows])


def _box_radius(radius, extra, params):
    return np.ceil(np.nan_to_num(radius, nan=1.0)).astype(np.int64) + params.box_margin_vox + extra


def refine_batch(tomogram, centers_vox, radii_vox, params: RefineParams, *, extra_vox=0,
                 progress: Callable[[int, int], None] | None = None) -> RefineResult:
    """The §2.17 loop for all vesicles at once, then a final profile on the final box.

    ``extra_vox`` (int or per-vesicle) enlarges every box half-edge (the paper's repair loop).
    Returns the final centres, box radii, radius estimate (``estimate.ok`` False: removed),
    final profiles and the number of cycles run per vesicle.
    """
    centers = np.array(centers_vox, dtype=np.float64).reshape(-1, 3)
    n = centers.shape[0]
    radius = np.broadcast_to(np.asarray(radii_vox, dtype=np.float64), (n,)).copy()
    extra = np.broadcast_to(np.asarray(extra_vox, dtype=np.int64), (n,)).copy()
    box = _box_radius(radius, extra, params)
    half_diagonal = 0.5 * np.sqrt(3.0) * (2 * box + 1)  # paper: half the initial box diagonal
    total = np.zeros((n, 3))
    zeros = np.zeros(n, dtype=np.int64)
    n_iter = np.zeros(n, dtype=np.int64)
    failed = np.zeros(n, dtype=bool)
    active = np.ones(n, dtype=bool)
    boxes = _Boxes(tomogram, n, params)
    for it in range(params.max_iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        profiles = boxes.profiles(centers, box, idx)
        step = _shifts(boxes, centers, profiles, box[idx], idx, params)
        n_iter[idx] += 1
        new_total = total[idx] + step
        too_far = np.linalg.norm(new_total, axis=1) > half_diagonal[idx]
        move = idx[~too_far]
        centers[move] += step[~too_far]
        total[move] = new_total[~too_far]
        zeros[idx] += np.all(np.round(step) == 0, axis=1)
        active[idx[too_far]] = False
        active[idx] &= zeros[idx] < 2
        idx = np.flatnonzero(active)
        if idx.size:
            est = estimate_radius(boxes.profiles(centers, box, idx), n_window_bins(box[idx], params.bin_width_vox),
                                  params)
            failed[idx[~est.ok]] = True
            active[idx[~est.ok]] = False
            good = idx[est.ok]
            radius[good] = est.radius_vox[est.ok]
            box[good] = _box_radius(radius[good], extra[good], params)
        if progress is not None:
            progress(it + 1, params.max_iterations)
    profiles = boxes.profiles(centers, box, np.arange(n), keep=False)
    est = estimate_radius(profiles, n_window_bins(box, params.bin_width_vox), params)
    est = est._replace(ok=est.ok & ~failed)
    return RefineResult(centers, box, est, profiles, n_iter)


def measure_spheres(profiles, estimate: RadiusEstimate, params: RefineParams):
    """Membrane density (mean profile over d_m +- t_m/2) and the resampled profile per vesicle."""
    n, nb = profiles.shape
    w = params.bin_width_vox
    filled = _fill_nan(profiles)
    centres = (np.arange(nb) + 0.5) * w
    half = 0.5 * estimate.thickness_vox[:, None]
    inside = np.abs(centres[None, :] - estimate.membrane_center_vox[:, None]) <= half
    inside &= np.isfinite(profiles)
    count = inside.sum(axis=1)
    density = np.divide(np.where(inside, profiles, 0.0).sum(axis=1), count, out=np.full(n, np.nan),
                        where=count > 0)
    u = np.linspace(0.0, params.profile_extent, params.n_profile_points)
    resampled = np.full((n, u.size), np.nan)
    for i in np.flatnonzero(estimate.ok):  # np.interp is 1-D; rows are short (100 points)
        resampled[i] = np.interp(u * estimate.radius_vox[i], centres, filled[i])
    return density, resampled


_RANK_ROWS = 256  # rows ranked at once: 256 x 100 x 100 comparisons


def average_ranks(rows) -> np.ndarray:
    """1-based ranks of the values along the last axis, tied values sharing their mean rank (scipy.stats.rankdata's
    default), counted pairwise: profile rows are short (`n_profile_points`), and importing scipy.stats would add
    0.4 s and 21 MB to every run."""
    rows = np.asarray(rows, dtype=np.float64)
    flat = rows.reshape(-1, rows.shape[-1])
    out = np.empty(flat.shape)
    for lo in range(0, len(flat), _RANK_ROWS):
        part = flat[lo:lo + _RANK_ROWS]
        below = np.count_nonzero(part[:, None, :] < part[:, :, None], axis=2)
        ties = np.count_nonzero(part[:, None, :] == part[:, :, None], axis=2)
        out[lo:lo + _RANK_ROWS] = below + 0.5 * (ties + 1)  # the tie group holds ranks below+1 .. below+ties
    return out.reshape(rows.shape)


def profile_correlation(resampled, mean_profile):
    """Spearman rank correlation of each resampled profile with the mean profile (NaN rows stay NaN)."""
    resampled = np.asarray(resampled, dtype=np.float64)
    mean_profile = np.asarray(mean_profile, dtype=np.float64)
    ranks = average_ranks(resampled)
    ref = average_ranks(mean_profile)
    ranks = ranks - ranks.mean(axis=1, keepdims=True)
    ref = ref - ref.mean()
    num = ranks @ ref
    den = np.sqrt((ranks * ranks).sum(axis=1) * (ref @ ref))
    return np.divide(num, den, out=np.full(resampled.shape[0], np.nan),
                     where=(den > 0) & np.all(np.isfinite(resampled), axis=1) & np.all(np.isfinite(mean_profile)))


def segment_spheres(labels, scale=(1.0, 1.0, 1.0)):
    """Segment ids, float centroids (n, 3) and r0 = floor(longest bounding-box side / 2) (§2.13), in voxels of a
    grid `scale` times finer than the labels' along (z, y, x), over the same field of view (centres aligned)."""
    stats = present_labels(labels)
    scale = np.asarray(scale, dtype=np.float64)
    centers = stats.centroid if np.all(scale == 1.0) else (stats.centroid + 0.5) * scale - 0.5
    return stats.ids.astype(np.int64), centers, np.floor((stats.sides * scale).max(axis=1, initial=0) / 2.0)


def build_table(ids, batch: RefineResult, density, resampled, correlation, voxel_size_a, outcome=None):
    """The vesicle table (TABLE_SCHEMA); statistics columns NaN until outlier detection."""
    est = batch.estimate
    n = len(ids)
    if outcome is None:
        outcome = np.where(est.ok, "kept", "removed")
    profile = pa.array([row.tolist() if ok else None for row, ok in zip(resampled, est.ok)],
                       type=pa.list_(pa.float64()))
    columns = {
        "id": pa.array(np.asarray(ids, dtype=np.int32)),
        **{name: batch.centers[:, a] for a, name in enumerate(CENTER_COLUMNS)},
        "radius_vox": est.radius_vox, "radius_nm": vox_to_nm(est.radius_vox, voxel_size_a),
        "membrane_thickness_nm": vox_to_nm(est.thickness_vox, voxel_size_a),
        "membrane_density": density, "profile_correlation": correlation,
        "mahalanobis_d2": np.full(n, np.nan), "p_value": np.full(n, np.nan),
        "outcome": pa.array(list(outcome), type=pa.string()),
        "n_iterations": pa.array(np.asarray(batch.n_iterations, dtype=np.int32)),
        "box_radius_vox": pa.array(np.asarray(batch.box_radius, dtype=np.int32)),
        "profile": profile,
    }
    return pa.table(columns, schema=TABLE_SCHEMA)


def refine_spheres(tomogram: np.ndarray, labels: np.ndarray, voxel_size_a: float,
                   params: RefineParams = RefineParams(),
                   progress: Callable[[int, int], None] | None = None, refiner: Refiner | None = None) -> pa.Table:
    """Fit a sphere to every segment of ``labels`` on the raw ``tomogram``; one row per segment.

    ``labels`` lie on the tomogram's grid or on a coarser one over the same field of view (the network grid,
    where `postprocess` finds the segments): each segment's centre and size are taken in the tomogram's voxels.
    Rows whose profile fails (empty search window, no halo) get outcome "removed" and NaN features.
    ``id`` is the segment's label in ``labels``. The Parquet metadata should carry ``asdict(params)``.
    ``refiner`` replaces `refine_batch` (same result, elsewhere: see `Refiner`).
    """
    tomogram = np.asarray(tomogram)
    labels = np.asarray(labels)
    if tomogram.ndim != 3 or labels.ndim != 3 or any(n < m for n, m in zip(tomogram.shape, labels.shape)):
        raise CryovesError(f"tomogram {tomogram.shape} and labels {labels.shape} must be 3-D volumes, the labels "
                           "on the tomogram's grid or a coarser one")
    if not voxel_size_a > 0:
        raise CryovesError(f"voxel_size_a must be > 0 Å, got {voxel_size_a}")
    ids, centers, r0 = segment_spheres(labels, np.divide(tomogram.shape, labels.shape))
    if refiner is None:
        batch = refine_batch(tomogram, centers, r0, params, progress=progress)
    else:
        batch = refiner(tomogram, centers, r0, params)
    density, resampled = measure_spheres(batch.profiles, batch.estimate, params)
    ok = batch.estimate.ok
    mean_profile = resampled[ok].mean(axis=0) if ok.any() else np.zeros(params.n_profile_points)
    correlation = profile_correlation(resampled, mean_profile)
    table = build_table(ids, batch, density, resampled, correlation, voxel_size_a)
    return table.replace_schema_metadata({"refine_params": repr(asdict(params))})
