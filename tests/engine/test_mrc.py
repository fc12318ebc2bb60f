import mrcfile
import numpy as np
import pytest

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.mrc import inspect_volume, read_volume, write_labels, write_volume
from cryoves.engine.io.pages import mapped_file, read_box, release_pages


def test_float_round_trip_keeps_data_voxel_size_and_origin(tmp_path, rng):
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    path = write_volume(tmp_path / "out.mrc", data, 14.69, origin_a=(10.0, 20.0, 30.0))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert volume.voxel_size_a == pytest.approx(14.69, rel=1e-6)
    assert volume.origin_a == (10.0, 20.0, 30.0)
    with mrcfile.open(path) as mrc:
        assert tuple(mrc.header.origin.item()) == (30.0, 20.0, 10.0)  # MRC stores x, y, z


def test_float16_on_request(tmp_path, rng):
    data = rng.normal(size=(4, 4, 4))
    volume = read_volume(write_volume(tmp_path / "h.mrc", data, 22.0, float16=True))
    assert volume.data.dtype == np.float16
    np.testing.assert_allclose(volume.data, data, atol=2e-3)


@pytest.mark.parametrize(("top", "dtype"), [(3, np.uint16), (65535, np.uint16), (70000, np.float32)])
def test_labels_use_smallest_type_that_holds_them(tmp_path, top, dtype):
    labels = np.zeros((3, 4, 5), dtype=np.int64)
    labels[1, 2, 3] = top
    volume = read_volume(write_labels(tmp_path / "l.mrc", labels, 22.0, (1.0, 2.0, 3.0)))
    assert volume.data.dtype == dtype
    np.testing.assert_array_equal(volume.data, labels)
    assert volume.origin_a == (1.0, 2.0, 3.0)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "x.mrc"
    write_volume(target, np.zeros((2, 2, 2)), 22.0)
    with pytest.raises(ValueError):
        write_volume(tmp_path / "sub" / "bad.mrc", np.zeros((2, 2)), 22.0)
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.mrc"]


def test_read_is_memory_mapped(write_mrc):
    volume = read_volume(write_mrc(np.ones((4, 4, 4), dtype=np.float32)))
    assert isinstance(volume.data, np.memmap)
    assert not volume.data.flags.writeable


@pytest.mark.parametrize(
    ("voxel_xyz", "message"),
    [
        ((0.0, 0.0, 0.0), r"voxel size is 0 Å in the header \(unset\)"),
        ((1.0, 1.0, 1.0), r"voxel size 1.0 Å looks unset"),
        ((0.5, 0.5, 0.5), r"voxel size 0.5 Å is outside the plausible range 1-100 Å"),
        ((150.0, 150.0, 150.0), r"voxel size 150 Å is outside the plausible range"),
        ((14.0, 14.0, 28.0), r"anisotropic voxel size x=14 y=14 z=28 Å"),
    ],
)
def test_implausible_voxel_sizes_are_refused_unless_overridden(write_mrc, voxel_xyz, message):
    path = write_mrc(np.zeros((4, 4, 4), dtype=np.float32), voxel_xyz)
    with pytest.raises(CryovesError, match=message):
        read_volume(path)
    assert read_volume(path, voxel_size_a=17.5).voxel_size_a == 17.5


@pytest.mark.parametrize(("voxel_size_a", "message"), [
    (-3.0, "--voxel-size must be a positive number"),
    (0.5, "--voxel-size 0.5 Å is outside the plausible range 1-100 Å"),
    (147.0, "--voxel-size 147 Å is outside the plausible range 1-100 Å"),
])
def test_bad_override_is_refused(write_mrc, voxel_size_a, message):
    with pytest.raises(CryovesError, match=message):
        read_volume(write_mrc(np.zeros((4, 4, 4), dtype=np.float32)), voxel_size_a=voxel_size_a)
    assert read_volume(write_mrc(np.zeros((4, 4, 4), dtype=np.float32)), voxel_size_a=100.0).voxel_size_a == 100.0


def test_a_write_that_fails_names_the_file_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CryovesError, match=r"file/x.mrc: cannot be written: .*file is a file, not a folder"):
        write_volume(tmp_path / "file" / "x.mrc", np.zeros((2, 2, 2)), 22.0)
    (tmp_path / "in-the-way.mrc" / "child").mkdir(parents=True)  # the rename onto a folder fails
    with pytest.raises(CryovesError, match=r"in-the-way.mrc: cannot be written"):
        write_volume(tmp_path / "in-the-way.mrc", np.zeros((2, 2, 2)), 22.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in-the-way.mrc"]


def test_stale_part_files_of_one_target_are_removed(tmp_path):
    from cryoves.engine.io.atomic import remove_stale_parts

    names = [".t.mrc.abc_1234.part", ".t.mrc.zz.part", ".t.mrc.abc.part.x", ".t2.mrc.abc12345.part",
             ".t.mrc.ab.c.part", "t.mrc"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in remove_stale_parts(tmp_path / "t.mrc")) == [".t.mrc.abc_1234.part", ".t.mrc.zz.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_stale_parts(tmp_path / "absent" / "t.mrc") == []


@pytest.mark.filterwarnings("ignore:Data array contains NaN values:RuntimeWarning")
def test_nonfinite_voxels_are_counted(write_mrc):
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[0, 0, 0] = np.nan
    data[3, 4, 5] = np.inf
    data[2, 2, 2] = -np.inf
    with pytest.raises(CryovesError, match="3 voxels are NaN or Inf"):
        read_volume(write_mrc(data))
    assert np.isnan(read_volume(write_mrc(data), scan=False).data[0, 0, 0])  # the report's reads of slices


def test_two_dimensional_data_is_refused(write_mrc):
    with pytest.raises(CryovesError, match="expected a 3-D tomogram, got 2-D data"):
        read_volume(write_mrc(np.zeros((8, 8), dtype=np.float32)))


def test_complex_data_is_refused(write_mrc):
    with pytest.raises(CryovesError, match="unsupported data type complex64"):
        read_volume(write_mrc(np.zeros((2, 4, 4), dtype=np.complex64)))


def test_missing_file_folder_and_garbage_are_refused(tmp_path):
    with pytest.raises(CryovesError, match="no such file"):
        read_volume(tmp_path / "absent.mrc")
    with pytest.raises(CryovesError, match="is a folder"):
        read_volume(tmp_path)
    garbage = tmp_path / "notes.mrc"
    garbage.write_text("this is not a tomogram\n" * 100)
    with pytest.raises(CryovesError, match="not a valid MRC file"):
        read_volume(garbage)


def test_truncated_file_is_refused(write_mrc):
    path = write_mrc(np.zeros((8, 16, 16), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CryovesError, match="not a valid MRC file or truncated data"):
        read_volume(path)


def test_inspect_reports_facts_and_verdict(write_mrc):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    facts = inspect_volume(write_mrc(data, (1.0, 1.0, 1.0), (4.0, 5.0, 6.0)))
    assert facts["shape"] == (2, 3, 4)
    assert facts["origin_a"] == (6.0, 5.0, 4.0)
    assert facts["value_range"] == (0.0, 23.0)
    assert facts["verdict"].startswith("refused:") and "looks unset" in facts["verdict"]


def test_inspect_value_range_skips_non_finite_voxels_across_slabs(write_mrc, monkeypatch):
    """The range is the finite voxels', combined over the z-slabs `info` reads in turn (here of one section), and the
    same pass counts the others for the verdict."""
    import cryoves.engine.io.mrc as mrc

    monkeypatch.setattr(mrc, "_NONFINITE_SLAB_VOXELS", 12)
    data = np.arange(36, dtype=np.float32).reshape(3, 3, 4) - 10
    data[0, 0, 0], data[2, 2, 3], data[1, 1, 1] = np.nan, np.inf, -np.inf
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's header statistics, when the test writes them
        path, empty = write_mrc(data, (10.0, 10.0, 10.0)), write_mrc(np.full((2, 3, 4), np.nan, np.float32),
                                                                     (10.0, 10.0, 10.0), name="nan.mrc")
    monkeypatch.setattr(mrc, "_count_nonfinite", None)  # `info` reads the voxels once, for the range and the count
    facts = inspect_volume(path)
    assert facts["value_range"] == (-9.0, 24.0)
    assert facts["verdict"].startswith("refused:") and "3 voxels are NaN or Inf" in facts["verdict"]
    nothing = inspect_volume(empty)
    assert all(np.isnan(nothing["value_range"]))


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    path = write_volume(tmp_path / "p.mrc", np.zeros((2, 2, 2)), 22.0)
    current = os.umask(0)
    os.umask(current)
    assert path.stat().st_mode & 0o777 == 0o666 & ~current


@pytest.mark.parametrize("kind", ["labels", "float"])
def test_header_statistics_are_mrcfiles_own(tmp_path, rng, kind):
    """dmin, dmax, dmean and rms as mrcfile computes them, without its volume-sized temporary."""
    if kind == "labels":
        data = rng.integers(0, 300, size=(9, 40, 50)).astype(np.uint16)
        path = write_labels(tmp_path / "s.mrc", data, 22.0)
    else:
        data = (rng.normal(size=(9, 40, 50)) * 3 + 1).astype(np.float32)
        path = write_volume(tmp_path / "s.mrc", data, 22.0)
    with mrcfile.open(path) as mrc:
        ours = [float(mrc.header[field]) for field in ("dmin", "dmax", "dmean", "rms")]
    with mrcfile.new(tmp_path / "reference.mrc") as reference:
        reference.set_data(data)
        expected = [float(reference.header[field]) for field in ("dmin", "dmax", "dmean", "rms")]
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    empty = write_volume(tmp_path / "empty.mrc", np.zeros((0, 4, 4), np.float32), 22.0)
    with mrcfile.open(empty) as mrc:
        assert float(mrc.header.rms) < 0  # mrcfile's reset: statistics unset


def test_released_pages_leave_resident_memory_and_read_back_the_same(tmp_path, rng, resident_mb):
    """A mapped tomogram's pages leave the process's resident memory (a view of it, as `oriented` passes, is
    enough) and read back unchanged; an array in memory is left alone."""
    data = rng.normal(size=(64, 256, 256)).astype(np.float32)  # 16.8 MB
    path = write_volume(tmp_path / "tomo.mrc", data, 10.0)
    mapped = read_volume(path).data
    view = np.asarray(mapped, dtype=np.float32)
    total = float(view.sum(dtype=np.float64))  # every page mapped in
    before = resident_mb()
    release_pages(view)
    assert before - resident_mb() > 12
    assert float(view.sum(dtype=np.float64)) == total
    release_pages(data)
    assert float(data.sum(dtype=np.float64)) == total


def test_a_box_of_a_mapped_tomogram_is_read_from_its_file(tmp_path, rng, resident_mb):
    """`read_box` equals slicing for a mapped tomogram, its C-ordered views and arrays in memory; from a mapped
    file it reads with the file's reads, so the map's pages stay out of resident memory (through the map, 8 rows
    of each of 64 sections would fault in at least 64 x 64 KB)."""
    data = rng.normal(size=(64, 256, 256)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", data, 10.0)).data
    box = (slice(0, 64), slice(100, 108), slice(7, 250))
    release_pages(mapped)
    before = resident_mb()
    np.testing.assert_array_equal(read_box(mapped, box), data[box])
    assert resident_mb() - before < 2
    for view, expected in ((np.asarray(mapped, np.float32), data), (mapped[5:40], data[5:40]),
                           (mapped[:, 3:], data[:, 3:]), (data, data)):
        np.testing.assert_array_equal(read_box(view, (slice(2, 30), slice(250, 300), slice(-9, None))),
                                      expected[2:30, 250:300, -9:])


def test_a_box_read_into_scratch_views_it(tmp_path, rng):
    """With `scratch`, `read_box` reads a mapped tomogram's rows into it (a reader by parts reuses one buffer) and
    returns a view of it; the same numbers as without, whole rows or part of them."""
    data = rng.normal(size=(16, 32, 24)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", data, 10.0)).data
    scratch = np.empty(data[:4].nbytes, np.uint8)
    for box in ((slice(0, 4), slice(None), slice(None)), (slice(10, 14), slice(5, 9), slice(3, 20))):
        part = read_box(mapped, box, scratch)
        np.testing.assert_array_equal(part, data[box])
        assert np.shares_memory(part, scratch)


def test_a_mapped_tomogram_is_mapped_again_from_where_it_lies_in_its_file(tmp_path, rng):
    """`mapped_file` (what `cryoves run` sends its refinement tasks instead of the voxels) maps the same voxels
    again, for the file's volume and its C-ordered views; arrays in memory and other views have none."""
    import pickle

    data = rng.normal(size=(6, 7, 8)).astype(np.float32)
    mapped = read_volume(write_volume(tmp_path / "tomo.mrc", data, 10.0)).data
    for view, expected in ((np.asarray(mapped, np.float32), data), (mapped[2:5], data[2:5])):
        again = pickle.loads(pickle.dumps(mapped_file(view))).open()
        np.testing.assert_array_equal(again, expected)
        assert not again.flags.writeable
    assert mapped_file(data) is None and mapped_file(mapped[:, 1:]) is None and mapped_file(-mapped) is None


def test_the_nan_check_leaves_a_mapped_tomogram_out_of_resident_memory(tmp_path, rng, resident_mb, monkeypatch):
    """`read_volume` reads every voxel of the file for NaN and Inf, by z-slabs whose pages it releases after each:
    17 MB of tomogram would otherwise stay resident (1.1 GB at 1024x1024x261)."""
    from cryoves.engine.io import mrc

    monkeypatch.setattr(mrc, "_NONFINITE_SLAB_VOXELS", 8 * 256 * 256)
    data = rng.normal(size=(64, 256, 256)).astype(np.float32)
    data[40, 3, 5] = np.nan
    path = write_volume(tmp_path / "tomo.mrc", np.nan_to_num(data), 10.0)
    before = resident_mb()
    read_volume(path)
    assert resident_mb() - before < 4
    with mrcfile.open(path, "r+") as mrc_file:
        mrc_file.data[40, 3, 5] = np.nan
    with pytest.raises(CryovesError, match="1 voxels are NaN or Inf"):
        read_volume(path)


def test_labels_written_by_slabs_equal_labels_written_whole(tmp_path, rng):
    """A label file written from z-slabs (the final labels are never whole in memory) holds the same voxels and
    header statistics as the volume written whole; slabs that do not cover it, or negative labels, are refused and
    leave no file."""
    import mrcfile

    from cryoves.engine.io.mrc import write_label_sections

    labels = rng.integers(0, 300, size=(23, 17, 19)).astype(np.uint16)
    whole = write_labels(tmp_path / "whole.mrc", labels, 14.7, (1.0, 2.0, 3.0))
    slabs = write_label_sections(tmp_path / "slabs.mrc", labels.shape, 299, (labels[k:k + 5] for k in range(0, 23, 5)),
                                 14.7, (1.0, 2.0, 3.0))
    with mrcfile.open(whole) as a, mrcfile.open(slabs) as b:
        np.testing.assert_array_equal(b.data, a.data)
        for field in ("mode", "dmin", "dmax", "dmean", "rms", "cella", "origin"):
            assert a.header[field] == b.header[field], field
    with pytest.raises(ValueError, match="cover 10 of its 23"):
        write_label_sections(tmp_path / "short.mrc", labels.shape, 299, [labels[:10]], 14.7)
    with pytest.raises(ValueError, match="non-negative"):
        write_label_sections(tmp_path / "negative.mrc", (2, 2, 2), 3, [-np.ones((2, 2, 2), np.int32)], 14.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slabs.mrc", "whole.mrc"]


@pytest.mark.parametrize("slab_sections", [1, 3, 40])
def test_label_files_leave_background_blocks_as_holes(tmp_path, slab_sections):
    """Only the file's 4 KB blocks that hold a label are written: a few small spheres (one at a corner, one at the
    far corner: the first and last bytes, in pieces shorter than a block) read back voxel for voxel, and the file
    takes a fraction of its size on disk; an all-background volume takes almost none."""
    from cryoves.engine.io.mrc import write_label_sections

    z, y, x = np.ogrid[:40, :96, :128]
    labels = np.zeros((40, 96, 128), np.uint16)
    for k, (cz, cy, cx) in enumerate([(0, 0, 0), (20, 50, 60), (39, 95, 127)], start=1):
        labels[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 16] = k
    sections = (labels[k:k + slab_sections] for k in range(0, 40, slab_sections))
    path = write_label_sections(tmp_path / "sparse.mrc", labels.shape, 3, sections, 14.7)
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, labels)
        assert (mrc.header.dmin, mrc.header.dmax) == (0, 3)
    assert path.stat().st_blocks * 512 < 0.3 * path.stat().st_size
    empty = write_label_sections(tmp_path / "empty.mrc", labels.shape, 0, [np.zeros_like(labels)], 14.7)
    assert empty.stat().st_blocks * 512 <= 8192 and empty.stat().st_size == path.stat().st_size
    with mrcfile.open(empty) as mrc:
        assert not mrc.data.any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's header statistics of NaN and Inf
@pytest.mark.parametrize("extended_bytes", [0, 12, 2])  # 2: float32 voxels would straddle the chunks
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16])
def test_one_pass_gives_the_file_checksum_and_counts_every_nonfinite_voxel(tmp_path, rng, monkeypatch, dtype,
                                                                          extended_bytes):
    """`read_volume_sha256` reads the file once: its SHA-256 is the whole file's, and the voxels that are not finite
    are counted across chunk boundaries (chunks of 4 KB here) exactly as `read_volume`'s scan counts them."""
    import hashlib

    from cryoves.engine.io import checksum
    from cryoves.engine.io.mrc import read_volume_sha256

    monkeypatch.setattr(checksum, "CHUNK_BYTES", 4096)
    data = rng.normal(size=(6, 20, 21)).astype(dtype)
    path = tmp_path / "t.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_extended_header(np.zeros(extended_bytes, dtype="V1"))
        mrc.voxel_size = 10.0
    volume, sha256 = read_volume_sha256(path)
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(volume.data, data)
    if dtype == np.int16:
        return
    flat = data.reshape(-1)
    start = 1024 + extended_bytes
    boundary = (4096 - start) // data.itemsize  # the first voxel of the second chunk
    for index, value in ((0, np.nan), (boundary - 1, np.inf), (boundary, -np.inf), (flat.size - 1, np.nan)):
        flat[index] = value
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_extended_header(np.zeros(extended_bytes, dtype="V1"))
        mrc.voxel_size = 10.0
    with pytest.raises(CryovesError, match="4 voxels are NaN or Inf"):
        read_volume_sha256(path)
