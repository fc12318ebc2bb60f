"""The kernel warm-up compiles what a real tomogram needs, and kernels import where no cache folder is writable."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from cryoves.engine.synthetic.phantom import PRESETS, make_phantom
from cryoves.engine.warmup import KernelWarmup

SIGNATURES = """
import numba
from cryoves.kernels import components, labels, radial, render, resize, shell, stats

def signatures():
    return {f"{m.__name__}.{name}": set(map(str, f.signatures))
            for m in (components, labels, radial, render, resize, shell, stats)
            for name, f in vars(m).items() if isinstance(f, numba.core.registry.CPUDispatcher)}
"""


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=os.environ | env)


def test_segment_after_warmup_compiles_nothing_new(tmp_path):
    """A crowded phantom (touching vesicles: the split step) resampled and segmented after the warm-up needs
    no kernel signature the warm-up did not compile. The phantom is made here, so that its own kernels do not
    compile anything in the process under test."""
    phantom = make_phantom((48, 96, 96), 22.0, seed=3, preset=PRESETS["crowded"])
    np.save(tmp_path / "tomogram.npy", phantom.tomogram)
    np.save(tmp_path / "network.npy", (phantom.labels[::2, ::2, ::2] > 0).astype(np.float32) * 0.98 + 0.01)
    result = _python(SIGNATURES + f"""
import numpy as np
from cryoves.engine.io.mrc import write_labels, write_volume
from cryoves.engine.network.inference import probability_on_input_grid
from cryoves.engine.pipeline import SegmentParams, postprocess
from cryoves.engine.warmup import warm_kernels

warm_kernels()
warm = signatures()
assert sum(map(len, warm.values())) >= 11, warm
tomogram = np.load("{tmp_path / 'tomogram.npy'}", mmap_mode="r")  # read-only, as an MRC is
probability = probability_on_input_grid(np.load("{tmp_path / 'network.npy'}"), tomogram.shape)
result = postprocess(tomogram, probability, 22.0, SegmentParams())
assert (result.vesicles.column("outcome").to_numpy(zero_copy_only=False) == "kept").sum() >= 4
write_labels("{tmp_path / 'labels.mrc'}", result.final_labels(), 22.0)
write_volume("{tmp_path / 'probability.mrc'}", probability, 22.0)
new = {{name: sigs - warm[name] for name, sigs in signatures().items() if sigs - warm[name]}}
assert not new, new
""")
    assert result.returncode == 0, result.stderr[-3000:]


CLI = "from cryoves.cluster.cli import command_line; command_line()"


def test_warmup_command_compiles_once_per_cache_in_child_processes(tmp_path):
    """`cryoves warmup` (the install step) on a cold cache compiles in one child process per share of the kernels,
    each leaving its marker beside Numba's files; a later process finds the cache warm and starts nothing, and the
    command says so."""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", CLI, "warmup"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("kernels compiled in ")
    assert len(list(tmp_path.rglob("*.nbi"))) >= 10  # the kernels' cache index files
    later = _python("""
from cryoves.engine.warmup import PARTS, start_kernel_warmup, warm_marker
print(all(warm_marker(part).exists() for part in PARTS), len(start_kernel_warmup().processes))
""", NUMBA_CACHE_DIR=str(tmp_path))
    assert later.stdout.split() == ["True", "0"], later.stderr[-3000:]
    again = subprocess.run([sys.executable, "-c", CLI, "warmup"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert (again.returncode, again.stdout.split()[:3]) == (0, ["kernels", "already", "compiled"])


def test_warmup_join_names_the_shares_whose_child_failed():
    """A child that fails (or any exit status but 0) is reported by its share, so `cryoves warmup` can say so."""
    def child(status: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])

    assert KernelWarmup({"detection": child(0), "measurement": child(1)}).join() == ["measurement"]


def test_kernels_cache_in_a_temporary_folder_when_nothing_else_is_writable(tmp_path):
    """With a read-only install and home (no in-tree or user-wide cache) and no NUMBA_CACHE_DIR, the
    kernels still import and run, caching under the temporary folder."""
    result = _python("""
import os
from numba.core import caching
for locator in (caching.InTreeCacheLocator, caching.UserWideCacheLocator):  # as if read-only
    locator.from_function = classmethod(lambda cls, function, path: None)
import numpy as np
from cryoves.kernels.labels import present_labels
assert present_labels(np.ones((4, 4, 4), np.uint16)).volume.tolist() == [64]
print(os.environ["NUMBA_CACHE_DIR"])
""", TMPDIR=str(tmp_path), NUMBA_CACHE_DIR="")
    assert result.returncode == 0, result.stderr[-3000:]
    cache = result.stdout.strip()
    assert cache.startswith(str(tmp_path))
    assert any(path.suffix == ".nbi" for path in (tmp_path / cache[len(str(tmp_path)) + 1:]).rglob("*"))
