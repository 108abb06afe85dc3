"""The training objective: the loss terms of a batch, their weights and schedules.

Loss per image (then averaged over the batch), in nats: minus an evidence bound, plus structural priors,
  -log (1/K) sum_k p(image | z_k) (p(z_k) / q(z_k | image))^w_latent   (K = importance_samples draws of z)
  + w_segmentation * KL(GMM posteriors || priors) / n_images   (the dataset-level KL, shared out over the images)
  + w_continuity * mean (d(i, i+1) - d_nominal(i, i+1))^2       (consecutive C-alpha of a chain, every draw)
  + w_clash * sum over non-consecutive pairs of relu(cutoff - d)^2 / n_residues   (from a neighbour list)
p(image | structure) is Gaussian noise of learned variance (per Fourier shell, or white) about the rendered image
times a learned scale (one for all images), at the image's best offset. w_latent ramps linearly from 0 over
latent_kl_warmup_epochs to 1, where the first term is the importance-weighted evidence bound (K = 1: the evidence
lower bound, -log p(image | z) + KL(q || N(0, I)), with the KL exact).
The likelihood's pull shrinks with the images' SNR, so an uninformative image's latent stays at the prior instead of
following the noise, and with K > 1 the bound rewards a decoder whose population of structures explains images that
say little about their own latent (at low SNR, where the encoder cannot tell). With K > 1 the draws are fixed
samples for the encoder, which learns from the loss -sum_k w~_k log q(z_k | image) added to the total (reweighted
wake-sleep, with the draws' normalised weights w~; logged as "proposal", the bound as "evidence_bound"); with
sleep_phase also -log q(z | image) of one image per particle simulated from a prior draw z (logged as "sleep").
likelihood "correlation" replaces -log p(image | z) by 1 - correlation with K = 1 (the original cryoSPHERE objective;
its weights, config.CORRELATION_WEIGHTS by default, are then relative to a term in [0, 2]).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cryoflex.config import TrainConfig
from cryoflex.data.batch import ParticleBatch
from cryoflex.imaging.noise import per_pixel_variance
from cryoflex.model.cryosphere import CryoSphere, ModelOutput, noise_over_draws
from cryoflex.model.losses import (
    ClashNeighbourList,
    clash_loss,
    consecutive_pairs,
    continuity_loss,
    correlation_loss,
    gaussian_image_nll,
    importance_weighted_bound,
    standard_normal_kl,
)

# The name of the image term in metrics.jsonl, TensorBoard and the report: it is 1 - correlation (0 = perfect fit).
IMAGE_TERM = "one_minus_correlation"
# The Gaussian likelihood's term: -log p(image | structure) in nats (likelihood "gaussian", the default).
NLL_TERM = "image_nll"
# Draws of the prior per held-out image for its log evidence (prior_log_evidence), rendered this many at a time:
# 32 rank the checkpoints of the SNR 0.1 benchmark run as 64 do, at half the cost
# (benchmarks/results/held_out_particles.json).
EVIDENCE_DRAWS = 32
EVIDENCE_DRAWS_PER_PASS = 8


@torch.no_grad()
def prior_log_evidence(model: CryoSphere, batch: ParticleBatch, generator: torch.Generator) -> torch.Tensor:
    """(B,) log p(image) in nats (up to the likelihood's constant) under the model with the Gaussian likelihood,
    estimated as log (1/K) sum_k p(image | z_k) over K = EVIDENCE_DRAWS draws of the prior N(0, I) from `generator`
    (an importance-sampled evidence with the prior as proposal: a lower bound in expectation), segmentation at its
    posterior mean.

    It scores the model alone. The encoder reads images it did not train on poorly, so an evidence or a loss taken
    with its q(z | image) for held-out particles also scores how well it reads them, and that worsens as training
    goes on while the model improves (docs/low_snr.md, "The encoder memorises the particles it trains on")."""
    device = batch.images.device
    latent_dim = model.encoder.latent_dim
    log_likelihoods = []
    for start in range(0, EVIDENCE_DRAWS, EVIDENCE_DRAWS_PER_PASS):
        draws = min(EVIDENCE_DRAWS_PER_PASS, EVIDENCE_DRAWS - start)
        latent = torch.randn(len(batch), draws, latent_dim, generator=generator).to(device)
        log_likelihoods.append(-model.image_nll(latent, batch))
    return torch.logsumexp(torch.cat(log_likelihoods, dim=1), dim=1) - math.log(EVIDENCE_DRAWS)


def correlation_term(output: ModelOutput, observed: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Mean 1 - correlation of the predicted images (B x samples, image-major) with the observed ones (B, N, N).

    The objective with likelihood "correlation" (one draw per image). With the Gaussian likelihood it is only
    reported, so it is taken without gradient on each image's first draw: an unbiased estimate of the mean over the
    draws, for 1/samples of the work (7 ms of an 84 ms default step at 214 residues and 64 px).
    """
    if likelihood == "correlation":  # TrainConfig.draws_per_image: always one draw
        return correlation_loss(output.predicted_images(), observed).mean()
    samples = len(output.latent) // len(observed)
    with torch.no_grad():
        return correlation_loss(output.predicted_images(step=samples), observed).mean()


class LossTerms:
    """The loss of one batch, term by term, with the configured weights and schedules."""

    def __init__(self, config: TrainConfig, model: CryoSphere, chain_ids: Any, n_images: int):
        self.config = config
        self.n_images = n_images
        nominal = model.nominal_coords_A
        self.pairs = consecutive_pairs(chain_ids).to(nominal.device)
        if len(self.pairs):
            self.reference_A = (nominal[self.pairs[:, 0]] - nominal[self.pairs[:, 1]]).norm(dim=-1)
        else:
            self.reference_A = nominal.new_zeros(0)
        self.neighbours = ClashNeighbourList(chain_ids, cutoff_A=config.clash_cutoff_A, skin_A=config.clash_skin_A)

    def latent_kl_weight(self, epoch_progress: float) -> float:
        """The latent KL weight after `epoch_progress` epochs (linear warm-up from 0)."""
        warmup = self.config.latent_kl_warmup_epochs
        ramp = 1.0 if warmup <= 0 else min(1.0, epoch_progress / warmup)
        return self.config.latent_kl_weight * ramp

    def __call__(
        self, output: ModelOutput, observed: torch.Tensor, epoch_progress: float, rebuild_neighbours: bool
    ) -> dict[str, torch.Tensor]:
        config = self.config
        samples = len(output.latent) // len(observed)
        terms = {
            IMAGE_TERM: correlation_term(output, observed, config.likelihood),
            "latent_kl": standard_normal_kl(output.latent_mean, output.latent_std).mean(),
            "segmentation_kl": output.segmentation_kl / self.n_images,
        }
        kl_weight = self.latent_kl_weight(epoch_progress)
        if config.likelihood == "gaussian":
            image_nll = gaussian_image_nll(  # (B, samples): each image's spectrum against its draws'
                output.predicted_spectra().unflatten(0, (len(observed), samples)), torch.fft.rfft2(observed)[:, None],
                noise_over_draws(output.log_noise_variance), output.log_image_scale,
            )  # fmt: skip
            terms[NLL_TERM] = image_nll.mean()
            # reported, not losses; the noise as one per-pixel variance, whatever its spectrum (the batch's mean)
            terms["noise_variance"] = per_pixel_variance(output.log_noise_variance.detach(), observed.shape[-1])
            terms["image_scale"] = output.log_image_scale.detach().exp()
        if samples > 1:
            bound, proposal_loss = importance_weighted_bound(
                image_nll, output.latent.view(len(observed), samples, -1), output.latent_mean, output.latent_std,
                kl_weight,
            )
            terms["proposal"] = proposal_loss.mean()
            terms["evidence_bound"] = bound.detach().mean()  # reported: the total holds it with the proposal's loss
            data_term = terms["proposal"] - bound.mean()
        else:
            image_term = terms[NLL_TERM if config.likelihood == "gaussian" else IMAGE_TERM]
            data_term = image_term + kl_weight * terms["latent_kl"]
        total = data_term + config.segmentation_kl_weight * terms["segmentation_kl"]
        if config.continuity_weight > 0 and len(self.pairs):
            terms["continuity"] = continuity_loss(output.coords_A, self.pairs[:, 0], self.reference_A).mean()
            total = total + config.continuity_weight * terms["continuity"]
        if config.clash_weight > 0:
            if rebuild_neighbours:  # from each image's first draw: the list serves the next steps' draws anyway
                first_draws = output.coords_A.detach().unflatten(0, (len(observed), samples))[:, 0]
                self.neighbours.update(first_draws)
            pairs = self.neighbours.pairs.to(output.coords_A.device)
            terms["clash"] = clash_loss(output.coords_A, pairs, cutoff_A=config.clash_cutoff_A).mean()
            total = total + config.clash_weight * terms["clash"]
        if output.sleep_nll is not None:  # the sleep phase: the encoder on simulated images
            terms["sleep"] = output.sleep_nll
            total = total + output.sleep_nll
        terms["total"] = total
        terms["sigma_A"] = output.sigma_A.detach()  # reported, not a loss: the Gaussians' (learned) width
        return terms
