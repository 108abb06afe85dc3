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


def rotate_by_vectors(points: torch.Tensor, rotation_vectors: torch.Tensor) -> torch.Tensor:
    """Rotate points (..., 3) by rotation vectors (..., 3) (axis * angle in radians), elementwise (Rodrigues)."""
    cos_t, sinc_t, versine_t = _rodrigues_coefficients(rotation_vectors.square().sum(-1, keepdim=True))
    cross = torch.linalg.cross(rotation_vectors, points, dim=-1)
    dot = (rotation_vectors * points).sum(-1, keepdim=True)
    return points * cos_t + cross * sinc_t + rotation_vectors * (dot * versine_t)


def segment_centres_A(coords_A: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """G-weighted centroids (M, 3) of the nominal coordinates (n, 3); an empty segment gets the origin."""
    mass = assignment.sum(0)
    weighted = assignment.transpose(0, 1) @ coords_A
    return weighted / mass.clamp_min(1e-6)[:, None]


def deform(
    coords_A: torch.Tensor,
    assignment: torch.Tensor,
    rotation_vectors: torch.Tensor,
    translations_A: torch.Tensor,
) -> torch.Tensor:
    """Nominal coords (n, 3), G (n, M), per-image rotation vectors (B, M, 3) and translations (B, M, 3) -> (B, n, 3)."""
    batch, n_segments = rotation_vectors.shape[:2]
    if assignment.shape[1] != n_segments or translations_A.shape != rotation_vectors.shape:
        raise ValueError(
            f"G has {assignment.shape[1]} segments, rotations {tuple(rotation_vectors.shape)}, "
            f"translations {tuple(translations_A.shape)}"
        )
    centres_A = segment_centres_A(coords_A, assignment)
    points = coords_A.expand(batch, -1, -1)
    for m in range(n_segments):
        vectors = assignment[:, m, None] * rotation_vectors[:, m, None, :]
        points = centres_A[m] + rotate_by_vectors(points - centres_A[m], vectors)
    return points + torch.einsum("nm,bmk->bnk", assignment, translations_A)
