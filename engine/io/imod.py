"""IMOD models: vesicle point models (one point and radius per vesicle) and closed-contour regions.

3dmod puts (0, 0) at the corner of the first pixel in x and y but z = 0 at the centre of the first
slice, so array index (z, y, x) is written as model point (x + 0.5, y + 0.5, z) and read back the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage.draw import line_nd, polygon

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.atomic import atomic_output

if TYPE_CHECKING:  # imodmodel imports pandas (about 0.5 s): only where a model is read or written
    from imodmodel.models import ImodModel

IMOD_UNITS_NM = -9
XY_OFFSET_VOX = np.array([0.5, 0.5, 0.0])


def write_vesicle_model(path, centers_vox, radii_vox, shape, voxel_size_a: float) -> Path:
    """Write a scattered-point IMOD model: one point per vesicle centre, point size = radius (voxels)."""
    from imodmodel.models import Contour, ImodModel, Object

    centers = np.asarray(centers_vox, dtype=np.float64).reshape(-1, 3)
    model = ImodModel()
    model.header.xmax, model.header.ymax, model.header.zmax = int(shape[2]), int(shape[1]), int(shape[0])
    model.header.pixelsize = voxel_size_a / 10.0
    model.header.units = IMOD_UNITS_NM
    vesicles = Object(color=(0.0, 1.0, 0.0))
    vesicles.header.flags.scattered = True
    if len(centers):
        vesicles.contours = [Contour(points=centers[:, ::-1] + XY_OFFSET_VOX,
                                     point_sizes=np.asarray(radii_vox, dtype=np.float64).reshape(-1))]
    vesicles.update_sizes()
    model.objects = [vesicles]
    model.update_sizes()
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # imodmodel still calls pydantic's .dict()
        model.to_file(tmp)
    return Path(path)


def read_vesicle_model(path) -> tuple[np.ndarray, np.ndarray]:
    """Read back the points (z, y, x voxels) and sizes of the first object of an IMOD model."""
    model = read_model(path)
    contours = [c for obj in model.objects[:1] for c in obj.contours]
    if not contours:
        return np.zeros((0, 3)), np.zeros(0)
    points = np.concatenate([c.points for c in contours]) - XY_OFFSET_VOX
    sizes = np.concatenate([c.point_sizes if c.point_sizes is not None else np.zeros(len(c.points))
                            for c in contours])
    return points[:, ::-1], sizes


def rasterise_region(path, shape) -> np.ndarray:
    """A binary mask of the closed contours of an IMOD model, filled slice by slice (z = contour z)."""
    model = read_model(path)
    mask = np.zeros(shape, dtype=bool)
    n_contours = 0
    for obj in model.objects:
        for contour in obj.contours:
            points = contour.points - XY_OFFSET_VOX
            if len(points) < 3:
                continue
            z = int(round(float(np.median(points[:, 2]))))
            if 0 <= z < shape[0]:
                rows, cols = polygon(points[:, 1], points[:, 0], shape=shape[1:])
                mask[z, rows, cols] = True
                n_contours += 1
    if not n_contours:
        raise CryovesError(f"{path}: no closed contour with 3 or more points inside the tomogram's z range")
    return mask


def rasterise_tube(path, shape) -> np.ndarray:
    """The contours of an IMOD model drawn as a tube 3 voxels across (the active zone, method.md §1.1)."""
    mask = np.zeros(shape, dtype=bool)
    for obj in read_model(path).objects:
        for contour in obj.contours:
            points = (contour.points - XY_OFFSET_VOX)[:, ::-1]  # z, y, x
            for start, stop in zip(points[:-1], points[1:]) if len(points) > 1 else [(points[0], points[0])]:
                index = np.array(line_nd(start, stop, endpoint=True))
                inside = np.all((index >= 0) & (index < np.array(shape)[:, None]), axis=0)
                mask[tuple(index[:, inside])] = True
    if not mask.any():
        raise CryovesError(f"{path}: no active-zone contour point lies inside the tomogram")
    return ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1))


def read_model(path) -> ImodModel:
    """An IMOD model file, or a CryovesError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CryovesError(f"{path}: no such IMOD model file")
    from imodmodel.models import ImodModel

    try:
        return ImodModel.from_file(path)
    except Exception as error:  # noqa: BLE001 - imodmodel raises assorted types for a malformed file
        raise CryovesError(f"{path}: not a readable IMOD model ({type(error).__name__}: {error})") from error
