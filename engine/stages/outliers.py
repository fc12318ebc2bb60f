"""Outlier statistics on (t_m, rho, r) and the paper's repair loop (method.md §2.19-2.20, §6.11).

Two rules behind ``OutlierParams.rule``:

- ``"paper"``: ``p = 1 - F_chi2(D^2; dof)``; a vesicle with ``p < p_min`` is refitted with a box
  grown by ``grow_step_vox`` (edge) per try, up to ``max_grow_tries``; the first fit with
  ``p >= p_min`` makes it "repaired", otherwise it is "removed". Vesicles whose profile failed in
  refinement (no features) get the same repair tries.
- ``"code"``: keep ``D < d_max`` (D = sqrt(D^2), as the reference thresholds D, not D^2) and
  ``profile_correlation > correlation_min``; no repair.

The location and scatter are the plain sample estimates by default, outliers included, as in the
reference; ``robust=True`` uses a robust MCD-style estimate instead, which on phantoms removed 3-12 %
of true vesicles (README, "Accuracy"). Features are standardised and the scatter
inverted with a pseudo-inverse, so a constant feature cannot turn every distance into NaN. With
fewer than ``min_vesicles`` usable vesicles nothing is tested: D^2 and p stay NaN, outcomes unchanged.
"""

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from scipy.special import chdtrc, chdtri  # χ² survival function and its inverse (scipy.stats takes 0.4 s to import)

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.tables import CENTER_COLUMNS
from cryoves.engine.stages.refine import TABLE_SCHEMA, RefineParams, measure_spheres, profile_correlation, refine_batch
from cryoves.engine.units import vox_to_nm

__all__ = ["OutlierParams", "mahalanobis", "robust_location_scatter", "detect_outliers",
           "FEATURE_COLUMNS"]

FEATURE_COLUMNS = ("membrane_thickness_nm", "membrane_density", "radius_nm")


@dataclass(frozen=True, kw_only=True)
class OutlierParams:
    """Outlier rule on the features (t_m, rho, r) and the paper's repair loop."""

    rule: str = "code"            # "paper" (chi2 p-value + repair) or "code" (D < d_max, rho_s)
    p_min: float = 0.3            # paper: outlier if p < p_min
    d_max: float = 4.0            # code: keep D < d_max (D, not D^2)
    correlation_min: float = 0.3  # code: keep Spearman rho_s > correlation_min
    dof: int = 2                  # chi2 degrees of freedom (paper: n_features - 1)
    grow_step_vox: int = 2        # repair: box edge grows by this many voxels per try
    max_grow_tries: int = 10
    robust: bool = False          # MCD-style scatter: removed 3-12% of true vesicles on phantoms (README)
    min_vesicles: int = 5         # fewer usable vesicles: no test

    def __post_init__(self) -> None:
        if self.rule not in ("paper", "code"):
            raise CryovesError(f"outlier rule must be 'paper' or 'code', got {self.rule!r}")
        if not 0 < self.p_min < 1:
            raise CryovesError(f"p_min must be in (0, 1), got {self.p_min}")
        if not self.d_max > 0:
            raise CryovesError(f"d_max must be > 0, got {self.d_max}")
        if self.dof < 1:
            raise CryovesError(f"dof must be >= 1, got {self.dof}")
        if int(self.grow_step_vox) != self.grow_step_vox or self.grow_step_vox < 2 or self.grow_step_vox % 2:
            raise CryovesError(f"grow_step_vox must be an even number of voxels >= 2 (the box edge grows "
                               f"on both sides), got {self.grow_step_vox}")
        if self.max_grow_tries < 0:
            raise CryovesError(f"max_grow_tries must be >= 0, got {self.max_grow_tries}")
        if self.min_vesicles < 2:
            raise CryovesError(f"min_vesicles must be >= 2, got {self.min_vesicles}")


def _classical(x):
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False, ddof=1))


def _d2(x, loc, inv):
    diff = x - loc
    return np.einsum("ij,jk,ik->i", diff, inv, diff)


def _pinv(cov):
    return np.linalg.pinv(cov, rcond=1e-10, hermitian=True)


def robust_location_scatter(x, *, support_fraction=0.75, max_steps=50):
    """MCD-style location and scatter: C-steps from a median/MAD start, consistency-scaled, reweighted."""
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    h = min(n, max(int(np.ceil(support_fraction * n)), (n + p + 1) // 2))
    loc = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - loc), axis=0)
    cov = np.diag(np.where(mad > 0, mad, 1.0) ** 2)
    subset = None
    for _ in range(max_steps):
        new = np.sort(np.argsort(_d2(x, loc, _pinv(cov)), kind="stable")[:h])
        if subset is not None and np.array_equal(new, subset):
            break
        subset = new
        loc, cov = _classical(x[subset])
    # scale so the median distance matches chi2 (the h-subset covariance is too small), then
    # reweight: re-estimate from every point within the 97.5 % quantile
    d2 = _d2(x, loc, _pinv(cov))
    median = np.median(d2)
    if median > 0:
        cov = cov * median / chdtri(p, 0.5)
    inliers = _d2(x, loc, _pinv(cov)) <= chdtri(p, 0.025)  # within the 97.5 % quantile
    if inliers.sum() > p:
        loc, cov = _classical(x[inliers])
        median = np.median(_d2(x, loc, _pinv(cov)))
        if median > 0:
            cov = cov * median / chdtri(p, 0.5)
    return loc, cov


def _fit(features, robust, min_vesicles):
    """Standardisation, location and inverse scatter from the finite rows; None if too few."""
    x = np.asarray(features, dtype=np.float64)
    good = np.all(np.isfinite(x), axis=1)
    if good.sum() < min_vesicles:
        return None
    centre = np.median(x[good], axis=0)
    scale = np.std(x[good], axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x[good] - centre) / scale
    loc, cov = robust_location_scatter(z) if robust else _classical(z)
    return centre, scale, loc, _pinv(cov)


def _apply(model, features):
    x = np.asarray(features, dtype=np.float64)
    if model is None:
        return np.full(x.shape[0], np.nan)
    centre, scale, loc, inv = model
    out = np.full(x.shape[0], np.nan)
    good = np.all(np.isfinite(x), axis=1)
    out[good] = np.maximum(_d2((x[good] - centre) / scale, loc, inv), 0.0)
    return out


def mahalanobis(features, *, robust=True, min_vesicles=5):
    """Squared Mahalanobis distance D^2 of each row (n, p); NaN rows stay NaN.

    All NaN when fewer than ``min_vesicles`` rows are finite (no statistics on so few).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (n, p), got shape {features.shape}")
    return _apply(_fit(features, robust, min_vesicles), features)


def _features(columns):
    return np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in FEATURE_COLUMNS])


def _columns(table):
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in TABLE_SCHEMA.names
            if name != "profile"}
    cols["outcome"] = np.array(table.column("outcome").to_pylist(), dtype=object)
    cols["profile"] = table.column("profile").to_pylist()
    for name in ("radius_vox", *CENTER_COLUMNS, "mahalanobis_d2", "p_value",
                 "membrane_thickness_nm", "membrane_density", "radius_nm", "profile_correlation"):
        cols[name] = np.array(cols[name], dtype=np.float64)
    for name in ("n_iterations", "box_radius_vox"):
        cols[name] = np.array(cols[name], dtype=np.int64)
    return cols


def _to_table(cols, metadata):
    arrays = {name: cols[name] for name in TABLE_SCHEMA.names}
    arrays["outcome"] = pa.array(list(cols["outcome"]), type=pa.string())
    arrays["profile"] = pa.array(cols["profile"], type=pa.list_(pa.float64()))
    table = pa.table({k: pa.array(v, type=TABLE_SCHEMA.field(k).type) if isinstance(v, np.ndarray) else v
                      for k, v in arrays.items()}, schema=TABLE_SCHEMA)
    return table.replace_schema_metadata(metadata)


def _repair(tomogram, cols, candidates, model, mean_profile, voxel_size_a, params, refine):
    """Refit the candidates with growing boxes; returns the rows that reached p >= p_min."""
    centers = np.column_stack([cols[name] for name in CENTER_COLUMNS])
    start_r = np.where(np.isfinite(cols["radius_vox"]), cols["radius_vox"],
                       np.maximum(cols["box_radius_vox"] - refine.box_margin_vox, 1))
    todo = np.asarray(candidates, dtype=np.int64)
    repaired = []
    for attempt in range(1, params.max_grow_tries + 1):
        if todo.size == 0:
            break
        extra = attempt * (params.grow_step_vox // 2)
        batch = refine_batch(tomogram, centers[todo], start_r[todo], refine, extra_vox=extra)
        est = batch.estimate
        density, resampled = measure_spheres(batch.profiles, est, refine)
        feats = np.column_stack([vox_to_nm(est.thickness_vox, voxel_size_a), density,
                                 vox_to_nm(est.radius_vox, voxel_size_a)])
        d2 = _apply(model, feats)
        p = chdtrc(params.dof, d2)
        passed = est.ok & (p >= params.p_min)
        for j in np.flatnonzero(passed):  # bookkeeping only: the fits above ran as one batch
            row = todo[j]
            for a, name in enumerate(CENTER_COLUMNS):
                cols[name][row] = batch.centers[j, a]
            cols["radius_vox"][row] = est.radius_vox[j]
            cols["radius_nm"][row] = feats[j, 2]
            cols["membrane_thickness_nm"][row] = feats[j, 0]
            cols["membrane_density"][row] = density[j]
            cols["profile"][row] = resampled[j].tolist()
            cols["profile_correlation"][row] = profile_correlation(resampled[j:j + 1], mean_profile)[0]
            cols["mahalanobis_d2"][row] = d2[j]
            cols["p_value"][row] = p[j]
            cols["n_iterations"][row] = batch.n_iterations[j]
            cols["box_radius_vox"][row] = batch.box_radius[j]
            repaired.append(row)
        todo = todo[~passed]
    return np.array(repaired, dtype=np.int64)


def detect_outliers(tomogram: np.ndarray, table: pa.Table, voxel_size_a: float,
                    params: OutlierParams = OutlierParams(), refine: RefineParams = RefineParams()) -> pa.Table:
    """Fill ``mahalanobis_d2``, ``p_value`` and ``outcome`` ("kept", "repaired", "removed").

    Repairs (paper rule) refit the sphere with ``refine``, the parameters of the first fit.
    """
    if not voxel_size_a > 0:
        raise CryovesError(f"voxel_size_a must be > 0 Å, got {voxel_size_a}")
    cols = _columns(table)
    metadata = dict(table.schema.metadata or {})
    metadata[b"outlier_params"] = repr(asdict(params)).encode()
    kept = cols["outcome"] == "kept"
    features = _features(cols)
    model = _fit(features[kept], params.robust, params.min_vesicles)
    if model is None:
        return _to_table(cols, metadata)
    d2 = _apply(model, features)
    p = chdtrc(params.dof, d2)
    cols["mahalanobis_d2"] = np.where(kept, d2, np.nan)
    cols["p_value"] = np.where(kept, p, np.nan)
    if params.rule == "code":
        keep = kept & (np.sqrt(d2) < params.d_max) & (cols["profile_correlation"] > params.correlation_min)
        cols["outcome"] = np.where(keep, "kept", "removed").astype(object)
        return _to_table(cols, metadata)
    flagged = kept & ~(p >= params.p_min)
    candidates = np.flatnonzero(flagged | (cols["outcome"] == "removed"))
    profiles = [cols["profile"][i] for i in np.flatnonzero(kept & ~flagged)]
    mean_profile = np.mean(np.array(profiles), axis=0) if profiles else None
    if mean_profile is None:
        mean_profile = np.mean(np.array([cols["profile"][i] for i in np.flatnonzero(kept)]), axis=0)
    repaired = _repair(tomogram, cols, candidates, model, mean_profile, voxel_size_a, params, refine)
    outcome = np.where(kept & ~flagged, "kept", "removed").astype(object)
    outcome[repaired] = "repaired"
    cols["outcome"] = outcome
    return _to_table(cols, metadata)
