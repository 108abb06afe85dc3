"""cryoSPHERE's deformation: per-segment rigid motions blended by the soft segmentation G.

Residue i is rotated successively, for m = 1..M, about segment m's centre c_m by the rotation vector G_im omega_m
(axis omega_m / |omega_m|, angle G_im |omega_m|), then translated by sum_m G_im t_m. With a one-hot G every segment
moves exactly rigidly (the other segments' rotations have angle 0, i.e. are the identity). The centre c_m is the
G-weighted centroid of the nominal structure, so a segment's rotation does not also translate it; this keeps rotation
and translation decoupled for the decoder. Rodrigues' coefficients are evaluated from the half angle (angle 0 is
exactly the identity) and their derivatives with Taylor series near 0, so gradients stay finite and accurate.

Speed (eager, CPU): the work is a few flops per residue, so the cost is the number of residues each pass touches,
the number of passes and their memory layout.
- Bands: with the mixture's sharp softmax (tau = 20) a segment's G is below rounding a few residues outside the
  segment, where its rotation is the identity to rounding. Each segment's rotation is applied to its band only
  (assignment_bands), so a step touches about n residues instead of M x n: forward + backward 4.7x faster than
  the dense chain at 214 residues, 12 segments and 256 structures, 8-19x at 2,750 and 13,941 residues with 20
  segments (benchmarks/deformation_bands.py).
- Coordinates are held component-major, (B, 3, n), so every pass runs along residues (a (B, n, 3) layout makes each
  elementwise operation loop over 3 numbers at a time, about 4x slower).
- Autograd functions with hand-written backward passes replace the graph of small operations: the per-residue
  coefficients (no trigonometry in the backward) and the chain of rotations, in one of two forms. Segment by segment
  (one 6 x 3 matrix product per band forward, three backward) costs a dozen small operations per segment, which
  dominate when the structures are small. In layers (band_layers: every residue's first band in one pass, the few
  residues at the segments' ends in one or two more, each residue with its own segment's vector gathered) it is
  two or three rounds of a few dozen passes over the residues, which cost more memory traffic when they are large.
  LAYERED_MAX_POINTS chooses between them by the structures' size.
The result is returned as a (B, n, 3) view of the component-major tensor; elementwise code downstream keeps that layout.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# A segment's rotation is applied to the residues whose G exceeds this times the dtype's epsilon (assignment_bands).
BAND_THRESHOLD = 1e-3
# (segment, first residue, end residue (exclusive))
Band = tuple[int, int, int]
# Structures x points (residues, and their density centres where deform moves those too) up to which the rotations are
# applied in layers, a few dozen passes over every point, rather than segment by segment, a dozen small passes per
# segment; the dense chain (torch.compile's) always goes segment by segment, whose bands are then static slices.
# Forward + backward in layers, as a share of segment by segment (20 segments, 2 threads,
# benchmarks/deformation_bands.py): 0.44-0.55x for 256 structures of 214 residues, 0.6-0.7x of 450, 0.8-1.05x of
# 700; 0.9-1.1x for 32-64 structures of 2,750, 1.25-1.35x for 256 of them. Measured on a CPU only.
LAYERED_MAX_POINTS = 150_000


def _small_angle_squared(dtype: torch.dtype) -> float:
    """Below this t^2 the coefficients' derivatives use their Taylor series: eps^(1/3) keeps both the series'
    truncation and the cancellation in the closed forms below the dtype's precision (5e-3 float32, 6e-6 float64)."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _half_angle_coefficients(angle_squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t^2 -> (cos t, sin t / t, (1 - cos t) / t^2) from sin and cos of t / 2, accurate for every t without a branch:
    cos t = 1 - 2 sin^2(t/2), sin t / t = sin(t/2) cos(t/2) / (t/2), (1 - cos t) / t^2 = (sin(t/2) / (t/2))^2 / 2."""
    half = (0.5 * torch.sqrt(angle_squared)).clamp_min_(torch.finfo(angle_squared.dtype).tiny)
    sin_half, cos_half = torch.sin(half), torch.cos(half)
    half_sinc = sin_half / half
    cos = 1.0 - 2.0 * sin_half.square()
    return cos, half_sinc * cos_half, 0.5 * half_sinc.square()


class _RotationCoefficients(torch.autograd.Function):
    """The per-residue coefficients of each segment's partial rotation, for t^2 = G^2 |w|^2:
    (G (M, 1, n), |w|^2 (M, B, 1)) -> cos t, a = G sin t / t, b = G^2 (1 - cos t) / t^2, each (M, B, n)
    (any two shapes that broadcast).

    One node instead of a graph of small passes; the backward reuses the outputs (no trigonometry), with s = t^2:
    d cos/ds = -sinc / 2, d sinc/ds = (cos - sinc) / 2s, d versine/ds = (sinc - 2 versine) / 2s (Taylor near 0).
    """

    @staticmethod
    def forward(
        ctx, weights: torch.Tensor, norm_squared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights_squared = weights.square()
        s = weights_squared * norm_squared
        cos, sinc, versine = _half_angle_coefficients(s)
        ctx.save_for_backward(weights, norm_squared, s, cos, sinc, versine)
        return cos, weights * sinc, weights_squared * versine

    @staticmethod
    def backward(
        ctx, grad_cos: torch.Tensor, grad_cross: torch.Tensor, grad_outer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights, norm_squared, s, cos, sinc, versine = ctx.saved_tensors
        small = s < _small_angle_squared(s.dtype)
        half_inverse = 0.5 / torch.where(small, 1.0, s)
        d_sinc = torch.where(small, s / 60 - 1.0 / 6, (cos - sinc) * half_inverse)
        d_versine = torch.where(small, s / 360 - 1.0 / 24, (sinc - 2.0 * versine) * half_inverse)
        weights_squared = weights.square()
        # dL/ds of the three outputs (a = G sinc, b = G^2 versine), then s = G^2 |w|^2
        grad_s = grad_cos * sinc * -0.5 + grad_cross * weights * d_sinc + grad_outer * weights_squared * d_versine
        grad_weights = grad_cross * sinc + (2.0 * weights) * (grad_outer * versine + grad_s * norm_squared)
        grad_norm_squared = grad_s * weights_squared
        return grad_weights.sum_to_size(weights.shape), grad_norm_squared.sum_to_size(norm_squared.shape)


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) matrices K with K p = v x p."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))


def _unskew(matrices: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 3): the gradient with respect to v of <matrices, skew(v)>."""
    return torch.stack([
        matrices[..., 2, 1] - matrices[..., 1, 2],
        matrices[..., 0, 2] - matrices[..., 2, 0],
        matrices[..., 1, 0] - matrices[..., 0, 1],
    ], dim=-1)  # fmt: skip


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross products along dim 1 of (B, 3, L) tensors (torch.linalg.cross is several times slower there)."""
    ax, ay, az = a.unbind(1)
    bx, by, bz = b.unbind(1)
    return torch.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), 1)


class Layer(NamedTuple):
    """One round of partial rotations: each listed residue turned by one segment, no residue twice."""

    residues: torch.Tensor  # (L,) the residues, ascending
    columns: torch.Tensor  # (L,) each one's place in the coefficients, packed band after band
    segments: torch.Tensor  # (L,) the segment that turns each
    everyone: bool  # the residues are all of them, in order (the layer needs no gather)


def band_layers(bands: list[Band], n_residues: int, device: torch.device) -> list[Layer]:
    """The bands regrouped so that each residue's rotations stay in segment order: layer k turns every residue that
    lies in k + 1 bands or more by the k-th of them. With a sharp segmentation the first layer is every residue and
    the next ones only the few residues at the segments' ends, so a step is two or three passes, not one per segment."""
    if not bands:
        return []
    residues = np.concatenate([np.arange(first, end) for _, first, end in bands])
    segments = np.concatenate([np.full(end - first, m) for m, first, end in bands])
    order = np.argsort(residues, kind="stable")  # bands come in segment order, and a stable sort keeps it per residue
    sorted_residues = residues[order]
    rank = np.arange(order.size) - np.searchsorted(sorted_residues, sorted_residues)
    picked = [order[rank == k] for k in range(int(rank.max()) + 1)]
    # one copy to the device for all the layers' indices: (3, P) residues, columns, segments, layer after layer
    packed = np.concatenate([np.stack([residues[columns], columns, segments[columns]]) for columns in picked], axis=1)
    on_device = torch.from_numpy(packed).to(device).split([columns.size for columns in picked], dim=1)
    return [
        Layer(indices[0], indices[1], indices[2], everyone=columns.size == n_residues)
        for indices, columns in zip(on_device, picked, strict=True)
    ]


class _LayeredRotations(torch.autograd.Function):
    """Apply the partial rotations layer by layer (band_layers) to component-major coordinates.

    Inputs: start (B, 3, n) coordinates; centres (M, 3); rotation vectors w (B, M, 3); per-residue coefficients cos,
    a = G sinc, b = G^2 versine, each (B, P), packed band after band; the layers. Segment m maps a residue p of its
    band to c_m + cos q + a (w x q) + b (w . q) w with q = p - c_m, each residue with its own segment's w and c
    gathered, so a layer is a few dozen elementwise passes however many segments it holds. The backward, with
    g = dL/dp': dL/dq = cos g + a (g x w) + b (g . w) w, dL/dw = a (q x g) + b ((w . q) g + (g . w) q),
    dL/dc = g - dL/dq.
    """

    @staticmethod
    def forward(
        ctx, start: torch.Tensor, centres: torch.Tensor, vectors: torch.Tensor,
        cos: torch.Tensor, cross_coefficient: torch.Tensor, outer_coefficient: torch.Tensor, layers: list[Layer],
    ) -> torch.Tensor:  # fmt: skip
        vectors_cm = vectors.transpose(1, 2).contiguous()  # (B, 3, M)
        centres_cm = centres.transpose(0, 1).contiguous()  # (3, M)
        p = start.clone(memory_format=torch.contiguous_format)
        relative = []
        for residues, columns, segments, everyone in layers:
            w, c = vectors_cm.index_select(2, segments), centres_cm.index_select(1, segments)
            q = (p if everyone else p.index_select(2, residues)) - c
            relative.append(q)
            cos_l, a, b = (coefficient.index_select(1, columns)[:, None]
                           for coefficient in (cos, cross_coefficient, outer_coefficient))  # fmt: skip
            along_w = (w * q).sum(1, keepdim=True).mul_(b)
            moved = _cross(w, q).mul_(a).addcmul_(q, cos_l).addcmul_(w, along_w).add_(c)
            p = moved if everyone else p.index_copy_(2, residues, moved)
        ctx.save_for_backward(vectors, centres, cos, cross_coefficient, outer_coefficient, *relative)
        ctx.layers = layers
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        vectors, centres, cos, cross_coefficient, outer_coefficient, *relative = ctx.saved_tensors
        vectors_cm = vectors.transpose(1, 2).contiguous()
        grad_vectors_cm = vectors_cm.new_zeros(vectors_cm.shape)
        grad_centres_cm = centres.new_zeros(3, centres.shape[0])
        grad_cos, grad_cross, grad_outer = (torch.empty_like(c) for c in (cos, cross_coefficient, outer_coefficient))
        u = grad.clone(memory_format=torch.contiguous_format)
        for (residues, columns, segments, everyone), q in zip(reversed(ctx.layers), reversed(relative), strict=True):
            w = vectors_cm.index_select(2, segments)
            g = u if everyone else u.index_select(2, residues)
            cos_l, a, b = (coefficient.index_select(1, columns)[:, None]
                           for coefficient in (cos, cross_coefficient, outer_coefficient))  # fmt: skip
            w_dot_q, g_dot_w = (w * q).sum(1, keepdim=True), (g * w).sum(1, keepdim=True)
            g_cross_w = _cross(g, w)
            grad_cos.index_copy_(1, columns, (g * q).sum(1))
            grad_cross.index_copy_(1, columns, (g_cross_w * q).sum(1))  # g . (w x q) = (g x w) . q
            grad_outer.index_copy_(1, columns, (g_dot_w * w_dot_q)[:, 0])
            grad_w = _cross(q, g).mul_(a).add_((g * w_dot_q).addcmul_(q, g_dot_w).mul_(b))
            grad_vectors_cm.index_add_(2, segments, grad_w)
            along_q = g_cross_w.mul_(a).addcmul_(g, cos_l).addcmul_(w, g_dot_w * b)
            grad_centres_cm.index_add_(1, segments, (g - along_q).sum(0))
            u = along_q if everyone else u.index_copy_(2, residues, along_q)
        return u, grad_centres_cm.t(), grad_vectors_cm.transpose(1, 2), grad_cos, grad_cross, grad_outer, None


class _SegmentRotations(torch.autograd.Function):
    """Apply the M partial rotations in turn to component-major coordinates, each to its band of residues only.

    Inputs: start (B, 3, n) coordinates; centres (M, 3); rotation vectors w (B, M, 3); per-residue coefficients cos,
    a = G sinc, b = G^2 versine, each (B, P), packed band after band; bands, the (segment, first residue, end,
    offset in the packed coefficients) of each band. Segment m maps a residue p of its band to
    c_m + cos q + a (w x q) + b (w . q) w with q = p - c_m, and (w x q, (w . q) w) is one product [K; w w^T] q.
    """

    @staticmethod
    def forward(
        ctx, start: torch.Tensor, centres: torch.Tensor, vectors: torch.Tensor,
        cos: torch.Tensor, cross_coefficient: torch.Tensor, outer_coefficient: torch.Tensor,
        bands: list[tuple[int, int, int, int]],
    ) -> torch.Tensor:  # fmt: skip
        segment_vectors = vectors.transpose(0, 1)  # (M, B, 3)
        operators = torch.cat(
            [_skew(segment_vectors), segment_vectors[..., :, None] * segment_vectors[..., None, :]], dim=-2
        ).contiguous()  # (M, B, 6, 3)
        p = start.clone()
        relative = []
        for m, first, end, offset in bands:
            columns = slice(offset, offset + end - first)
            centre = centres[m].view(1, 3, 1)
            q = p[:, :, first:end] - centre
            relative.append(q)
            cross, outer = torch.bmm(operators[m], q).split(3, dim=1)
            rotated = torch.addcmul(q * cos[:, None, columns], cross, cross_coefficient[:, None, columns])
            p[:, :, first:end] = rotated.addcmul_(outer, outer_coefficient[:, None, columns]).add_(centre)
        ctx.save_for_backward(vectors, operators, cos, cross_coefficient, outer_coefficient, *relative)
        ctx.bands = bands
        ctx.n_segments = len(centres)
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        vectors, operators, cos, cross_coefficient, outer_coefficient, *relative = ctx.saved_tensors
        grad_centres = grad.new_zeros(ctx.n_segments, 3)
        grad_vectors = torch.zeros_like(vectors)
        grad_cos, grad_cross, grad_outer = (torch.empty_like(c) for c in (cos, cross_coefficient, outer_coefficient))
        u = grad.clone(memory_format=torch.contiguous_format)
        for (m, first, end, offset), q in zip(reversed(ctx.bands), reversed(relative), strict=True):
            columns = slice(offset, offset + end - first)
            v = u[:, :, first:end]
            cross, outer = torch.bmm(operators[m], q).split(3, dim=1)
            grad_cos[:, columns] = (v * q).sum(1)
            grad_cross[:, columns] = (v * cross).sum(1)
            grad_outer[:, columns] = (v * outer).sum(1)
            weighted = torch.cat([v * cross_coefficient[:, None, columns], v * outer_coefficient[:, None, columns]], 1)
            # d/dK and d/d(w w^T), summed over residues: (B, 6, 3)
            cross_part, outer_part = torch.bmm(weighted, q.transpose(1, 2)).split(3, dim=1)
            symmetric = outer_part + outer_part.transpose(1, 2)
            grad_vectors[:, m] = _unskew(cross_part) + (symmetric @ vectors[:, m, :, None])[..., 0]
            # d/dq = cos v + K^T (a v) + w w^T (b v); the centre enters as c + R (p - c)
            along_q = torch.bmm(operators[m].transpose(1, 2), weighted).addcmul_(v, cos[:, None, columns])
            grad_centres[m] = (v - along_q).sum((0, 2))
            u[:, :, first:end] = along_q
        return u, grad_centres, grad_vectors, grad_cos, grad_cross, grad_outer, None


def segment_centres_A(coords_A: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """G-weighted centroids (M, 3) of the nominal coordinates (n, 3); an empty segment gets the origin."""
    mass = assignment.sum(0)
    weighted = assignment.transpose(0, 1) @ coords_A
    return weighted / mass.clamp_min(1e-6)[:, None]


def rotation_matrices(rotation_vectors: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (..., 3) -> matrices (..., 3, 3): the full-weight (G_im = 1) rotation that deform applies.

    R = cos t I + sinc(t) K + (1 - cos t) / t^2 w w^T (Rodrigues, K the cross-product matrix of w), with the same
    coefficients as deform, so a one-hot segment's motion is R_m (x - c_m) + c_m + t_m exactly.
    """
    norm_squared = rotation_vectors.square().sum(-1)
    cos_t, sinc_t, versine_t = _RotationCoefficients.apply(torch.ones_like(norm_squared), norm_squared)
    identity = torch.eye(3, dtype=rotation_vectors.dtype, device=rotation_vectors.device)
    outer = rotation_vectors[..., :, None] * rotation_vectors[..., None, :]
    return (
        cos_t[..., None, None] * identity
        + sinc_t[..., None, None] * _skew(rotation_vectors)
        + versine_t[..., None, None] * outer
    )


def assignment_bands(assignment: torch.Tensor, *, dense: bool = False) -> list[Band]:
    """The bands of the segmentation G (n, M): for each segment m, the residues first..end-1 that span every G_im above
    BAND_THRESHOLD x the dtype's epsilon (bands in segment order).

    A rotation by G_im w turns a residue by G_im |w| radians, so below that threshold it moves less than a
    thousandth of the coordinates' rounding per radian: every other residue keeps its place exactly to rounding, and
    the band is all that segment m's rotation has to touch. dense=True gives every segment all residues (static
    shapes, for torch.compile).
    """
    n, n_segments = assignment.shape
    if dense:
        spans = [(0, n)] * n_segments
    else:
        active = (assignment.detach() > BAND_THRESHOLD * torch.finfo(assignment.dtype).eps).cpu()
        any_active = active.any(0).tolist()
        firsts = active.int().argmax(0).tolist()
        ends = (n - active.flip(0).int().argmax(0)).tolist()
        spans = [(first, end) if used else (0, 0) for first, end, used in zip(firsts, ends, any_active, strict=True)]
    return [(m, first, end) for m, (first, end) in enumerate(spans) if end > first]


def _packed(pieces: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Index arrays concatenated into one long tensor on `device` (empty if there are none)."""
    return torch.from_numpy(np.concatenate([np.zeros(0, dtype=np.int64), *pieces]).astype(np.int64)).to(device)


def deform(
    coords_A: torch.Tensor,
    assignment: torch.Tensor,
    rotation_vectors: torch.Tensor,
    translations_A: torch.Tensor,
    *,
    centres_A: torch.Tensor | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """Nominal coords (n, 3), G (n, M), per-image rotation vectors (B, M, 3) and translations (B, M, 3) -> (B, n, 3).

    The segments rotate about centres_A (M, 3), by default segment_centres_A of these coordinates; points that are
    not the nominal pseudo-atoms (e.g. the residues' Gaussians beside them) pass the pseudo-atoms' centres, so
    they move with exactly the same motion.

    Rotating p by G_im w_m (Rodrigues, with t = G_im |w_m|):
        p cos t + G_im sinc(t) (w_m x p) + G_im^2 (1 - cos t) / t^2 (w_m . p) w_m,
    so the per-residue part is three coefficients, computed at once for every residue of every segment's band
    (assignment_bands: with a sharp segmentation a band is the segment and a few residues each side, so the work
    is about n instead of M x n). The rotations are then applied in layers (_LayeredRotations) where the structures
    are small, segment by segment (_SegmentRotations) where they are large: LAYERED_MAX_POINTS. Outside its band a
    segment's G is below rounding: its gradient there (through the mixture, proportional to G) is left out.
    The (B, n, 3) result is a view of a (B, 3, n) tensor.
    """
    batch, n_segments = rotation_vectors.shape[:2]
    if assignment.shape[1] != n_segments or translations_A.shape != rotation_vectors.shape:
        raise ValueError(
            f"G has {assignment.shape[1]} segments, rotations {tuple(rotation_vectors.shape)}, "
            f"translations {tuple(translations_A.shape)}"
        )
    if centres_A is None:
        centres_A = segment_centres_A(coords_A, assignment)
    bands = assignment_bands(assignment, dense=dense)
    residues = _packed([np.arange(first, end) for _, first, end in bands], coords_A.device)
    segments = _packed([np.full(end - first, m) for m, first, end in bands], coords_A.device)
    norm_squared = rotation_vectors.square().sum(-1)  # (B, M)
    coefficients = _RotationCoefficients.apply(
        assignment[residues, segments][None, :], norm_squared[:, segments]
    )  # cos t, G sinc t, G^2 versine t: each (B, P), P residues in all bands, packed band after band
    start = coords_A.transpose(0, 1).expand(batch, -1, -1)
    if not dense and batch * len(coords_A) <= LAYERED_MAX_POINTS:
        layers = band_layers(bands, len(coords_A), coords_A.device)
        moved = _LayeredRotations.apply(start, centres_A, rotation_vectors, *coefficients, layers)
    else:
        offsets = np.cumsum([0] + [end - first for _, first, end in bands]).tolist()
        with_offsets = [(m, first, end, offset) for (m, first, end), offset in zip(bands, offsets[:-1], strict=True)]
        moved = _SegmentRotations.apply(start, centres_A, rotation_vectors, *coefficients, with_offsets)
    # sum_m G_im t_m, (B, 3, n), as one (3 B, M) x (M, n) product: the batched form of a transposed view, without
    # gradient (analysis), expands G to B copies (8 ms against 0.4 ms for 2,048 structures of 214 residues)
    translation_A = (translations_A.transpose(1, 2).reshape(-1, n_segments) @ assignment.transpose(0, 1)).view_as(moved)
    return (moved + translation_A).transpose(1, 2)
