"""Lazy particle stacks: real RELION/cryojax stacks, path resolution, validation errors, writers, scale."""

from __future__ import annotations

import os
import shutil
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import starfile

from cryoflex.errors import CryoflexInputError
from cryoflex.io import particles
from cryoflex.io.particles import ParticleStack, StackWriter, open_particle_images, write_stack


def _image_names(star_path: Path) -> tuple[list[str], np.ndarray]:
    """Split rlnImageName 'k@stack' into stack paths and 0-based indices."""
    names = starfile.read(star_path, always_dict=True)["particles"]["rlnImageName"]
    split = [name.split("@", 1) for name in names]
    return [path for _, path in split], np.array([int(k) - 1 for k, _ in split])


def _reference_images(path: Path) -> np.ndarray:
    """All images of a stack as mrcfile reads them (permissive: relion31.mrcs has a zeroed MAP tag)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data, dtype=np.float32)


def _write_raw_stack(path: Path, images: np.ndarray) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(images.astype(np.float32))


@pytest.fixture()
def relion_project(tmp_path: Path, data_dir: Path) -> Path:
    """A RELION-like project: star in Refine3D/job001/, stack named relative to the project directory."""
    job = tmp_path / "Refine3D" / "job001"
    job.mkdir(parents=True)
    (tmp_path / "Extract").mkdir()
    shutil.copy(data_dir / "relion31.mrcs", tmp_path / "Extract" / "relion31.mrcs")
    return job


def test_relion31_images_match_mrcfile(data_dir: Path) -> None:
    paths, indices = _image_names(data_dir / "relion31.star")
    stack = ParticleStack(paths, indices, base_dir=data_dir)
    reference = _reference_images(data_dir / "relion31.mrcs")
    assert len(stack) == 5
    assert stack.box_size_px == 256
    images = stack[:]
    assert images.dtype == np.float32 and images.shape == (5, 256, 256)
    np.testing.assert_array_equal(images, reference[indices])
    np.testing.assert_array_equal(stack[3], reference[3])
    np.testing.assert_array_equal(stack[-1], reference[4])
    assert reference.std() > 0


def test_out_of_order_indices_follow_index_not_position(data_dir: Path) -> None:
    order = np.array([4, 0, 3, 1, 2, 2])
    stack = ParticleStack(["relion31.mrcs"] * order.size, order, base_dir=data_dir)
    reference = _reference_images(data_dir / "relion31.mrcs")
    np.testing.assert_array_equal(stack[:], reference[order])
    np.testing.assert_array_equal(stack[np.array([5, 0])], reference[[2, 4]])
    np.testing.assert_array_equal(stack[[1]], reference[[0]])
    assert not np.array_equal(stack[0], stack[1])


def test_cryojax_starfile_pair(data_dir: Path) -> None:
    paths, indices = _image_names(data_dir / "test_starfile.star")
    stack = ParticleStack(paths, indices, base_dir=data_dir)
    reference = _reference_images(data_dir / "000000.mrcs")
    assert stack.box_size_px == 16 and len(stack) == 3
    np.testing.assert_array_equal(stack[np.arange(3)], reference)


def test_relion_project_relative_paths_resolve_from_parents(relion_project: Path, data_dir: Path) -> None:
    stack = ParticleStack(["Extract/relion31.mrcs"], [2], base_dir=relion_project)
    assert stack.stack_paths == [relion_project.parent.parent / "Extract" / "relion31.mrcs"]
    np.testing.assert_array_equal(stack[0], _reference_images(data_dir / "relion31.mrcs")[2])


def test_datadir_and_basename_resolution(tmp_path: Path, data_dir: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(data_dir / "000000.mrcs", moved / "000000.mrcs")
    stack = ParticleStack(["/gone/elsewhere/000000.mrcs"], [1], base_dir=tmp_path, datadir=moved)
    assert stack.stack_paths == [moved / "000000.mrcs"]
    beside = ParticleStack(["Other/job9/000000.mrcs"], [0], base_dir=moved)
    assert beside.stack_paths == [moved / "000000.mrcs"]


def test_two_stacks_found_as_one_file_by_their_name_are_refused(tmp_path: Path, data_dir: Path) -> None:
    """Two extraction jobs name their stacks alike; with --datadir at one job's folder, the other job's particles
    would read its images. Refused, naming both stacks; with the project as --datadir each finds its own file."""
    for job in ("job007", "job012"):
        (tmp_path / "Extract" / job).mkdir(parents=True)
        shutil.copy(data_dir / "000000.mrcs", tmp_path / "Extract" / job / "mic_001.mrcs")
    written = ["Extract/job007/mic_001.mrcs", "Extract/job012/mic_001.mrcs"]
    elsewhere = tmp_path / "Refine3D"
    with pytest.raises(CryoflexInputError, match="two different stacks by their shared file name") as info:
        ParticleStack(written, [0, 1], base_dir=elsewhere, datadir=tmp_path / "Extract" / "job007")
    assert "Extract/job012/mic_001.mrcs" in str(info.value) and "rlnImageName" in str(info.value)
    stack = ParticleStack(written, [0, 1], base_dir=elsewhere, datadir=tmp_path)
    assert stack.stack_paths == [tmp_path / "Extract" / job / "mic_001.mrcs" for job in ("job007", "job012")]
    same = ParticleStack(["Extract/job007/mic_001.mrcs", "./Extract/job007/mic_001.mrcs:mrcs"], [0, 1],
                         base_dir=tmp_path)  # fmt: skip
    assert same.stack_paths[0].resolve() == same.stack_paths[1].resolve()  # one stack written two ways: fine


def test_absolute_path_and_relion_type_suffix(data_dir: Path, tmp_path: Path) -> None:
    absolute = str((data_dir / "000000.mrcs").resolve())
    stack = ParticleStack([absolute + ":mrcs"], [2], base_dir=tmp_path)
    np.testing.assert_array_equal(stack[0], _reference_images(data_dir / "000000.mrcs")[2])


def test_from_files_reads_every_image_in_file_order(tmp_path: Path, data_dir: Path) -> None:
    shutil.copy(data_dir / "000000.mrcs", tmp_path / "copy.mrcs")
    stack = ParticleStack.from_files([data_dir / "000000.mrcs", tmp_path / "copy.mrcs"])
    reference = _reference_images(data_dir / "000000.mrcs")
    assert len(stack) == 6
    np.testing.assert_array_equal(stack[:], np.concatenate([reference, reference]))


def test_index_past_end_names_stack_and_count(data_dir: Path) -> None:
    with pytest.raises(CryoflexInputError) as info:
        ParticleStack(["relion31.mrcs", "relion31.mrcs"], [0, 5], base_dir=data_dir)
    message = str(info.value)
    assert "relion31.mrcs" in message
    assert "particle 1" in message and "image 6" in message and "holds 5 images" in message


def test_missing_stack_lists_paths_tried(relion_project: Path) -> None:
    with pytest.raises(CryoflexInputError) as info:
        ParticleStack(["Extract/missing.mrcs"], [0], base_dir=relion_project, datadir=Path("/data/here"))
    message = str(info.value)
    assert message.startswith("Extract/missing.mrcs:")
    assert str(relion_project / "Extract" / "missing.mrcs") in message
    assert str(relion_project.parent.parent / "Extract" / "missing.mrcs") in message
    assert "/data/here/missing.mrcs" in message
    assert f"resolved against {relion_project}" in message
    assert "--datadir" in message


def test_disagreeing_box_sizes(tmp_path: Path) -> None:
    _write_raw_stack(tmp_path / "a.mrcs", np.zeros((2, 8, 8)))
    _write_raw_stack(tmp_path / "b.mrcs", np.zeros((2, 10, 10)))
    with pytest.raises(CryoflexInputError) as info:
        ParticleStack(["a.mrcs", "b.mrcs"], [0, 1], base_dir=tmp_path)
    message = str(info.value)
    assert "b.mrcs" in message and "a.mrcs" in message and "10x10" in message and "8x8" in message


def test_truncated_stack_is_reported(tmp_path: Path) -> None:
    _write_raw_stack(tmp_path / "t.mrcs", np.ones((4, 8, 8)))
    with open(tmp_path / "t.mrcs", "r+b") as handle:
        handle.truncate(1024 + 3 * 8 * 8 * 4)
    with pytest.raises(CryoflexInputError, match="truncated"):
        ParticleStack(["t.mrcs"], [0], base_dir=tmp_path)


def test_single_2d_mrc_is_a_stack_of_one(tmp_path: Path) -> None:
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(image)
    stack = ParticleStack(["one.mrc", "one.mrc"], [0, 0], base_dir=tmp_path)
    np.testing.assert_array_equal(stack[1], image)
    with pytest.raises(CryoflexInputError, match="holds 1 images"):
        ParticleStack(["one.mrc"], [1], base_dir=tmp_path)


def test_integer_stacks_are_converted_to_float32(tmp_path: Path) -> None:
    images = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    with mrcfile.new(tmp_path / "i16.mrcs") as mrc:
        mrc.set_data(images)
    out = ParticleStack(["i16.mrcs"], [1], base_dir=tmp_path)[0]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, images[1].astype(np.float32))


def test_bad_item_indices(data_dir: Path) -> None:
    stack = ParticleStack(["000000.mrcs"] * 3, [0, 1, 2], base_dir=data_dir)
    with pytest.raises(IndexError):
        stack[3]
    with pytest.raises(IndexError):
        stack[np.array([0, -4])]
    with pytest.raises(TypeError):
        stack[np.array([0.5])]
    assert stack[np.array([], dtype=np.int64)].shape == (0, 16, 16)


def test_lru_bounds_open_files(tmp_path: Path) -> None:
    n_files = 12
    for k in range(n_files):
        _write_raw_stack(tmp_path / f"s{k}.mrcs", np.full((3, 8, 8), k, dtype=np.float32))
    paths = [f"s{k}.mrcs" for k in range(n_files) for _ in range(3)]
    indices = [i for _ in range(n_files) for i in range(3)]
    stack = ParticleStack(paths, indices, base_dir=tmp_path, max_open_files=4)
    fd_dir = Path("/proc/self/fd")
    fds_before = len(os.listdir(fd_dir)) if fd_dir.is_dir() else None
    for position in range(len(stack)):
        assert stack[position][0, 0] == position // 3
        assert stack.n_open_files <= 4
    everything = stack[np.arange(len(stack))[::-1]]
    np.testing.assert_array_equal(everything[:, 0, 0], np.repeat(np.arange(n_files), 3)[::-1])
    assert stack.n_open_files == 4
    if fds_before is not None:  # each memory map holds the file and its mmap: two descriptors
        assert len(os.listdir(fd_dir)) - fds_before <= 2 * 4
    stack.close()
    assert stack.n_open_files == 0
    if fds_before is not None:
        assert len(os.listdir(fd_dir)) == fds_before


def test_pickle_drops_open_maps(data_dir: Path) -> None:
    import pickle

    stack = ParticleStack(["000000.mrcs"], [1], base_dir=data_dir)
    first = stack[0]
    clone = pickle.loads(pickle.dumps(stack))
    assert clone.n_open_files == 0
    np.testing.assert_array_equal(clone[0], first)


def test_open_particle_images_from_metadata_record(relion_project: Path, data_dir: Path) -> None:
    star = relion_project / "run_data.star"
    metadata = SimpleNamespace(
        source_path=star, image_paths=["Extract/relion31.mrcs"] * 2, image_indices=[1, 0], box_size_px=256
    )
    stack = open_particle_images(metadata)
    np.testing.assert_array_equal(stack[:], _reference_images(data_dir / "relion31.mrcs")[[1, 0]])

    with pytest.raises(CryoflexInputError, match="references no images") as info:
        open_particle_images(SimpleNamespace(source_path=star, image_paths=None, image_indices=None))
    assert str(star) in str(info.value)

    wrong_box = SimpleNamespace(**{**vars(metadata), "box_size_px": 128})
    with pytest.raises(CryoflexInputError, match="128 px"):
        open_particle_images(wrong_box)


def test_write_stack_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 12, 12)).astype(np.float32)
    target = tmp_path / "out" / "stack.mrcs"
    write_stack(target, images, pixel_size_A=1.7)
    with mrcfile.open(target) as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.voxel_size.x == pytest.approx(1.7)
        assert mrc.is_image_stack()
    assert [p.name for p in target.parent.iterdir()] == ["stack.mrcs"]


def test_stack_writer_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 8, 8)).astype(np.float32)
    target = tmp_path / "sim.mrcs"
    with StackWriter(target, n_images=10, box_size_px=8, pixel_size_A=2.5) as writer:
        assert not target.exists()
        for start, stop in [(6, 10), (0, 3), (3, 6)]:
            writer.write(start, images[start:stop])
    with mrcfile.open(target) as mrc:
        np.testing.assert_array_equal(mrc.data, images)
        assert mrc.voxel_size.x == pytest.approx(2.5)
        assert mrc.is_image_stack()
        assert mrc.header.dmax == pytest.approx(images.max())
        assert mrc.header.dmean == pytest.approx(images.mean(), abs=1e-6)
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-5)
    stack = ParticleStack(["sim.mrcs"] * 10, np.arange(10), base_dir=tmp_path)
    np.testing.assert_array_equal(stack[:], images)


def test_stack_writer_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sim.mrcs"
    with pytest.raises(RuntimeError, match="never written"):
        with StackWriter(target, n_images=4, box_size_px=8, pixel_size_A=1.0) as writer:
            writer.write(0, np.zeros((3, 8, 8)))
    with pytest.raises(ZeroDivisionError):
        with StackWriter(target, n_images=1, box_size_px=8, pixel_size_A=1.0) as writer:
            writer.write(0, np.zeros((1, 8, 8)))
            _ = 1 / 0
    with pytest.raises(IndexError):
        with StackWriter(target, n_images=2, box_size_px=8, pixel_size_A=1.0) as writer:
            writer.write(1, np.zeros((2, 8, 8)))
    assert list(tmp_path.iterdir()) == []


def test_many_references_open_without_reading_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n_files, per_file, box = 4, 50_000, 8
    for k in range(n_files):
        mrc = mrcfile.new_mmap(tmp_path / f"big{k}.mrcs", shape=(per_file, box, box), mrc_mode=2)
        mrc.close()
    stack_bytes = n_files * per_file * box * box * 4
    paths = [f"big{k}.mrcs" for k in range(n_files) for _ in range(per_file)]
    indices = np.tile(np.arange(per_file)[::-1], n_files)

    calls = {"mmap": 0, "open": 0}
    real_mmap, real_open = mrcfile.mmap, mrcfile.open

    def counting_mmap(*args, **kwargs):
        calls["mmap"] += 1
        return real_mmap(*args, **kwargs)

    def counting_open(*args, **kwargs):
        calls["open"] += 1
        assert kwargs.get("header_only"), "construction must read headers only"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(particles.mrcfile, "mmap", counting_mmap)
    monkeypatch.setattr(particles.mrcfile, "open", counting_open)
    tracemalloc.start()
    stack = ParticleStack(paths, indices, base_dir=tmp_path)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert len(stack) == n_files * per_file
    assert calls == {"mmap": 0, "open": n_files}
    assert peak_bytes < 32 * len(paths)  # bytes per particle, whatever the box size
    assert peak_bytes < stack_bytes / 8
    assert stack[np.array([0, 199_999])].shape == (2, box, box)
    assert calls["mmap"] == 2


def test_missing_image_references_point_to_the_stack_option(tmp_path: Path) -> None:
    metadata = SimpleNamespace(source_path=tmp_path / "poses.pkl", image_paths=None, image_indices=None)
    with pytest.raises(CryoflexInputError) as info:
        open_particle_images(metadata)
    assert "--stack STACK.mrcs" in info.value.fix and "--particles" not in info.value.fix
