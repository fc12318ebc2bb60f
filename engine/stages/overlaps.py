"""Overlap resolution, minimum radius and the final label volume (method.md §2.20).

Rule ``"code"`` is the reference: every pair with centre distance ``dist <= r_i + r_j`` has both radii
set to ``floor(ceil(dist) r / (r_i + r_j)) - 1``, pairs in order, a vesicle changed at most once per
round, repeated until no pair overlaps. It shrinks vesicles that merely touch (method.md §6.10).

Rule ``"tolerant"`` (default) leaves pairs that overlap by at most ``tolerance_vox`` alone: touching
membranes share a voxel or so, and :func:`render_labels` gives each shared voxel to the nearer
centre (relative to the radius). Deeper overlaps scale both radii by the same factor until they
overlap by exactly ``tolerance_vox``; that resolves every pair in one round (radii only shrink).

Both then remove vesicles with ``radius_nm <= min_radius_nm`` (current code, 12 nm). Only "kept"
and "repaired" rows take part; changed radii update ``radius_vox`` and ``radius_nm``.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.spatial import cKDTree

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.units import vox_to_nm
from cryoves.kernels.render import render_spheres

__all__ = ["OverlapParams", "label_slabs", "resolve_overlaps", "render_labels", "rendered_spheres"]


@dataclass(frozen=True, kw_only=True)
class OverlapParams:
    """How overlapping spheres are resolved, and the smallest radius kept."""

    rule: str = "tolerant"        # "tolerant" or "code" (reference: proportional shrink, minus 1)
    tolerance_vox: float = 1.0    # tolerant: overlap depth left alone
    min_radius_nm: float = 12.0   # vesicles with radius <= this are removed (current code)
    max_rounds: int = 1000        # code rule: safety cap on the rounds

    def __post_init__(self) -> None:
        if self.rule not in ("tolerant", "code"):
            raise CryovesError(f"overlap rule must be 'tolerant' or 'code', got {self.rule!r}")
        if not self.tolerance_vox >= 0:
            raise CryovesError(f"tolerance_vox must be >= 0 voxels, got {self.tolerance_vox}")
        if not self.min_radius_nm >= 0:
            raise CryovesError(f"min_radius_nm must be >= 0 nm, got {self.min_radius_nm}")


def _pairs(centers, radii, slack):
    """Index pairs (i < j) with dist < r_i + r_j - slack (dist <= r_i + r_j when slack is 0)."""
    if len(centers) < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    tree = cKDTree(centers)
    pairs = tree.query_pairs(2.0 * max(radii.max(), 0.0) + 1e-9, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    dist = np.linalg.norm(centers[pairs[:, 0]] - centers[pairs[:, 1]], axis=1)
    limit = radii[pairs[:, 0]] + radii[pairs[:, 1]]
    hit = dist <= limit if slack == 0 else dist < limit - slack
    return pairs[hit], dist[hit]


def _shrink_code(centers, radii, max_rounds):
    radii = radii.copy()
    for _ in range(max_rounds):
        pairs, dist = _pairs(centers, radii, 0.0)
        if pairs.size == 0:
            break
        changed = np.zeros(radii.size, dtype=bool)
        for (i, j), d in zip(pairs, dist):  # sequential by definition: skip what changed this round
            if changed[i] or changed[j]:
                continue
            total = radii[i] + radii[j]
            d = np.ceil(d)
            if total > 0:
                radii[i], radii[j] = np.floor(d * radii[i] / total) - 1, np.floor(d * radii[j] / total) - 1
            changed[i] = changed[j] = True
    return radii


def _shrink_tolerant(centers, radii, tolerance):
    pairs, dist = _pairs(centers, radii, tolerance)
    if pairs.size == 0:
        return radii.copy()
    factor = (dist + tolerance) / (radii[pairs[:, 0]] + radii[pairs[:, 1]])
    scale = np.ones(radii.size)
    np.minimum.at(scale, pairs[:, 0], factor)
    np.minimum.at(scale, pairs[:, 1], factor)
    return radii * scale


def resolve_overlaps(table: pa.Table, voxel_size_a: float, params: OverlapParams = OverlapParams()) -> pa.Table:
    """Shrink overlapping kept/repaired spheres (``params.rule``), then remove the too small ones."""
    if not voxel_size_a > 0:
        raise CryovesError(f"voxel_size_a must be > 0 Å, got {voxel_size_a}")
    active = active_mask(table)
    outcome = np.asarray(table.column("outcome").to_pylist(), dtype=object)
    radius = radii_vox(table)
    idx = np.flatnonzero(active)
    centers = centers_vox(table)[idx]
    if params.rule == "code":
        new = _shrink_code(centers, radius[idx], params.max_rounds)
    else:
        new = _shrink_tolerant(centers, radius[idx], params.tolerance_vox)
    radius[idx] = new
    radius_nm = vox_to_nm(radius, voxel_size_a)
    too_small = active & ~(radius_nm > params.min_radius_nm)
    outcome[too_small] = "removed"
    table = table.set_column(table.schema.get_field_index("radius_vox"), "radius_vox", pa.array(radius))
    table = table.set_column(table.schema.get_field_index("radius_nm"), "radius_nm", pa.array(radius_nm))
    return table.set_column(table.schema.get_field_index("outcome"), "outcome",
                            pa.array(list(outcome), type=pa.string()))


def rendered_spheres(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row mask, centres (n, 3) voxels, radii voxels) of the spheres `render_labels` draws, in label order."""
    active = active_mask(table)
    return active, centers_vox(table)[active], radii_vox(table)[active]


def render_labels(shape, table: pa.Table, *, sections: tuple[int, int] | None = None) -> np.ndarray:
    """Labels (`label_dtype`) of the kept and repaired spheres, numbered 1..n in table order (0: background);
    only z-sections k0 to k1 - 1 with `sections` (k0, k1).

    Label k is the k-th kept/repaired row, not its ``id``; shared voxels go to the nearer centre
    relative to the radius (kernels/render.py).
    """
    _, centers, radii = rendered_spheres(table)
    return render_spheres(shape, centers, radii, np.arange(1, len(radii) + 1), sections=sections)


def label_slabs(shape, table: pa.Table, max_voxels: int = 1 << 23):
    """`render_labels` by z-slabs of about `max_voxels`, in order: what a label file is written from, never whole.
    A slab (16 MB of uint16) stays under the 32 MB above which glibc maps every array afresh: a freed slab's memory
    holds the next one (fresh pages cost up to 2.4 s/GB on a virtual machine; 32 MB slabs were 0.5 GB of them)."""
    step = max(1, max_voxels // max(1, int(shape[1]) * int(shape[2])))
    for k0 in range(0, int(shape[0]), step):
        yield render_labels(shape, table, sections=(k0, min(k0 + step, int(shape[0]))))
