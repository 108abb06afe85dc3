"""benchmarks/rigid_floor.py: the rigid-segment floor and the exact search for the best contiguous segmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import roma
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from rigid_floor import best_contiguous_cuts, labels_of, segment_costs_A2, segmentation_floor_A  # noqa: E402

CUTS = [0, 9, 21, 30]


def _frames(n_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random 30-residue chain and frames in which the residues CUTS[k]..CUTS[k+1]-1 each move rigidly."""
    generator = torch.Generator().manual_seed(seed)
    nominal = torch.cumsum(torch.randn(CUTS[-1], 3, generator=generator, dtype=torch.float64) * 2.2, 0)
    frames = []
    for _ in range(n_frames):
        parts = []
        for a, b in zip(CUTS[:-1], CUTS[1:], strict=True):
            rotation = roma.rotvec_to_rotmat(0.4 * torch.randn(3, generator=generator, dtype=torch.float64))
            parts.append(nominal[a:b] @ rotation.T + 3.0 * torch.randn(3, generator=generator, dtype=torch.float64))
        frames.append(torch.cat(parts))
    return nominal.numpy(), torch.stack(frames).numpy()


def test_the_search_finds_the_segments_that_moved_rigidly() -> None:
    nominal, frames = _frames(5)
    cost_A2 = segment_costs_A2(nominal, frames)
    cuts = best_contiguous_cuts(cost_A2, 3)
    assert cuts == CUTS
    assert segmentation_floor_A(nominal, frames, labels_of(cuts)).max() < 1e-6
    coarser = labels_of(best_contiguous_cuts(cost_A2, 2))
    assert segmentation_floor_A(nominal, frames, coarser).min() > 0.1


def test_one_segment_is_the_kabsch_rmsd() -> None:
    """Against Kabsch's SVD solution written out here (centroids, SVD of the covariance, no reflection)."""
    nominal, frames = _frames(4, seed=1)
    floor_A = segmentation_floor_A(nominal, frames, np.zeros(len(nominal), dtype=int))
    expected = []
    for frame in frames:
        mobile, target = nominal - nominal.mean(0), frame - frame.mean(0)
        u, _, vt = np.linalg.svd(mobile.T @ target)
        sign = np.sign(np.linalg.det(u @ vt))
        rotation = u @ np.diag([1.0, 1.0, sign]) @ vt
        expected.append(np.sqrt(np.square(mobile @ rotation - target).sum(-1).mean()))
    np.testing.assert_allclose(floor_A, expected, rtol=1e-9)


def test_bayes_oracle_ideal_model_frames_are_the_rigid_fits() -> None:
    """bayes_oracle.py's ideal K-segment model: each frame replaced by the rigid fit of the best K-segmentation, so
    with the true segments nothing changes, and with fewer the change is that segmentation's floor."""
    from bayes_oracle import fitted_frames_A, rigid_segment_frames_A

    nominal, moved = _frames(5, seed=2)
    frames = np.concatenate([moved[:2], nominal[None], moved[2:]])  # the nominal structure is frame 2
    fitted = rigid_segment_frames_A(frames, 2, [3, 2])
    np.testing.assert_allclose(fitted[3], frames, atol=1e-9)
    coarser = labels_of(best_contiguous_cuts(segment_costs_A2(nominal, frames), 2))
    floor_A = segmentation_floor_A(nominal, frames, coarser)
    np.testing.assert_allclose(np.sqrt(np.square(fitted[2] - frames).sum(-1).mean(-1)), floor_A, rtol=1e-9, atol=1e-9)
    assert floor_A.max() > 0.1
    np.testing.assert_allclose(fitted_frames_A(nominal, frames, coarser), fitted[2], atol=1e-12)


def test_bayes_oracle_expected_rmsd_is_the_weighted_mean_rmsd_from_the_estimate() -> None:
    """bayes_oracle.py's uncertainty: sum_k w_k RMSD(X_k, estimate), zero where all weight is on the estimate itself."""
    from bayes_oracle import expected_rmsd_A

    _, frames = _frames(4, seed=3)
    weights = np.array([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    estimate = np.stack([frames.mean(0), frames[2]])
    direct = [sum(w * np.sqrt(np.square(frame - x).sum(-1).mean()) for w, frame in zip(row, frames, strict=True))
              for row, x in zip(weights, estimate, strict=True)]  # fmt: skip
    np.testing.assert_allclose(expected_rmsd_A(weights, frames, estimate), direct, rtol=1e-12)
    assert direct[0] > 0.1 and direct[1] == 0.0
