"""napari reader: a cryoves output folder as layers (tomogram, probability, labels, vesicles), and MRC tomograms.

Every layer carries the voxel size as scale and the origin as translate, in nm, so the layers overlay
each other and the vesicle table's `center_*_nm`. The vesicles are a Points layer with one point per
row of the vesicle table (removed ones too), the diameter in voxels as size and the outcome as the
colour of its outline; each slice draws a vesicle as the sphere's cross-section there (with the thick
slice the widgets set). This module builds napari's layer
data (data, keyword arguments, layer type) and imports no napari itself.
"""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.outputs import read_run_record, tomogram_name
from cryoves.engine.io.tables import centers_vox, radii_vox, read_metadata
from cryoves.engine.report.tomogram import OUTCOME_COLORS as REPORT_COLORS

OUTCOME_COLORS = REPORT_COLORS | {"added": "#7dff4a"}
"""Point colours by `outcome`, as in the QC report; `added` marks a vesicle added by hand and not saved yet."""
LAYER_KEY = "cryoves"
"""The key of `layer.metadata` under which a layer says what it shows: `kind` (tomogram, probability,
labels, vesicles), and `out_dir` and `name` for the outputs of a segmented tomogram, `path` for a tomogram file."""
TOMOGRAM_SUFFIXES = (".mrc", ".rec")
BORDER_WIDTH = 0.08
"""A vesicle is drawn as a circle (transparent disc) whose outline is this fraction of its diameter."""
FEATURES = ("vesicle_id", "outcome", "stage", "radius_nm", "membrane_thickness_nm", "membrane_density",
            "profile_correlation", "mahalanobis_d2", "p_value")
"""Vesicle-table columns shown as point features (napari's features table)."""
ADDED_FEATURES = {column: np.nan for column in FEATURES} | {"vesicle_id": 0, "outcome": "added", "stage": "added"}
"""The features of a point added by hand: no vesicle yet (id 0), no measurements."""

LayerData = tuple  # (data, keyword arguments of the layer, layer type), as napari readers return them


def get_reader(path):
    """napari's reader hook: `read_outputs` for an output folder or a vesicle table in one, `read_tomogram`
    for an MRC file, None for anything else (napari then asks other readers)."""
    if isinstance(path, list):
        return None
    path = Path(path)
    if path.is_dir():
        return read_outputs if output_names(path) else None
    if path.suffix == ".parquet" and path.parent.name == "vesicles":
        return read_outputs if (path.parents[1] / "runs" / path.name).is_file() else None
    if path.suffix.lower() in TOMOGRAM_SUFFIXES:
        return read_tomogram
    return None


def output_names(out_dir) -> list[str]:
    """The tomograms of an output folder whose run finished (run record with status ok), sorted."""
    records = sorted(Path(out_dir).glob("runs/*.parquet"))
    return [path.stem for path in records if (read_run_record(out_dir, path.stem) or {}).get("status") == "ok"]


def read_outputs(path) -> list[LayerData]:
    """The layers of every finished tomogram in an output folder, or of the one whose vesicle table `path` is."""
    path = Path(path)
    if path.is_dir():
        return [layer for name in output_names(path) for layer in tomogram_layers(path, name)]
    return tomogram_layers(path.parents[1], path.stem)


def read_tomogram(path) -> list[LayerData]:
    """An MRC tomogram as an image layer (memory-mapped), placed in nm."""
    volume = read_volume(path)
    metadata = {LAYER_KEY: {"kind": "tomogram", "path": str(Path(path).resolve())}}
    return [(volume.data, {"name": tomogram_name(path), "metadata": metadata,
                           **placement(volume.voxel_size_a, volume.origin_a)}, "image")]


def placement(voxel_size_a: float, origin_a) -> dict:
    """Layer scale and translate (nm) for a volume of this voxel size (Å) and origin (Å, z y x)."""
    return {"scale": (voxel_size_a / 10.0,) * 3, "translate": tuple(float(a) / 10.0 for a in origin_a),
            "units": ("nm",) * 3}


def tomogram_layers(out_dir, name: str, *, tomogram: bool = True) -> list[LayerData]:
    """The layers of segmented tomogram `name`: the input tomogram (with `tomogram`, when it is still where
    the run record says), the probability map (when written), the labels and the vesicles."""
    out_dir = Path(out_dir).resolve()
    record = read_run_record(out_dir, name)
    if record is None or record.get("status") != "ok":
        raise CryovesError(f"{out_dir}: tomogram {name} has no finished run (runs/{name}.parquet)")
    table_path = out_dir / "vesicles" / f"{name}.parquet"
    metadata = read_metadata(table_path)
    voxel_size_a = float(metadata["voxel_size_a"])
    place = placement(voxel_size_a, metadata["origin_a"])

    def about(kind: str, **more) -> dict:
        return {"metadata": {LAYER_KEY: {"kind": kind, "out_dir": str(out_dir), "name": name, **more}}, **place}

    layers = []
    source = Path(record.get("input") or "")
    if tomogram and source.is_file():
        layers.append((read_volume(source, voxel_size_a).data,
                       {"name": f"{name} tomogram", **about("tomogram", path=str(source))}, "image"))
    probability = out_dir / f"{name}.prob.mrc"
    if probability.is_file():
        layers.append((read_volume(probability, voxel_size_a).data,
                       {"name": f"{name} probability", "colormap": "magma", "contrast_limits": (0.0, 1.0),
                        "blending": "additive", "opacity": 0.4, **about("probability")}, "image"))
    layers.append((read_volume(out_dir / f"{name}.labels.mrc", voxel_size_a).data,
                   {"name": f"{name} labels", "opacity": 0.3, **about("labels")}, "labels"))
    points, kwargs = vesicle_points(pq.read_table(table_path), voxel_size_a)
    layers.append((points, {"name": f"{name} vesicles", **kwargs, **about("vesicles")}, "points"))
    return layers


def vesicle_points(table, voxel_size_a: float) -> tuple[np.ndarray, dict]:
    """Point centres (voxels) and Points-layer arguments for the vesicles of a table with a finite sphere;
    a point added by hand gets vesicle_id 0 and outcome `added`."""
    centers, radii = centers_vox(table), radii_vox(table, voxel_size_a)
    shown = np.isfinite(centers).all(axis=1) & (radii > 0)
    features = {column: table.column(column).to_numpy(zero_copy_only=False)[shown] for column in FEATURES}
    return centers[shown], {
        "ndim": 3, "size": 2.0 * radii[shown], "features": features, "feature_defaults": ADDED_FEATURES,
        "face_color": "transparent", "border_color": "outcome", "border_color_cycle": OUTCOME_COLORS,
        "border_width": BORDER_WIDTH, "projection_mode": "rescale_spherical",
    }

