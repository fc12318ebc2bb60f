"""Shared fixtures: a seeded random generator and a writer of MRC files with chosen headers."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


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
