"""Bad input through the installed command: one clear line, exit 2, no traceback and no output files.

One row per case: (what is wrong, the command for a scene `s`, exit code, a fragment of the message).
Add a case with one line; `Scene` makes the files (`s.tomogram` is a good 32x64x64 phantom at 22 Å,
`s.out` a fresh output folder). Every row fails before the network runs, so the table stays fast.
"""

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoves.engine.network.model import MODEL_WEIGHTS, bundled_model_dir


class Scene:
    """Files for one row, in a folder every user can read."""

    def __init__(self, folder: Path, tomogram: Path, script: str) -> None:
        self.dir, self.tomogram, self.out, self.script = folder, tomogram, folder / "out", script

    def cmd(self, *args) -> list[str]:
        """`cryoves ARGS...`."""
        return [self.script, *map(str, args)]

    def cmd_unprivileged(self, *args) -> list[str]:
        """`cryoves ARGS...` bound by file permissions: as is, or where the tests run as root (who may write
        anywhere, so a read-only folder would not be one) without the capabilities that override them."""
        if os.geteuid() != 0:
            return self.cmd(*args)
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot run bound by file permissions")
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *self.cmd(*args)]

    def file(self, name: str, content: bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def mrc(self, data, voxel_size_xyz_a=(22.0, 22.0, 22.0), name: str = "tomo.mrc") -> Path:
        path = self.dir / name
        with mrcfile.new(path) as mrc, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN data, on purpose
            mrc.set_data(data)
            mrc.voxel_size = tuple(voxel_size_xyz_a)
        return path

    def truncated_mrc(self) -> Path:
        content = self.tomogram.read_bytes()
        return self.file("truncated.mrc", content[:len(content) // 2])

    def sparse_mrc(self, shape=(261, 1024, 1024)) -> Path:
        """An int8 tomogram of `shape` at 14.69 Å that takes no disk space (all zeros)."""
        path = self.dir / "large.mrc"
        mrcfile.new_mmap(path, shape=shape, mrc_mode=0).close()
        with mrcfile.open(path, mode="r+") as mrc:
            mrc.voxel_size = 14.69
        return path

    def copy(self, relative: str) -> Path:
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.tomogram, path)
        return path

    def link(self, relative: str, target: Path) -> Path:
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(os.path.relpath(target, path.parent))
        return path

    def model(self, truncate: bool) -> Path:
        """A copy of the bundled model folder, with its weights cut in half or removed."""
        folder = self.dir / "model"
        shutil.copytree(bundled_model_dir(), folder)
        weights = folder / MODEL_WEIGHTS
        if truncate:
            weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        else:
            weights.unlink()
        return folder

    def read_only(self) -> Path:
        folder = self.dir / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder


def _zeros(*shape) -> np.ndarray:
    return np.zeros(shape, np.float32)


def _nan() -> np.ndarray:
    data = np.zeros((8, 16, 16), np.float32)
    data[1, 2, 3] = np.nan
    return data


BAD_INPUT = [
    # what is wrong, the command, exit code, a fragment of the message
    ("info: missing file", lambda s: s.cmd("info", s.dir / "absent.mrc"), 2, "no such file"),
    ("info: not an MRC file", lambda s: s.cmd("info", s.file("notes.mrc", b"not an mrc" * 200)), 2,
     "not a valid MRC file"),
    ("info: unset voxel size", lambda s: s.cmd("info", s.mrc(_zeros(4, 4, 4), (1, 1, 1))), 2,
     "looks unset"),
    ("info: negative --voxel-size", lambda s: s.cmd("info", s.tomogram, "--voxel-size", "-1"), 2,
     "expected a positive number"),
    ("segment: missing file", lambda s: s.cmd("segment", s.dir / "absent.mrc", "--out", s.out), 2, "no such file"),
    ("segment: not an MRC file", lambda s: s.cmd("segment", s.file("bad.mrc", b"not a tomogram"), "--out", s.out),
     2, "not a valid MRC file"),
    ("segment: truncated MRC", lambda s: s.cmd("segment", s.truncated_mrc(), "--out", s.out), 2, "truncated data"),
    ("segment: 2-D data", lambda s: s.cmd("segment", s.mrc(_zeros(16, 16)), "--out", s.out), 2,
     "expected a 3-D tomogram, got 2-D"),
    ("segment: 4-D data", lambda s: s.cmd("segment", s.mrc(_zeros(2, 4, 8, 8)), "--out", s.out), 2,
     "expected a 3-D tomogram, got 4-D"),
    ("segment: complex data", lambda s: s.cmd("segment", s.mrc(np.zeros((4, 8, 8), np.complex64)), "--out", s.out),
     2, "unsupported data type complex64"),
    ("segment: NaN voxels", lambda s: s.cmd("segment", s.mrc(_nan()), "--out", s.out), 2, "1 voxels are NaN or Inf"),
    ("segment: unset voxel size", lambda s: s.cmd("segment", s.mrc(_zeros(8, 16, 16), (1, 1, 1)), "--out", s.out), 2,
     "voxel size 1.0 Å looks unset"),
    ("segment: implausible header voxel size", lambda s: s.cmd("segment", s.mrc(_zeros(8, 16, 16), (150, 150, 150)),
                                                               "--out", s.out), 2, "outside the plausible range"),
    ("segment: --voxel-size far below the plausible range",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--voxel-size", "0.5"), 2,
     "--voxel-size 0.5 Å is outside the plausible range 1-100 Å"),
    ("segment: --voxel-size whose network grid cannot fit in memory",
     lambda s: s.cmd("segment", s.sparse_mrc(), "--out", s.out, "--voxel-size", "90"), 2,
     "network grid is 1068 x 4189 x 4189 voxels (22 Å) and needs about"),
    ("segment: --out is a file", lambda s: s.cmd("segment", s.tomogram, "--out", s.file("out.txt", b"")), 2,
     "out.txt: the output folder is a file, not a folder"),
    ("segment: --out lies under a file",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.file("out.txt", b"") / "results"), 2,
     "lies under the file"),
    ("segment: --out is read-only", lambda s: s.cmd_unprivileged("segment", s.tomogram, "--out", s.read_only()), 2,
     "read-only: cannot write into this folder"),
    ("segment: --pyto without a region", lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--pyto"), 2,
     "phantom: --pyto needs a region"),
    ("segment: region not found",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--region", s.dir / "region.mrc"), 2,
     "region file not found"),
    ("segment: ground truth not found",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--truth", s.dir / "gt.mrc"), 2,
     "ground truth file not found"),
    ("segment: model folder without weights",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--weights", s.model(truncate=False)), 2,
     "weights.npz: weights not found"),
    ("segment: truncated weights.npz",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--weights", s.model(truncate=True)), 2,
     "weights.npz: not a readable weight file, truncated or damaged"),
    ("segment: two tomograms of one name",
     lambda s: s.cmd("segment", s.copy("x/tomo.mrc"), s.copy("y/tomo.mrc"), "--out", s.out), 2,
     "1 tomogram name(s) occur twice"),
    ("run: two tomograms of one name, one a symlink named as given",
     lambda s: s.cmd("run", s.link("links/a.mrc", s.copy("x/tomogram.mrc")), s.copy("y/a.mrc"), "--out", s.out), 2,
     "1 tomogram name(s) occur twice"),
    ("run: missing input", lambda s: s.cmd("run", s.dir / "absent.mrc", "--out", s.out), 2,
     "no such file, folder or pattern"),
    ("run: --out is a file", lambda s: s.cmd("run", s.tomogram, "--out", s.file("out.txt", b"")), 2,
     "the output folder is a file, not a folder"),
    ("evaluate: no ground truth", lambda s: s.cmd("evaluate", s.tomogram), 2, "needs at least one prediction"),
    ("segment: --precision with --device gpu",
     lambda s: s.cmd("segment", s.tomogram, "--out", s.out, "--device", "gpu", "--precision", "float32"), 2,
     "--precision applies to --device cpu; the GPU runs the network in float16"),
    ("bench: --precision with --device gpu", lambda s: s.cmd("bench", "--device", "gpu", "--precision", "bfloat16"),
     2, "--precision applies to --device cpu"),
]


@pytest.fixture
def scene(shared_tmp, tiny_phantoms, cryoves_script, request):
    folder = shared_tmp / re.sub(r"\W+", "-", request.node.name)
    folder.mkdir()
    folder.chmod(0o777)  # an unprivileged row may write beside its files
    yield Scene(folder, tiny_phantoms["A"]["tomogram"], cryoves_script)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(("description", "argv", "code", "message"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_no_outputs(scene, description, argv, code, message):
    result = subprocess.run(argv(scene), capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert message in output, output
    assert "Traceback" not in output and "internal error" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"cryoves( \w+)?: error: ", last), result.stderr
    if last.startswith("cryoves: error:"):  # a CryovesError: that one line, nothing else
        assert result.stderr.count("\n") == 1, result.stderr
    assert not [p for p in scene.out.rglob("*") if p.is_file()]
