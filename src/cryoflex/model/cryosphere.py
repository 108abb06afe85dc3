"""The cryoSPHERE model: image -> latent -> per-segment rigid motions -> deformed structure -> predicted image.

Everything that has parameters runs inside forward(), so DistributedDataParallel sees every parameter used and
averages every gradient (the original implementation called submodules directly and never synchronised them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cryoflex.data.batch import ParticleBatch
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.model.deformation import deform
from cryoflex.model.networks import Decoder, Encoder
from cryoflex.model.segmentation import Segmentation


@dataclass
class ModelOutput:
    """What one forward pass produces for a batch of B images of D x D pixels and n residues, M segments."""

    predicted_images: torch.Tensor  # (B, D, D)
    coords_A: torch.Tensor  # (B, n, 3), model frame (before the pose)
    latent_mean: torch.Tensor  # (B, L)
    latent_std: torch.Tensor  # (B, L)
    assignment: torch.Tensor  # (n, M)
    segmentation_kl: torch.Tensor  # scalar


class CryoSphere(nn.Module):
    """Nominal structure + segmentation + encoder/decoder + the image formation (Gaussian projector with CTF)."""

    nominal_coords_A: torch.Tensor  # buffer (n, 3)
    amplitudes_e: torch.Tensor  # buffer (n,)

    def __init__(
        self,
        nominal_coords_A: torch.Tensor,
        amplitudes_e: torch.Tensor,
        segmentation: Segmentation,
        encoder: Encoder,
        decoder: Decoder,
        formation: ImageFormation,
    ):
        super().__init__()
        self.register_buffer("nominal_coords_A", nominal_coords_A.float())
        self.register_buffer("amplitudes_e", amplitudes_e.float())
        self.segmentation = segmentation
        self.encoder = encoder
        self.decoder = decoder
        self.formation = formation
        self.network_bf16 = False  # run the encoder and decoder under bf16 autocast (CUDA); physics stays float32
        self.deformation = deform

    def compile_deformation(self) -> None:
        """Compile the deformation with torch.compile: ~4x faster forward + backward where per-operation overhead
        dominates (small structures, many segments), after a one-off compilation of about a minute on a CPU."""
        self.deformation = torch.compile(deform, dynamic=True)

    def _network_precision(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.network_bf16)

    def decode(self, latent: torch.Tensor, *, sample_segmentation: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, L) -> structures (B, n, 3) in the model frame and the assignment G (n, M) used."""
        assignment = self.segmentation(sample_segmentation)
        with self._network_precision(latent.device):
            rotation_vectors, translations_A = self.decoder(latent)
        coords_A = self.deformation(self.nominal_coords_A, assignment, rotation_vectors.float(), translations_A.float())
        return coords_A, assignment

    def render(self, coords_A: torch.Tensor, poses: PoseBatch, ctf: CTFBatch) -> torch.Tensor:
        """Structures (B, n, 3) with this model's amplitudes -> images (B, D, D) at these poses, with this CTF."""
        return self.formation.images(coords_A, self.amplitudes_e, poses, ctf)

    def forward(self, batch: ParticleBatch) -> ModelOutput:
        """Training mode samples z and the segmentation; evaluation mode uses the posterior means."""
        with self._network_precision(batch.images.device):
            latent_mean, latent_std = self.encoder(batch.images)
        latent_mean, latent_std = latent_mean.float(), latent_std.float()
        if self.training:
            latent = latent_mean + latent_std * torch.randn_like(latent_mean)
        else:
            latent = latent_mean
        coords_A, assignment = self.decode(latent, sample_segmentation=self.training)
        images = self.render(coords_A, batch.poses, batch.ctf)
        return ModelOutput(
            predicted_images=images,
            coords_A=coords_A,
            latent_mean=latent_mean,
            latent_std=latent_std,
            assignment=assignment,
            segmentation_kl=self.segmentation.kl_divergence(),
        )
