"""The training objective: the loss terms of a batch, their weights and schedules.

Loss per image (then averaged over the batch):
  (1 - correlation(predicted, observed))
  + w_latent(epoch) * KL(q(z | image) || N(0, I))
  + w_segmentation * KL(GMM posteriors || priors) / n_images   (the dataset-level KL, shared out over the images)
  + w_continuity * mean (d(i, i+1) - d_nominal(i, i+1))^2       (consecutive C-alpha of a chain)
  + w_clash * sum over non-consecutive pairs of relu(cutoff - d)^2 / n_residues   (from a neighbour list)
w_latent ramps linearly from 0 over latent_kl_warmup_epochs.
"""

from __future__ import annotations

from typing import Any

import torch

from cryoflex.config import TrainConfig
from cryoflex.model.cryosphere import CryoSphere, ModelOutput
from cryoflex.model.losses import (
    ClashNeighbourList,
    clash_loss,
    consecutive_pairs,
    continuity_loss,
    correlation_loss,
    standard_normal_kl,
)

# The name of the image term in metrics.jsonl, TensorBoard and the report: it is 1 - correlation (0 = perfect fit).
IMAGE_TERM = "one_minus_correlation"


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
        terms = {
            IMAGE_TERM: correlation_loss(output.predicted_images, observed).mean(),
            "latent_kl": standard_normal_kl(output.latent_mean, output.latent_std).mean(),
            "segmentation_kl": output.segmentation_kl / self.n_images,
        }
        total = (
            terms[IMAGE_TERM]
            + self.latent_kl_weight(epoch_progress) * terms["latent_kl"]
            + config.segmentation_kl_weight * terms["segmentation_kl"]
        )
        if config.continuity_weight > 0 and len(self.pairs):
            terms["continuity"] = continuity_loss(output.coords_A, self.pairs, self.reference_A).mean()
            total = total + config.continuity_weight * terms["continuity"]
        if config.clash_weight > 0:
            if rebuild_neighbours:
                self.neighbours.update(output.coords_A.detach())
            pairs = self.neighbours.pairs.to(output.coords_A.device)
            terms["clash"] = clash_loss(output.coords_A, pairs, cutoff_A=config.clash_cutoff_A).mean()
            total = total + config.clash_weight * terms["clash"]
        terms["total"] = total
        return terms
