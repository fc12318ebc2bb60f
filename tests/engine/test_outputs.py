"""The files one segmented tomogram leaves: grid alignment, IMOD points, the documented table schema, the
output folder checked before any work, and a new set replacing an old one (the run record, written last,
is tests/engine/test_job.py's)."""

import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.imod import read_vesicle_model
from cryoves.engine.io.mrc import Volume, read_volume
from cryoves.engine.io.outputs import begin_outputs, check_out_dir, output_files, read_run_record, write_outputs
from cryoves.engine.io.tables import VESICLE_SCHEMA, active_mask, centers_vox
from cryoves.engine.pipeline import SegmentParams, postprocess
from cryoves.engine.synthetic.phantom import make_phantom

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_columns() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("### Vesicle table"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"^\| `(\w+)` \| (\w+) \|", section, flags=re.MULTILINE)


def test_vesicle_schema_matches_the_readme():
    assert documented_columns() == [(field.name, str(field.type)) for field in VESICLE_SCHEMA]


@pytest.fixture(scope="module")
def written(tmp_path_factory, probability_from_truth):
    phantom = make_phantom((48, 128, 128), 20.0, seed=3)
    result = postprocess(phantom.tomogram, probability_from_truth(phantom.labels, 3), 20.0, SegmentParams())
    volume = Volume(phantom.tomogram, 20.0, (100.0, -40.0, 12.5))
    out = tmp_path_factory.mktemp("out")
    paths = write_outputs(out, "tomo", volume, result, probability=True, stages=True)
    return out, paths, result, volume


def test_volumes_align_with_the_input(written):
    _, paths, result, volume = written
    for key in ("labels", "probability", "global", "local", "sphere"):
        back = read_volume(paths[key])
        assert back.data.shape == volume.data.shape
        assert back.voxel_size_a == pytest.approx(20.0) and back.origin_a == volume.origin_a
    np.testing.assert_array_equal(read_volume(paths["labels"]).data, result.final_labels())
    np.testing.assert_array_equal(read_volume(paths["local"]).data, result.labels["local"])


def test_table_ids_match_the_label_volume_and_the_imod_model(written):
    _, paths, _, volume = written
    table = pq.read_table(paths["vesicles"])
    assert table.schema.remove_metadata() == VESICLE_SCHEMA
    labels = np.asarray(read_volume(paths["labels"]).data)
    kept = table.filter(active_mask(table))
    assert kept.num_rows == labels.max() > 10
    centers = centers_vox(kept)
    at_centres = labels[tuple(np.round(centers).astype(int).T)]
    np.testing.assert_array_equal(at_centres, kept.column("vesicle_id").to_numpy())
    np.testing.assert_allclose(kept.column("center_z_nm").to_numpy(), (centers[:, 0] * 20.0 + 100.0) / 10)
    np.testing.assert_allclose(kept.column("center_y_nm").to_numpy(), (centers[:, 1] * 20.0 - 40.0) / 10)
    points, sizes = read_vesicle_model(paths["model"])
    np.testing.assert_allclose(points, centers, atol=1e-4)
    np.testing.assert_allclose(sizes * 2.0, kept.column("radius_nm").to_numpy(), rtol=1e-5)


def test_written_files_are_the_output_files(written):
    out, paths, _, _ = written
    assert {kind: out / relative for kind, relative in output_files("tomo", probability=True, stages=True).items()} \
        == paths


def test_the_output_folder_is_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CryovesError, match=r"file: the output folder is a file, not a folder; pass a folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(CryovesError, match=r"file/out: the output folder lies under the file .*file; pass"):
        check_out_dir(tmp_path / "file" / "out")
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs").chmod(0o555)
    try:
        if os.access(tmp_path / "out" / "runs", os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")  # tests/cluster/test_bad_input.py runs it
        with pytest.raises(CryovesError, match=r"runs: cannot write into this folder \(Permission denied\)"):
            check_out_dir(tmp_path / "out")
    finally:
        (tmp_path / "out" / "runs").chmod(0o755)


def test_a_missing_output_folder_is_made_and_nothing_else(tmp_path):
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_a_new_set_invalidates_the_old_record_and_removes_what_it_does_not_rewrite(tmp_path):
    every = output_files("tomo", probability=True, stages=True, pyto=True, metrics=True)
    for relative in [*every.values(), "tomo2.prob.mrc", "runs/tomo.parquet"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"old")
    keep = output_files("tomo", probability=True)
    begin_outputs(tmp_path, "tomo", {"tomogram": "tomo", "status": "error", "error": "being rewritten"},
                  keep=keep.values())
    assert read_run_record(tmp_path, "tomo") == {"tomogram": "tomo", "status": "error", "error": "being rewritten"}
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([*keep.values(), "tomo2.prob.mrc", "runs/tomo.parquet"])


def test_the_parameter_digest_ignores_the_memory_budget_only():
    from cryoves.engine.io.outputs import params_digest
    from cryoves.engine.network.inference import InferenceParams

    def digest(**inference):
        return params_digest(SegmentParams(inference=InferenceParams(**inference)), 22.0, "sha")

    assert digest(memory_gb=1.0) == digest(memory_gb=64.0)  # a resume on another machine is still current
    assert digest(tta=4) != digest(tta=1) and digest(gaussian_sigma_vox=0.0) != digest()
