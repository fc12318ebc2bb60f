"""No silent empty result: a tomogram without vesicles, or one whose threshold search ends at the top of its
range, or whose membranes look white, says so in one line with what to check (issue 13 item 7)."""

import numpy as np
import pytest

from cryoves.engine import pipeline
from cryoves.engine.io.tables import active_mask
from cryoves.engine.network.model import load_logit_fn
from cryoves.engine.pipeline import SegmentParams, membrane_polarity, segment
from cryoves.engine.synthetic.phantom import make_phantom


@pytest.fixture(scope="module")
def bundled():
    return load_logit_fn(None)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((48, 128, 128), 22.0, seed=3)


def test_pure_noise_says_it_found_nothing_and_what_to_check(bundled):
    noise = np.random.default_rng(0).standard_normal((48, 128, 128)).astype(np.float32)
    result = segment(noise, 22.0, bundled, SegmentParams(), keep_stages=False)
    assert np.count_nonzero(result.final_labels()) == 0
    assert any("almost no vesicle" in w for w in result.warnings)
    assert any(w.startswith("no vesicles found") and "--prefilter-sigma" in w and "--invert-contrast" in w
               for w in result.warnings)


def test_inverted_contrast_is_caught_by_the_membrane_polarity(bundled, phantom, monkeypatch):
    vesicles = segment(phantom.tomogram, 22.0, bundled, SegmentParams()).vesicles
    vesicles = vesicles.filter(active_mask(vesicles))
    assert membrane_polarity(phantom.tomogram, vesicles) > 0
    # many vesicles: the median of an evenly spread subset (here 5 rows: the first, the last, three between)
    monkeypatch.setattr(pipeline, "_POLARITY_VESICLES", 5)
    rows = np.linspace(0, len(vesicles) - 1, 5).round().astype(int)
    assert membrane_polarity(phantom.tomogram, vesicles) == membrane_polarity(phantom.tomogram, vesicles.take(rows))
    monkeypatch.undo()
    result = segment(-phantom.tomogram, 22.0, bundled, SegmentParams(), keep_stages=False)
    assert membrane_polarity(-phantom.tomogram, result.vesicles) < 0
    assert any("look white" in w and "--invert-contrast" in w for w in result.warnings)
    fixed = segment(-phantom.tomogram, 22.0, bundled, SegmentParams(invert_contrast=True), keep_stages=False)
    assert fixed.warnings == ()
    assert len(fixed.vesicles) > 10
