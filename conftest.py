"""Fixtures for tests/ and benchmarks/ alike: where CryoVesNet's published weights lie beside the repository."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cryovesnet_weights_path() -> Path:
    """Where CryoVesNet's weights.h5 (GPL-3, not distributed here) belongs, whether or not it is there."""
    return Path(__file__).resolve().parent.parent / "shared" / "models" / "cryovesnet" / "weights.h5"


@pytest.fixture(scope="session")
def cryovesnet_weights(cryovesnet_weights_path) -> Path:
    """CryoVesNet's weights.h5; the test is skipped when the file is absent."""
    if not cryovesnet_weights_path.is_file():
        pytest.skip(f"CryoVesNet weights not found at {cryovesnet_weights_path}: ../shared beside the repository "
                    "holds them")
    return cryovesnet_weights_path
