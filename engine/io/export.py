"""Vesicle centres from an output folder for subtomogram averaging and annotation tools.

RELION 5 STAR (`rlnTomoName`, `rlnCenteredCoordinate{X,Y,Z}Angst`: Å from the tomogram centre, which
RELION puts at size / 2 voxels), RELION 3/4 and Warp STAR (`rlnCoordinate{X,Y,Z}`: voxels of the
segmented tomogram, counted from 0 at the first voxel's centre, as the vesicle table's `center_*_vox`;
the voxel size as `rlnDetectorPixelSize` with `rlnMagnification` 10000, the RELION 3 way of stating
Å per pixel), both through the `starfile` library; and copick picks (the optional `copick` extra):
one point per vesicle in Å from the first voxel, its `vesicle_id` as instance id and its profile
correlation as score, under one pickable object whose radius is the median vesicle radius (copick
holds one radius per object; every vesicle's own radius stays in the vesicle table).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.tables import active_mask, centers_vox

STAR_STYLES = {"relion5": "centred Å (RELION 5)", "relion4": "pixels (RELION 3/4, Warp)"}
COPICK_OBJECT = "synaptic-vesicle"
COPICK_USER = "cryoves"
COPICK_SESSION = "0"
"""copick's session id for picks made by a tool rather than a person."""


@dataclass(frozen=True)
class ExportedTomogram:
    """One segmented tomogram's grid and the vesicle rows to export."""

    name: str
    input_path: str
    shape: tuple[int, int, int]  # (z, y, x) voxels
    voxel_size_a: float
    vesicles: pa.Table


def exported_tomograms(out_dir, include_removed: bool = False) -> list[ExportedTomogram]:
    """Every successfully segmented tomogram in `out_dir` with its kept and repaired vesicles (all
    rows with `include_removed`), by name."""
    out_dir = Path(out_dir)
    found = []
    for path in sorted((out_dir / "runs").glob("*.parquet")):
        record = pq.read_table(path).to_pylist()[0]
        if record.get("status") != "ok":
            continue
        name, voxel_size_a = record["tomogram"], float(record["voxel_size_a"])
        table = pq.read_table(out_dir / "vesicles" / f"{name}.parquet")
        if not include_removed:
            table = table.filter(pa.array(active_mask(table)))
        shape = read_volume(out_dir / f"{name}.labels.mrc", voxel_size_a).data.shape
        found.append(ExportedTomogram(name, str(record.get("input") or ""), tuple(int(n) for n in shape),
                                      voxel_size_a, table))
    if not found:
        raise CryovesError(f"{out_dir}: no segmented tomograms (runs/*.parquet with status ok); nothing to export")
    return found


def star_particles(tomogram: ExportedTomogram, style: str):
    """The particle table (a pandas DataFrame, as `starfile` writes it) of one tomogram in `style`."""
    import pandas as pd

    if style not in STAR_STYLES:
        raise ValueError(f"style must be one of {', '.join(STAR_STYLES)}, got {style!r}")
    xyz = centers_vox(tomogram.vesicles)[:, ::-1]
    n = len(xyz)
    columns = {"rlnTomoName": [tomogram.name] * n}
    if style == "relion5":
        size_xyz = np.asarray(tomogram.shape[::-1], dtype=np.float64)
        centred_a = (xyz - size_xyz / 2.0) * tomogram.voxel_size_a
        columns |= {f"rlnCenteredCoordinate{a}Angst": centred_a[:, i] for i, a in enumerate("XYZ")}
    else:
        columns |= {"rlnMicrographName": [Path(tomogram.input_path).name] * n}
        columns |= {f"rlnCoordinate{a}": xyz[:, i] for i, a in enumerate("XYZ")}
        columns |= {"rlnMagnification": np.full(n, 10000.0), "rlnDetectorPixelSize": np.full(n, tomogram.voxel_size_a)}
    return pd.DataFrame(columns)


def write_star(out_dir, dest, style: str = "relion5", *, per_tomogram: bool = False,
               include_removed: bool = False) -> list[Path]:
    """Write `dest/vesicles.STYLE.star` (one particle table for the run) or, `per_tomogram`,
    `dest/NAME.STYLE.star`; returns the files written."""
    import pandas as pd
    import starfile

    tables = {t.name: star_particles(t, style) for t in exported_tomograms(out_dir, include_removed)}
    groups = tables.items() if per_tomogram else [("vesicles", pd.concat(tables.values(), ignore_index=True))]
    written = []
    for stem, particles in groups:
        path = Path(dest) / f"{stem}.{style}.star"
        with atomic_output(path) as tmp:
            starfile.write({"particles": particles}, tmp)
        written.append(path)
    return written


def write_copick(out_dir, config_path, *, include_removed: bool = False) -> Path:
    """Add every tomogram's vesicles as picks (user `cryoves`, session 0) to the copick project of
    `config_path`, creating the project (overlay beside the config) when the file does not exist.
    Rewriting replaces cryoves's earlier picks; returns the config path."""
    try:
        import copick
        from copick.models import PickableObject
    except ImportError:
        raise CryovesError("copick export needs the copick library: pip install 'cryoves[copick]'") from None
    tomograms = exported_tomograms(out_dir, include_removed)
    config_path = Path(config_path)
    radii_a = np.concatenate([t.vesicles.column("radius_nm").to_numpy(zero_copy_only=False) * 10.0 for t in tomograms])
    radius_a = float(np.nanmedian(radii_a)) if np.isfinite(radii_a).any() else None
    vesicle = dict(name=COPICK_OBJECT, is_particle=True, radius=radius_a, color=(0, 200, 255, 255),
                   identifier="GO:0008021")  # GO: synaptic vesicle
    if config_path.is_file():
        root = copick.from_file(str(config_path))
        if root.get_object(COPICK_OBJECT) is None:
            root.new_object(**vesicle)
            root.save_config(str(config_path))
    else:
        root = copick.new_config(str(config_path), overlay_root=str(config_path.parent.resolve() / "overlay"),
                                 proj_name="cryoves vesicles", pickable_objects=[PickableObject(label=1, **vesicle)])
    for tomogram in tomograms:
        run = root.get_run(tomogram.name) or root.new_run(tomogram.name)
        if run.get_voxel_spacing(tomogram.voxel_size_a) is None:
            run.new_voxel_spacing(tomogram.voxel_size_a)
        picks = run.new_picks(COPICK_OBJECT, COPICK_SESSION, COPICK_USER, exist_ok=True)
        picks.meta.voxel_spacing = tomogram.voxel_size_a
        table = tomogram.vesicles
        scores = table.column("profile_correlation").to_numpy(zero_copy_only=False).astype(np.float64)
        picks.from_numpy(centers_vox(table)[:, ::-1] * tomogram.voxel_size_a,
                         instance_ids=table.column("vesicle_id").to_numpy(zero_copy_only=False).astype(np.int64),
                         scores=np.nan_to_num(scores, nan=0.0))
    return config_path
