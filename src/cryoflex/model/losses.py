"""cryoSPHERE losses: image correlation, KL terms, chain continuity and residue clashes.

Every function is batched over the leading dimension, differentiable, works in float32 and float64, and never
produces 0/0 or NaN, in value or gradient (the original implementation's clash loss divided 0/0 when nothing
clashed, and its distances had NaN gradients at coincident residues).

The clash loss never builds an n x n matrix: `ClashNeighbourList` keeps the residue pairs that are close in
some recent predicted structure (a Verlet list with a skin, rebuilt every few steps from a k-d tree), and
`clash_loss` evaluates only those pairs, so memory is O(batch x pairs) instead of O(batch x n^2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from cryoflex.imaging.noise import stationary_nll

# Distances computed at once when the clash list is built on a GPU: 2^26 (B x rows x n), about 1 GiB of float32
# temporaries in all.
_DISTANCE_BLOCK_ELEMENTS = 2**26
# Listed pairs screened for clashes at once: their differences over a batch of 256 structures are 3 MB of float32.
_SCREENED_PAIRS = 1024


def _safe_distance(diff: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """|diff| over axis `dim`; exactly 0 (with zero, finite gradient) where diff is exactly 0."""
    squared = (diff * diff).sum(dim=dim)
    positive = squared > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squared, torch.ones_like(squared))), 0.0)


def _safe_log(values: torch.Tensor) -> torch.Tensor:
    """log, its argument clamped to the dtype's smallest normal number: a zero std gives a finite value."""
    return torch.log(values.clamp_min(torch.finfo(values.dtype).tiny))


def correlation_loss(predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """(B, N, N) images -> (B,) 1 - Pearson correlation over pixels: 0 for a match, 2 for anti-correlation.

    An image that is constant (to rounding) has no defined correlation; it counts as correlation 0 (loss 1),
    with a finite gradient, instead of the 0/0 of the textbook formula.
    """
    predicted_flat = predicted.flatten(start_dim=1)
    observed_flat = observed.flatten(start_dim=1)
    predicted_centred = predicted_flat - predicted_flat.mean(dim=1, keepdim=True)
    observed_centred = observed_flat - observed_flat.mean(dim=1, keepdim=True)
    covariance = (predicted_centred * observed_centred).sum(dim=1)
    predicted_power = (predicted_centred * predicted_centred).sum(dim=1)
    observed_power = (observed_centred * observed_centred).sum(dim=1)
    defined = (predicted_power > _rounding_power(predicted_flat)) & (
        observed_power > _rounding_power(observed_flat)
    )
    one = torch.ones_like(covariance)
    predicted_norm = torch.sqrt(torch.where(defined, predicted_power, one))
    norm = predicted_norm * torch.sqrt(torch.where(defined, observed_power, one))
    return 1.0 - torch.where(defined, covariance / norm, 0.0)


def gaussian_image_nll(
    predicted_spectra: torch.Tensor,
    observed_spectra: torch.Tensor,
    log_noise_variance: torch.Tensor,
    log_image_scale: torch.Tensor,
) -> torch.Tensor:
    """-log p(observed | predicted) in nats (up to a constant) from the images' half spectra (torch.fft.rfft2,
    (..., N, N//2 + 1), predicted and observed broadcast against each other, e.g. (B, K, ...) draws against (B, 1,
    ...) images) -> (...): the observed image is s * predicted + b + Gaussian noise, with one scale
    s = exp(log_image_scale) for every image (learned, as the noise is) and each image's least-squares offset b. A
    scalar log_noise_variance is white noise of per-pixel variance sigma^2; one value per Fourier shell, (S,) for every
    image or (..., S) for each, is noise with that variance in each shell (cryoflex.imaging.noise.stationary_nll).

    White, with P pixels and x~ an image minus its mean: ||observed~ - s predicted~||^2 / (2 sigma^2) + P log(sigma^2)
    / 2, which the spectra give by Parseval's theorem without the images (the model renders spectra directly: an
    inverse and a forward FFT per draw fewer than in pixels).
    One shared scale, not one per image: at SNR 0.001 an image's own least-squares scale is as uncertain as its value,
    and fitting it throws away a tenth of what the image says about its conformation (the evidence then grows with
    the correlation squared instead of linearly). The offset is free: fitting it costs nothing measurable.
    """
    return stationary_nll(observed_spectra, predicted_spectra, log_image_scale, log_noise_variance)


def log_importance_weights(
    image_nll: torch.Tensor,
    latent: torch.Tensor,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """(B, K) log p(image | z_k) + kl_weight * (log p(z_k) - log q(z_k | image)) of K samples z_k ~ q(z | image).

    image_nll (B, K) is -log p(image | z_k); latent (B, K, L) the samples; latent_mean, latent_std (B, L) define q;
    p(z) = N(0, I). Normalised over k, they weight the samples into the posterior p(z | image).
    """
    standardized = (latent - latent_mean[:, None]) / latent_std[:, None]
    log_q_over_p = (0.5 * (latent.square() - standardized.square()) - _safe_log(latent_std)[:, None]).sum(-1)
    return -image_nll - kl_weight * log_q_over_p


def importance_weighted_bound(
    image_nll: torch.Tensor,
    latent: torch.Tensor,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance-weighted evidence bound (Burda et al. 2016) of each image, and the loss that fits the encoder.

    image_nll (B, K) is -log p(image | z_k) of K draws z_k ~ q(z | image), latent (B, K, L) those draws, taken as
    fixed samples (no gradient through them); latent_mean, latent_std (B, L) define q. Returns
    - (B,) bound log (1/K) sum_k w_k, w_k = p(image | z_k) (p(z_k) / q(z_k | image))^kl_weight, in nats, with q held
      fixed: it trains the decoder and the likelihood. K = 1 is the evidence lower bound; more draws tighten it towards
      log p(image), which rewards a decoder whose population explains images that say little about their own latent.
    - (B,) -sum_k w~_k log q(z_k | image) with the normalised weights w~ (reweighted wake-sleep, Bornschein & Bengio
      2015): it moves q towards the posterior the weights describe, however sharp, where the bound's own gradient
      would let q stay at the prior (the encoder is then the proposal that analysis weighs the same way).
    """
    latent = latent.detach()
    log_weights = log_importance_weights(image_nll, latent, latent_mean.detach(), latent_std.detach(), kl_weight)
    bound = torch.logsumexp(log_weights, dim=1) - math.log(log_weights.shape[1])
    standardized = (latent - latent_mean[:, None]) / latent_std[:, None]
    log_q = (-0.5 * standardized.square() - _safe_log(latent_std)[:, None] - 0.5 * math.log(2 * math.pi)).sum(-1)
    proposal_loss = -(torch.softmax(log_weights.detach(), dim=1) * log_q).sum(1)
    return bound, proposal_loss


def _rounding_power(flat: torch.Tensor) -> torch.Tensor:
    """(B,) sum of squared deviations that rounding alone can leave in a constant image (a few ulps/pixel)."""
    ulp = 8.0 * torch.finfo(flat.dtype).eps * flat.detach().abs().amax(dim=1)
    return flat.shape[1] * ulp * ulp


def standard_normal_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B,) KL(N(mean, diag std^2) || N(0, I)), summed over the L latent dimensions."""
    return 0.5 * (mean * mean + std * std - 1.0 - 2.0 * _safe_log(std)).sum(dim=-1)


def consecutive_pairs(chain_ids: Sequence[str] | np.ndarray) -> torch.Tensor:
    """(P, 2) int64 pairs (i, i + 1) of residues that follow each other in file order in the same chain."""
    same_chain_next = _same_chain_next(chain_ids)
    first = torch.from_numpy(np.flatnonzero(same_chain_next).astype(np.int64))
    return torch.stack([first, first + 1], dim=1)


def _same_chain_next(chain_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """(n - 1,) bool: residue i + 1 is in the same chain as residue i."""
    ids = np.asarray(chain_ids, dtype=str)
    return ids[1:] == ids[:-1]


def continuity_loss(
    coords_A: torch.Tensor, first_residues: torch.Tensor, reference_distances_A: torch.Tensor
) -> torch.Tensor:
    """(B, n, 3), (P,) residues i followed by i + 1 in their chain (consecutive_pairs(...)[:, 0]) -> (B,) mean over
    those pairs of (d - d_ref)^2 in A^2 (keeps consecutive C-alpha distances). 0 when there are none (no 0/0).

    Every distance between neighbours in file order is taken from two shifted slices of the structures,
    component-major (B, 3, n) as the deformation holds them (the transposed view costs nothing), and the pairs pick
    theirs: 0.53x the time of gathering both residues of every pair, forward and backward (2,750 residues).
    """
    columns = coords_A.transpose(1, 2)
    distances_A = _safe_distance(columns[..., 1:] - columns[..., :-1], dim=1)
    squared_error = (
        distances_A.index_select(1, first_residues.to(coords_A.device)) - reference_distances_A.to(coords_A)
    ) ** 2
    return squared_error.sum(dim=-1) / max(len(first_residues), 1)


class ClashNeighbourList:
    """Verlet-style list of candidate clash pairs: residue pairs that are not consecutive in a chain (i.e. not
    in consecutive_pairs, and not i == j), whose distance in ANY structure of the batch given to update() is
    below cutoff_A + skin_A. Rebuilt by the caller every few steps from the current predicted structures
    (no grad), so clash memory is O(batch x pairs), never O(batch x n^2)."""

    def __init__(
        self, chain_ids: Sequence[str] | np.ndarray, *, cutoff_A: float = 4.0, skin_A: float = 2.0
    ) -> None:
        if cutoff_A <= 0 or skin_A < 0:
            raise ValueError(f"need cutoff_A > 0 and skin_A >= 0, got {cutoff_A} and {skin_A}")
        self.cutoff_A = float(cutoff_A)
        self.skin_A = float(skin_A)
        self._same_chain_next = _same_chain_next(chain_ids)
        self.n_residues = len(chain_ids)
        self.pairs = torch.zeros((0, 2), dtype=torch.int64)

    def update(self, coords_A: torch.Tensor) -> torch.Tensor:
        """(B, n, 3) or (n, 3) -> (P, 2) int64 pairs i < j, stored in self.pairs, on the device of coords_A.

        On a CPU, one k-d tree per structure in float64; the pairs are the union over the batch, by hashing
        (pandas.unique: most pairs recur in every structure, 12.5 million keys of 256 structures of 13,941 residues
        hold 85,000 distinct pairs; 9x faster than sorting them all). On an accelerator, where the trees' 0.27 s per
        rebuild at 13,941 residues (32 structures, this project's CPU) would outweigh a whole step, every distance
        is computed on the GPU (close_pair_keys_by_distance).
        """
        structures = coords_A.detach()
        if structures.ndim == 2:
            structures = structures[None]
        if structures.ndim != 3 or structures.shape[1:] != (self.n_residues, 3):
            raise ValueError(
                f"coords_A must have shape (B, {self.n_residues}, 3), got {tuple(coords_A.shape)}"
            )
        radius_A = self.cutoff_A + self.skin_A
        n = self.n_residues
        if _builds_on_device(structures.device):
            keys = close_pair_keys_by_distance(structures, radius_A).cpu().numpy()
        else:
            keys = _close_pair_keys_by_trees(structures.to(torch.float64).numpy(), radius_A)
        first, second = np.divmod(keys, n)
        consecutive = (second - first == 1) & self._same_chain_next[first]
        pairs = np.stack([first[~consecutive], second[~consecutive]], axis=1)
        self.pairs = torch.from_numpy(pairs).to(coords_A.device)
        return self.pairs


def _close_pair_keys_by_trees(structures: np.ndarray, radius_A: float) -> np.ndarray:
    """(B, n, 3) -> the sorted distinct keys i * n + j (i < j) of the pairs closer than radius_A in any structure,
    by one k-d tree per structure; cKDTree releases the GIL while it searches, so threads give a real speed-up."""
    n = structures.shape[1]

    def keys_of(points: np.ndarray) -> np.ndarray:
        return _pair_keys(cKDTree(points).query_pairs(radius_A, output_type="ndarray"), n)

    with ThreadPoolExecutor(max_workers=max(1, min(len(structures), os.cpu_count() or 1))) as pool:
        keys = np.concatenate(list(pool.map(keys_of, structures)))
    return np.sort(pd.unique(keys))


def _builds_on_device(device: torch.device) -> bool:
    """Whether the clash list is built from every distance on the structures' device (a GPU) rather than by k-d
    trees on the CPU."""
    return device.type == "cuda"


def close_pair_keys_by_distance(structures: torch.Tensor, radius_A: float) -> torch.Tensor:
    """(B, n, 3) -> the sorted distinct keys i * n + j (i < j) of the pairs closer than radius_A in any structure,
    from every squared distance, computed where the structures are in blocks of rows (up to _DISTANCE_BLOCK_ELEMENTS
    at once, never B x n x n): elementwise work, coordinate by coordinate (differences, not the matrix-product
    expansion, whose cancellation would err at pairs far from the origin)."""
    batch, n, _ = structures.shape
    rows = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, batch * n))
    components = structures.permute(2, 0, 1)  # (3, B, n)
    keys = [structures.new_zeros(0, dtype=torch.int64)]
    for start in range(0, n, rows):
        squared = structures.new_zeros(batch, min(rows, n - start), n)
        for component in components:
            squared.add_((component[:, start : start + rows, None] - component[:, None, :]).square_())
        first, second = (squared < radius_A**2).any(dim=0).nonzero(as_tuple=True)  # row-major: sorted keys
        first = first + start
        upper = second > first
        keys.append(first[upper] * n + second[upper])
    return torch.cat(keys)


def _pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    """(K, 2) index pairs i < j -> (K,) int64 keys i * n + j, so that a union is one pass over the keys."""
    pairs = pairs.astype(np.int64, copy=False).reshape(-1, 2)
    return pairs[:, 0] * n + pairs[:, 1]


def clash_loss(coords_A: torch.Tensor, pairs: torch.Tensor, *, cutoff_A: float = 4.0) -> torch.Tensor:
    """(B, n, 3), (P, 2) -> (B,) sum over pairs of relu(cutoff - d)^2, divided by n (a fixed normaliser).

    Dividing by the residue count rather than by the number of clashing pairs keeps the value finite and
    continuous when nothing clashes or when the neighbour list is rebuilt. Only a structure's pairs closer than the
    cutoff add to the value or the gradient, a few percent of the list's B x P. On a CPU they are found without
    gradient (_close_entries) and the loss is taken on them alone, 0.28x the time of taking it on every listed pair,
    forward and backward (2,750 residues, 8,146 pairs, 256 structures). Elsewhere every listed pair is taken: finding
    the close ones would wait on the device once per step (torch.nonzero), where memory bandwidth makes the dense
    form cheap. Memory O(B x P).
    """
    pairs = pairs.to(coords_A.device)
    if not _screens_close_pairs(coords_A.device):
        columns = coords_A.transpose(1, 2)  # component-major, as the deformation holds the structures
        distances_A = _safe_distance(columns.index_select(2, pairs[:, 0]) - columns.index_select(2, pairs[:, 1]), dim=1)
        return _clash_sum(distances_A, cutoff_A) / coords_A.shape[1]
    with torch.no_grad():
        structures, listed = _close_entries(coords_A, pairs, cutoff_A)
    first, second = pairs[listed, 0], pairs[listed, 1]
    overlaps = torch.relu(cutoff_A - _safe_distance(coords_A[structures, first] - coords_A[structures, second])) ** 2
    return coords_A.new_zeros(len(coords_A)).index_add(0, structures, overlaps) / coords_A.shape[1]


def _screens_close_pairs(device: torch.device) -> bool:
    """Whether clash_loss finds a structure's close pairs first (on a CPU) rather than taking every listed pair."""
    return device.type == "cpu"


def _close_entries(coords_A: torch.Tensor, pairs: torch.Tensor, cutoff_A: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, 3), (P, 2) -> the structure and the pair (K,), (K,) of each pair closer than cutoff_A in a structure.

    The structures are laid out residue-major, (n, 3, B), so each pair gathers two contiguous rows and the
    differences run along the batch; _SCREENED_PAIRS pairs at a time, so the differences stay in cache."""
    rows = coords_A.permute(1, 2, 0).contiguous()
    close = torch.empty(len(pairs), len(coords_A), dtype=torch.bool, device=coords_A.device)
    for start in range(0, len(pairs), _SCREENED_PAIRS):
        block = pairs[start : start + _SCREENED_PAIRS]
        differences = rows.index_select(0, block[:, 0]) - rows.index_select(0, block[:, 1])
        torch.lt(differences.square_().sum(1), cutoff_A**2, out=close[start : start + _SCREENED_PAIRS])
    listed, structures = close.nonzero(as_tuple=True)
    return structures, listed


def _clash_sum(distances_A: torch.Tensor, cutoff_A: float) -> torch.Tensor:
    """(B, P) -> (B,) sum of squared overlaps relu(cutoff - d)^2."""
    return (torch.relu(cutoff_A - distances_A) ** 2).sum(dim=-1)


def dense_clash_loss(
    coords_A: torch.Tensor, chain_ids: Sequence[str] | np.ndarray, *, cutoff_A: float = 4.0
) -> torch.Tensor:
    """clash_loss over every non-consecutive pair, computed densely: O(B n^2) memory and time.

    A reference for tests and for small structures only; training uses ClashNeighbourList + clash_loss.
    """
    n = coords_A.shape[1]
    upper = torch.triu(torch.ones((n, n), dtype=torch.bool, device=coords_A.device), diagonal=1)
    consecutive = consecutive_pairs(chain_ids).to(coords_A.device)
    upper[consecutive[:, 0], consecutive[:, 1]] = False
    first, second = upper.nonzero(as_tuple=True)
    distances_A = _safe_distance(coords_A[:, :, None, :] - coords_A[:, None, :, :])[:, first, second]
    return _clash_sum(distances_A, cutoff_A) / n
