"""Training: the loss falls on a tiny set, saved models reload identically, bad data is refused clearly."""

import json

import numpy as np
import pytest

from cryoves.cluster.cli import main
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import write_labels, write_volume
from cryoves.engine.network.inference import InferenceParams, predict_probability
from cryoves.engine.network.model import load_logit_fn, model_inference_params
from cryoves.engine.network.train import TrainParams, prepare_pair, train
from cryoves.engine.synthetic.phantom import make_phantom

TINY = TrainParams(epochs=3, batch_size=4, patches_per_tomogram=8, validation_fraction=0.0, seed=1)


@pytest.fixture(scope="module")
def pairs():
    return [prepare_pair(p.tomogram, p.labels, 22.0, f"seed {s}")
            for s, p in ((s, make_phantom((32, 64, 64), 22.0, seed=s)) for s in (101, 102))]


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return out, train(pairs, TINY, out, description={"test": True})


def test_a_few_steps_reduce_the_loss(trained):
    _, config = trained
    losses = [row["loss"] for row in config["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_saved_model_reloads_and_predicts_identically(trained, pairs):
    out, config = trained
    assert json.loads((out / "config.json").read_text())["best_epoch"] == config["best_epoch"]
    assert model_inference_params(out).gaussian_sigma_vox == 1.0 and model_inference_params(out).resampling == "fourier"
    volume = make_phantom((32, 64, 64), 22.0, seed=5).tomogram
    first = predict_probability(volume, 22.0, load_logit_fn(out), InferenceParams())
    again = predict_probability(volume, 22.0, load_logit_fn(out), InferenceParams())
    np.testing.assert_array_equal(first, again)


def test_training_resumes_where_it_stopped(pairs, tmp_path):
    train(pairs, TrainParams(epochs=1, batch_size=4, patches_per_tomogram=8, validation_fraction=0.0), tmp_path,
          description={})
    config = train(pairs, TrainParams(epochs=2, batch_size=4, patches_per_tomogram=8, validation_fraction=0.0),
                   tmp_path, description={})
    assert [row["epoch"] for row in config["history"]] == [1, 2]


def test_bad_training_data_is_refused(tmp_path):
    phantom = make_phantom((32, 64, 64), 22.0, seed=1)
    with pytest.raises(CryovesError, match="differ in shape"):
        prepare_pair(phantom.tomogram, phantom.labels[:, :32], 22.0, "x")
    with pytest.raises(CryovesError, match="the label volume is empty"):
        prepare_pair(phantom.tomogram, np.zeros_like(phantom.labels), 22.0, "x")
    data = tmp_path / "data"
    write_volume(data / "t.mrc", phantom.tomogram, 22.0)
    write_labels(data / "t.labels.mrc", phantom.labels, 14.0)
    assert main(["train", "--out", str(tmp_path / "m"), "--data", str(data)]) == 2
    (data / "t.mrc").unlink()
    assert main(["train", "--out", str(tmp_path / "m"), "--data", str(data)]) == 2
    assert main(["train", "--out", str(tmp_path / "m")]) == 2
