"""Faults through the installed command (issue 17): an interrupted rewrite is redone, never trusted; an
output asked for is part of the work; a full disk or an unwritable record is that tomogram's error;
inverted contrast is reported; a closed pipe ends quietly; `run` leaves no Ray process behind a killed
driver."""

import json
import os
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.cluster.local_ray import descendants, running
from cryoves.engine.io.mrc import read_volume, write_volume
from cryoves.engine.io.tables import active_mask, centers_vox

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

LABELS_BYTES = 1024 + 2 * 32 * 64 * 64  # NAME.labels.mrc of a tiny phantom (uint16); NAME.prob.mrc is float32


@pytest.fixture(scope="module")
def segmented(tiny_phantoms, tmp_path_factory, cryoves):
    """`cryoves segment A/phantom.mrc --out OUT`: OUT, to copy."""
    out = tmp_path_factory.mktemp("segmented") / "out"
    result = cryoves("segment", tiny_phantoms["A"]["tomogram"], "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def _copy(segmented, tmp_path):
    return shutil.copytree(segmented, tmp_path / "out")


def _record(out, name="phantom") -> dict:
    return pq.read_table(out / "runs" / f"{name}.parquet").to_pylist()[0]


def _disk_full_after(n_bytes: int):
    """For subprocess preexec_fn: no file may grow past `n_bytes` (EFBIG, as ENOSPC on a full disk)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return limit


def test_a_rewrite_interrupted_by_a_full_disk_is_one_line_and_redone_not_trusted(segmented, tiny_phantoms,
                                                                                  tmp_path, cryoves):
    out = _copy(segmented, tmp_path)
    a_labels = np.asarray(read_volume(out / "phantom.labels.mrc").data)
    # B (same name) into A's folder; the disk fills after B's labels replaced A's, at its probability map
    failed = cryoves("segment", tiny_phantoms["B"]["tomogram"], "--out", out, "--probability",
                     preexec_fn=_disk_full_after(LABELS_BYTES + 4096))
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.count("\n") == 1 and "phantom.prob.mrc: cannot be written (File too large)" in failed.stderr
    assert not np.array_equal(np.asarray(read_volume(out / "phantom.labels.mrc").data), a_labels)  # B's labels
    assert _record(out)["status"] == "error"  # A's record did not survive the first new file
    assert not list(out.rglob("*.part"))

    again = cryoves("segment", tiny_phantoms["A"]["tomogram"], "--out", out)
    assert again.returncode == 0 and "skipped" not in again.stdout, again.stdout + again.stderr
    labels = np.asarray(read_volume(out / "phantom.labels.mrc").data)
    np.testing.assert_array_equal(labels, a_labels)
    table = pq.read_table(out / "vesicles" / "phantom.parquet")
    kept = table.filter(active_mask(table))
    at_centres = labels[tuple(np.round(centers_vox(kept)).astype(int).T)]
    np.testing.assert_array_equal(at_centres, kept.column("vesicle_id").to_numpy())  # table and labels agree
    assert _record(out)["status"] == "ok"


def test_an_output_asked_for_and_missing_makes_the_work_not_done(segmented, tiny_phantoms, tmp_path, cryoves):
    out = _copy(segmented, tmp_path)
    result = cryoves("segment", tiny_phantoms["A"]["tomogram"], "--out", out, "--probability")
    assert result.returncode == 0 and "skipped" not in result.stdout, result.stdout + result.stderr
    assert read_volume(out / "phantom.prob.mrc").data.shape == (32, 64, 64)
    assert "phantom.prob.mrc" in json.loads(_record(out)["files"])
    result = cryoves("segment", tiny_phantoms["A"]["tomogram"], "--out", out, "--probability")
    assert "skipped" in result.stdout


def test_inverted_contrast_warns_and_is_recorded(tiny_phantoms, tmp_path, cryoves):
    tomogram = read_volume(tiny_phantoms["A"]["tomogram"])
    negated = write_volume(tmp_path / "negated.mrc", -np.asarray(tomogram.data), tomogram.voxel_size_a)
    result = cryoves("segment", negated, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "--invert-contrast" in result.stderr  # the threshold search's or the boundary brightness's warning
    warnings = json.loads(_record(tmp_path / "out", "negated")["warnings"])
    assert any("--invert-contrast" in w for w in warnings)


def test_info_into_a_pipe_closed_early_ends_quietly(tiny_phantoms, cryoves_script):
    """`cryoves info *.mrc | head -1`: more output than a pipe holds, its reader gone after one line."""
    files = [str(tiny_phantoms["A"]["tomogram"])] * 400  # about 100 kB of output; a pipe holds 64 kB
    process = subprocess.Popen([cryoves_script, "info", *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == files[0]
    process.stdout.close()
    errors = process.stderr.read()
    process.stderr.close()
    assert process.wait() == 128 + signal.SIGPIPE and errors == ""


def test_run_an_unwritable_record_is_that_tomograms_error_and_the_batch_goes_on(tmp_path, cryoves):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "text.mrc").write_text("not a tomogram")
    write_volume(folder / "unset.mrc", np.zeros((8, 16, 16), np.float32), 1.0)
    out = tmp_path / "out"
    (out / "runs" / "unset.parquet" / "in-the-way").mkdir(parents=True)  # its run record cannot be written
    result = cryoves("run", folder, "--out", out)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unset: error: " in result.stdout and "looks unset" in result.stdout
    assert "(and its run record could not be written: " in result.stdout
    assert "text: error: " in result.stdout and "not a valid MRC file" in result.stdout
    assert "2 tomograms: 0 segmented, 0 already complete (skipped), 2 failed" in result.stdout
    assert _record(out, "text")["status"] == "error"
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def _agents(processes) -> list[int]:
    """Ray's agents among `processes` (pid → start time): what outlived a killed driver."""
    found = []
    for pid in running(processes):
        try:
            name = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
        except OSError:
            continue
        if name.startswith("ray::") and name.endswith("Agent"):
            found.append(pid)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="processes are read from /proc")
def test_run_leaves_no_ray_process_behind_a_driver_killed_with_sigkill(tiny_phantoms, tmp_path, cryoves_script):
    driver = subprocess.Popen([cryoves_script, "run", tiny_phantoms["A"]["tomogram"], "--out", tmp_path / "out"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    instance: dict[int, str] = {}  # every process started under the driver: pid → start time
    try:
        deadline = time.monotonic() + 120
        while len(_agents(instance)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            instance |= descendants(driver.pid)
            time.sleep(0.1)
        assert len(_agents(instance)) == 2, "Ray's dashboard and runtime-environment agents did not start"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 60
        while running(instance) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(instance), [open(f"/proc/{pid}/cmdline", "rb").read() for pid in running(instance)]
    finally:
        for pid in running(instance):
            os.kill(pid, signal.SIGKILL)
