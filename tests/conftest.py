"""Shared fixtures: a seeded random generator and a writer of MRC files with chosen headers."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy import ndimage


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


@pytest.fixture
def resident_mb():
    """This process's resident memory now, in MB (Linux)."""

    def measure() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 1e6

    return measure


@pytest.fixture
def write_mrc(tmp_path):
    """Write `data` to an MRC file with exactly the given header voxel size (x, y, z Å) and origin."""

    def write(data, voxel_size_xyz_a=(22.0, 22.0, 22.0), origin_xyz_a=(0.0, 0.0, 0.0), name="tomo.mrc") -> Path:
        path = tmp_path / name
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = tuple(voxel_size_xyz_a)
            mrc.header.origin = tuple(origin_xyz_a)
        return path

    return write


@pytest.fixture(scope="session")
def probability_from_truth():
    """A network-like probability map made from ground-truth labels (no network needed)."""

    def _map(labels: np.ndarray, seed: int) -> np.ndarray:
        """A network-like map: sigmoid of the signed distance to the vesicle surface, with smooth noise,
        so touching vesicles merge at the global threshold, as they do in the real network's output."""
        inside = labels > 0
        signed = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
        noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=labels.shape).astype(np.float32), 2)
        noise *= 0.3 / noise.std()
        return (1.0 / (1.0 + np.exp(-np.clip(3.0 * (signed + 0.5 + noise), -50, 50)))).astype(np.float32)

    return _map


@pytest.fixture(scope="session")
def random_unet():
    """The U-Net with seeded random weights, BN statistics moved away from (0, 1) so that BN matters:
    random_unet(n_filter_base) -> (model, {layer name: weights})."""

    def make(n_filter_base: int = 16):
        from cryoves.engine.network.model import build_unet

        model = build_unet(n_filter_base=n_filter_base)
        rng = np.random.default_rng(0)
        weights = {}
        for layer in model.layers:
            arrays = []
            for w in layer.weights:
                value = np.asarray(w)
                if "moving_variance" in w.path or "gamma" in w.path:
                    value = rng.uniform(0.5, 1.5, value.shape)
                elif "moving_mean" in w.path or "beta" in w.path or "bias" in w.path:
                    value = rng.normal(0, 0.2, value.shape)
                arrays.append(value.astype(np.float32))
            if arrays:
                layer.set_weights(arrays)
                weights[layer.name] = arrays
        return model, weights

    return make
