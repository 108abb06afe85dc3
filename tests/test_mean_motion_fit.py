"""benchmarks/mean_motion_fit.py: the split of several runs' population offsets into a shared bias and each run's own
noise, and the ideal model's mean structure."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from mean_motion_fit import ideal_mean_A, offset_split  # noqa: E402


def test_offset_split_recovers_a_known_bias_and_noise():
    rng = np.random.default_rng(0)
    bias_A = rng.normal(size=(2000, 3)) * 0.3  # RMS over residues 0.3 * sqrt(3)
    offsets_A = [bias_A + rng.normal(size=bias_A.shape) * 0.2 for _ in range(4)]
    split = offset_split(offsets_A)
    assert abs(split["shared_rms_A"] - 0.3 * np.sqrt(3)) < 0.02
    assert abs(split["per_run_rms_A"] - 0.2 * np.sqrt(3)) < 0.02
    assert abs(split["shared_share"] - 0.09 / 0.13) < 0.03


def test_offset_split_of_pure_noise_shares_nothing():
    rng = np.random.default_rng(1)
    split = offset_split([rng.normal(size=(2000, 3)) for _ in range(2)])
    assert split["shared_rms_A"] < 0.1
    assert abs(split["cosine_first_two"]) < 0.05


def test_ideal_mean_of_rigidly_moved_segments_is_their_mean():
    rng = np.random.default_rng(2)
    nominal_A = np.cumsum(rng.normal(size=(12, 3)) * 2.0, 0)
    labels = np.repeat([0, 1], 6)
    shifts_A = rng.normal(size=(5, 2, 3)) * 3.0
    frames_A = nominal_A[None] + shifts_A[:, labels]  # each segment translated rigidly: the ideal fit is exact
    np.testing.assert_allclose(ideal_mean_A(nominal_A, frames_A, labels), frames_A.mean(0), atol=1e-9)
