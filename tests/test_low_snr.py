"""Images that carry no signal: the evidence bound leaves the latent at the prior and the structures at the nominal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryoflex.analysis.metrics import rmsd_A
from cryoflex.analysis.predict import particle_posteriors, posterior_structures
from cryoflex.analysis.run import load_run
from cryoflex.config import load_config
from cryoflex.io.trajectory import read_trajectory
from cryoflex.model.losses import standard_normal_kl
from cryoflex.simulate import SimulationConfig, simulate_dataset
from cryoflex.train.loop import train


def test_pure_noise_gives_a_latent_at_the_prior_and_the_nominal_structure(data_dir: Path, tmp_path: Path) -> None:
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    simulation = SimulationConfig(n_images=256, box_size_px=32, pixel_size_A=4.0, sigma_A=4.0, snr=1e-6, seed=5)
    star = simulate_dataset(ensemble, simulation, tmp_path / "data", progress=False)
    config = load_config(None, dict(
        particles=str(star), structure=str(tmp_path / "data" / "nominal.pdb"), segments=3, latent_dim=2, epochs=8,
        batch_size=32, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32], progress=False, device="cpu", seed=1,
    ))  # fmt: skip
    assert config.likelihood == "gaussian" and config.draws_per_image > 1  # the defaults are under test
    train(config, tmp_path / "run")
    run = load_run(tmp_path / "run")
    posterior = particle_posteriors(run.model, run.dataset, weighted=True, samples=16, seed=0)
    kl_nats = standard_normal_kl(torch.as_tensor(posterior.mean), torch.as_tensor(posterior.std)).numpy()
    log_weights = posterior.log_weights
    assert log_weights is not None
    spread_of_weights = log_weights.std(axis=1)
    structures = np.concatenate([chunk.coords_A for chunk in posterior_structures(run.model, posterior, samples=16)])
    nominal = run.model.nominal_coords_A.numpy()
    # The encoder says next to nothing about any image (an image of AdK at SNR 0.001 carries ~0.2 nats, at 0.01 ~1)
    assert kl_nats.mean() < 0.15
    assert np.median(spread_of_weights) < 1.0  # no draw explains an image much better than another: weights ~ equal
    # The structures stay near the nominal: the motions of this trajectory reach 4.7 A RMSD from it
    assert np.median(rmsd_A(structures, np.broadcast_to(nominal, structures.shape))) < 1.0
