import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from cryoves.cluster.cli import build_parser, main

SCRIPT = Path(sysconfig.get_path("scripts")) / "cryoves"


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_command_has_a_purpose_and_an_example():
    assert "example: cryoves" in build_parser().format_help()
    for name, sub in _subcommands().items():
        assert sub.description, name
        assert f"example: cryoves {name}" in sub.format_help(), name


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_info_accepts_a_good_file(write_mrc, capsys):
    path = write_mrc(np.arange(64, dtype=np.float32).reshape(4, 4, 4), (14.69, 14.69, 14.69), (0.0, 0.0, 220.0))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 x 4 x 4" in out and "14.69" in out and "220 x 0 x 0" in out and "verdict       ok" in out


def test_info_refuses_unset_voxel_size_with_one_line(write_mrc, capsys):
    path = write_mrc(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0))
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert "looks unset" in captured.out
    assert captured.err.strip().count("\n") == 0 and captured.err.startswith("cryoves: error: 1 of 1 files refused")
    assert main(["info", str(path), "--voxel-size", "21.8"]) == 0


def test_bad_option_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "x.mrc", "--voxel-size", "-1"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"not an mrc" * 200, "not a valid MRC file")],
)
def test_installed_script_reports_bad_input_without_traceback(tmp_path, content, message):
    path = tmp_path / "tomo.mrc"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run([str(SCRIPT), "info", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("cryoves: error:") and result.stderr.count("\n") == 1


def test_installed_script_help():
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "phantom" in result.stdout
    result = subprocess.run([sys.executable, "-m", "cryoves.cluster.cli", "info", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--voxel-size" in result.stdout
