"""Pyto export (method.md §2.21): one label volume with region 1, active zone 2 and vesicles from 10,
and the vesicle IMOD model merged with the region and active-zone models."""

import warnings
from pathlib import Path

import numpy as np

from cryoves.engine.io.atomic import atomic_output
from cryoves.engine.io.imod import rasterise_tube, read_model, write_vesicle_model
from cryoves.engine.io.mrc import Volume, write_labels

REGION_ID = 1
ACTIVE_ZONE_ID = 2
FIRST_VESICLE_ID = 10


def pyto_labels(vesicle_labels: np.ndarray, region: np.ndarray, active_zone: np.ndarray | None = None) -> np.ndarray:
    """uint16 labels: 1 region, 2 active zone, vesicle k as 9 + k (so the first is 10)."""
    out = np.where(region, REGION_ID, 0).astype(np.uint16)
    if active_zone is not None:
        out[active_zone] = ACTIVE_ZONE_ID
    vesicles = vesicle_labels > 0
    out[vesicles] = vesicle_labels[vesicles].astype(np.uint16) + (FIRST_VESICLE_ID - 1)
    return out


def write_pyto(out_dir, name: str, volume: Volume, vesicle_labels: np.ndarray, centers_vox, radii_vox,
               region: np.ndarray, region_model=None, active_zone_model=None) -> dict[str, Path]:
    """Write NAME.pyto.mrc and NAME.pyto.mod (vesicles merged with the region and active-zone models)."""
    out_dir = Path(out_dir)
    shape = vesicle_labels.shape
    active_zone = rasterise_tube(active_zone_model, shape) if active_zone_model else None
    labels = write_labels(out_dir / f"{name}.pyto.mrc", pyto_labels(vesicle_labels, region, active_zone),
                          volume.voxel_size_a, volume.origin_a)
    model_path = write_vesicle_model(out_dir / f"{name}.pyto.mod", centers_vox, radii_vox, shape, volume.voxel_size_a)
    merged = read_model(model_path)
    for extra in (region_model, active_zone_model):
        if extra is not None:
            merged.objects.extend(read_model(extra).objects)
    merged.update_sizes()
    with atomic_output(model_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # imodmodel still calls pydantic's .dict()
        merged.to_file(tmp)
    return {"pyto_labels": labels, "pyto_model": model_path}
