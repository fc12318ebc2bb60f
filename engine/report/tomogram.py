"""The quality-control picture of one segmented tomogram, drawn from its outputs alone.

`write_report(out_dir, name)` reads the run record, the vesicle table, the input tomogram (where the
run record says it is) and `NAME.prob.mrc` when present, and writes `report/NAME.png`: three orthogonal
slices through the densest vesicle region with every vesicle outlined (kept, repaired and removed in
their own colours), the probability map under them, histograms of radius, membrane thickness and
profile correlation, and how many vesicles were left after each stage; plus a small `NAME.thumb.png`
for the run index. Matplotlib draws through its object API on the Agg canvas: no pyplot state, no display.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.outputs import read_run_record
from cryoves.engine.io.pages import is_mapped, read_box
from cryoves.engine.io.tables import active_mask, centers_vox, radii_vox
from cryoves.engine.units import nm_to_vox

REPORT_DIR = "report"
"""Reports go to OUT_DIR/report/: NAME.png, NAME.thumb.png, run.png and index.html."""
OUTCOME_COLORS = {"kept": "#00c8ff", "repaired": "#ffc400", "removed": "#ff2d55"}
"""Outline and histogram colours; removed vesicles are also dashed, so the two stay apart without colour."""
SLAB_HALF_WIDTH_VOX = 1
"""Each tomogram slice is the mean of 2*h+1 planes: less noise, same sharpness at vesicle scale."""
NEIGHBOURHOOD_RADII = 4.0
"""The densest region is the vesicle with the most neighbours within this many median radii."""
_PLANES = (("XY", 0, "z", ("x", "y")), ("XZ", 1, "y", ("x", "z")), ("YZ", 2, "x", ("y", "z")))
"""(name, axis cut, its letter, (horizontal, vertical) axis letters) of the three slices."""


@dataclass(frozen=True)
class TomogramOutputs:
    """What one finished tomogram left in the output folder, as the report reads it."""

    name: str
    record: dict
    vesicles: pa.Table
    voxel_size_a: float
    labels_path: Path
    probability_path: Path | None
    tomogram_path: Path | None  # the input, if it is still where the run record says


def read_outputs(out_dir, name: str) -> TomogramOutputs:
    """The outputs of tomogram `name`; a CryovesError when it has none or its run failed."""
    out_dir = Path(out_dir)
    record = read_run_record(out_dir, name)
    if record is None:
        raise CryovesError(f"{out_dir}: no run record runs/{name}.parquet; segment the tomogram first")
    if record.get("status") != "ok":
        raise CryovesError(f"{name}: its run failed ({record.get('error', '')}); there is nothing to report")
    table_path = out_dir / "vesicles" / f"{name}.parquet"
    labels_path = out_dir / f"{name}.labels.mrc"
    for path in (table_path, labels_path):
        if not path.is_file():
            raise CryovesError(f"{path}: missing, although runs/{name}.parquet says the run finished")
    probability = out_dir / f"{name}.prob.mrc"
    tomogram = Path(record.get("input") or "")
    return TomogramOutputs(name, record, pq.read_table(table_path), float(record["voxel_size_a"]), labels_path,
                           probability if probability.is_file() else None,
                           tomogram if tomogram.is_file() else None)


def outcomes(vesicles: pa.Table) -> np.ndarray:
    """The `outcome` column as a NumPy array of str."""
    return np.asarray(vesicles.column("outcome").to_pylist(), dtype=object).astype(str)


@dataclass(frozen=True)
class StageCounts:
    """Vesicles left after each post-processing stage and after corrections by hand (`engine.io.corrections`)."""

    candidates: int
    after_sphere_fit: int
    after_outliers: int
    after_overlaps: int
    final: int
    repaired: int
    removed: int
    added: int
    deleted: int

    def bars(self) -> list[tuple[str, int]]:
        """(label, count) in pipeline order, for the report; hand edits only where there were some."""
        bars = [("candidates", self.candidates), ("after sphere fit", self.after_sphere_fit),
                ("after outlier check", self.after_outliers), ("after overlap check", self.after_overlaps)]
        return bars + ([("after edits by hand", self.final)] if self.added or self.deleted else [])


def stage_counts(vesicles: pa.Table) -> StageCounts:
    """Count the vesicles left after each stage, from where each row's outcome was decided.

    Every row but those added by hand is a candidate from the adaptive local threshold; the sphere fit,
    the outlier check and the overlap check each remove some (column `stage`), and corrections by hand
    add and delete some; the rest are the final (kept + repaired) vesicles.
    """
    outcome = outcomes(vesicles)
    stage = np.asarray(vesicles.column("stage").to_pylist(), dtype=object).astype(str)
    removed = outcome == "removed"
    added, deleted = int(np.sum(stage == "added")), int(np.sum(removed & (stage == "deleted")))
    counts = [len(outcome) - added]
    for step in ("refine", "outliers", "overlap"):
        counts.append(counts[-1] - int(np.sum(removed & (stage == step))))
    return StageCounts(*counts, final=int(np.sum(active_mask(vesicles))), repaired=int(np.sum(outcome == "repaired")),
                       removed=int(np.sum(removed)), added=added, deleted=deleted)


def densest_point(centers_vox: np.ndarray, radii_vox: np.ndarray, shape) -> tuple[int, int, int]:
    """Integer (z, y, x) of the vesicle with the most others within `NEIGHBOURHOOD_RADII` median radii
    (the first such one); the volume centre when there are no vesicles."""
    centers = np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3)
    if not len(centers):
        return tuple(int(n // 2) for n in shape)
    from scipy.spatial import cKDTree

    reach = NEIGHBOURHOOD_RADII * float(np.median(radii_vox))
    best = int(np.argmax(cKDTree(centers).query_ball_point(centers, reach, return_length=True)))
    return tuple(int(np.clip(np.rint(c), 0, n - 1)) for c, n in zip(centers[best], shape))


_PART_BYTES = 1 << 24
"""Bytes of a mapped volume's sections `slab` reads at a time (under glibc's 32 MB threshold for fresh maps: the
parts' buffers are reused, see `overlaps.label_slabs`)."""


def slab(volume: np.ndarray, axis: int, index: int, half_width: int) -> np.ndarray:
    """Mean of the planes index-h..index+h (clipped to the volume) across `axis`, as float32 2-D
    (rows, columns) = the remaining axes in (z, y, x) order.

    A mapped volume is read from its file by groups of sections (`read_box`), not through the map: a plane across
    x holds a few voxels of every row, so it made the whole file resident (1.1 GB at 1024x1024x261)."""
    lo, hi = max(index - half_width, 0), min(index + half_width + 1, volume.shape[axis])
    box = [slice(None)] * 3
    box[axis] = slice(lo, hi)
    z0, z1, _ = box[0].indices(volume.shape[0])
    step = max(1, _PART_BYTES // max(volume[:1].nbytes, 1))
    scratch = np.empty(volume[z0:z0 + step].nbytes, np.uint8) if is_mapped(volume) else None  # parts read in turn
    parts = [np.array(read_box(volume, (slice(z, min(z + step, z1)), *box[1:]), scratch), dtype=np.float32)
             for z in range(z0, z1, step)]
    return np.concatenate(parts).mean(axis=axis)


def circles_in_plane(centers_vox: np.ndarray, radii_vox: np.ndarray, axis: int, index: float):
    """Where the spheres cut the plane `axis` = index: (row indices, in-plane centres (n, 2) as
    (row, column) of the remaining axes, circle radii), for the spheres that reach the plane."""
    centers = np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3)
    squared = np.asarray(radii_vox, dtype=np.float64) ** 2 - (centers[:, axis] - index) ** 2
    rows = np.flatnonzero(squared > 0)
    keep_axes = [a for a in range(3) if a != axis]
    return rows, centers[rows][:, keep_axes], np.sqrt(squared[rows])


def write_report(out_dir, name: str) -> Path:
    """Draw `report/NAME.png` (and the index thumbnail `report/NAME.thumb.png`); returns the PNG's path."""
    from matplotlib.figure import Figure

    outputs = read_outputs(out_dir, name)
    scene = _Scene.load(outputs)
    report_dir = Path(out_dir) / REPORT_DIR
    rows = 3 if scene.probability is not None else 2
    z, y, x = scene.shape
    slice_height = 4.2 * max(y, z) / max(x, y, 1) + 0.6
    figure = Figure(figsize=(15, 1.3 + slice_height * (rows - 1) + 3.2), layout="constrained")
    figure.get_layout_engine().set(h_pad=0.08, w_pad=0.08)
    parts = figure.subfigures(rows + 1, 1, height_ratios=[1.3] + [slice_height] * (rows - 1) + [3.2])
    _draw_header(parts[0], outputs, scene)
    _draw_slices(parts[1], scene, scene.background, scene.background_label, "gray", legend=True)
    if scene.probability is not None:
        _draw_slices(parts[2], scene, scene.probability, "probability map", "magma", limits=(0.0, 1.0))
    _draw_distributions(parts[-1], outputs.vesicles, stage_counts(outputs.vesicles))
    path = save_png(figure, report_dir / f"{name}.png", dpi=90)

    thumb = Figure(figsize=(2.6, 2.6 * y / max(x, 1) + 0.1), layout="constrained")
    _draw_plane(thumb.add_subplot(), scene, scene.background, 0, "gray", None, title=False)
    save_png(thumb, report_dir / f"{name}.thumb.png", dpi=70)
    return path


@dataclass(frozen=True)
class _Scene:
    """The arrays one report draws: the three slabs per volume and the spheres in voxels."""

    shape: tuple[int, int, int]
    point: tuple[int, int, int]
    background: dict[int, np.ndarray]
    background_label: str
    probability: dict[int, np.ndarray] | None
    centers_vox: np.ndarray
    radii_vox: np.ndarray
    outcome: np.ndarray
    voxel_size_a: float

    @classmethod
    def load(cls, outputs: TomogramOutputs) -> "_Scene":
        table = outputs.vesicles
        centers, radii = centers_vox(table), radii_vox(table, outputs.voxel_size_a)
        def mapped(path):  # checked when segmented: only the slices are read here
            return read_volume(path, outputs.voxel_size_a, scan=False).data

        labels = mapped(outputs.labels_path)
        shape = tuple(int(n) for n in labels.shape)
        final = active_mask(table)
        point = densest_point(centers[final], radii[final], shape)
        if outputs.tomogram_path is not None:
            volume, label, half = mapped(outputs.tomogram_path), "tomogram", 1
        elif outputs.probability_path is not None:
            volume, label, half = mapped(outputs.probability_path), "probability (input not found)", 0
        else:
            volume, label, half = labels > 0, "labels (input not found)", 0
        if tuple(volume.shape) != shape:
            raise CryovesError(f"{outputs.tomogram_path}: shape {tuple(volume.shape)} differs from "
                               f"{outputs.labels_path} {shape}; the input changed after segmentation")
        probability = None
        if outputs.probability_path is not None:
            prob = mapped(outputs.probability_path)
            probability = {axis: slab(prob, axis, point[axis], 0) for axis in range(3)}
        background = {axis: slab(volume, axis, point[axis], half * SLAB_HALF_WIDTH_VOX) for axis in range(3)}
        return cls(shape, point, background, label, probability, centers, radii, outcomes(table),
                   outputs.voxel_size_a)


def _scale_bar_nm(shape, voxel_size_a: float) -> float:
    """A round length in nm, at most a quarter of the slice width."""
    width_nm = shape[2] * voxel_size_a / 10.0
    return float(max((n for n in (10, 20, 50, 100, 200, 500, 1000) if n <= width_nm / 4), default=10))


def _draw_header(figure, outputs: TomogramOutputs, scene: _Scene) -> None:
    record, counts = outputs.record, stage_counts(outputs.vesicles)
    seconds = record.get("total_seconds")
    lines = [
        (f"{outputs.name}: {counts.final} vesicles ({counts.repaired} repaired), {counts.removed} removed of "
         f"{counts.candidates} candidates"
         + (f"; {counts.added} added and {counts.deleted} deleted by hand" if counts.added or counts.deleted else ""),
         15, "bold", "black"),
        (f"threshold {record['threshold']:.3f}   voxel {outputs.voxel_size_a:g} Å   "
         f"shape {' x '.join(map(str, scene.shape))} (z, y, x)   "
         + (f"{seconds:.1f} s" if seconds is not None else ""), 11, "normal", "black"),
        (f"input {record.get('input', '')}", 9, "normal", "dimgray"),
    ]
    warnings = _warnings(record)
    lines += [(f"warning: {w}", 10, "bold", "#c00000") for w in warnings] or [("no warnings", 10, "normal", "green")]
    for i, (text, size, weight, color) in enumerate(lines):
        figure.text(0.01, 0.92 - i * 0.2, text, fontsize=size, fontweight=weight, color=color, va="top",
                    ha="left")


def _warnings(record: dict) -> list[str]:
    import json

    raw = record.get("warnings") or "[]"
    return list(json.loads(raw) if isinstance(raw, str) else raw)


def _draw_slices(figure, scene: _Scene, planes: dict[int, np.ndarray], label: str, cmap: str,
                 limits: tuple[float, float] | None = None, *, legend: bool = False) -> None:
    z, y, x = scene.shape
    axes = figure.subplots(1, 3, width_ratios=[x, x, y])
    for axis, ax in enumerate(axes):
        _draw_plane(ax, scene, planes, axis, cmap, limits)
    axes[0].set_ylabel(label, fontsize=11)
    _draw_scale_bar(axes[0], _scale_bar_nm(scene.shape, scene.voxel_size_a), scene.voxel_size_a, scene.shape)
    if legend:
        axes[-1].legend(handles=[_legend_handle(outcome) for outcome in OUTCOME_COLORS], loc="upper right",
                        fontsize=8, framealpha=0.8)


def _legend_handle(outcome: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=OUTCOME_COLORS[outcome], linestyle="--" if outcome == "removed" else "-",
                  label=outcome)


def _draw_plane(ax, scene: _Scene, planes: dict[int, np.ndarray], axis: int, cmap: str,
                limits: tuple[float, float] | None, *, title: bool = True) -> None:
    """One slice with the circles where the spheres cut it; vertical axis up, as in IMOD. The circles are one
    collection of ellipses in data units, without a patch object each: patches took 1 s for the 1069 circles of a
    1024x1024x261 tomogram's report (each updates the axes' data limits and resolves its default colour)."""
    from matplotlib.collections import EllipseCollection

    name, _, letter, (horizontal, vertical) = _PLANES[axis]
    image = planes[axis]
    lo, hi = limits if limits is not None else np.percentile(image, [1, 99])
    ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", interpolation="nearest")
    rows, centers, radii = circles_in_plane(scene.centers_vox, scene.radii_vox, axis, scene.point[axis])
    outcomes = [scene.outcome[row] for row in rows]
    ax.add_collection(EllipseCollection(2 * radii, 2 * radii, 0.0, units="xy", offsets=centers[:, ::-1],
                                        offset_transform=ax.transData, facecolors="none", linewidths=1.1,
                                        edgecolors=[OUTCOME_COLORS[outcome] for outcome in outcomes],
                                        linestyles=["--" if outcome == "removed" else "-" for outcome in outcomes]),
                      autolim=False)
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(f"{name} at {letter} = {scene.point[axis]}", fontsize=10)
        ax.set_xlabel(horizontal, fontsize=9, labelpad=1)


def _draw_scale_bar(ax, length_nm: float, voxel_size_a: float, shape) -> None:
    length_vox = nm_to_vox(length_nm, voxel_size_a)
    y0, x0 = 0.06 * shape[1], 0.05 * shape[2]
    ax.plot([x0, x0 + length_vox], [y0, y0], color="white", linewidth=3, solid_capstyle="butt")
    from matplotlib.patheffects import withStroke

    ax.text(x0 + length_vox / 2, y0 + 0.025 * shape[1], f"{length_nm:g} nm", color="white", ha="center",
            va="bottom", fontsize=8, fontweight="bold", path_effects=[withStroke(linewidth=2, foreground="black")])


def _draw_distributions(figure, vesicles: pa.Table, counts: StageCounts) -> None:
    axes = figure.subplots(1, 4, width_ratios=[1, 1, 1, 1.15])
    outcome = outcomes(vesicles)
    for ax, (column, label) in zip(axes, (("radius_nm", "radius (nm)"),
                                          ("membrane_thickness_nm", "membrane thickness (nm)"),
                                          ("profile_correlation", "profile correlation"))):
        values = vesicles.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        groups = [values[(outcome == o) & np.isfinite(values)] for o in OUTCOME_COLORS]
        finite = np.concatenate(groups)
        if len(finite):
            bins = np.histogram_bin_edges(finite, bins=min(30, max(5, len(finite) // 3)))
            # one filled outline per outcome, not a rectangle per bin (1,900 vesicles: 274 of them, half the report's
            # time to add, lay out and draw); the same bars, the legend in the stack's order
            ax.hist(groups, bins=bins, stacked=True, histtype="stepfilled", color=list(OUTCOME_COLORS.values()),
                    label=list(OUTCOME_COLORS))
        ax.set_xlabel(label, fontsize=10)
        ax.set_ylabel("vesicles", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    names, values = zip(*counts.bars())
    bars = axes[3].barh(range(len(names))[::-1], values, color=["#9aa5b1"] * (len(names) - 1) + ["#00c8ff"])
    axes[3].set_yticks(range(len(names))[::-1], names, fontsize=9)
    axes[3].bar_label(bars, fontsize=9, padding=2)
    axes[3].set_xlim(0, max(*values, 1) * 1.2)
    axes[3].set_title("vesicles left after each stage", fontsize=10)
    axes[3].tick_params(axis="x", labelsize=8)


def save_png(figure, path: Path, dpi: int) -> Path:
    """The figure as a PNG at `dpi`, drawn once: `savefig` draws a figure with a layout engine twice (the first,
    unrendered, to lay it out), which was a third of the report's time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_dpi(dpi)
    with atomic_output(path) as tmp:
        FigureCanvasAgg(figure).print_png(tmp)
    return path
