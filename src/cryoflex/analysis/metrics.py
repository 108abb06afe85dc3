"""Structure metrics against a known truth: per-image C-alpha RMSD and inter-domain distances."""

from __future__ import annotations

import math

import numpy as np

from cryoflex.geometry.superposition import superpose_A


def json_number(value: float) -> float | None:
    """A float for JSON, which has no NaN or infinity: those become null (e.g. a resolution never reached)."""
    return float(value) if math.isfinite(value) else None


def rmsd_A(predicted_A: np.ndarray, truth_A: np.ndarray) -> np.ndarray:
    """Direct C-alpha RMSD (no superposition) per structure: (k, n, 3) x (k, n, 3) -> (k,)."""
    return np.sqrt(np.square(predicted_A - truth_A).sum(-1).mean(-1))


def superposed_rmsd_A(predicted_A: np.ndarray, truth_A: np.ndarray) -> np.ndarray:
    """C-alpha RMSD per structure after optimal rigid superposition (Kabsch): (k, n, 3) x (k, n, 3) -> (k,)."""
    return rmsd_A(superpose_A(predicted_A, truth_A), truth_A)


def centroid_distance_A(coords_A: np.ndarray, group_a: np.ndarray, group_b: np.ndarray) -> np.ndarray:
    """Distance between the C-alpha centroids of two residue groups (index arrays or masks): (k, n, 3) -> (k,)."""
    return np.linalg.norm(coords_A[:, group_a].mean(1) - coords_A[:, group_b].mean(1), axis=-1)


def domain_f1(segment_labels: np.ndarray, domain_labels: np.ndarray, domain: int) -> float:
    """How well the segments whose majority is `domain` cover exactly that domain: F1 of their union vs the domain.

    A domain cut into several segments that all lie inside it still scores 1; a segment that straddles two domains
    lowers precision (or recall, if its majority is elsewhere).
    """
    in_domain = domain_labels == domain
    chosen = np.zeros_like(in_domain)
    for segment in np.unique(segment_labels):
        members = segment_labels == segment
        if np.bincount(domain_labels[members]).argmax() == domain:
            chosen |= members
    overlap = np.sum(chosen & in_domain)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / chosen.sum(), overlap / in_domain.sum()
    return float(2 * precision * recall / (precision + recall))


def recovery_summary(
    predicted_A: np.ndarray,
    truth_A: np.ndarray,
    nominal_A: np.ndarray,
    group_a: np.ndarray,
    group_b: np.ndarray,
) -> dict[str, float | list[float]]:
    """How well per-image structures (k, n, 3) recover the truth, against predicting the nominal (n, 3) for all.

    Median direct RMSD (model frame) of prediction and baseline, and the Pearson correlation between predicted and
    true distances of two residue groups' centroids.
    """
    rmsd = rmsd_A(predicted_A, truth_A)
    baseline = rmsd_A(np.broadcast_to(nominal_A, truth_A.shape), truth_A)
    predicted_distance = centroid_distance_A(predicted_A, group_a, group_b)
    true_distance = centroid_distance_A(truth_A, group_a, group_b)
    spread = predicted_distance.std() * true_distance.std()
    correlation = float(np.corrcoef(predicted_distance, true_distance)[0, 1]) if spread > 0 else 0.0
    return {
        "median_rmsd_A": float(np.median(rmsd)),
        "baseline_median_rmsd_A": float(np.median(baseline)),
        "distance_correlation": correlation,
        "predicted_distance_range_A": [float(predicted_distance.min()), float(predicted_distance.max())],
        "true_distance_range_A": [float(true_distance.min()), float(true_distance.max())],
    }
