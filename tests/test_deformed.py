"""Deformed backprojection (issue 11, item 4): the composed pose of each segment, the body weights, and a simulated
continuous motion whose motion-corrected map beats the plain consensus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.analysis.deformed import (
    DeformedAccumulators,
    DeformedMaps,
    RigidMotions,
    body_weights,
    compare_deformed,
    compare_fsc,
    decoded_motions,
    deformed_maps,
    deformed_reconstruction,
    model_body_weights,
    segment_poses,
)
from cryoflex.analysis.predict import latent_means
from cryoflex.analysis.reconstruct import reconstruct_groups
from cryoflex.analysis.run import TrainedRun, load_run
from cryoflex.config import load_config
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.model.deformation import deform, rotation_matrices, segment_centres_A
from cryoflex.train.loop import train


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


# ------------------------------------------------------------ a simulated continuous hinge motion

BOX_PX, PIXEL_A, SIGMA_A = 32, 2.0, 1.5
HINGE_A = (1.0, -6.0, 0.0)  # between the two domains, off the box centre (so the origin shift matters)
MAX_ANGLE_DEG = 30.0
NOISE = 4.0  # noise std / clean image std


@dataclass
class Hinge:
    coords_A: torch.Tensor  # nominal (60, 3)
    assignment: torch.Tensor  # one-hot (60, 2); segment 2 moves
    amplitudes: torch.Tensor
    weights: torch.Tensor
    maps: DeformedMaps


def _hinge_motion(angles_deg: torch.Tensor, centres_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation vectors and translations (n, 2, 3) of segment 2 turning about the z axis through the hinge point:
    about its own centre c that is the same rotation plus t = (R - I)(c - h). Segment 1 stays."""
    vectors = torch.zeros(len(angles_deg), 2, 3, dtype=torch.float64)
    vectors[:, 1, 2] = torch.deg2rad(angles_deg)
    lever_A = centres_A[1] - torch.tensor(HINGE_A, dtype=torch.float64)
    translations_A = torch.zeros_like(vectors)
    translations_A[:, 1] = torch.einsum("bij,j->bi", rotation_matrices(vectors[:, 1]), lever_A) - lever_A
    return vectors, translations_A


@pytest.fixture(scope="module")
def hinge() -> Hinge:
    """1,200 noisy 32 px images with CTF of a two-domain structure whose second domain swings by -30..30 degrees,
    reconstructed with the known motions (deformed) and without (the plain consensus of the same accumulators)."""
    generator = torch.Generator().manual_seed(5)
    coords_A, assignment = _two_domains(generator)
    amplitudes = torch.ones(60, dtype=torch.float64)
    centres_A = segment_centres_A(coords_A, assignment)
    n_images, batch = 1200, 300
    angles_deg = (torch.rand(n_images, generator=generator, dtype=torch.float64) * 2 - 1) * MAX_ANGLE_DEG
    vectors, translations_A = _hinge_motion(angles_deg, centres_A)
    poses = PoseBatch(
        _random_rotations(n_images, generator), torch.randn(n_images, 2, generator=generator, dtype=torch.float64) * 2
    )
    defocus_A = torch.rand(n_images, generator=generator, dtype=torch.float64) * 15000 + 5000
    ctf = CTFBatch.from_values(defocus_A, defocus_A, 0.0, 300.0, 2.7, 0.1)
    formation = ImageFormation(BOX_PX, PIXEL_A, sigma_A=SIGMA_A)
    in_half_a = torch.arange(n_images) % 2 == 0
    accumulators = DeformedAccumulators(BOX_PX, PIXEL_A, 2)
    for start in range(0, n_images, batch):
        rows = slice(start, start + batch)
        moved_A = deform(coords_A, assignment, vectors[rows], translations_A[rows])
        clean = formation.images(moved_A, amplitudes, poses[rows], ctf[rows])
        images = clean + torch.randn(clean.shape, generator=generator, dtype=torch.float64) * clean.std() * NOISE
        motions = RigidMotions.from_vectors(vectors[rows], translations_A[rows], centres_A)
        accumulators.insert(
            images.float(), poses[rows].to(dtype=torch.float32), ctf[rows].to(dtype=torch.float32),
            motions.to(dtype=torch.float32), in_half_a[rows],
        )  # fmt: skip
    weights = body_weights(coords_A, assignment, BOX_PX, PIXEL_A)
    maps = deformed_maps(accumulators.finish(), weights, np.arange(n_images), PIXEL_A)
    return Hinge(coords_A, assignment, amplitudes, weights, maps)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy().ravel(), b.double().numpy().ravel())[0, 1])


def test_deformed_map_is_closer_to_the_nominal_structure(hinge: Hinge) -> None:
    """Correlation with the nominal map: plain 0.867 -> deformed 0.879 globally, 0.870 -> 0.893 in the moving domain
    (weighted by its body weight), 0.892 -> 0.891 in the still one; with the origin sign flipped, lower than plain."""
    truth = gaussian_volume(hinge.coords_A, hinge.amplitudes, BOX_PX, PIXEL_A, SIGMA_A).float()
    deformed, plain = hinge.maps.deformed.full, hinge.maps.plain.full
    still, moving = hinge.weights[0], hinge.weights[1]
    glob = _correlation(plain, truth), _correlation(deformed, truth)
    moved = _correlation(plain * moving, truth * moving), _correlation(deformed * moving, truth * moving)
    kept = _correlation(plain * still, truth * still), _correlation(deformed * still, truth * still)
    assert glob[1] > glob[0] + 0.005
    assert moved[1] > moved[0] + 0.015
    assert moved[1] - moved[0] > kept[1] - kept[0] + 0.01  # the gain is where the motion is


def test_deformed_half_maps_reach_higher_resolution_in_the_moving_domain(hinge: Hinge) -> None:
    """Half-map FSC at 0.143: moving domain 5.99 A plain -> 4.73 A deformed (the still domain: 4.84 and 4.81 A),
    whole map 6.69 -> 6.48 A; the plain consensus is the static body of the same accumulators. (Seeds 6-8: the moving
    domain gains 0.47-0.71 A.)"""
    table = compare_fsc(hinge.maps.plain, hinge.maps.deformed, hinge.weights, PIXEL_A)
    moving, still, whole = table["segment_2"], table["segment_1"], table["global"]
    assert moving["deformed_resolution_A"] < moving["plain_resolution_A"] - 0.4
    assert moving["deformed_resolution_A"] < still["plain_resolution_A"] + 0.3  # as sharp as the domain that stays
    assert abs(still["deformed_resolution_A"] - still["plain_resolution_A"]) < 0.2
    assert whole["deformed_resolution_A"] < whole["plain_resolution_A"]
    assert hinge.maps.deformed.resolution_A == pytest.approx(whole["deformed_resolution_A"])


# ------------------------------------------------------------ from a trained run


@pytest.fixture(scope="module")
def tiny_run(tiny_adk_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """40 simulated AdK images (32 px, 4 A/px), tiny networks trained 2 epochs, 3 segments, reopened on the CPU."""
    config = load_config(None, dict(
        particles=str(tiny_adk_dataset / "particles.star"), structure=str(tiny_adk_dataset / "nominal.pdb"),
        segments=3, latent_dim=2, epochs=2, batch_size=16, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32],
        progress=False, device="cpu", learning_rate=1e-2, seed=1,
    ))  # fmt: skip
    run_dir = tmp_path_factory.mktemp("deformed") / "run"
    train(config, run_dir)
    return load_run(run_dir, device="cpu")


def test_decoded_motions_are_the_models_motion_of_one_hot_residues(tiny_run: TrainedRun) -> None:
    model = tiny_run.model
    latents = torch.as_tensor(latent_means(model, tiny_run.dataset)[:8])
    with torch.no_grad():
        coords_A, assignment = model.decode(latents, sample_segmentation=False)
        motions = decoded_motions(model, latents)
    assert motions.rotations.abs().sum() > 0 and motions.translations_A.abs().max() > 1e-3  # the run moved something
    segment = assignment.argmax(1)
    rigid = (
        torch.einsum("bnij,nj->bni", motions.rotations[:, segment], model.nominal_coords_A - motions.centres_A[segment])
        + motions.centres_A[segment]
        + motions.translations_A[:, segment]
    )
    one_hot = assignment.max(1).values > 1 - 1e-6
    assert one_hot.sum() > 20
    torch.testing.assert_close(rigid[:, one_hot], coords_A[:, one_hot], rtol=0, atol=1e-3)


def test_deformed_reconstruction_of_a_run_streams_its_particles(tiny_run: TrainedRun) -> None:
    """The wrapper equals the lower level fed with the run's latent means, on a subset; compare_deformed reads it."""
    dataset, model = tiny_run.dataset, tiny_run.model
    indices = np.arange(3, 37)
    in_half_a = np.arange(dataset.n) % 3 == 0
    maps = deformed_reconstruction(tiny_run, indices, in_half_a, padding=2, batch_size=16, device="cpu", progress=False)
    batch = dataset.__getitems__(indices.tolist())
    motions = decoded_motions(model, torch.as_tensor(latent_means(model, dataset)[indices]))
    accumulators = DeformedAccumulators(dataset.box_size_px, dataset.pixel_size_A, 3)
    accumulators.insert(batch.images, batch.poses, batch.ctf, motions, torch.as_tensor(in_half_a[indices]))
    weights = model_body_weights(model, dataset.box_size_px, dataset.pixel_size_A)
    expected = deformed_maps(accumulators.finish(), weights, indices, dataset.pixel_size_A)
    assert accumulators.n_images == (int(in_half_a[indices].sum()), int((~in_half_a[indices]).sum()))
    for name in ("half_a", "half_b", "full", "full_filtered"):
        torch.testing.assert_close(getattr(maps, name), getattr(expected.deformed, name), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(maps.particle_indices, indices)
    consensus = reconstruct_groups(dataset, {"all": indices}, in_half_a, padding=2, batch_size=16)["all"]
    torch.testing.assert_close(expected.plain.full, consensus.full)  # the static body is the command's consensus
    comparison = compare_deformed(expected.plain, maps, tiny_run)
    assert list(comparison) == ["global", "segment_1", "segment_2", "segment_3"]
    assert {"plain_resolution_A", "deformed_resolution_A", "frequency_per_A"} <= set(comparison["segment_2"])
    one_body_per_pass = deformed_reconstruction(
        tiny_run, indices, in_half_a, padding=2, batch_size=16, device="cpu", progress=False, memory_budget_bytes=1
    )
    torch.testing.assert_close(one_body_per_pass.full, maps.full)  # 4 passes over the data, the same map
    # given latents (analyze's posterior latents) replace the encoder's means: the same map from the same latents,
    # another from others
    means = latent_means(model, dataset)
    given = deformed_reconstruction(
        tiny_run, indices, in_half_a, padding=2, batch_size=16, device="cpu", progress=False, latents=means
    )
    torch.testing.assert_close(given.full, maps.full)
    moved = deformed_reconstruction(
        tiny_run, indices, in_half_a, padding=2, batch_size=16, device="cpu", progress=False, latents=means + 2.0
    )
    assert not torch.allclose(moved.full, maps.full, rtol=1e-3, atol=1e-4)
    with pytest.raises(CryoflexInputError, match="both halves"):
        deformed_reconstruction(
            tiny_run, np.array([0, 3, 6]), in_half_a, padding=2, batch_size=16, device="cpu", progress=False
        )
