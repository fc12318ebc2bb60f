"""Speed of the per-vesicle kernels against their references, and of refine_spheres on 100 vesicles.

Run ``pytest benchmarks/test_refine_bench.py``; the group tables show each time's ratio to the
fastest. CI runs ``--benchmark-disable`` (each once, untimed).
"""

import numpy as np
import numpy.testing as npt
import pytest

from cryoves.engine.stages.refine import RefineParams, refine_spheres
from cryoves.kernels.radial import back_project, back_project_reference, radial_profiles, radial_profiles_reference
from cryoves.kernels.render import render_spheres, render_spheres_reference

RNG = np.random.default_rng(11)
VOLUME = RNG.normal(size=(64, 128, 128)).astype(np.float32)
CENTERS = RNG.uniform([8, 16, 16], [56, 112, 112], size=(50, 3))
BOX = 16


@pytest.mark.benchmark(group="radial_profiles 64x128x128, 50 vesicles, R=16")
@pytest.mark.parametrize("impl", [radial_profiles, radial_profiles_reference], ids=["numba", "reference"])
def test_radial_profiles(benchmark, impl):
    impl(VOLUME, CENTERS, BOX, 28)  # compile outside the timed rounds
    profiles = benchmark(impl, VOLUME, CENTERS, BOX, 28)
    npt.assert_allclose(profiles, radial_profiles_reference(VOLUME, CENTERS, BOX, 28), rtol=1e-5)


PROFILES = RNG.normal(size=(50, 28))
OFFSETS = RNG.uniform(-0.5, 0.5, size=(50, 3))


@pytest.mark.benchmark(group="back_project 50 boxes of 33^3")
@pytest.mark.parametrize("impl", [back_project, back_project_reference], ids=["numba", "reference"])
def test_back_project(benchmark, impl):
    impl(PROFILES, BOX, OFFSETS)
    boxes = benchmark(impl, PROFILES, BOX, OFFSETS)
    npt.assert_array_equal(boxes, back_project_reference(PROFILES, BOX, OFFSETS))


BALL_CENTERS = RNG.uniform(0, [64, 128, 128], size=(100, 3))
BALL_RADII = RNG.uniform(6, 12, size=100)


@pytest.mark.benchmark(group="render_spheres 64x128x128, 100 balls")
@pytest.mark.parametrize("impl", [render_spheres, render_spheres_reference], ids=["numba", "reference"])
def test_render_spheres(benchmark, impl):
    ids = np.arange(1, 101)
    impl(VOLUME.shape, BALL_CENTERS, BALL_RADII, ids)
    labels = benchmark(impl, VOLUME.shape, BALL_CENTERS, BALL_RADII, ids)
    npt.assert_array_equal(labels, render_spheres_reference(VOLUME.shape, BALL_CENTERS, BALL_RADII, ids))


def _scene(n=100, shape=(96, 160, 160), seed=5):
    """n vesicles (outer radius 8-11 voxels, 2.3-voxel membrane, halo) on a jittered grid; labels
    are the balls shifted by up to 2 voxels with a radius 1 voxel off."""
    rng = np.random.default_rng(seed)
    grid = np.array([[z, y, x] for z in (16, 48, 80) for y in range(16, 160, 27) for x in range(16, 160, 27)],
                    float)[:n]
    centers = grid + rng.uniform(-1.5, 1.5, grid.shape)
    radii = rng.uniform(8, 11, len(grid))
    volume = rng.normal(0.0, 0.3, shape)
    labels = np.zeros(shape, np.uint32)
    sigma = 2.3 / 2.3548
    h = 14
    g = np.arange(-h, h + 1)
    for i, (c, r) in enumerate(zip(centers, radii)):
        a = np.round(c).astype(int)
        sl = tuple(slice(max(ai - h, 0), min(ai + h + 1, s)) for ai, s in zip(a, shape))
        zz, yy, xx = (g[:, None, None] + a[0], g[None, :, None] + a[1], g[None, None, :] + a[2])
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        shell = -np.exp(-0.5 * ((d - r + 1.15) / sigma) ** 2) + 0.4 * np.exp(-0.5 * ((d - r - 1.15) / sigma) ** 2)
        crop = tuple(slice(s.start - (ai - h), s.stop - (ai - h)) for s, ai in zip(sl, a))
        volume[sl] += shell[crop]
        shift = rng.integers(-2, 3, 3)
        dl = np.sqrt((zz - c[0] - shift[0]) ** 2 + (yy - c[1] - shift[1]) ** 2 + (xx - c[2] - shift[2]) ** 2)
        labels[sl][(dl <= r - 1)[crop]] = i + 1
    return volume.astype(np.float32), labels, centers, radii


SCENE = None


@pytest.mark.benchmark(group="refine_spheres 96x160x160, 100 vesicles")
def test_refine_spheres_100(benchmark):
    global SCENE
    if SCENE is None:
        SCENE = _scene()
    volume, labels, centers, radii = SCENE
    table = benchmark(refine_spheres, volume, labels, 22.0, RefineParams())
    d = table.to_pydict()
    assert table.num_rows == 100 and d["outcome"].count("kept") >= 98
    got = np.column_stack([d["center_z_vox"], d["center_y_vox"], d["center_x_vox"]])
    assert np.median(np.linalg.norm(got - centers, axis=1)) < 0.5
    assert np.median(np.abs(np.array(d["radius_vox"]) - radii)) < 0.5


@pytest.fixture(scope="module")
def phantom_segments():
    from cryoves.engine.synthetic.phantom import make_phantom

    phantom = make_phantom((64, 128, 128), 22.0, seed=3)
    return phantom.tomogram, phantom.labels.astype(np.uint32)


@pytest.mark.benchmark(group="per-vesicle stages (refine + render), phantom 64x128x128")
@pytest.mark.parametrize("kernels", ["numba", "reference"])
def test_per_vesicle_stages(benchmark, kernels, phantom_segments, monkeypatch):
    """The whole per-vesicle work with the Numba kernels against the same code on the NumPy references."""
    import cryoves.engine.stages.overlaps as spheres
    import cryoves.engine.stages.refine as refine
    from cryoves.engine.stages.overlaps import render_labels
    from cryoves.kernels import radial

    tomogram, labels = phantom_segments
    if kernels == "reference":
        for name in ("box_profiles", "back_project", "extract_boxes", "xcorr_shift"):
            monkeypatch.setattr(refine, name, getattr(radial, f"{name}_reference"))
        monkeypatch.setattr(spheres, "render_spheres", render_spheres_reference)

    def stages():
        table = refine_spheres(tomogram, labels, 22.0, RefineParams())
        return table, render_labels(labels.shape, table)

    table, rendered = benchmark.pedantic(stages, rounds=1 if kernels == "reference" else 3, iterations=1,
                                         warmup_rounds=0 if kernels == "reference" else 1)
    assert table.num_rows == labels.max() and rendered.max() > 0
