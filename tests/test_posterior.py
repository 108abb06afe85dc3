"""Posterior-mean structures, their spread and expected RMSD: checked against decoding each sample on its own, in
numpy."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES, predict
from cryoflex.analysis.predict import (
    LatentPosterior,
    decode_latents,
    population_expected_rmsd_A,
    posterior_noise,
    posterior_structures,
)
from cryoflex.cli import analyze as analyze_cli
from cryoflex.cli import eval as eval_cli
from cryoflex.config import load_config
from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import read_structure
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.train.setup import build_model


@pytest.fixture(scope="module")
def model(data_dir: Path) -> CryoSphere:
    """A tiny untrained model whose decoder output is randomised, so that each latent gives its own structure."""
    torch.manual_seed(0)
    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8]))  # fmt: skip
    built = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0)
    torch.nn.init.normal_(built.decoder.net[-1].weight, std=0.3)
    return built.eval()


def _posterior(n: int, seed: int = 1) -> LatentPosterior:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, 2)).astype(np.float32)
    return LatentPosterior(mean, rng.uniform(0.2, 0.6, size=(n, 2)).astype(np.float32))


def _run(model: CryoSphere, posterior: LatentPosterior, **options) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(posterior_structures(model, posterior, **options))
    return np.concatenate([c.coords_A for c in chunks]), np.concatenate([c.spread_A for c in chunks])


def _expected(model: CryoSphere, posterior: LatentPosterior, **options) -> np.ndarray:
    return np.concatenate([c.expected_rmsd_A for c in posterior_structures(model, posterior, **options)])


def _decode_one(model: CryoSphere, latent: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        coords_A, _ = model.decode(latent[None], sample_segmentation=False)
    return coords_A[0].numpy().astype(np.float64)


def _decoded_draws(model: CryoSphere, posterior: LatentPosterior, particle: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n, 3) the structures of one particle's posterior draws, decoded one at a time."""
    noise = torch.as_tensor(posterior_noise(seed, np.array([particle]), samples, 2)[0])  # (their law: tested below)
    latents = torch.as_tensor(posterior.mean[particle]) + torch.as_tensor(posterior.std[particle]) * noise
    return np.stack([_decode_one(model, latent) for latent in latents])


@pytest.mark.parametrize("weighted", [False, True])
def test_posterior_mean_spread_and_expected_rmsd_match_samples_decoded_one_by_one(
    model: CryoSphere, weighted: bool
) -> None:
    posterior = _posterior(7)
    if weighted:  # self-normalised importance weights, some far from equal
        log_weights = np.random.default_rng(4).normal(scale=2.0, size=(7, 5))
        posterior = LatentPosterior(posterior.mean, posterior.std, log_weights, weights_seed=3)
    coords, spread = _run(model, posterior, samples=5, seed=3, batch_size=3)
    expected = _expected(model, posterior, samples=5, seed=3, batch_size=3)
    assert coords.dtype == spread.dtype == expected.dtype == np.float32
    assert coords.shape == (7, 214, 3) and spread.shape == (7, 214) and expected.shape == (7,)
    for p in range(7):
        samples = _decoded_draws(model, posterior, p, 5, 3)  # (5, 214, 3)
        weights = np.full(5, 0.2) if not weighted else np.exp(log_weights[p]) / np.exp(log_weights[p]).sum()
        mean = np.einsum("k,kni->ni", weights, samples)
        rms_distance = np.sqrt(np.einsum("k,kn->n", weights, np.sum((samples - mean) ** 2, axis=-1)))
        rmsd_of_each = np.sqrt(np.mean(np.sum((samples - mean) ** 2, axis=-1), axis=-1))  # (5,)
        np.testing.assert_allclose(coords[p], mean, rtol=0, atol=1e-4)
        np.testing.assert_allclose(spread[p], rms_distance, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(expected[p], weights @ rmsd_of_each, rtol=1e-4, atol=1e-5)
    assert spread.mean() > 0.05  # the samples really differ
    # the mean of the RMSDs is at most their root mean square, which is the RMS over residues of the spread
    assert np.all(expected <= np.sqrt(np.mean(spread.astype(np.float64) ** 2, axis=1)) * (1 + 1e-5))


def test_expected_rmsd_is_the_same_when_the_draws_are_decoded_again(
    model: CryoSphere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large structures do not keep a chunk's draws for their RMSDs but decode them a second time: same figures."""
    posterior = _posterior(6)
    kept = _expected(model, posterior, samples=4, seed=2)
    monkeypatch.setattr(predict, "_KEPT_DRAWS_BYTES", 0)
    np.testing.assert_array_equal(_expected(model, posterior, samples=4, seed=2), kept)
    assert kept.min() > 0


def test_the_population_expected_rmsd_is_that_of_a_particle_whose_posterior_is_the_prior(model: CryoSphere) -> None:
    # an image that says nothing leaves the prior as its posterior: posterior_structures then reports this figure
    prior = LatentPosterior(np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32))
    for samples, seed in ((64, 0), (256, 3)):
        population_A = population_expected_rmsd_A(model, samples=samples, seed=seed, batch_size=48)
        assert population_A == pytest.approx(float(_expected(model, prior, samples=samples, seed=seed)[0]), rel=1e-5)
        # and by hand: the mean RMSD of the decoded draws from their mean
        latents = posterior_noise(seed, np.zeros(1), samples, 2)[0]
        drawn = np.stack([_decode_one(model, torch.as_tensor(z)) for z in latents])
        by_hand = np.sqrt(((drawn - drawn.mean(0)) ** 2).sum(-1).mean(-1)).mean()
        assert population_A == pytest.approx(by_hand, rel=1e-5)
    assert population_A > 0.1  # the randomised decoder moves the structures by angstroms


@pytest.mark.parametrize("samples", [0, 1])
def test_no_samples_decode_at_the_latent_mean_with_zero_spread(model: CryoSphere, samples: int) -> None:
    posterior = _posterior(10)
    coords, spread = _run(model, posterior, samples=samples, seed=5, batch_size=4)
    np.testing.assert_array_equal(coords, np.concatenate(list(decode_latents(model, posterior.mean, batch_size=4))))
    np.testing.assert_array_equal(spread, np.zeros((10, 214), np.float32))
    np.testing.assert_array_equal(_expected(model, posterior, samples=samples, seed=5), np.zeros(10, np.float32))


def test_an_encoder_of_no_width_gives_no_spread(model: CryoSphere) -> None:
    images = torch.as_tensor(np.random.default_rng(0).normal(size=(6, 32, 32)), dtype=torch.float32)
    spreads = {}
    for raw_std in (-60.0, 1.0):  # std = softplus(raw) + 1e-4: the floor 1e-4, or about 1.3
        sure = copy.deepcopy(model)
        output = sure.encoder.net[-1]
        with torch.no_grad():
            output.weight[2:] = 0.0
            output.bias[2:] = raw_std
            mean, std = sure.encoder(images)
        posterior = LatentPosterior(mean.numpy(), std.numpy())
        coords, spreads[raw_std] = _run(sure, posterior, samples=8, seed=0)
        if raw_std < 0:
            at_mean = np.concatenate(list(decode_latents(sure, posterior.mean)))
            np.testing.assert_allclose(coords, at_mean, rtol=0, atol=0.01)
    assert spreads[1.0].mean() > 0.1  # the same model with a wide posterior does spread
    assert spreads[-60.0].max() < min(0.01, 1e-2 * spreads[1.0].mean())  # ~1e-4 of the latent's scale


def test_draws_are_deterministic_per_seed_and_per_particle(model: CryoSphere) -> None:
    posterior = _posterior(9)
    coords, spread = _run(model, posterior, samples=4, seed=7, batch_size=4)
    again, again_spread = _run(model, posterior, samples=4, seed=7, batch_size=4)
    np.testing.assert_array_equal(coords, again)
    np.testing.assert_array_equal(spread, again_spread)
    other_chunks, _ = _run(model, posterior, samples=4, seed=7, batch_size=9)
    np.testing.assert_allclose(other_chunks, coords, rtol=0, atol=1e-5)  # the chunk size does not change the draws
    chosen = np.array([8, 2])
    subset = LatentPosterior(posterior.mean[chosen], posterior.std[chosen])
    alone, _ = _run(model, subset, samples=4, seed=7, positions=chosen)
    np.testing.assert_allclose(alone, coords[chosen], rtol=0, atol=1e-5)  # a particle's draws do not depend on others
    other_seed, _ = _run(model, posterior, samples=4, seed=8, batch_size=4)
    assert np.abs(other_seed - coords).max() > 1e-3


def test_each_particle_has_its_own_draws_across_noise_blocks() -> None:
    every = posterior_noise(4, np.arange(2100), 3, 2)  # three blocks of 1024 particles
    chosen = np.array([2099, 3, 1024, 1023])
    np.testing.assert_array_equal(posterior_noise(4, chosen, 3, 2), every[chosen])
    assert len(np.unique(every.reshape(2100, -1), axis=0)) == 2100  # no two particles share their draws
    assert np.abs(posterior_noise(5, chosen, 3, 2) - every[chosen]).min() > 0  # another seed, other draws


def test_posterior_draws_are_standard_normal_and_spread_more_evenly_than_independent_ones() -> None:
    """Each coordinate of the draws is N(0, 1) (Kolmogorov-Smirnov over 4,000 particles), and a particle's 16 draws
    average closer to 0 than 16 independent draws would (their mean's std 1/4): randomised quasi-Monte Carlo."""
    draws = posterior_noise(0, np.arange(4000), 16, 8).astype(np.float64)
    for k in (0, 7):
        assert kstest(draws[:, k, 3], "norm").pvalue > 0.01  # draw k of every particle
    assert kstest(draws[:, :, 0].ravel(), "norm").pvalue > 0.01
    assert (draws.mean(axis=1).std(axis=0) < 0.16).all()


def test_negative_samples_or_seed_are_refused(model: CryoSphere) -> None:
    with pytest.raises(CryoflexInputError, match=r"\[--posterior-samples\]"):
        next(posterior_structures(model, _posterior(2), samples=-1))
    with pytest.raises(CryoflexInputError, match=r"\[--seed\]"):
        next(posterior_structures(model, _posterior(2), samples=2, seed=-1))


def test_analyze_and_eval_flags_default_to_the_same_number_of_samples() -> None:
    for module in (analyze_cli, eval_cli):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.get_default("posterior_samples") == DEFAULT_POSTERIOR_SAMPLES


def test_importance_weights_weigh_the_draws(model: CryoSphere) -> None:
    """With weights, a particle's structure is the weighted mean of its draws and its spread the weighted RMS
    distance from it (computed here from each draw decoded on its own)."""
    plain = _posterior(5)
    log_weights = np.random.default_rng(2).normal(scale=2.0, size=(5, 4))
    weighted = LatentPosterior(plain.mean, plain.std, log_weights, weights_seed=3)
    coords, spread = _run(model, weighted, samples=4, seed=3, batch_size=2)
    for p in range(5):
        noise = torch.as_tensor(posterior_noise(3, np.array([p]), 4, 2)[0])
        latents = torch.as_tensor(plain.mean[p]) + torch.as_tensor(plain.std[p]) * noise
        draws = np.stack([_decode_one(model, latent) for latent in latents])
        weights = np.exp(log_weights[p]) / np.exp(log_weights[p]).sum()
        mean = np.einsum("k,knd->nd", weights, draws)
        rms_distance = np.sqrt(np.einsum("k,kn->n", weights, np.sum((draws - mean) ** 2, axis=-1)))
        np.testing.assert_allclose(coords[p], mean, rtol=0, atol=1e-4)
        np.testing.assert_allclose(spread[p], rms_distance, rtol=1e-4, atol=1e-5)
    unweighted, _ = _run(model, plain, samples=4, seed=3)
    assert np.abs(unweighted - coords).max() > 0.01  # the weights matter
    chosen = np.array([4, 1])
    alone, _ = _run(model, weighted.subset(chosen), samples=4, seed=3, positions=chosen)
    np.testing.assert_allclose(alone, coords[chosen], rtol=0, atol=1e-5)  # a subset keeps its particles' weights
    with pytest.raises(ValueError, match="weights are for 4 samples with seed 3"):
        _run(model, weighted, samples=4, seed=4)


def test_importance_log_weights_equal_an_independent_computation(data_dir: Path, tiny_adk_dataset: Path) -> None:
    """log p(image | z) + log p(z) - log q(z | image) per draw: the likelihood at the model's image scale with a
    least-squares offset in numpy, the densities from scipy."""
    from scipy.stats import norm

    from cryoflex.analysis.predict import importance_log_weights, latent_posteriors
    from cryoflex.data.dataset import ParticleDataset
    from cryoflex.io.metadata import read_metadata

    dataset = ParticleDataset(read_metadata(tiny_adk_dataset / "particles.star"))
    torch.manual_seed(1)
    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8],
                                    noise_model="white"))  # fmt: skip
    model = build_model(config, read_structure(tiny_adk_dataset / "nominal.pdb"), 32, 4.0).eval()
    torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.3)
    with torch.no_grad():
        model.log_noise_variance.fill_(0.3)
        model.log_image_scale.fill_(-0.4)
    chosen = np.array([5, 0, 17])
    posterior = latent_posteriors(model, dataset).subset(chosen)
    log_weights = importance_log_weights(model, dataset, posterior, samples=3, seed=2, positions=chosen)
    batch = dataset.__getitems__(chosen.tolist())
    for row, p in enumerate(chosen):
        noise = posterior_noise(2, np.array([p]), 3, 2)[0]
        for k in range(3):
            latent = posterior.mean[row] + posterior.std[row] * noise[k]
            with torch.no_grad():
                coords_A, _ = model.decode(torch.as_tensor(latent)[None], sample_segmentation=False)
                image = model.render(coords_A, batch.poses[[row]], batch.ctf[[row]])[0].double().numpy().ravel()
            observed = batch.images[row].double().numpy().ravel()
            target = observed - np.exp(-0.4) * image
            (offset,), *_ = np.linalg.lstsq(np.ones((target.size, 1)), target, rcond=None)
            nll = np.square(target - offset).sum() / (2 * np.exp(0.3)) + 0.5 * observed.size * 0.3
            log_prior = norm.logpdf(latent).sum()
            log_q = norm.logpdf(latent, posterior.mean[row], posterior.std[row]).sum()
            assert log_weights[row, k] == pytest.approx(-nll + log_prior - log_q, rel=1e-5, abs=1e-3)
    # positions for other particles than the posterior's: a clear error, not one from deep inside the FFTs
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\), one per posterior row"):
        importance_log_weights(model, dataset, posterior, samples=3, seed=2, positions=np.arange(2))
