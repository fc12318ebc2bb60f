"""The installed `cryoves` command, run as a user runs it, and tiny phantoms to run it on."""

import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from cryoves.engine.synthetic.phantom import make_phantom, write_phantom

SCRIPT = Path(sysconfig.get_path("scripts")) / "cryoves"
TINY_SHAPE = (32, 64, 64)


@pytest.fixture(scope="session")
def cryoves_script() -> str:
    """The installed `cryoves` script."""
    return str(SCRIPT)


@pytest.fixture(scope="session")
def cryoves(cryoves_script):
    """cryoves(*args, **subprocess_options): `cryoves ARGS...` through the installed script, as a user
    runs it; the completed process, its output as text."""

    def run(*args, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([cryoves_script, *map(str, args)], capture_output=True, text=True, check=False,
                              **kwargs)

    return run


@pytest.fixture(scope="session")
def shared_tmp():
    """A folder every user can read (pytest's own are private to the user), for runs as another user."""
    folder = Path(tempfile.mkdtemp(prefix="cryoves-tests-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_phantoms(shared_tmp):
    """Two 32x64x64 phantoms at 22 Å with the same name in two folders: {"A": paths, "B": paths}
    (write_phantom's tomogram, labels, vesicles)."""
    found = {}
    for seed, folder in enumerate(("A", "B"), start=1):
        (shared_tmp / folder).mkdir()
        found[folder] = write_phantom(shared_tmp / folder, make_phantom(TINY_SHAPE, 22.0, seed=seed))
    for path in shared_tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return found
