"""One image formation for model, simulator and contrast check; typed CTF, pose and particle batches."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.config import load_config
from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import particle_loader
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.ctf import ctf_rfft
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.projector import apply_ctf, project_gaussians
from cryoflex.io.metadata import CTFParameters
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset
from cryoflex.train.loop import nominal_fit
from cryoflex.train.setup import prepare_inputs, prepare_model

F64 = torch.float64


def _ctf_batch(batch: int, dtype: torch.dtype = F64) -> CTFBatch:
    rng = np.random.default_rng(0)
    defocus_u_A = torch.as_tensor(rng.uniform(8000.0, 20000.0, batch), dtype=dtype)
    return CTFBatch.from_values(defocus_u_A, defocus_u_A - 300.0, 40.0, 300.0, 2.7, 0.1, bfactor_A2=30.0)


def test_images_are_the_projection_convolved_with_the_batch_ctf() -> None:
    rng = np.random.default_rng(1)
    coords = torch.as_tensor(rng.uniform(-8, 8, size=(3, 12, 3)), dtype=F64)
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2, size=12), dtype=F64)
    poses = PoseBatch(torch.as_tensor(uniform_random_rotations(3, rng)), torch.as_tensor(rng.normal(size=(3, 2))))
    ctf = _ctf_batch(3)
    formation = ImageFormation(24, 1.5, sigma_A=2.0)
    transfer = ctf_rfft(24, 1.5, ctf)
    torch.testing.assert_close(formation.ctf_rfft(ctf), transfer, rtol=0, atol=0)
    assert transfer.shape == (3, 24, 13)
    projections = project_gaussians(
        coords, amplitudes, poses.rotations, box_size_px=24, pixel_size_A=1.5, sigma_A=2.0, shifts_A=poses.shifts_A
    )
    torch.testing.assert_close(formation.images(coords, amplitudes, poses, None), projections, rtol=0, atol=0)
    expected = apply_ctf(projections, transfer)
    torch.testing.assert_close(formation.images(coords, amplitudes, poses, ctf), expected, rtol=0, atol=0)
    # Poses and CTF follow the structures' dtype: float32 structures give float32 images from float64 batches.
    single = formation.images(coords.float(), amplitudes.float(), poses, ctf)
    assert single.dtype == torch.float32
    assert (single.double() - expected).abs().max() < 1e-4 * expected.abs().max()


def test_model_simulator_and_contrast_check_all_form_images_through_one_formation(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []  # images rendered by ImageFormation's renderers: point samples or band-limited spectra
    from cryoflex.imaging import formation

    def counted(renderer):
        def render(*args, **kwargs):
            calls.append(len(args[0]))
            return renderer(*args, **kwargs)

        return render

    for name in ("project_on_grid", "band_limited_spectra"):
        monkeypatch.setattr(formation, name, counted(getattr(formation, name)))
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=40)
    config = SimulationConfig(n_images=12, box_size_px=24, pixel_size_A=5.0, sigma_A=5.0, batch_size=12, seed=2)
    star = simulate_dataset(ensemble, config, tmp_path / "sim", progress=False)
    assert calls == [12, 12]  # the noise-level pilot and the written batch
    train_config = load_config(None, dict(
        particles=str(star), structure=str(tmp_path / "sim" / "nominal.pdb"), segments=2, latent_dim=2,
        sigma_A=5.0, encoder_hidden=[8], decoder_hidden=[8], progress=False, device="cpu", cache=False,
    ))  # fmt: skip
    inputs = prepare_inputs(train_config, tmp_path / "run", progress=False)
    model = prepare_model(train_config, inputs, torch.device("cpu"))
    assert isinstance(model.formation, ImageFormation)
    loader = particle_loader(inputs.dataset, [[0, 1, 2, 3, 4], [5, 6, 7]])
    calls.clear()
    nominal_fit(model, loader, torch.device("cpu"))
    batch = inputs.dataset.__getitems__([3, 1])
    output = model(batch)
    assert calls == [5, 3, 2]
    assert output.predicted_images().shape == (2, 24, 24)


def test_ctf_batch_fields_are_those_of_the_metadata_record() -> None:
    assert [f.name for f in fields(CTFBatch)] == [f.name for f in fields(CTFParameters)]
    record = CTFParameters(*(np.arange(3.0) + 10.0 * k for k in range(9)))
    batch = CTFBatch.from_record(record)
    assert batch.defocus_u_A.dtype == torch.float32 and len(batch) == 3
    for k, f in enumerate(fields(CTFParameters)):
        np.testing.assert_array_equal(getattr(batch, f.name).numpy(), np.arange(3.0) + 10.0 * k)


def test_ctf_batch_from_values_broadcasts_and_follows_the_defocus_dtype() -> None:
    floats = CTFBatch.from_values(10000.0, 9000.0, 10.0, 300.0, 2.7, 0.1)
    assert floats.defocus_u_A.dtype == torch.get_default_dtype() and floats.scale.shape == ()
    batch = CTFBatch.from_values(torch.tensor([1.0e4, 2.0e4], dtype=F64), 9000.0, 10.0, 300.0, 2.7, 0.1)
    assert all(getattr(batch, f.name).shape == (2,) for f in fields(batch))
    assert batch.voltage_kV.dtype == F64 and batch.voltage_kV.tolist() == [300.0, 300.0]
    assert batch.phase_shift_deg.tolist() == [0.0, 0.0] and batch.scale.tolist() == [1.0, 1.0]


def test_batches_index_slice_and_move_as_one() -> None:
    n = 5
    poses = PoseBatch(torch.eye(3).expand(n, 3, 3) * torch.arange(n)[:, None, None], torch.arange(2.0 * n).view(n, 2))
    ctf = _ctf_batch(n, torch.float32)
    groups = torch.arange(n) % 2 + 1
    batch = ParticleBatch(torch.arange(n * 16.0).view(n, 4, 4), poses, ctf, torch.arange(n), groups)
    part = batch[torch.tensor([3, 1])]
    assert len(part) == 2 and part.indices.tolist() == [3, 1] and part.optics_groups.tolist() == [2, 2]
    assert part.poses.rotations[0, 0, 0] == 3.0 and part.poses.shifts_A[1].tolist() == [2.0, 3.0]
    assert part.ctf.defocus_u_A.tolist() == [ctf.defocus_u_A[3].item(), ctf.defocus_u_A[1].item()]
    torch.testing.assert_close(part.images[1], batch.images[1])
    assert len(batch[1:3]) == 2 and len(batch[4]) == 1
    moved = batch.to("cpu")
    assert isinstance(moved, ParticleBatch) and torch.equal(moved.ctf.scale, batch.ctf.scale)
    assert ctf.to(dtype=F64).cs_mm.dtype == F64 and poses.to(dtype=F64).rotations.dtype == F64
