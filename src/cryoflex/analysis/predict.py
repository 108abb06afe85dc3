"""Per-particle latent posteriors and decoded structures from a trained model (evaluation mode).

Decoding uses the posterior-mean segmentation, so a structure depends only on its latent. A particle's structure
is the posterior mean of the structure: the average of the structures decoded at samples z ~ q(z | image), which
also gives its spread (how sure the model is of that particle's structure). Without samples, it is the structure
decoded at the mean of q(z | image).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import ParticleDataset, particle_loader
from cryoflex.errors import CryoflexInputError
from cryoflex.model.cryosphere import CryoSphere

DEFAULT_POSTERIOR_SAMPLES = 16
NOISE_BLOCK = 1024  # particles per random stream of the posterior samples


@dataclass(frozen=True)
class LatentPosterior:
    """q(z | image) = N(mean, std^2) of each particle, in dataset order."""

    mean: np.ndarray  # (n_particles, L) float32
    std: np.ndarray  # (n_particles, L) float32


@dataclass(frozen=True)
class PosteriorChunk:
    """Posterior-mean structures of successive particles and the spread of the sampled structures about them."""

    coords_A: np.ndarray  # (k, n_residues, 3) float32, model frame
    spread_A: np.ndarray  # (k, n_residues) float32: RMS distance of the sampled structures from their mean


def _batches(dataset: ParticleDataset, batch_size: int, num_workers: int) -> Iterator[ParticleBatch]:
    """The dataset in order, in batches of at most batch_size particles."""
    chunks = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    yield from particle_loader(dataset, chunks, num_workers=num_workers)


@torch.no_grad()
def latent_posteriors(
    model: CryoSphere, dataset: ParticleDataset, *, batch_size: int = 256, num_workers: int = 0
) -> LatentPosterior:
    """Mean and std of q(z | image) for every particle, float32 (n_particles, L), in dataset order."""
    model.eval()
    device = model.nominal_coords_A.device
    means, stds = [], []
    for batch in _batches(dataset, batch_size, num_workers):
        mean, std = model.encoder(batch.images.to(device))
        means.append(mean.float().cpu().numpy())
        stds.append(std.float().cpu().numpy())
    return LatentPosterior(np.concatenate(means), np.concatenate(stds))


def latent_means(
    model: CryoSphere, dataset: ParticleDataset, *, batch_size: int = 256, num_workers: int = 0
) -> np.ndarray:
    """(n_particles, L) float32 means of q(z | image), in dataset order."""
    return latent_posteriors(model, dataset, batch_size=batch_size, num_workers=num_workers).mean


@torch.no_grad()
def decode_latents(model: CryoSphere, latents: np.ndarray, *, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Structures (k, n_residues, 3) float32 in A, model frame, for successive chunks of at most batch_size latents."""
    model.eval()
    device = model.nominal_coords_A.device
    for start in range(0, len(latents), batch_size):
        chunk = torch.as_tensor(latents[start : start + batch_size], device=device, dtype=torch.float32)
        coords_A, _ = model.decode(chunk, sample_segmentation=False)
        yield coords_A.float().cpu().numpy()


def check_posterior_options(samples: int, seed: int) -> None:
    """Refuse a negative number of posterior samples or a negative seed (numpy seeds are non-negative)."""
    if samples < 0:
        raise CryoflexInputError(
            None, f"{samples} posterior samples", fix="give 0 (decode at the latent mean) or more",
            field="--posterior-samples",
        )  # fmt: skip
    if seed < 0:
        raise CryoflexInputError(None, f"seed {seed}", fix="give a seed of 0 or more", field="--seed")


def posterior_noise(seed: int, positions: np.ndarray, samples: int, latent_dim: int) -> np.ndarray:
    """Standard normal draws (len(positions), samples, latent_dim) float32 for the particles at `positions`.

    Particle p's draws are row p % NOISE_BLOCK of a block (NOISE_BLOCK, samples, latent_dim) drawn from a stream keyed
    by (seed, p // NOISE_BLOCK), so a particle gets the same draws in any chunk or subset; a stream per block rather
    than per particle keeps the draws fast (one generator per 1024 particles).
    """
    positions = np.asarray(positions, dtype=np.int64)
    block_of = positions // NOISE_BLOCK
    draws = np.empty((len(positions), samples, latent_dim), np.float32)
    for block in np.unique(block_of):
        rows = block_of == block
        stream = np.random.default_rng([seed, int(block)])
        draws[rows] = stream.standard_normal((NOISE_BLOCK, samples, latent_dim), dtype=np.float32)[
            positions[rows] % NOISE_BLOCK
        ]
    return draws


@torch.no_grad()
def posterior_structures(
    model: CryoSphere,
    posterior: LatentPosterior,
    *,
    samples: int = DEFAULT_POSTERIOR_SAMPLES,
    seed: int = 0,
    positions: np.ndarray | None = None,
    batch_size: int = 256,
) -> Iterator[PosteriorChunk]:
    """Posterior-mean structures and per-residue spreads for successive chunks of at most batch_size particles.

    Each particle's structure is the mean of the structures decoded at `samples` draws z = mean + std * noise
    (posterior_noise of its position in the particle file: `positions`, default 0, 1, ...); its spread is the
    RMS distance of those structures from their mean, per residue. With 0 or 1 samples, the structure decoded at
    the latent mean and zero spread (one sample gives no spread and a noisier structure than the mean).
    Memory is one chunk: the samples are accumulated one at a time (Welford, float64).
    """
    check_posterior_options(samples, seed)
    n = len(posterior.mean)
    positions = np.arange(n) if positions is None else np.asarray(positions)
    if positions.shape != (n,):
        raise ValueError(f"positions must have shape ({n},), got {positions.shape}")
    if samples <= 1:
        for at_mean_A in decode_latents(model, posterior.mean, batch_size=batch_size):
            yield PosteriorChunk(at_mean_A, np.zeros(at_mean_A.shape[:2], np.float32))
        return
    model.eval()
    device = model.nominal_coords_A.device
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        mean = torch.as_tensor(posterior.mean[start:stop], device=device, dtype=torch.float32)
        std = torch.as_tensor(posterior.std[start:stop], device=device, dtype=torch.float32)
        noise = torch.as_tensor(posterior_noise(seed, positions[start:stop], samples, mean.shape[1]), device=device)
        average_A = np.zeros((stop - start, int(model.nominal_coords_A.shape[0]), 3))
        squares_A2 = np.zeros(average_A.shape[:2])
        for k in range(samples):
            coords_A, _ = model.decode(mean + std * noise[:, k], sample_segmentation=False)
            sample_A = coords_A.float().cpu().numpy().astype(np.float64)
            deviation_A = sample_A - average_A
            average_A += deviation_A / (k + 1)
            squares_A2 += np.sum(deviation_A * (sample_A - average_A), axis=-1)
        yield PosteriorChunk(average_A.astype(np.float32), np.sqrt(squares_A2 / samples).astype(np.float32))
