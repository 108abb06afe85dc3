"""Per-particle latent means and decoded structures from a trained model (evaluation mode: posterior means).

Evaluation mode uses the posterior means of both q(z | image) and the segmentation, so the same particle always
gives the same structure.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import ParticleDataset, particle_loader
from cryoflex.model.cryosphere import CryoSphere


def _batches(dataset: ParticleDataset, batch_size: int, num_workers: int) -> Iterator[ParticleBatch]:
    """The dataset in order, in batches of at most batch_size particles."""
    chunks = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    yield from particle_loader(dataset, chunks, num_workers=num_workers)


@torch.no_grad()
def latent_means(
    model: CryoSphere, dataset: ParticleDataset, *, batch_size: int = 256, num_workers: int = 0
) -> np.ndarray:
    """(n_particles, L) float32 means of q(z | image), in dataset order."""
    model.eval()
    device = model.nominal_coords_A.device
    out = []
    for batch in _batches(dataset, batch_size, num_workers):
        mean, _ = model.encoder(batch.images.to(device))
        out.append(mean.float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def decode_latents(model: CryoSphere, latents: np.ndarray, *, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Structures (k, n_residues, 3) float32 in A, model frame, for successive chunks of at most batch_size latents."""
    model.eval()
    device = model.nominal_coords_A.device
    for start in range(0, len(latents), batch_size):
        chunk = torch.as_tensor(latents[start : start + batch_size], device=device, dtype=torch.float32)
        coords_A, _ = model.decode(chunk, sample_segmentation=False)
        yield coords_A.float().cpu().numpy()
