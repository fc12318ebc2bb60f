import numpy as np
import pytest
from imodmodel.models import Contour, ImodModel, Object

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.imod import rasterise_tube, read_model, read_vesicle_model
from cryoves.engine.io.mrc import Volume, read_volume
from cryoves.engine.io.pyto import pyto_labels, write_pyto

SHAPE = (8, 32, 32)


def _model(path, contours):
    obj = Object()
    obj.contours = [Contour(points=np.asarray(c, float)) for c in contours]
    obj.update_sizes()
    model = ImodModel()
    model.objects = [obj]
    model.update_sizes()
    with pytest.warns(DeprecationWarning):  # imodmodel still calls pydantic's .dict()
        model.to_file(path)
    return path


def test_labels_put_region_active_zone_and_vesicles_in_pyto_order():
    vesicles = np.zeros(SHAPE, np.uint16)
    vesicles[2, 5, 5], vesicles[3, 6, 6] = 1, 2
    region = np.zeros(SHAPE, bool)
    region[:, :16] = True
    zone = np.zeros(SHAPE, bool)
    zone[:, 15] = True
    labels = pyto_labels(vesicles, region, zone)
    assert labels.dtype == np.uint16
    assert (labels[2, 5, 5], labels[3, 6, 6]) == (10, 11)
    assert labels[0, 15, 0] == 2 and labels[0, 0, 0] == 1 and labels[0, 20, 0] == 0


def test_active_zone_is_a_tube_three_voxels_across(tmp_path):
    path = _model(tmp_path / "az.mod", [[[4.5, 10.5, 3.0], [20.5, 10.5, 3.0]]])
    tube = rasterise_tube(path, SHAPE)
    assert tube[3, 10, 4:21].all() and tube[3, 9, 10] and tube[3, 11, 10] and tube[2, 10, 10]
    assert not tube[3, 8, 10] and not tube[1, 10, 10] and not tube[3, 10, 22]
    with pytest.raises(CryovesError, match="no active-zone contour point lies inside"):
        rasterise_tube(_model(tmp_path / "far.mod", [[[100.5, 100.5, 50.0]]]), SHAPE)


def test_write_pyto_merges_the_models(tmp_path):
    square = [(2.5, 2.5), (28.5, 2.5), (28.5, 28.5), (2.5, 28.5)]
    region_model = _model(tmp_path / "region.mod", [[[x, y, float(z)] for x, y in square] for z in range(8)])
    az_model = _model(tmp_path / "az.mod", [[[4.5, 10.5, 3.0], [20.5, 10.5, 3.0]]])
    vesicles = np.zeros(SHAPE, np.uint16)
    vesicles[4, 20, 20] = 1
    region = np.ones(SHAPE, bool)
    paths = write_pyto(tmp_path, "tomo", Volume(np.zeros(SHAPE), 22.0, (1.0, 2.0, 3.0)), vesicles,
                       [[4.0, 20.0, 20.0]], [3.0], region, region_model, az_model)
    labels = read_volume(paths["pyto_labels"])
    assert labels.origin_a == (1.0, 2.0, 3.0) and labels.data[4, 20, 20] == 10 and labels.data[3, 10, 10] == 2
    merged = read_model(paths["pyto_model"])
    assert len(merged.objects) == 3 and len(merged.objects[1].contours) == 8
    points, sizes = read_vesicle_model(paths["pyto_model"])
    np.testing.assert_allclose(points, [[4.0, 20.0, 20.0]], atol=1e-5)
    np.testing.assert_allclose(sizes, [3.0])
