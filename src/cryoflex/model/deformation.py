"""cryoSPHERE's deformation: per-segment rigid motions blended by the soft segmentation G.

Residue i is rotated successively, for m = 1..M, about segment m's centre c_m by the rotation vector G_im omega_m
(axis omega_m / |omega_m|, angle G_im |omega_m|), then translated by sum_m G_im t_m. With a one-hot G every segment
moves exactly rigidly (the other segments' rotations have angle 0, i.e. are the identity). The centre c_m is the
G-weighted centroid of the nominal structure, so a segment's rotation does not also translate it; this keeps rotation
and translation decoupled for the decoder. Rodrigues' formula is evaluated with Taylor series near angle 0, so angle 0
is exactly the identity and gradients stay finite.
"""

from __future__ import annotations

import torch

_SMALL_ANGLE_SQUARED = 1e-6


def _rodrigues_coefficients(angle_squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos t, sin t / t, (1 - cos t) / t^2 as functions of t^2, exact near 0 (Taylor) and finite everywhere."""
    small = angle_squared < _SMALL_ANGLE_SQUARED
    t2 = torch.where(small, torch.zeros_like(angle_squared), angle_squared)
    angle = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    cos, sin = torch.cos(angle), torch.sin(angle)
    s2 = angle_squared
    cos_t = torch.where(small, 1.0 - s2 / 2 + s2.square() / 24, cos)
    sinc_t = torch.where(small, 1.0 - s2 / 6 + s2.square() / 120, sin / angle)
    versine_t = torch.where(small, 0.5 - s2 / 24 + s2.square() / 720, (1.0 - cos) / torch.where(small, 1.0, t2))
    return cos_t, sinc_t, versine_t


def segment_centres_A(coords_A: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """G-weighted centroids (M, 3) of the nominal coordinates (n, 3); an empty segment gets the origin."""
    mass = assignment.sum(0)
    weighted = assignment.transpose(0, 1) @ coords_A
    return weighted / mass.clamp_min(1e-6)[:, None]


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) matrices K with K p = v x p."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))


def rotation_matrices(rotation_vectors: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (..., 3) -> matrices (..., 3, 3): the full-weight (G_im = 1) rotation that deform applies.

    R = cos t I + sinc(t) K + (1 - cos t) / t^2 w w^T (Rodrigues, K the cross-product matrix of w), with the same
    Taylor-safe coefficients as deform, so a one-hot segment's motion is R_m (x - c_m) + c_m + t_m exactly.
    """
    cos_t, sinc_t, versine_t = _rodrigues_coefficients(rotation_vectors.square().sum(-1))
    identity = torch.eye(3, dtype=rotation_vectors.dtype, device=rotation_vectors.device)
    outer = rotation_vectors[..., :, None] * rotation_vectors[..., None, :]
    return (
        cos_t[..., None, None] * identity
        + sinc_t[..., None, None] * _skew(rotation_vectors)
        + versine_t[..., None, None] * outer
    )


def deform(
    coords_A: torch.Tensor,
    assignment: torch.Tensor,
    rotation_vectors: torch.Tensor,
    translations_A: torch.Tensor,
) -> torch.Tensor:
    """Nominal coords (n, 3), G (n, M), per-image rotation vectors (B, M, 3) and translations (B, M, 3) -> (B, n, 3).

    Rotating p by G_im w_m (Rodrigues, with t = G_im |w_m|):
        p cos t + G_im sinc(t) (w_m x p) + G_im^2 (1 - cos t) / t^2 (w_m . p) w_m,
    so the per-residue part is three scalars; w x p and (w . p) w are one small matmul per segment. All scalars for
    all segments are computed at once, leaving a short loop of a few batched operations per segment.
    """
    batch, n_segments = rotation_vectors.shape[:2]
    if assignment.shape[1] != n_segments or translations_A.shape != rotation_vectors.shape:
        raise ValueError(
            f"G has {assignment.shape[1]} segments, rotations {tuple(rotation_vectors.shape)}, "
            f"translations {tuple(translations_A.shape)}"
        )
    centres_A = segment_centres_A(coords_A, assignment)
    angle_squared = assignment.square() * rotation_vectors.square().sum(-1)[:, None, :]  # (B, n, M)
    cos_t, sinc_t, versine_t = _rodrigues_coefficients(angle_squared)
    cross_coefficient = assignment * sinc_t
    outer_coefficient = assignment.square() * versine_t
    # per segment: p @ [K^T | w w^T] gives (w x p, (w . p) w) side by side
    operators = torch.cat(
        [_skew(rotation_vectors).transpose(-1, -2), rotation_vectors[..., :, None] * rotation_vectors[..., None, :]],
        dim=-1,
    )  # (B, M, 3, 6)
    # Work relative to the current segment's centre: going on to the next one is a single shift. steps_A[k] is
    # c_k - c_(k-1) with c_(-1) = c_M = 0, so the loop starts relative to c_0 and ends back in absolute coordinates.
    steps_A = torch.diff(centres_A, dim=0, prepend=centres_A.new_zeros(1, 3), append=centres_A.new_zeros(1, 3))
    relative = coords_A.expand(batch, -1, -1) - steps_A[0]
    for m in range(n_segments):
        cross, outer = torch.bmm(relative, operators[:, m]).split(3, dim=-1)
        rotated = torch.addcmul(relative * cos_t[..., m, None], cross, cross_coefficient[..., m, None])
        relative = torch.addcmul(rotated, outer, outer_coefficient[..., m, None]) - steps_A[m + 1]
    return relative + torch.einsum("nm,bmk->bnk", assignment, translations_A)
