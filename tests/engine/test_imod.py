import numpy as np
import pytest
from imodmodel.models import Contour, ImodModel, Object

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.imod import rasterise_region, read_vesicle_model, write_vesicle_model


def test_vesicle_model_round_trip(tmp_path):
    centers = np.array([[3.0, 10.5, 20.25], [7.0, 0.0, 1.0]])
    radii = np.array([9.0, 11.5])
    path = write_vesicle_model(tmp_path / "v.mod", centers, radii, (16, 32, 48), 22.0)
    points, sizes = read_vesicle_model(path)
    np.testing.assert_allclose(points, centers, atol=1e-5)
    np.testing.assert_allclose(sizes, radii, atol=1e-6)
    model = ImodModel.from_file(path)
    assert (model.header.xmax, model.header.ymax, model.header.zmax) == (48, 32, 16)
    assert model.header.pixelsize == pytest.approx(2.2)
    np.testing.assert_allclose(model.objects[0].contours[0].points[0], [20.75, 11.0, 3.0], atol=1e-5)


def test_empty_vesicle_model(tmp_path):
    points, sizes = read_vesicle_model(write_vesicle_model(tmp_path / "e.mod", np.zeros((0, 3)), [], (4, 4, 4), 22.0))
    assert points.shape == (0, 3) and sizes.shape == (0,)


def test_region_contours_rasterise_slice_by_slice(tmp_path):
    square = np.array([[2.5, 2.5], [12.5, 2.5], [12.5, 8.5], [2.5, 8.5]])  # x, y with 3dmod's half-pixel offset
    obj = Object()
    obj.contours = [Contour(points=np.column_stack([square, np.full(4, z)])) for z in (1.0, 2.0)]
    obj.update_sizes()
    model = ImodModel()
    model.objects = [obj]
    model.update_sizes()
    with pytest.warns(DeprecationWarning):  # imodmodel still calls pydantic's .dict()
        model.to_file(tmp_path / "region.mod")
    mask = rasterise_region(tmp_path / "region.mod", (4, 12, 16))
    assert not mask[0].any() and not mask[3].any()
    expected = np.zeros((12, 16), bool)
    expected[2:9, 2:13] = True  # pixel centres on or inside the contour: rows 2..8, columns 2..12
    np.testing.assert_array_equal(mask[1], expected)
    np.testing.assert_array_equal(mask[2], expected)


def test_bad_region_files_are_refused(tmp_path):
    with pytest.raises(CryovesError, match="no such IMOD model"):
        rasterise_region(tmp_path / "absent.mod", (4, 4, 4))
    (tmp_path / "junk.mod").write_bytes(b"junk" * 10)
    with pytest.raises(CryovesError, match="not a readable IMOD model"):
        rasterise_region(tmp_path / "junk.mod", (4, 4, 4))
