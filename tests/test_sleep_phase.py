"""The sleep phase (TrainConfig.sleep_phase): the encoder also learns -log q(z | image) on images the model simulates
from prior draws z, and nothing else learns from that term."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from cryoflex.config import load_config
from cryoflex.data.dataset import particle_loader
from cryoflex.train.objective import LossTerms
from cryoflex.train.setup import prepare_inputs, prepare_model


def _setup(tiny_adk_dataset: Path, tmp_path: Path, **changes: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = dict(
        particles=str(tiny_adk_dataset / "particles.star"), structure=str(tiny_adk_dataset / "nominal.pdb"),
        segments=3, latent_dim=2, batch_size=4, encoder_hidden=[16], decoder_hidden=[16], progress=False,
        importance_samples=3, noise_model="white",
    )  # fmt: skip
    values.update(changes)
    config = load_config(None, values)
    inputs = prepare_inputs(config, tmp_path / "run", progress=False)
    model = prepare_model(config, inputs, torch.device("cpu"))
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.3)
        model.log_noise_variance.fill_(-0.2)
        model.log_image_scale.fill_(0.3)
    batch = next(iter(particle_loader(inputs.dataset, [[0, 5, 9, 20]])))
    return config, inputs, model, batch


def test_sleep_term_is_minus_log_q_of_prior_draws_on_their_simulated_images(
    tiny_adk_dataset: Path, tmp_path: Path
) -> None:
    """Against scipy: the same random draws (the latents, then the images' noise) replayed by hand."""
    _, _, model, batch = _setup(tiny_adk_dataset, tmp_path, sleep_phase=True)
    model.train()
    torch.manual_seed(4)
    value = float(model.sleep_nll(batch).detach())
    torch.manual_seed(4)
    latent = torch.randn(4, 2)
    with torch.no_grad():
        coords_A, _ = model.decode(latent, sample_segmentation=False)
        clean = model.render(coords_A, batch.poses, batch.ctf)
        images = np.exp(0.3) * clean + np.exp(-0.1) * torch.randn_like(clean)
        mean, std = model.encoder(images)
    expected = -norm.logpdf(latent.numpy(), mean.numpy(), std.numpy()).sum(-1).mean()
    assert value == pytest.approx(expected, rel=1e-5)


def test_only_the_encoder_learns_from_the_sleep_term_and_only_if_asked(tiny_adk_dataset: Path, tmp_path: Path) -> None:
    config, inputs, model, batch = _setup(tiny_adk_dataset, tmp_path, sleep_phase=True)
    losses = LossTerms(config, model, inputs.structure.chain_ids, len(inputs.dataset))
    model.train()
    output = model(batch, config.importance_samples)
    terms = losses(output, batch.images, 1.0, True)
    assert output.sleep_nll is not None and torch.isfinite(terms["sleep"])
    without_sleep = terms["total"] - terms["sleep"]
    output.sleep_nll.backward()
    for name, parameter in model.named_parameters():
        learns = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert learns == name.startswith("encoder."), name
    assert torch.isfinite(without_sleep)

    model.eval()  # validation and analysis: no sleep term
    assert model(batch).sleep_nll is None
    model.train()
    model.sleep_phase = False  # the default
    assert "sleep" not in losses(model(batch, config.importance_samples), batch.images, 1.0, False)
