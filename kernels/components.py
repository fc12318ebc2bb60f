"""Connected components by union-find: of a whole volume above a threshold, by runs of voxels along x; and
over a segment's voxels from the highest value down (26-connectivity), how many pieces it falls into at each
of many raised thresholds, and which of its maxima stand out by more than a depth.

The global labelling (method.md §2.10) of a 1024x1024x261 map took scipy's `ndimage.label` 6.5 s on one
core: it labels voxel by voxel, through a boolean mask. Here the map is read once into runs of voxels above
the threshold along x (a segment's rows), runs that touch in the neighbouring rows are joined, and the ids
are painted run by run, numbered as `ndimage.label` numbers them.

The split step of adaptive local thresholding (method.md §2.11) raises the threshold over a segment until
{P > t} holds more pieces than at the global threshold. Labelling the segment's box once per threshold
(up to a few hundred thresholds per segment) was most of the post-processing time of a large tomogram.
Here the voxels enter a union-find forest from the highest P down (26-connectivity), and the number of
pieces of at least `min_size` voxels is read off as the level passes each threshold. The neck cut asks
for the maxima of a distance transform deeper than the saddle to any higher maximum (their dynamic),
which `skimage.morphology.h_maxima` finds by a grey-level reconstruction that sorts the whole box.
"""

import numba
import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima

from cryoves.kernels.arrays import readonly
from cryoves.kernels.labels import label_dtype

__all__ = ["component_counts", "component_counts_reference", "deep_maxima", "deep_maxima_reference", "label_above",
           "label_above_reference"]

_STRUCTURE26 = np.ones((3, 3, 3), bool)
_STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 26: _STRUCTURE26}


def label_above(values, threshold: float, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """Connected components of ``{values > threshold}`` (float64 comparison; ``connectivity`` 6 or 26) and
    their number n: ids 1..n in raster order of each component's first voxel, as `scipy.ndimage.label`
    numbers them, in `label_dtype(n)`."""
    if connectivity not in _STRUCTURES or isinstance(connectivity, bool):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
    values = readonly(_float_volume(values))
    row_runs = _count_runs(values, float(threshold))
    offsets = np.zeros(row_runs.size + 1, np.int64)
    np.cumsum(row_runs, out=offsets[1:])
    starts, stops = _find_runs(values, float(threshold), readonly(offsets))
    ids, n = _run_ids(readonly(offsets), readonly(starts), readonly(stops), values.shape[1], connectivity == 26)
    labels = np.zeros(values.shape, label_dtype(n))
    _paint_runs(labels, readonly(offsets), readonly(starts), readonly(stops), readonly(ids))
    return labels, n


def _float_volume(values) -> np.ndarray:
    """`values` as a C-contiguous 3-D float array; ValueError otherwise."""
    values = np.ascontiguousarray(values)
    if values.ndim != 3 or values.dtype.kind != "f":
        raise ValueError(f"values must be a 3-D float array, got {values.dtype} {values.shape}")
    return values


def label_above_reference(values, threshold: float, connectivity: int = 6) -> tuple[np.ndarray, int]:
    """`label_above` by `scipy.ndimage.label` of the boolean mask."""
    labels, n = ndimage.label(np.asarray(values) > np.float64(threshold), structure=_STRUCTURES[connectivity],
                              output=np.uint32)
    return labels.astype(label_dtype(n)), n


@numba.njit(cache=True, nogil=True)
def _count_runs(values, threshold):
    """Runs of consecutive voxels above `threshold` in each (z, y) row, flat over rows."""
    nz, ny, nx = values.shape
    counts = np.zeros(nz * ny, np.int64)
    for z in range(nz):
        for y in range(ny):
            inside, n = False, 0
            for x in range(nx):
                above = np.float64(values[z, y, x]) > threshold
                if above and not inside:
                    n += 1
                inside = above
            counts[z * ny + y] = n
    return counts


@numba.njit(cache=True, nogil=True)
def _find_runs(values, threshold, offsets):
    """First and end x of every run, rows in raster order (row r's runs at offsets[r]:offsets[r + 1])."""
    nz, ny, nx = values.shape
    starts = np.empty(offsets[-1], np.int32)
    stops = np.empty(offsets[-1], np.int32)
    for z in range(nz):
        for y in range(ny):
            k, inside = offsets[z * ny + y], False
            for x in range(nx):
                above = np.float64(values[z, y, x]) > threshold
                if above and not inside:
                    starts[k] = x
                elif inside and not above:
                    stops[k] = x
                    k += 1
                inside = above
            if inside:
                stops[k] = nx
    return starts, stops


@numba.njit(cache=True)
def _join_rows(parent, a0, a1, b0, b1, starts, stops, reach):
    """Joins the runs of two neighbouring rows (runs a0:a1 and b0:b1) that overlap along x, or come within
    `reach` voxels of each other (1 for diagonal neighbours)."""
    i, j = a0, b0
    while i < a1 and j < b1:
        if starts[i] < stops[j] + reach and starts[j] < stops[i] + reach:
            ri, rj = _find(parent, i), _find(parent, j)
            if ri < rj:  # the root is a component's first run in raster order
                parent[rj] = ri
            elif rj < ri:
                parent[ri] = rj
        if stops[i] <= stops[j]:
            i += 1
        else:
            j += 1


@numba.njit(cache=True)
def _run_ids(offsets, starts, stops, ny, diagonal):
    """Component id of every run (1..n, in raster order of the components' first runs) and n."""
    n_runs = starts.shape[0]
    parent = np.arange(n_runs)
    n_rows = offsets.shape[0] - 1
    for r in range(n_rows):
        a0, a1 = offsets[r], offsets[r + 1]
        if a0 == a1:
            continue
        y = r % ny
        if y > 0:
            _join_rows(parent, a0, a1, offsets[r - 1], offsets[r], starts, stops, 1 if diagonal else 0)
        if r >= ny:  # the row below in z, and with diagonals its y neighbours
            for dy in range(-1 if diagonal else 0, 2 if diagonal else 1):
                if 0 <= y + dy < ny:
                    q = r - ny + dy
                    _join_rows(parent, a0, a1, offsets[q], offsets[q + 1], starts, stops, 1 if diagonal else 0)
    ids = np.empty(n_runs, np.int64)
    n = 0
    for k in range(n_runs):
        root = _find(parent, k)
        if root == k:
            n += 1
            ids[k] = n
        else:
            ids[k] = ids[root]
    return ids, n


@numba.njit(cache=True, nogil=True)
def _paint_runs(labels, offsets, starts, stops, ids):
    nz, ny, _ = labels.shape
    for z in range(nz):
        for y in range(ny):
            r = z * ny + y
            for k in range(offsets[r], offsets[r + 1]):
                labels[z, y, starts[k]:stops[k]] = ids[k]


def component_counts(values, thresholds, min_size: float = 0.0) -> np.ndarray:
    """Number of 26-connected components of ``{values > t}`` (float64 comparison) with at least
    ``min_size`` voxels, for each ``t`` of ``thresholds`` (any order); int64, one per threshold."""
    values = _float_volume(values)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        return np.zeros(0, np.int64)
    descending = np.argsort(-thresholds, kind="stable")
    order, levels, size_padded, neighbours = _by_threshold(values, thresholds[descending])
    index = np.int32 if size_padded < np.iinfo(np.int32).max else np.int64  # int32: half the union-find's memory
    counts = _counts(order, levels, np.full(size_padded, -1, index), np.zeros(size_padded, index), neighbours,
                     readonly(thresholds[descending]), float(min_size))
    out = np.empty(thresholds.size, np.int64)
    out[descending] = counts
    return out


def component_counts_reference(values, thresholds, min_size: float = 0.0) -> np.ndarray:
    """`component_counts` by one `scipy.ndimage.label` per threshold."""
    values = np.asarray(values, dtype=np.float64)
    out = []
    for t in np.asarray(thresholds, dtype=np.float64).reshape(-1):
        labels, n = ndimage.label(values > t, structure=_STRUCTURE26)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        out.append(int(np.count_nonzero(sizes >= min_size)))
    return np.array(out, np.int64)


def deep_maxima(values, depth: float) -> np.ndarray:
    """Flat indices (ascending) of one peak voxel per maximum of ``values`` (> 0 only) whose dynamic
    exceeds ``depth``: from it one must descend more than ``depth`` to reach a higher maximum. The highest
    maximum of each connected part of ``{values > 0}`` always counts."""
    order, *forest = _from_the_top(_float_volume(values), 0.0)
    return np.sort(order[_deep_peaks(*forest, float(depth))])


def deep_maxima_reference(values, depth: float) -> np.ndarray:
    """The connected regions (labels 1..n, 26-connectivity) of `skimage.morphology.h_maxima`: one per maximum
    whose dynamic exceeds ``depth``; `deep_maxima` returns one voxel of each."""
    return ndimage.label(h_maxima(np.asarray(values, np.float64), depth), structure=_STRUCTURE26)[0]


@numba.njit(cache=True)
def _find(parent, v):
    while parent[v] != v:
        parent[v] = parent[parent[v]]  # path halving
        v = parent[v]
    return v


def _from_the_top(values, floor: float):
    """The voxels of `values` above `floor` (compared in float64) in the order the union-find kernels add them,
    highest first (ties: the lower index first): their flat indices; the same in the volume padded by one voxel on
    every face, where a voxel's 26 neighbours lie at fixed offsets and the padding never enters the forest (no
    bounds to check); their values (float64); the padded size; the neighbours' offsets (z, y, x ascending)."""
    flat = values.reshape(-1)
    candidates = np.flatnonzero(flat > np.float64(floor))  # no copy
    order = candidates[np.argsort(-flat[candidates], kind="stable")]
    return order, *_padded(values.shape, order, flat[order].astype(np.float64))


def _by_threshold(values, descending):
    """`_from_the_top`'s hand-off (less the flat indices) for `component_counts` at the thresholds `descending`: the
    voxels grouped by the first threshold they exceed, in that order, each group in index order (the counts at the
    thresholds do not depend on the order within a group): no sort of the values (a fifth of the split's time)."""
    flat = values.reshape(-1)
    candidates = np.flatnonzero(flat > descending[-1])
    levels = flat[candidates].astype(np.float64)
    group = np.searchsorted(-descending, -levels, side="right")  # how many thresholds are >= the value
    order = np.argsort(group.astype(np.uint16 if descending.size < 1 << 16 else np.int64), kind="stable")
    return _padded(values.shape, candidates[order], levels[order])


def _padded(shape, order, levels):
    """(indices `order` in the volume of `shape` padded by one voxel on every face, `levels`, the padded size, the
    26 neighbours' offsets in it)."""
    nz, ny, nx = shape
    z, rest = np.divmod(order, ny * nx)
    y, x = np.divmod(rest, nx)
    plane, row = (ny + 2) * (nx + 2), nx + 2
    step = np.array([-1, 0, 1])
    neighbours = (step[:, None, None] * plane + step[None, :, None] * row + step[None, None, :]).ravel()
    padded = (z + 1) * plane + (y + 1) * row + (x + 1)
    return readonly(padded), readonly(levels), (nz + 2) * plane, readonly(neighbours[neighbours != 0])


@numba.njit(cache=True)
def _counts(order, levels, parent, size, neighbours, thresholds_descending, min_size):
    """`component_counts` of the voxels `order` (padded indices, `_by_threshold`) at `levels`, grouped by the first
    threshold they exceed, highest first; `parent` (all -1: not yet above the level) and `size` (zeros) span the
    padded volume."""
    counts = np.zeros(thresholds_descending.size, np.int64)
    large = 0
    k = 0
    for j in range(thresholds_descending.size):
        t = thresholds_descending[j]
        while k < order.size and levels[k] > t:
            v = order[k]
            k += 1
            parent[v] = v
            size[v] = 1
            if 1 >= min_size:
                large += 1
            root = v  # the root of v's component, kept across its neighbours
            for m in range(neighbours.size):
                u = v + neighbours[m]
                if parent[u] < 0:
                    continue
                a = _find(parent, u)
                if a == root:
                    continue
                b = root
                before = (size[a] >= min_size) + (size[b] >= min_size)
                if size[a] < size[b]:
                    a, b = b, a
                parent[b] = a
                size[a] += size[b]
                large += (size[a] >= min_size) - before
                root = a
        counts[j] = large
    return counts


@numba.njit(cache=True)
def _deep_peaks(order, levels, size_padded, neighbours, depth):
    """Positions in `order` (padded indices, `_from_the_top`, at `levels`, highest first) of the deep maxima's
    peaks."""
    parent = np.full(size_padded, -1, np.int64)
    size = np.zeros(size_padded, np.int64)
    peak = np.zeros(size_padded, np.int64)  # of a root: its component's highest voxel, as a position in `order`
    deep = np.zeros(order.size, np.bool_)
    for k in range(order.size):
        v = order[k]
        parent[v] = v
        size[v] = 1
        peak[v] = k
        for m in range(neighbours.size):
            u = v + neighbours[m]
            if parent[u] < 0:
                continue
            a, b = _find(parent, u), _find(parent, v)
            if a == b:
                continue
            # the component whose peak entered later (the lower) ends here, at the saddle levels[k]
            high, low = (peak[a], peak[b]) if peak[a] < peak[b] else (peak[b], peak[a])
            if levels[low] - levels[k] > depth:
                deep[low] = True
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            peak[a] = high
    for k in range(order.size):
        v = order[k]
        if parent[v] == v:
            deep[peak[v]] = True
    return np.flatnonzero(deep)
