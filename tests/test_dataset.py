"""ParticleDataset: items, normalisation, input errors, the on-disk cache and DataLoader workers."""

import json
import logging
import os
import pickle
import shutil
from dataclasses import fields, replace

import mrcfile
import numpy as np
import pytest
import starfile
import torch

import cryoflex.data.dataset as dataset_module
from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import ImageNormalisation, ParticleDataset, estimate_normalisation, particle_loader
from cryoflex.data.downsample import fourier_crop
from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import CTFParameters, read_metadata
from cryoflex.io.particles import StackNotFoundError, open_particle_images, write_stack
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset

N_IMAGES, BOX_PX, PIXEL_A = 40, 32, 2.5
UNIT = ImageNormalisation(mean=0.0, std=1.0)
CTF_FIELDS = tuple(f.name for f in fields(CTFParameters))


def _as_dict(batch: ParticleBatch) -> dict[str, torch.Tensor]:
    """A batch as per-field tensors (the CTF stacked in CTFParameters' field order), for the checks below."""
    ctf = torch.stack([getattr(batch.ctf, name) for name in CTF_FIELDS], dim=1)
    poses = batch.poses
    return {"index": batch.indices, "image": batch.images, "rotation": poses.rotations, "shifts_A": poses.shifts_A,
            "ctf": ctf}  # fmt: skip


def _item(dataset: ParticleDataset, i: int) -> dict[str, torch.Tensor]:
    """Particle i's fields, from dataset[i] (a batch of one)."""
    return {key: value[0] for key, value in _as_dict(dataset[i]).items()}


@pytest.fixture(scope="module")
def simulated(data_dir, tmp_path_factory):
    """A small synthetic RELION dataset spread over 3 stacks (16 + 16 + 8 images)."""
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=40)
    config = SimulationConfig(
        n_images=N_IMAGES,
        box_size_px=BOX_PX,
        pixel_size_A=PIXEL_A,
        snr=1.0,
        shift_std_A=2.0,
        images_per_file=16,
        batch_size=N_IMAGES,
        astigmatism_max_A=200.0,
    )
    return simulate_dataset(ensemble, config, tmp_path_factory.mktemp("sim"), progress=False)


@pytest.fixture()
def simulated_copy(simulated, tmp_path):
    """A private copy of the simulated dataset, for tests that touch its files."""
    shutil.copytree(simulated.parent, tmp_path / "sim")
    return tmp_path / "sim" / simulated.name


def _assert_close_float32(actual, expected):
    """Equal up to float32 FFT rounding, relative to the largest value."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def _raw_images(metadata):
    return open_particle_images(metadata)[np.arange(metadata.n_particles)]


def _downsampled(metadata, box_px):
    return fourier_crop(torch.from_numpy(_raw_images(metadata)), box_px).numpy()


def test_items_hold_downsampled_image_pose_and_ctf(simulated):
    metadata = read_metadata(simulated)
    dataset = ParticleDataset(metadata, box_size_px=16, normalisation=ImageNormalisation(0.5, 2.0))
    assert len(dataset) == dataset.n == N_IMAGES
    assert (dataset.box_size_px, dataset.original_box_size_px) == (16, BOX_PX)
    assert dataset.pixel_size_A == pytest.approx(2 * PIXEL_A)
    assert dataset.original_pixel_size_A == pytest.approx(PIXEL_A)
    expected = (_downsampled(metadata, 16) - 0.5) / 2.0
    for i in (0, 17, N_IMAGES - 1):
        item = _item(dataset, i)
        assert item["index"].dtype == torch.int64 and item["index"].item() == i
        assert item["image"].dtype == torch.float32 and item["image"].shape == (16, 16)
        _assert_close_float32(item["image"].numpy(), expected[i])
        np.testing.assert_allclose(item["rotation"].numpy(), metadata.rotations[i], atol=1e-7)
        np.testing.assert_allclose(item["shifts_A"].numpy(), metadata.shifts_A[i], rtol=1e-6)
        ctf = item["ctf"].numpy()
        assert ctf.dtype == np.float32 and ctf.shape == (9,)
        np.testing.assert_allclose(ctf, [getattr(metadata.ctf, f)[i] for f in CTF_FIELDS], rtol=1e-6)
        # Column order spelled out: voltage, Cs, amplitude contrast, phase shift, B-factor, scale.
        np.testing.assert_allclose(ctf[3:], [300.0, 2.7, 0.1, 0.0, 0.0, 1.0], rtol=1e-6)
        assert 10000.0 <= ctf[0] <= 25000.0 and ctf[1] <= ctf[0]
    assert _item(dataset, -1)["index"].item() == N_IMAGES - 1
    with pytest.raises(IndexError):
        dataset[N_IMAGES]


def test_estimated_normalisation_standardises_pixels(simulated):
    dataset = ParticleDataset(read_metadata(simulated), box_size_px=16)
    images = torch.stack([_item(dataset, i)["image"] for i in range(len(dataset))]).double()
    assert abs(images.mean().item()) < 1e-5
    assert images.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    inverted = ParticleDataset(
        read_metadata(simulated), box_size_px=16, invert_contrast=True, normalisation=dataset.normalisation
    )
    np.testing.assert_array_equal(_item(inverted, 3)["image"].numpy(), -_item(dataset, 3)["image"].numpy())


def test_real_images_are_resolved_through_image_names(data_dir):
    metadata = read_metadata(data_dir / "test_starfile.star")
    dataset = ParticleDataset(metadata)
    with mrcfile.open(data_dir / "000000.mrcs", permissive=True) as mrc:
        raw = np.array(mrc.data, dtype=np.float64)
    assert dataset.box_size_px == 16 and dataset.pixel_size_A == pytest.approx(12.0)
    assert dataset.normalisation.mean == pytest.approx(raw.mean(), rel=1e-6)
    assert dataset.normalisation.std == pytest.approx(raw.std(), rel=1e-6)
    for i in range(3):
        expected = (raw[i] - raw.mean()) / raw.std()
        np.testing.assert_allclose(_item(dataset, i)["image"].numpy(), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*:RuntimeWarning:mrcfile")  # relion31.mrcs has a zeroed MAP tag
def test_reordered_metadata_keeps_image_and_pose_together(data_dir):
    metadata = read_metadata(data_dir / "relion31.star", stack_path=data_dir / "relion31.mrcs")
    order = np.array([4, 2, 0, 3, 1])
    dataset = ParticleDataset(metadata.subset(order), box_size_px=64, normalisation=UNIT)
    with mrcfile.open(data_dir / "relion31.mrcs", permissive=True) as mrc:
        raw = np.array(mrc.data, dtype=np.float32)
    expected = fourier_crop(torch.from_numpy(raw), 64).numpy()
    assert dataset.pixel_size_A == pytest.approx(2.806 * 4)
    for position, original in enumerate(order):
        item = _item(dataset, position)
        assert item["index"].item() == position
        np.testing.assert_allclose(item["image"].numpy(), expected[original], atol=1e-5)
        np.testing.assert_allclose(item["rotation"].numpy(), metadata.rotations[original], atol=1e-7)
        assert item["ctf"][0].item() == pytest.approx(metadata.ctf.defocus_u_A[original], rel=1e-6)


def test_star_without_angles_asks_for_a_refinement(data_dir, tmp_path):
    blocks = starfile.read(data_dir / "test_starfile.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    starfile.write(blocks, tmp_path / "no_angles.star")
    shutil.copy(data_dir / "000000.mrcs", tmp_path / "000000.mrcs")
    with pytest.raises(CryoflexInputError) as err:
        ParticleDataset(read_metadata(tmp_path / "no_angles.star"))
    message = str(err.value)
    assert "no_angles.star" in message and "rlnAngleRot" in message and "consensus refinement" in message


@pytest.mark.parametrize(("missing", "field"), [("shifts_A", "rlnOriginXAngst"), ("ctf", "rlnDefocusU")])
def test_missing_shifts_or_ctf_is_named(data_dir, missing, field):
    metadata = replace(read_metadata(data_dir / "test_starfile.star"), **{missing: None})
    with pytest.raises(CryoflexInputError) as err:
        ParticleDataset(metadata)
    assert "test_starfile.star" in str(err.value) and field in str(err.value)


def test_several_pixel_sizes_are_rejected_with_groups_listed(data_dir):
    with pytest.raises(CryoflexInputError) as err:
        ParticleDataset(read_metadata(data_dir / "relion31.6opticsgroups.star"))
    message = str(err.value)
    assert "relion31.6opticsgroups.star" in message
    assert "group 1: 1.25 A" in message and "group 2: 1.24 A" in message
    assert "relion_image_handler" in message and "one optics group" in message


@pytest.mark.parametrize("box_px", [15, 34, 0])
def test_bad_box_size_is_an_input_error(simulated, box_px):
    with pytest.raises(CryoflexInputError, match="box_size_px"):
        ParticleDataset(read_metadata(simulated), box_size_px=box_px, normalisation=UNIT)


def test_constant_images_cannot_be_normalised(data_dir, tmp_path):
    shutil.copy(data_dir / "test_starfile.star", tmp_path / "particles.star")
    write_stack(tmp_path / "000000.mrcs", np.full((3, 16, 16), 7.0, np.float32), pixel_size_A=12.0)
    with pytest.raises(CryoflexInputError) as err:
        ParticleDataset(read_metadata(tmp_path / "particles.star"))
    assert "particles.star" in str(err.value) and "constant" in str(err.value)


class _RecordingSource:
    """images[positions] from an array, remembering every position asked for."""

    def __init__(self, images):
        self.images = images
        self.asked: list[int] = []

    def __getitem__(self, positions):
        self.asked += list(positions)
        return self.images[positions]


def test_estimate_normalisation_samples_without_replacement():
    images = np.random.default_rng(1).normal(3.0, 2.0, size=(50, 4, 4))
    source = _RecordingSource(images)
    estimate = estimate_normalisation(source, 50, max_images=10, seed=3)
    assert len(source.asked) == 10 and len(set(source.asked)) == 10
    chosen = images[sorted(source.asked)]
    assert estimate.mean == pytest.approx(chosen.mean(), rel=1e-12)
    assert estimate.std == pytest.approx(chosen.std(), rel=1e-12)
    again = _RecordingSource(images)
    assert estimate_normalisation(again, 50, max_images=10, seed=3) == estimate
    assert again.asked == source.asked
    other = _RecordingSource(images)
    estimate_normalisation(other, 50, max_images=10, seed=4)
    assert other.asked != source.asked


def test_estimate_normalisation_over_chunks_and_single_image():
    rng = np.random.default_rng(2)
    many = 1e4 + rng.normal(0.0, 0.5, size=(600, 3, 3))  # 3 chunks; large mean tests the chunk merge
    estimate = estimate_normalisation(many, 600)
    assert estimate.mean == pytest.approx(many.mean(), rel=1e-12)
    assert estimate.std == pytest.approx(many.std(), rel=1e-9)
    one = rng.normal(size=(1, 8, 8))
    single = estimate_normalisation(one, 1)
    assert (single.mean, single.std) == pytest.approx((one.mean(), one.std()), rel=1e-12)
    with pytest.raises(ValueError, match="constant"):
        estimate_normalisation(np.full((1, 8, 8), 2.0), 1)
    with pytest.raises(ValueError, match="finite"):
        estimate_normalisation(np.full((2, 8, 8), np.nan), 2)


def test_cache_is_built_once_and_matches_direct_reading(simulated_copy, tmp_path, monkeypatch):
    metadata = read_metadata(simulated_copy)
    cache_dir = tmp_path / "cache"
    cached = ParticleDataset(metadata, box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)
    direct = ParticleDataset(metadata, box_size_px=16, normalisation=UNIT)
    assert cached.cache_path is not None and cached.cache_path.parent == cache_dir
    array = np.load(cached.cache_path)
    assert array.dtype == np.float32 and array.shape == (N_IMAGES, 16, 16)
    _assert_close_float32(array, _downsampled(metadata, 16))
    sidecar = json.loads(cached.cache_path.with_suffix(".json").read_text())
    assert sidecar["n_images"] == N_IMAGES and sidecar["box_size_px"] == 16
    assert sidecar["original_box_size_px"] == BOX_PX and sidecar["source_path"] == str(simulated_copy.resolve())
    for i in (0, 21, N_IMAGES - 1):
        _assert_close_float32(_item(cached, i)["image"].numpy(), _item(direct, i)["image"].numpy())
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # no temp files left

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(dataset_module, "_write_cache", no_rebuild)
        reused = ParticleDataset(metadata, box_size_px=16, cache_dir=cache_dir)
    assert reused.cache_path == cached.cache_path
    assert reused.normalisation == ParticleDataset(metadata, box_size_px=16).normalisation

    builds = []
    real_write = dataset_module._write_cache
    monkeypatch.setattr(dataset_module, "_write_cache", lambda *a: builds.append(a[2]) or real_write(*a))
    reversed_order = metadata.subset(np.arange(N_IMAGES)[::-1])
    flipped = ParticleDataset(reversed_order, box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)
    _assert_close_float32(_item(flipped, 0)["image"].numpy(), _item(direct, N_IMAGES - 1)["image"].numpy())
    stat = simulated_copy.stat()
    os.utime(simulated_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ParticleDataset(read_metadata(simulated_copy), box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)
    other_box = ParticleDataset(metadata, box_size_px=8, cache_dir=cache_dir, normalisation=UNIT)
    assert other_box.cache_path != cached.cache_path
    assert builds == [16, 16, 8]


def test_the_cache_stands_in_for_stacks_no_longer_on_disk(simulated_copy, tmp_path, caplog):
    """A run analysed after its stacks were removed reads its cache, with a warning; a box it holds no cache of, or no
    cache at all, is the usual missing-stack error."""
    metadata = read_metadata(simulated_copy)
    cache_dir = tmp_path / "cache"
    cached = ParticleDataset(metadata, box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)
    full_box = ParticleDataset(metadata, cache_dir=cache_dir, normalisation=UNIT)
    expected, expected_full = _item(cached, 7)["image"].numpy(), _item(full_box, 7)["image"].numpy()
    for stack in simulated_copy.parent.rglob("*.mrcs"):
        stack.unlink()
    with caplog.at_level(logging.WARNING):
        stand_in = ParticleDataset(metadata, box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)
    assert stand_in.cache_path == cached.cache_path
    assert (stand_in.original_box_size_px, stand_in.pixel_size_A) == (BOX_PX, cached.pixel_size_A)
    np.testing.assert_array_equal(_item(stand_in, 7)["image"].numpy(), expected)
    assert "not found; using the run's images cached at 16 px" in caplog.text and "give --datadir" in caplog.text
    unpickled = pickle.loads(pickle.dumps(stand_in))  # as DataLoader workers receive it
    np.testing.assert_array_equal(_item(unpickled, 7)["image"].numpy(), expected)
    np.testing.assert_array_equal(
        _item(ParticleDataset(metadata, cache_dir=cache_dir, normalisation=UNIT), 7)["image"].numpy(), expected_full
    )
    for missing in (dict(box_size_px=8, cache_dir=cache_dir), dict(box_size_px=16)):
        with pytest.raises(StackNotFoundError, match="particle stack not found"):
            ParticleDataset(metadata, normalisation=UNIT, **missing)
    stat = simulated_copy.stat()  # the particle file changed since the cache: the cache is not its images
    os.utime(simulated_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(StackNotFoundError):
        ParticleDataset(metadata, box_size_px=16, cache_dir=cache_dir, normalisation=UNIT)


def test_corrupt_cache_is_rebuilt(simulated_copy, tmp_path, capsys):
    metadata = read_metadata(simulated_copy)
    first = ParticleDataset(metadata, box_size_px=16, cache_dir=tmp_path, normalisation=UNIT)
    expected = _item(first, 5)["image"].numpy()
    assert "cache images" not in capsys.readouterr().err
    first.cache_path.write_bytes(b"truncated")
    second = ParticleDataset(metadata, box_size_px=16, cache_dir=tmp_path, normalisation=UNIT, progress=True)
    assert f"{N_IMAGES}/{N_IMAGES}" in capsys.readouterr().err
    np.testing.assert_array_equal(_item(second, 5)["image"].numpy(), expected)


@pytest.mark.parametrize("use_cache", [False, True])
def test_dataloader_workers_yield_whole_batches(simulated, tmp_path, use_cache):
    dataset = ParticleDataset(
        read_metadata(simulated), box_size_px=16, cache_dir=tmp_path if use_cache else None
    )
    dataset[0]  # opens the memmap / stack in this process: pickling must still work
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(_item(clone, 7)["image"].numpy(), _item(dataset, 7)["image"].numpy())
    in_order = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), 16, drop_last=False)
    loaded = list(particle_loader(dataset, in_order, num_workers=2))
    assert all(isinstance(b, ParticleBatch) for b in loaded)
    batches = [_as_dict(b) for b in loaded]
    assert [b["index"].shape[0] for b in batches] == [16, 16, 8]
    batch = batches[1]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == list(range(16, 32))
    assert batch["image"].shape == (16, 16, 16) and batch["rotation"].shape == (16, 3, 3)
    assert batch["shifts_A"].shape == (16, 2) and batch["ctf"].shape == (16, 9)
    # batched and single-image float32 FFTs differ in the last bits (no cache: cropping happens per read)
    np.testing.assert_allclose(batch["image"][4].numpy(), _item(dataset, 20)["image"].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(batch["ctf"][4].numpy(), _item(dataset, 20)["ctf"].numpy())


def test_iterating_a_loader_leaves_the_global_random_stream_alone(simulated):
    """Training samples latents from torch's global generator: starting a loader (or a progress bar) must not draw."""
    dataset = ParticleDataset(read_metadata(simulated), box_size_px=16)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    loader = particle_loader(dataset, [[0, 1], [2]])
    for _ in range(3):
        assert [len(batch) for batch in loader] == [2, 1]
    assert torch.equal(torch.rand(4), expected)
