"""Variational Gaussian mixture over residue position -> soft assignment G of residues to segments (cryoSPHERE).

Each segmented part (the whole structure, a chain, or a residue range) has its own mixture of M components over the
residue's normalised position u in [0, 1] along the part (u = k / (n_part - 1) for its k-th residue, file order).
Component m has mean mu_m, width sigma_m and logit alpha_m; G_im = softmax_m(tau * (log N(u_i | mu_m, sigma_m^2) +
log softmax(alpha)_m)), i.e. the paper's (phi pi)^tau / sum_k (phi pi)^tau computed in log space (no overflow, rows
sum to 1 exactly). Residues outside every part get an all-zero row of G and so never move.

Scaling of the priors (a deliberate change from the paper's standard normals on raw residue indices, which would pull
every segment centre towards residue 0 whatever the chain length): positions are normalised to [0, 1] and
  mu_m ~ N(0.5, 1)                          weakly informative over the whole part, whatever its length,
  s_m ~ N(0, 1), sigma_m = (ELU(s_m) + 1) / (2 M) + 1 / (2 n_part)   width 1/(2M) at the prior mean, never below half a
                                                                     residue (so never 0, never NaN),
  alpha_m ~ N(0, 1).
Each of mu, s, alpha has a Gaussian variational posterior (learned mean and std, std = softplus + 1e-6), shared by all
images. Evaluation uses the posterior means, so the same latent always decodes to the same structure. Training
draws them once per step (reparameterised; TrainConfig.sample_segmentation, the default, the original's). With
sample_segmentation false training uses the means too: they are then a MAP estimate, the KL's mean term being their
negative log prior, and the stds, which enter only the KL, relax to the prior's (docs/low_snr.md, "The
segmentation: one for training and analysis").
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cryoflex.io.residues import select_residues
from cryoflex.io.structure import Structure

_MIN_POSTERIOR_STD = 1e-6


@dataclass(frozen=True)
class SegmentedPart:
    """Residues (0-based positions in the structure, file order) cut into n_segments by one mixture."""

    label: str
    residue_indices: np.ndarray
    n_segments: int


def _softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))


class VariationalParameter(nn.Module):
    """A vector with a Gaussian posterior N(mean, std^2) (std = softplus(raw) + 1e-6) and a Gaussian prior."""

    def __init__(self, initial_mean: torch.Tensor, initial_std: float, prior_mean: float, prior_std: float):
        super().__init__()
        self.mean = nn.Parameter(initial_mean.clone().float())
        self.raw_std = nn.Parameter(torch.full_like(self.mean, _softplus_inverse(initial_std)))
        self.prior_mean = prior_mean
        self.prior_std = prior_std

    @property
    def std(self) -> torch.Tensor:
        return F.softplus(self.raw_std) + _MIN_POSTERIOR_STD

    def value(self, sample: bool) -> torch.Tensor:
        """A reparameterised sample when `sample`, else the posterior mean."""
        if not sample:
            return self.mean
        return self.mean + self.std * torch.randn_like(self.mean)

    def kl_divergence(self) -> torch.Tensor:
        """KL(posterior || prior), summed over the vector."""
        std = self.std
        ratio = std / self.prior_std
        offset = (self.mean - self.prior_mean) / self.prior_std
        return 0.5 * (ratio.square() + offset.square() - 1.0).sum() - torch.log(ratio).sum()


class PartMixture(nn.Module):
    """The variational mixture of one part: -> G_part (n_part, M)."""

    positions: torch.Tensor  # buffer (n_part,): residue positions scaled to [0, 1]

    def __init__(self, n_residues: int, n_segments: int, *, tau: float):
        super().__init__()
        if n_segments < 1 or n_residues < 1:
            raise ValueError(f"need at least one residue and one segment, got {n_residues} and {n_segments}")
        self.n_segments = n_segments
        self.tau = tau
        self.min_width = 0.5 / n_residues
        positions = torch.arange(n_residues, dtype=torch.float32) / max(n_residues - 1, 1)
        self.register_buffer("positions", positions, persistent=False)
        centres = (torch.arange(n_segments, dtype=torch.float32) + 0.5) / n_segments
        self.mu = VariationalParameter(centres, initial_std=0.01, prior_mean=0.5, prior_std=1.0)
        self.s = VariationalParameter(torch.zeros(n_segments), initial_std=0.05, prior_mean=0.0, prior_std=1.0)
        self.alpha = VariationalParameter(torch.zeros(n_segments), initial_std=0.05, prior_mean=0.0, prior_std=1.0)

    def widths(self, s: torch.Tensor) -> torch.Tensor:
        """sigma_m = (ELU(s) + 1) / (2 M) + half a residue: positive for every real s."""
        return (F.elu(s) + 1.0) / (2 * self.n_segments) + self.min_width

    def forward(self, sample: bool) -> torch.Tensor:
        mu, s, alpha = self.mu.value(sample), self.s.value(sample), self.alpha.value(sample)
        sigma = self.widths(s)
        z = (self.positions[:, None] - mu) / sigma
        log_density = -0.5 * z.square() - torch.log(sigma)
        log_weights = torch.log_softmax(alpha, dim=0)
        return torch.softmax(self.tau * (log_density + log_weights), dim=1)

    def kl_divergence(self) -> torch.Tensor:
        return self.mu.kl_divergence() + self.s.kl_divergence() + self.alpha.kl_divergence()


class Segmentation(nn.Module):
    """All parts' mixtures -> G (n_residues, M_total); residues in no part have zero rows (they stay fixed)."""

    def __init__(self, n_residues: int, parts: Sequence[SegmentedPart], *, tau: float = 20.0):
        super().__init__()
        if not parts:
            raise ValueError("at least one segmented part is needed")
        seen = np.zeros(n_residues, dtype=bool)
        for part in parts:
            if seen[part.residue_indices].any():
                raise ValueError(f"part {part.label} overlaps another part")
            seen[part.residue_indices] = True
        self.n_residues = n_residues
        self.segments_per_part = [part.n_segments for part in parts]
        self.mixtures = nn.ModuleList(PartMixture(len(p.residue_indices), p.n_segments, tau=tau) for p in parts)
        for k, part in enumerate(parts):
            self.register_buffer(f"indices_{k}", torch.as_tensor(part.residue_indices, dtype=torch.long))

    @property
    def n_segments(self) -> int:
        return sum(self.segments_per_part)

    def part_mixtures(self) -> list[PartMixture]:
        """The parts' mixtures in order, typed (iterating an nn.ModuleList yields plain Modules)."""
        return [cast(PartMixture, mixture) for mixture in self.mixtures]

    def forward(self, sample: bool) -> torch.Tensor:
        mixtures = self.part_mixtures()
        assignment = mixtures[0].positions.new_zeros(self.n_residues, self.n_segments)
        column = 0
        for k, mixture in enumerate(mixtures):
            rows = getattr(self, f"indices_{k}")
            assignment = assignment.index_put((rows,), _pad_columns(mixture(sample), column, self.n_segments))
            column += mixture.n_segments
        return assignment

    def kl_divergence(self) -> torch.Tensor:
        return torch.stack([mixture.kl_divergence() for mixture in self.part_mixtures()]).sum()


def _pad_columns(block: torch.Tensor, first_column: int, n_columns: int) -> torch.Tensor:
    return F.pad(block, (first_column, n_columns - first_column - block.shape[1]))


_PART_PATTERN = re.compile(r"^(?P<group>.+):(?P<segments>\d+)$")


def parse_parts(
    specs: Sequence[str], structure: Structure, default_segments: int, *, warn: bool = True
) -> list[SegmentedPart]:
    """Parts from specs like "A:8" (all of chain A, 8 segments) or "A:1-120:3" (chain A residues 1..120, 3 segments).

    No specs: the whole structure is one part with default_segments. Raises ValueError with the reason for bad specs;
    with `warn`, warns of a residue range that reaches past its chain.
    """
    if not specs:
        return [SegmentedPart("all", np.arange(structure.n_residues), default_segments)]
    parts = []
    for spec in specs:
        match = _PART_PATTERN.match(spec.strip())
        if match is None:
            raise ValueError(
                f"segment part {spec!r}: expected CHAIN:SEGMENTS or CHAIN:START-END:SEGMENTS, e.g. A:1-120:3"
            )
        try:
            indices = select_residues(match["group"], structure, warn=warn)
        except ValueError as error:
            raise ValueError(f"segment part {spec!r}: {error}") from None
        parts.append(SegmentedPart(spec.strip(), indices, int(match["segments"])))
    return parts
