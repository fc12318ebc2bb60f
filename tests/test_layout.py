"""The package layout: every subpackage is declared, heavy imports stay where they belong, the wheel is clean."""

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "kernels", "cluster")
# module prefix -> the only files that may import it
CONFINED_IMPORTS = {
    "ray": ("cluster/",),
    "tensorflow": ("engine/network/tensorflow_ops.py",),
    "keras": ("engine/network/model.py", "engine/network/train.py"),
    "csbdeep": ("engine/network/model.py",),
    "torch": ("engine/network/torch_unet.py",),
    "napari": ("cluster/napari/",),
    "magicgui": ("cluster/napari/",),
    "qtpy": ("cluster/napari/",),
    "npe2": ("cluster/napari/",),
}


def _modules():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_package_folder_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        "cryoves." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found == set(config["packages"])
    assert config["package-dir"] == {f"cryoves.{folder}": folder for folder in FOLDERS}


def test_heavy_imports_stay_in_their_module():
    for path in _modules():
        relative = path.relative_to(ROOT).as_posix()
        for name in _imported(path):
            top = name.split(".")[0]
            if top in CONFINED_IMPORTS:
                assert relative.startswith(CONFINED_IMPORTS[top]), f"{relative} imports {name}"


def test_imports_are_absolute_and_layered():
    order = {"kernels": 0, "engine": 1, "cluster": 2}
    for path in _modules():
        layer = order[path.relative_to(ROOT).parts[0]]
        for name in _imported(path):
            assert name.split(".")[0] not in FOLDERS, f"{path}: relative-style import {name}"
            if name.startswith("cryoves."):
                assert order[name.split(".")[1]] <= layer, f"{path} imports upward: {name}"


def test_no_print_in_engine_or_kernels():
    for folder in ("engine", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    pytest.fail(f"{path}:{node.lineno} prints; return values or log instead")


@pytest.mark.slow
def test_wheel_holds_only_the_cryoves_namespace(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("cryoves-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"cryoves", next(t for t in tops if t.endswith(".dist-info"))}
    for folder in FOLDERS:
        assert f"cryoves/{folder}/__init__.py" in names
    assert not any(name.startswith("cryoves/__init__") for name in names)  # an implicit namespace package
    bundled = "cryoves/engine/network/bundled_model/"
    assert {bundled + "weights.npz", bundled + "config.json"} <= set(names)


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
