"""The cryoSPHERE model: image -> latent -> per-segment rigid motions -> deformed structure -> predicted image.

Everything that has parameters runs inside forward(), so DistributedDataParallel sees every parameter used and
averages every gradient (the original implementation called submodules directly and never synchronised them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cryoflex.data.batch import ParticleBatch
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation, images_from_spectra
from cryoflex.imaging.noise import sample_noise
from cryoflex.model.deformation import deform, segment_centres_A
from cryoflex.model.losses import gaussian_image_nll
from cryoflex.model.networks import Decoder, Encoder
from cryoflex.model.segmentation import Segmentation

# The Gaussian likelihood's learned constants (parameters of CryoSphere).
LIKELIHOOD_CONSTANTS = ("log_noise_variance", "log_image_scale")


@dataclass
class ModelOutput:
    """What one forward pass produces for a batch of B images of D x D pixels and n residues, M segments."""

    # (B K, D, D) the predicted images, K samples per image, image-major, as the renderer makes them: band-limited
    # rendering makes their half spectra (B K, D, D//2 + 1), complex, which the likelihood reads without the images
    predicted: torch.Tensor
    coords_A: torch.Tensor  # (B K, n, 3), model frame (before the pose)
    latent: torch.Tensor  # (B K, L): the latent each structure was decoded from
    latent_mean: torch.Tensor  # (B, L)
    latent_std: torch.Tensor  # (B, L)
    assignment: torch.Tensor  # (n, M)
    segmentation_kl: torch.Tensor  # scalar
    # log of the images' noise variance in per-pixel units (normalised images): a scalar (white), or each image's
    # optics group's spectrum, one per Fourier shell (B, S), or (S,) when every image has the same (noise_spectra)
    log_noise_variance: torch.Tensor
    log_image_scale: torch.Tensor  # scalar: log of the scale from rendered to observed images
    sigma_A: torch.Tensor  # scalar: the width of the Gaussians rendered, in A
    # scalar, with the sleep phase: -log q(z | image) of images simulated from prior draws z (mean over them)
    sleep_nll: torch.Tensor | None = None

    def predicted_images(self, step: int = 1) -> torch.Tensor:
        """Every step-th predicted image (B K / step, D, D) (step K: each image's first draw)."""
        predicted = self.predicted[::step]
        return images_from_spectra(predicted) if predicted.is_complex() else predicted

    def predicted_spectra(self) -> torch.Tensor:
        """The predicted images' half spectra (B K, D, D//2 + 1) (torch.fft.rfft2)."""
        return self.predicted if self.predicted.is_complex() else torch.fft.rfft2(self.predicted)


class CryoSphere(nn.Module):
    """Nominal structure + segmentation + encoder/decoder + the image formation (Gaussian projector with CTF)."""

    nominal_coords_A: torch.Tensor  # buffer (n, 3): the pseudo-atoms (C-alpha / C1')
    amplitudes_e: torch.Tensor  # buffer (n,): each residue's electrons
    density_offsets_A: torch.Tensor  # buffer (n, P, 3): from each pseudo-atom to its residue's P Gaussians
    density_shares: torch.Tensor  # buffer (n, P): each Gaussian's share of its residue's electrons
    noise_optics_groups: torch.Tensor  # buffer (G,) int64, ascending: the optics groups whose noise spectra are rows

    def __init__(
        self,
        nominal_coords_A: torch.Tensor,
        amplitudes_e: torch.Tensor,
        segmentation: Segmentation,
        encoder: Encoder,
        decoder: Decoder,
        formation: ImageFormation,
        density_offsets_A: torch.Tensor | None = None,
        density_shares: torch.Tensor | None = None,
        noise_shells: int = 0,
        optics_groups: Sequence[int] = (1,),
    ):
        super().__init__()
        self.register_buffer("nominal_coords_A", nominal_coords_A.float())
        self.register_buffer("amplitudes_e", amplitudes_e.float())
        # Each residue is rendered as P Gaussians at fixed offsets from its pseudo-atom, moving rigidly with it, each
        # with its share of the residue's electrons (docs/conventions.md, "Density"): one at the heavy atoms' electron
        # centroid, or one each at the backbone's and the side chain's. Zeros put one on the pseudo-atom (C-alphas).
        self.register_buffer("density_offsets_A", torch.empty(0))
        self.register_buffer("density_shares", torch.empty(0))
        self._set_density(density_offsets_A, density_shares)
        self.segmentation = segmentation
        self.encoder = encoder
        self.decoder = decoder
        self.formation = formation
        # The Gaussian likelihood's constants, learned (maximum likelihood) on a log scale: the images' noise variance
        # (one per pixel, white, or with noise_shells one per Fourier shell for each optics group, as RELION keeps
        # them: cryoflex.imaging.noise) and the scale from rendered to observed images. Training starts them from the
        # nominal structure's fit to the first images (cryoflex.train.loop.nominal_fit).
        groups = sorted({int(g) for g in optics_groups})
        self.register_buffer("noise_optics_groups", torch.tensor(groups, dtype=torch.int64))
        spectra_shape = (len(groups), noise_shells) if noise_shells else ()
        self.log_noise_variance = nn.Parameter(torch.zeros(spectra_shape))
        self.log_image_scale = nn.Parameter(torch.zeros(()))
        # The Gaussians' width, started at the configured one; learned unless training freezes it (learn_sigma). Real
        # particles are blurred by their atoms' motion and the microscope's envelope by an amount no fixed width
        # matches, and a width the images prefer renders them better (docs/conventions.md, "Density").
        self.log_sigma_A = nn.Parameter(torch.tensor(math.log(formation.sigma_A)))
        self.network_bf16 = False  # run the encoder and decoder under bf16 autocast (CUDA); physics stays float32
        # Set (the original's; TrainConfig.sample_segmentation, true by default): training decodes with a draw from
        # the segmentation's variational posterior each step; unset: with its posterior mean, as analysis does.
        self.sample_segmentation = True
        self.sleep_phase = False  # TrainConfig.sleep_phase: train the encoder on simulated images too (sleep_nll)
        self.deformation = deform

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As nn.Module's, except that:
        - checkpoints from before the likelihood's constants were learned start them at their initial values
          (checkpoint.check_likelihood_state refuses those that were trained with a likelihood that used them),
          and those from before the width was learned keep the configured width;
        - the model renders the Gaussians the checkpoint was trained with, whatever the structure file holds now:
          saved as (n, 3) offsets without shares, one per residue; saved without offsets, one on each pseudo-atom."""
        defaults = {name: torch.zeros(()) for name in LIKELIHOOD_CONSTANTS if name not in state_dict}
        if "noise_optics_groups" not in state_dict:  # saved before spectra per optics group: one for all images
            defaults["noise_optics_groups"] = self.noise_optics_groups
            saved = state_dict.get("log_noise_variance")
            if saved is not None and saved.dim() == 1:
                defaults["log_noise_variance"] = saved.expand(len(self.noise_optics_groups), -1)
        if "log_sigma_A" not in state_dict:
            defaults["log_sigma_A"] = torch.tensor(math.log(self.formation.sigma_A))
        offsets = state_dict.get("density_offsets_A")
        if offsets is not None and offsets.dim() == 2:
            offsets = offsets[:, None]
        self._set_density(offsets, state_dict.get("density_shares"))
        density = {"density_offsets_A": self.density_offsets_A, "density_shares": self.density_shares}
        return super().load_state_dict({**state_dict, **defaults, **density}, strict, assign)

    def _set_density(self, offsets_A: torch.Tensor | None, shares: torch.Tensor | None) -> None:
        """Set the (n, P, 3) density offsets and (n, P) shares (None: one Gaussian on each pseudo-atom), and note
        whether that is what is rendered: a Python bool, so that a GPU step never waits on it."""
        n, device = len(self.nominal_coords_A), self.nominal_coords_A.device
        offsets_A = torch.zeros(n, 1, 3) if offsets_A is None else offsets_A
        shares = torch.ones(offsets_A.shape[:2]) if shares is None else shares
        fits = offsets_A.dim() == 3 and offsets_A.shape[0] == n and offsets_A.shape[2] == 3
        if not fits or shares.shape != offsets_A.shape[:2]:
            raise ValueError(f"density offsets {tuple(offsets_A.shape)} and shares {tuple(shares.shape)} do not fit "
                             f"{n} residues")  # fmt: skip
        self.density_offsets_A = offsets_A.to(device, torch.float32)
        self.density_shares = shares.to(device, torch.float32)
        self.renders_pseudo_atoms = offsets_A.shape[1] == 1 and not bool(offsets_A.any())

    def compile_deformation(self) -> None:
        """Compile the deformation with torch.compile, after a one-off compilation of about a minute. It compiles the
        dense chain (every residue through every segment: static shapes), which on a CPU is slower than the default
        banded one (docs/benchmarks.md); on a GPU, fewer kernel launches may outweigh the extra work (not measured)."""
        self.deformation = torch.compile(functools.partial(deform, dense=True), dynamic=True)

    def _network_precision(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.network_bf16)

    @property
    def sigma_A(self) -> torch.Tensor:
        """The width of the Gaussians this model renders, in A (a 0-dim tensor: learned, or fixed at the configured
        width)."""
        return self.log_sigma_A.exp()

    @property
    def nominal_density_A(self) -> torch.Tensor:
        """(n P, 3) the nominal structure's Gaussians, residue-major: pseudo-atoms plus density offsets."""
        return (self.nominal_coords_A[:, None] + self.density_offsets_A).flatten(0, 1)

    @property
    def density_amplitudes_e(self) -> torch.Tensor:
        """(n P,) the electrons of each Gaussian, in the order of nominal_density_A."""
        return (self.amplitudes_e[:, None] * self.density_shares).flatten()

    def decode(self, latent: torch.Tensor, *, sample_segmentation: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, L) -> structures (B, n, 3) in the model frame and the assignment G (n, M) used."""
        assignment = self.segmentation(sample_segmentation)
        rotation_vectors, translations_A = self._motions(latent)
        coords_A = self.deformation(self.nominal_coords_A, assignment, rotation_vectors, translations_A)
        return coords_A, assignment

    def decode_with_density(
        self, latent: torch.Tensor, *, sample_segmentation: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As decode, and also the Gaussians the images are rendered from (B, n P, 3, as nominal_density_A), each
        moved with exactly its pseudo-atom's motion (all in one deformation, about the pseudo-atoms' segment centres).
        With one Gaussian per residue on its pseudo-atom these are the structures themselves."""
        if self.renders_pseudo_atoms:
            coords_A, assignment = self.decode(latent, sample_segmentation=sample_segmentation)
            return coords_A, coords_A, assignment
        assignment = self.segmentation(sample_segmentation)
        rotation_vectors, translations_A = self._motions(latent)
        nominal_A = self.nominal_coords_A[:, None]
        points_A = torch.cat([nominal_A, nominal_A + self.density_offsets_A], dim=1)  # (n, 1 + P, 3)
        moved_A = self.deformation(
            points_A.flatten(0, 1), assignment.repeat_interleave(points_A.shape[1], dim=0), rotation_vectors,
            translations_A, centres_A=segment_centres_A(self.nominal_coords_A, assignment),
        ).unflatten(1, points_A.shape[:2])  # fmt: skip
        return moved_A[:, :, 0], moved_A[:, :, 1:].flatten(1, 2), assignment

    def _motions(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's per-segment rotation vectors and translations (B, M, 3) in float32."""
        with self._network_precision(latent.device):
            rotation_vectors, translations_A = self.decoder(latent)
        return rotation_vectors.float(), translations_A.float()

    def render(self, density_A: torch.Tensor, poses: PoseBatch, ctf: CTFBatch) -> torch.Tensor:
        """The Gaussians of decode_with_density (B, n P, 3) with this model's amplitudes -> images (B, D, D) at these
        poses, with this CTF, at this model's width."""
        return self.formation.images(density_A, self.density_amplitudes_e, poses, ctf, sigma_A=self.sigma_A)

    def render_spectra(self, density_A: torch.Tensor, poses: PoseBatch, ctf: CTFBatch) -> torch.Tensor:
        """As render, the images' half spectra (B, D, D//2 + 1) (torch.fft.rfft2), what the likelihood reads."""
        return self.formation.spectra(density_A, self.density_amplitudes_e, poses, ctf, sigma_A=self.sigma_A)

    def noise_spectra(self, optics_groups: torch.Tensor) -> torch.Tensor:
        """The noise model for images of these optics groups (B,): the white log variance (scalar), else each image's
        group's log variance per shell (B, S), or the one spectrum (S,) all share when there is one group (the same
        likelihood, without a per-image copy)."""
        if self.log_noise_variance.dim() == 0:
            return self.log_noise_variance
        if len(self.noise_optics_groups) == 1:
            return self.log_noise_variance[0]
        return self.log_noise_variance[self.noise_group_rows(optics_groups)]

    def noise_group_rows(self, optics_groups: torch.Tensor) -> torch.Tensor:
        """(B,) optics group numbers -> their rows of noise_optics_groups. A group the model has no spectrum for takes
        the nearest one above it (or the last): callers check the groups first (checkpoint.check_optics_groups)."""
        groups = self.noise_optics_groups
        return torch.searchsorted(groups, optics_groups.to(groups.device)).clamp_max(len(groups) - 1)

    def image_nll(self, latent: torch.Tensor, batch: ParticleBatch) -> torch.Tensor:
        """(B, K, L) latents, K per image of the batch -> (B, K) -log p(image | structure decoded at each) in nats, with
        the Gaussian likelihood and the segmentation's posterior mean (what analysis and validation score images by)."""
        samples = latent.shape[1]
        _, density_A, _ = self.decode_with_density(latent.flatten(0, 1), sample_segmentation=False)
        rows = torch.arange(len(batch), device=latent.device).repeat_interleave(samples)
        spectra = self.render_spectra(density_A, batch.poses[rows], batch.ctf[rows]).unflatten(0, (len(batch), samples))
        noise = noise_over_draws(self.noise_spectra(batch.optics_groups))
        return gaussian_image_nll(spectra, torch.fft.rfft2(batch.images)[:, None], noise, self.log_image_scale)

    def sleep_nll(self, batch: ParticleBatch) -> torch.Tensor:
        """Mean -log q(z | image) over one image per particle simulated from a prior draw z: the structure decoded at
        z (the segmentation's posterior mean) rendered at the particle's pose and CTF, times the image scale, plus noise
        as the likelihood models it (the likelihood's model of an image). Its gradient reaches the encoder only.

        The sleep phase of reweighted wake-sleep (Bornschein & Bengio 2015). The wake phase alone teaches the encoder
        each training image's posterior, which it then recalls by the image's noise and does not carry to new images
        (docs/low_snr.md, "The encoder memorises the particles it trains on"); fresh simulated images cannot be
        memorised."""
        latent = torch.randn(len(batch), self.encoder.latent_dim, device=batch.images.device)
        with torch.no_grad():
            _, density_A, _ = self.decode_with_density(latent, sample_segmentation=False)
            images = self.log_image_scale.exp() * self.render(density_A, batch.poses, batch.ctf)
            images = images + sample_noise(images, self.noise_spectra(batch.optics_groups))
        with self._network_precision(batch.images.device):
            mean, std = self.encoder(images)
        return -torch.distributions.Normal(mean.float(), std.float()).log_prob(latent).sum(-1).mean()

    def forward(self, batch: ParticleBatch, samples: int = 1) -> ModelOutput:
        """Training mode samples `samples` latents per image (and the segmentation, if sample_segmentation);
        evaluation mode decodes the posterior means once per image. One draw is reparameterised (the encoder learns
        through it: the evidence lower bound); several are proposals for an importance-weighted bound, detached from
        the encoder, which learns from their weights instead (cryoflex.model.losses.importance_weighted_bound), and
        with sleep_phase also from simulated images (sleep_nll)."""
        with self._network_precision(batch.images.device):
            latent_mean, latent_std = self.encoder(batch.images)
        latent_mean, latent_std = latent_mean.float(), latent_std.float()
        poses, ctf = batch.poses, batch.ctf
        if not self.training:
            latent = latent_mean
        elif samples == 1:
            latent = latent_mean + latent_std * torch.randn_like(latent_mean)
        else:
            noise = torch.randn(len(latent_mean), samples, latent_mean.shape[1], device=latent_mean.device)
            latent = (latent_mean[:, None] + latent_std[:, None] * noise).flatten(0, 1).detach()
            rows = torch.arange(len(latent_mean), device=latent_mean.device).repeat_interleave(samples)
            poses, ctf = poses[rows], ctf[rows]
        coords_A, density_A, assignment = self.decode_with_density(
            latent, sample_segmentation=self.training and self.sample_segmentation
        )
        # as the renderer makes them: spectra when band-limited, else pixels (what 1 - correlation reads)
        render = self.render_spectra if self.formation.band_limited else self.render
        predicted = render(density_A, poses, ctf)
        sleep = self.training and samples > 1 and self.sleep_phase
        return ModelOutput(
            sleep_nll=self.sleep_nll(batch) if sleep else None,
            predicted=predicted,
            coords_A=coords_A,
            latent=latent,
            latent_mean=latent_mean,
            latent_std=latent_std,
            assignment=assignment,
            segmentation_kl=self.segmentation.kl_divergence(),
            log_noise_variance=self.noise_spectra(batch.optics_groups),
            log_image_scale=self.log_image_scale,
            sigma_A=self.sigma_A,
        )


def noise_over_draws(log_noise_variance: torch.Tensor) -> torch.Tensor:
    """noise_spectra's noise model broadcast over each image's draws: each image's spectrum (B, S) -> (B, 1, S), the
    white variance and the one spectrum for all unchanged."""
    return log_noise_variance[:, None] if log_noise_variance.dim() == 2 else log_noise_variance
