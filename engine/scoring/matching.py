"""Accuracy against ground truth, as the CryoVesNet paper measures it but with one-to-one matching.

A prediction is a true positive when its centre lies inside a ground-truth vesicle; each ground-truth
vesicle matches at most one prediction (Hungarian assignment on centre distance), which fixes the
reference's many-to-one matching (method.md §6.13).
"""

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from cryoves.engine.units import vox_to_nm
from cryoves.kernels.labels import present_labels


@dataclass(frozen=True)
class Matching:
    """Object-wise accuracy: counts, rates, diameter error δ_d and centre residual Δ_c (nm) over TPs."""

    n_true_positive: int
    n_false_positive: int
    n_false_negative: int
    precision: float
    recall: float
    f1: float
    diameter_error: float
    center_residual_nm: float
    center_residual_std_nm: float
    pairs: np.ndarray  # (n_tp, 2) indices (prediction, ground truth)

    def as_row(self) -> dict:
        """The scalar fields, for a metrics table."""
        return {key: value for key, value in asdict(self).items() if key != "pairs"}


def match_vesicles(pred_centers_vox, pred_radii_vox, gt_centers_vox, gt_radii_vox, voxel_size_a: float) -> Matching:
    """Match predicted to true spheres one-to-one; a pair is allowed when the predicted centre lies
    inside the true sphere, and the assignment minimises the total centre distance."""
    pred_c = np.asarray(pred_centers_vox, dtype=np.float64).reshape(-1, 3)
    gt_c = np.asarray(gt_centers_vox, dtype=np.float64).reshape(-1, 3)
    pred_r = np.asarray(pred_radii_vox, dtype=np.float64).reshape(-1)
    gt_r = np.asarray(gt_radii_vox, dtype=np.float64).reshape(-1)
    distance = np.linalg.norm(pred_c[:, None, :] - gt_c[None, :, :], axis=2)
    allowed = distance <= gt_r[None, :]
    pairs = np.empty((0, 2), dtype=np.int64)
    if allowed.any():
        cost = np.where(allowed, distance, distance.max() * 1e3 + 1e6)
        rows, cols = linear_sum_assignment(cost)
        keep = allowed[rows, cols]
        pairs = np.stack([rows[keep], cols[keep]], axis=1)
    n_tp = len(pairs)
    n_fp = len(pred_c) - n_tp
    n_fn = len(gt_c) - n_tp
    precision = n_tp / (n_tp + n_fp) if n_tp + n_fp else float("nan")
    recall = n_tp / (n_tp + n_fn) if n_tp + n_fn else float("nan")
    f1 = 2 * n_tp / (2 * n_tp + n_fp + n_fn) if n_tp + n_fp + n_fn else float("nan")
    if n_tp:
        d_pred, d_gt = pred_r[pairs[:, 0]], gt_r[pairs[:, 1]]
        diameter_error = float(np.mean(1.0 - np.minimum(d_pred, d_gt) / np.maximum(d_pred, d_gt)))
        residual_nm = vox_to_nm(distance[pairs[:, 0], pairs[:, 1]], voxel_size_a)
        center_mean, center_std = float(residual_nm.mean()), float(residual_nm.std())
    else:
        diameter_error = center_mean = center_std = float("nan")
    return Matching(n_tp, n_fp, n_fn, precision, recall, f1, diameter_error, center_mean, center_std, pairs)


def dice(prediction, truth) -> float:
    """Dice of two masks (or of a probability map against a mask: the paper's soft Dice).

    Uses the reference's form (2Σyŷ + 1)/(Σy + Σŷ + 1) so figures compare with the paper's tables.
    """
    y = np.asarray(truth) > 0
    p = np.asarray(prediction)
    p = p.astype(np.float64) if p.dtype.kind == "f" else (p > 0)
    overlap = float(np.sum(p[y], dtype=np.float64))
    return (2.0 * overlap + 1.0) / (float(np.count_nonzero(y)) + float(np.sum(p, dtype=np.float64)) + 1.0)


def spheres_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (centroids, voxels) and radii of labelled objects: radius = (longest bbox side − 1)/2,
    so a digital ball {‖v − c‖ ≤ r} gives back r. Returns (ids, centers (n, 3), radii)."""
    stats = present_labels(labels)
    return stats.ids.astype(np.int64), stats.centroid, (stats.sides.max(axis=1, initial=0) - 1.0) / 2.0
