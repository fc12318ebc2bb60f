"""Digital balls painted into a label volume (method.md §2.20 "Render").

A ball is ``{v : |v - c|^2 <= r^2}`` (diameter 2r + 1 voxels for an integer centre and radius),
clipped at the volume faces. Where balls overlap, the voxel goes to the ball of smallest *power*
``|v - c|^2 - r^2`` (ties: the earlier ball), not to the last one painted as in the reference
(method.md §6.10). The power is the squared distance to the centre measured relative to the radius:
the boundary between two overlapping balls is the plane through the circle where their spheres
meet, so each vesicle keeps the half of the lens on its own side and the split does not depend on
table order.
"""

import numba
import numpy as np

from cryoves.kernels.arrays import readonly
from cryoves.kernels.labels import label_dtype, relabel
from cryoves.kernels.threads import threads_for

__all__ = ["render_spheres", "render_spheres_reference"]


def _check(shape, centers_vox, radii_vox, ids):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 0:
        raise ValueError(f"shape must be (z, y, x) sizes >= 0, got {shape}")
    centers = np.ascontiguousarray(np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3))
    n = centers.shape[0]
    radii = np.ascontiguousarray(np.broadcast_to(np.asarray(radii_vox, dtype=np.float64), (n,)))
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must have one entry per centre ({n}), got shape {ids.shape}")
    if ids.size and (ids.min() < 1 or ids.max() > np.iinfo(np.uint32).max):
        raise ValueError("ids must be in 1 .. 2**32 - 1 (0 is background)")
    if not (np.all(np.isfinite(centers)) and np.all(np.isfinite(radii))):
        raise ValueError("centers_vox and radii_vox must be finite")
    return shape, centers, radii, ids.astype(np.uint32)


def render_spheres(shape, centers_vox, radii_vox, ids, *, sections: tuple[int, int] | None = None):
    """Label volume (`label_dtype` of the largest id) with ball i painted as ``ids[i]``; overlaps go to
    the smallest power. `sections` (k0, k1): only z-sections k0 to k1 - 1 of it, the same labels (a volume
    written by parts never exists whole)."""
    shape, centers, radii, ids = _check(shape, centers_vox, radii_vox, ids)
    k0, k1 = (0, shape[0]) if sections is None else (int(sections[0]), int(sections[1]))
    if not 0 <= k0 <= k1 <= shape[0]:
        raise ValueError(f"sections must be (k0, k1) with 0 <= k0 <= k1 <= {shape[0]}, got {sections}")
    n = centers.shape[0]
    index = np.zeros((k1 - k0, *shape[1:]), dtype=label_dtype(n))  # 1 + ball index; mapped to ids below unless 1..n
    if n:
        with threads_for(index.size):
            _render(index, readonly(centers), readonly(radii), k0)
    if np.array_equal(ids, np.arange(1, n + 1)):  # as `render_labels` numbers them: no second pass
        return index
    return relabel(index, np.concatenate([[0], ids]).astype(label_dtype(ids.max() if ids.size else 0)))


@numba.njit(parallel=True, cache=True)
def _render(index, centers, radii, first):
    """Sections `first`.. of the volume into `index` (its first section is section `first`)."""
    nz, ny, nx = index.shape
    n = centers.shape[0]
    for k in numba.prange(nz):  # slice k is written by iteration k only: no races
        z = k + first
        labels = index[k]
        for i in range(n):
            cz, cy, cx = centers[i, 0], centers[i, 1], centers[i, 2]
            r2 = radii[i] * radii[i]
            dz = z - cz
            if radii[i] < 0 or dz * dz > r2:
                continue
            reach = np.sqrt(r2 - dz * dz)
            for y in range(max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, ny)):
                dy = y - cy
                dzy = dz * dz + dy * dy
                if dzy > r2:
                    continue
                rest = np.sqrt(r2 - dzy)
                for x in range(max(int(np.floor(cx - rest)), 0), min(int(np.ceil(cx + rest)) + 1, nx)):
                    dx = x - cx
                    d2 = dzy + dx * dx
                    if d2 > r2:
                        continue
                    owner = labels[y, x]
                    if owner == 0:
                        labels[y, x] = i + 1
                        continue
                    j = np.int64(owner) - 1
                    ez = z - centers[j, 0]
                    ey = y - centers[j, 1]
                    ex = x - centers[j, 2]
                    if d2 - r2 < (ez * ez + ey * ey + ex * ex) - radii[j] * radii[j]:
                        labels[y, x] = i + 1


def render_spheres_reference(shape, centers_vox, radii_vox, ids, *, sections: tuple[int, int] | None = None):
    """Plain NumPy version of :func:`render_spheres` (whole-volume distances per ball), for tests."""
    if sections is not None:
        return render_spheres_reference(shape, centers_vox, radii_vox, ids)[sections[0]:sections[1]]
    shape, centers, radii, ids = _check(shape, centers_vox, radii_vox, ids)
    labels = np.zeros(shape, dtype=label_dtype(ids.max() if ids.size else 0))
    best = np.full(shape, np.inf)
    z, y, x = (np.arange(s, dtype=np.float64) for s in shape)
    for (cz, cy, cx), r, label in zip(centers, radii, ids):
        dz, dy, dx = z - cz, y - cy, x - cx
        d2 = (dz[:, None, None] * dz[:, None, None] + dy[None, :, None] * dy[None, :, None]) \
            + dx[None, None, :] * dx[None, None, :]
        power = d2 - r * r
        win = (d2 <= r * r) & (power < best)
        labels[win] = label
        best[win] = power[win]
    return labels
