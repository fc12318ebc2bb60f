import subprocess
import sys

import numpy as np

from cryoves.cluster.cli import build_parser, main


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


def test_info_takes_the_voxel_size_of_a_header_that_lacks_it(write_mrc):
    """The refusal without --voxel-size is a row of tests/cluster/test_bad_input.py."""
    path = write_mrc(np.zeros((4, 4, 4), dtype=np.float32), (1.0, 1.0, 1.0))
    assert main(["info", str(path), "--voxel-size", "21.8"]) == 0


def test_installed_script_help(cryoves):
    result = cryoves("--help")
    assert result.returncode == 0 and "phantom" in result.stdout
    result = subprocess.run([sys.executable, "-m", "cryoves.cluster.cli", "info", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--voxel-size" in result.stdout


def test_the_command_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """`cryoves` ends without the interpreter's teardown (a second after every run), but as a finished program:
    exit handlers run, output flushed, main's exit code."""
    missing = tmp_path / "missing.mrc"
    code = ("import atexit, sys; atexit.register(print, 'exit handler ran'); "
            f"sys.argv = ['cryoves', 'segment', {str(missing)!r}, '--out', {str(tmp_path / 'out')!r}]; "
            "print('before', end=' '); from cryoves.cluster.cli import command_line; command_line()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stdout == "before exit handler ran\n"
    assert result.stderr.strip() == f"cryoves: error: {missing}: no such file; check the path"
