"""Speed of the phantom generator on a typical tomogram size (the brief: well under 30 s on 2 cores)."""

import pytest

from cryoves.engine.synthetic.phantom import make_phantom

SHAPE = (128, 256, 256)


@pytest.mark.benchmark(group="make_phantom 128x256x256 at 22 Å")
def test_make_phantom(benchmark):
    phantom = benchmark.pedantic(make_phantom, args=(SHAPE, 22.0), kwargs=dict(seed=0), rounds=1, iterations=1)
    assert phantom.tomogram.shape == SHAPE
    assert phantom.vesicles.num_rows > 100
