"""Per-particle latent posteriors and decoded structures from a trained model (evaluation mode).

Decoding uses the posterior-mean segmentation, so a structure depends only on its latent. A particle's structure
is the posterior mean of the structure: the average of the structures decoded at samples z ~ q(z | image), weighted
(for a model trained with the Gaussian likelihood) by how well each explains the image, which also gives its spread
(how sure the model is of that particle's structure). Without samples, it is the structure decoded at the mean of
q(z | image).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import qmc
from torch.utils.data import BatchSampler, SequentialSampler

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.config import check_seed
from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import ParticleDataset, particle_loader
from cryoflex.errors import CryoflexInputError
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.model.losses import log_importance_weights
from cryoflex.progress import Progress

NOISE_BLOCK = 1024  # particles per random stream of the posterior samples
POPULATION_SAMPLES = 1024  # prior draws for the population's expected RMSD (population_expected_rmsd_A)
_KEPT_DRAWS_BYTES = 256 * 2**20  # a chunk's decoded draws are kept up to this size for their RMSDs, else decoded again
_SOBOL_STREAM = 2**31  # the stream key of the Sobol points' scrambling (block keys are particle // NOISE_BLOCK)
_UNIFORM_CLIP = 1e-12  # keeps the normal quantiles finite (|z| <= 7)


@dataclass(frozen=True)
class LatentPosterior:
    """q(z | image) = N(mean, std^2) of each particle, in dataset order, and optionally the importance weights of
    its posterior draws (importance_log_weights; drawn with weights_seed)."""

    mean: np.ndarray  # (n_particles, L) float32
    std: np.ndarray  # (n_particles, L) float32
    log_weights: np.ndarray | None = None  # (n_particles, samples) float64
    weights_seed: int | None = None

    def subset(self, index: np.ndarray) -> LatentPosterior:
        """The particles at `index` (their weights too)."""
        weights = None if self.log_weights is None else self.log_weights[index]
        return LatentPosterior(self.mean[index], self.std[index], weights, self.weights_seed)


@dataclass(frozen=True)
class PosteriorChunk:
    """Posterior-mean structures of successive particles and the spread of the sampled structures about them."""

    coords_A: np.ndarray  # (k, n_residues, 3) float32, model frame
    spread_A: np.ndarray  # (k, n_residues) float32: RMS distance of the sampled structures from their mean
    # (k,) float32: the posterior's expected RMSD of the particle's structure from coords_A (the weighted mean over the
    # samples of each one's RMSD from it): how far the model expects the truth to be, in the units of the error itself
    expected_rmsd_A: np.ndarray


def _batches(dataset: ParticleDataset, batch_size: int, num_workers: int) -> Iterator[ParticleBatch]:
    """The dataset in order, in batches of at most batch_size particles."""
    chunks = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    yield from particle_loader(dataset, chunks, num_workers=num_workers)


@torch.no_grad()
def latent_posteriors(
    model: CryoSphere, dataset: ParticleDataset, *, batch_size: int = 256, num_workers: int = 0,
    progress: bool = False,
) -> LatentPosterior:  # fmt: skip
    """Mean and std of q(z | image) for every particle, float32 (n_particles, L), in dataset order."""
    model.eval()
    device = model.nominal_coords_A.device
    means, stds = [], []
    with Progress(len(dataset), "encoding", unit="img", enabled=progress) as bar:
        for batch in _batches(dataset, batch_size, num_workers):
            mean, std = model.encoder(batch.images.to(device))
            means.append(mean.float().cpu().numpy())
            stds.append(std.float().cpu().numpy())
            bar.update(len(mean))
    return LatentPosterior(np.concatenate(means), np.concatenate(stds))


def particle_posteriors(
    model: CryoSphere,
    dataset: ParticleDataset,
    *,
    weighted: bool,
    samples: int = DEFAULT_POSTERIOR_SAMPLES,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> LatentPosterior:
    """q(z | image) of every particle; with `weighted` (a model trained with the Gaussian likelihood) and more than
    one sample, also the importance weights of the `samples` draws that posterior_structures takes with `seed`."""
    posterior = latent_posteriors(model, dataset, batch_size=batch_size, progress=progress)
    if not weighted or samples <= 1:
        return posterior
    log_weights = importance_log_weights(
        model, dataset, posterior, samples=samples, seed=seed, batch_size=batch_size, progress=progress
    )
    return replace(posterior, log_weights=log_weights, weights_seed=seed)


def _normalised(log_weights: np.ndarray) -> np.ndarray:
    """(n, K) log weights -> (n, K) weights summing to 1 over each row (self-normalised importance sampling)."""
    weights = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def posterior_latents(posterior: LatentPosterior, samples: int, seed: int) -> np.ndarray:
    """(n_particles, L) float32 posterior mean of each particle's latent: the importance-weighted mean of its draws
    when the posterior has weights (at low SNR the encoder's mean says little; the weighted draws say what the
    images do), else the mean of q(z | image). For latent-space plots and clustering."""
    if posterior.log_weights is None:
        return posterior.mean
    out = np.empty_like(posterior.mean)
    for start in range(0, len(out), NOISE_BLOCK):
        stop = min(start + NOISE_BLOCK, len(out))
        noise = posterior_noise(seed, np.arange(start, stop), samples, out.shape[1])
        draws = posterior.mean[start:stop, None] + posterior.std[start:stop, None] * noise
        out[start:stop] = np.einsum("ik,ikl->il", _normalised(posterior.log_weights[start:stop]), draws)
    return out


def latent_means(
    model: CryoSphere, dataset: ParticleDataset, *, batch_size: int = 256, num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:  # fmt: skip
    """(n_particles, L) float32 means of q(z | image), in dataset order."""
    return latent_posteriors(model, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress).mean


@torch.no_grad()
def decode_latents(
    model: CryoSphere, latents: np.ndarray, *, batch_size: int = 256, density: bool = False
) -> Iterator[np.ndarray]:
    """Structures (k, n_residues, 3) float32 in A, model frame, for successive chunks of at most batch_size latents;
    with `density`, the Gaussians the model renders instead ((k, n P, 3), CryoSphere.decode_with_density: for maps of
    the model)."""
    model.eval()
    device = model.nominal_coords_A.device
    for start in range(0, len(latents), batch_size):
        chunk = torch.as_tensor(latents[start : start + batch_size], device=device, dtype=torch.float32)
        if density:
            _, points_A, _ = model.decode_with_density(chunk, sample_segmentation=False)
        else:
            points_A, _ = model.decode(chunk, sample_segmentation=False)
        yield points_A.float().cpu().numpy()


def population_expected_rmsd_A(
    model: CryoSphere, *, samples: int = POPULATION_SAMPLES, seed: int = 0, batch_size: int = 256
) -> float:
    """The expected RMSD, in A, of the structures decoded at `samples` prior draws z ~ N(0, I) from their mean: what
    posterior_structures reports for a particle whose image says nothing (its posterior is then the prior). The
    scale for the particles' own expected RMSDs: near it, an image tells little about its particle's conformation.
    Quasi-random draws as for a particle (posterior_noise); decoded twice (the mean first), so memory is one batch."""
    check_posterior_options(samples, seed)
    latents = posterior_noise(seed, np.zeros(1, np.int64), max(samples, 1), model.encoder.latent_dim)[0]
    mean_A = sum(drawn.astype(np.float64).sum(0) for drawn in decode_latents(model, latents, batch_size=batch_size))
    mean_A = mean_A / len(latents)
    rmsds_A = [
        np.sqrt(np.square(drawn - mean_A).sum(-1).mean(-1))
        for drawn in decode_latents(model, latents, batch_size=batch_size)
    ]
    return float(np.concatenate(rmsds_A).mean())


def check_posterior_options(samples: int, seed: int) -> None:
    """Refuse a negative number of posterior samples or a seed numpy cannot take (check_seed)."""
    if samples < 0:
        raise CryoflexInputError(
            None, f"{samples} posterior samples", fix="give 0 (decode at the latent mean) or more",
            field="--posterior-samples",
        )  # fmt: skip
    check_seed(seed)


def posterior_noise(seed: int, positions: np.ndarray, samples: int, latent_dim: int) -> np.ndarray:
    """Standard normal draws (len(positions), samples, latent_dim) float32 for the particles at `positions`.

    Randomised quasi-Monte Carlo: one scrambled Sobol point set of `samples` points in [0, 1)^latent_dim, shifted
    modulo 1 by each particle's own uniform random vector (a Cranley-Patterson rotation) and mapped through the normal
    quantile function. Every draw is exactly N(0, I), and a particle's draws cover that distribution more evenly than
    independent ones, so the weighted means taken from them (structure, spread) carry less Monte Carlo noise.
    Particle p's shift is row p % NOISE_BLOCK of a block drawn from a stream keyed by (seed, p // NOISE_BLOCK): a
    particle gets the same draws in any chunk or subset, from one generator per 1024 particles.
    """
    positions = np.asarray(positions, dtype=np.int64)
    points = qmc.Sobol(latent_dim, scramble=True, seed=np.random.default_rng([seed, _SOBOL_STREAM]))
    base = points.random_base2(max(0, math.ceil(math.log2(max(samples, 1)))))[:samples]  # a power of 2 keeps balance
    block_of = positions // NOISE_BLOCK
    shifts = np.empty((len(positions), latent_dim))
    for block in np.unique(block_of):
        rows = block_of == block
        shifts[rows] = np.random.default_rng([seed, int(block)]).random((NOISE_BLOCK, latent_dim))[
            positions[rows] % NOISE_BLOCK
        ]
    uniform = np.mod(base[None] + shifts[:, None], 1.0)
    return ndtri(np.clip(uniform, _UNIFORM_CLIP, 1.0 - _UNIFORM_CLIP)).astype(np.float32)


def _particle_positions(n_particles: int, positions: np.ndarray | None) -> np.ndarray:
    """Each posterior row's position in the particle file (default 0, 1, ...): one per row, or a clear error."""
    positions = np.arange(n_particles) if positions is None else np.asarray(positions)
    if positions.shape != (n_particles,):
        raise ValueError(f"positions must have shape ({n_particles},), one per posterior row; got {positions.shape}")
    return positions


@torch.no_grad()
def importance_log_weights(
    model: CryoSphere,
    dataset: ParticleDataset,
    posterior: LatentPosterior,
    *,
    samples: int = DEFAULT_POSTERIOR_SAMPLES,
    seed: int = 0,
    positions: np.ndarray | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """(n, samples) log importance weights of the draws posterior_structures takes with the same samples, seed and
    positions (the particles' rows in `dataset`, default all; `posterior` holds those particles'):
    log p(image | z_k) + log p(z_k) - log q(z_k | image), with the model's Gaussian likelihood.

    q(z | image) is the encoder's approximation; weighting its draws by how well their structures explain the image
    turns them into draws of the model's exact posterior (self-normalised importance sampling), which matters at low
    SNR, where q is a loose fit. Each particle costs `samples` rendered images. Needs a model trained with the
    Gaussian likelihood (its noise variance is learned).
    """
    model.eval()
    device = model.nominal_coords_A.device
    n = len(posterior.mean)
    positions = _particle_positions(n, positions)
    chunks = [positions[start : start + batch_size].tolist() for start in range(0, n, batch_size)]
    out = np.empty((n, samples), np.float64)
    start = 0
    with Progress(n, f"posterior weights ({samples} draws each)", unit="img", enabled=progress) as bar:
        for batch in particle_loader(dataset, chunks, num_workers=num_workers):
            batch = batch.to(device)
            stop = start + len(batch)
            mean = torch.as_tensor(posterior.mean[start:stop], device=device, dtype=torch.float32)
            std = torch.as_tensor(posterior.std[start:stop], device=device, dtype=torch.float32)
            noise = torch.as_tensor(posterior_noise(seed, positions[start:stop], samples, mean.shape[1]), device=device)
            latent = mean[:, None] + std[:, None] * noise
            nll = model.image_nll(latent, batch)
            out[start:stop] = log_importance_weights(nll, latent, mean, std).double().cpu().numpy()
            bar.update(stop - start)
            start = stop
    return out


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
    RMS distance of those structures from their mean, per residue, and its expected RMSD the weighted mean of their
    RMSDs from it (which ranks the particles' errors better than the mean of the per-residue spreads:
    docs/low_snr.md). The posterior's importance weights, when it has them, weight the draws (self-normalised);
    without them every draw counts the same. With 0 or 1 samples, the structure decoded at the latent mean and zero
    spread (one sample gives no spread and a noisier structure than the mean). Memory is one chunk: the samples are
    accumulated one at a time (float64); their RMSDs need the mean first, so they are kept (float32) where a chunk's
    draws fit in _KEPT_DRAWS_BYTES and decoded a second time where not (large structures).
    """
    check_posterior_options(samples, seed)
    n = len(posterior.mean)
    positions = _particle_positions(n, positions)
    if samples <= 1:
        for at_mean_A in decode_latents(model, posterior.mean, batch_size=batch_size):
            no_spread = np.zeros(at_mean_A.shape[:2], np.float32)
            yield PosteriorChunk(at_mean_A, no_spread, np.zeros(len(at_mean_A), np.float32))
        return
    log_weights = posterior.log_weights
    if log_weights is not None and (log_weights.shape != (n, samples) or posterior.weights_seed != seed):
        raise ValueError(
            f"the posterior's weights are for {log_weights.shape[1]} samples with seed {posterior.weights_seed}, "
            f"not {samples} with seed {seed}"
        )
    model.eval()
    device = model.nominal_coords_A.device
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        mean = torch.as_tensor(posterior.mean[start:stop], device=device, dtype=torch.float32)
        std = torch.as_tensor(posterior.std[start:stop], device=device, dtype=torch.float32)
        noise = torch.as_tensor(posterior_noise(seed, positions[start:stop], samples, mean.shape[1]), device=device)
        if log_weights is None:
            weights = np.full((stop - start, samples), 1.0 / samples)
        else:
            weights = _normalised(log_weights[start:stop])
        average_A = np.zeros((stop - start, int(model.nominal_coords_A.shape[0]), 3))
        squares_A2 = np.zeros(average_A.shape[:2])
        weight_sum = np.zeros((stop - start, 1))
        latents = mean[:, None] + std[:, None] * noise
        kept: list[torch.Tensor] = []  # the draws, when they fit the budget; else decoded again below
        keep = (stop - start) * samples * average_A.shape[1] * 3 * 4 <= _KEPT_DRAWS_BYTES
        for k in range(samples):  # weighted Welford: stable for spreads far below the coordinates' size
            drawn = model.decode(latents[:, k], sample_segmentation=False)[0].float()
            if keep:
                kept.append(drawn)
            drawn_A = drawn.cpu().numpy().astype(np.float64)
            weight = weights[:, k : k + 1]
            weight_sum += weight
            deviation_A = drawn_A - average_A
            average_A += deviation_A * (weight / np.maximum(weight_sum, np.finfo(np.float64).tiny))[..., None]
            squares_A2 += weight * np.sum(deviation_A * (drawn_A - average_A), axis=-1)
        expected_rmsd_A = np.zeros(stop - start)
        reported_A = torch.as_tensor(average_A, device=device, dtype=torch.float32)
        for k in range(samples):  # float32 suffices for distances of tenths of an angstrom and more
            drawn = kept[k] if keep else model.decode(latents[:, k], sample_segmentation=False)[0].float()
            rmsd = (drawn - reported_A).square().sum(-1).mean(-1).sqrt()
            expected_rmsd_A += weights[:, k] * rmsd.cpu().numpy()
        yield PosteriorChunk(
            average_A.astype(np.float32), np.sqrt(np.maximum(squares_A2, 0.0)).astype(np.float32),
            (expected_rmsd_A / weight_sum[:, 0]).astype(np.float32),
        )  # fmt: skip
