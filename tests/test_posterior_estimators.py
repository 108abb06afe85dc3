"""benchmarks/posterior_estimators.py: the weighted medoid of a particle's decoded draws."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from posterior_estimators import weighted_medoid_A  # noqa: E402


def test_weighted_medoid_is_the_draw_with_the_least_weighted_sum_of_rmsds():
    rng = np.random.default_rng(0)
    draws_A = rng.normal(size=(3, 7, 5, 3))
    weights = rng.dirichlet(np.ones(7), size=3)
    medoid_A = weighted_medoid_A(weights, draws_A)
    for b in range(3):
        costs = [sum(weights[b, k] * np.sqrt(np.square(draws_A[b, j] - draws_A[b, k]).sum(-1).mean())
                     for k in range(7)) for j in range(7)]  # fmt: skip
        np.testing.assert_array_equal(medoid_A[b], draws_A[b, int(np.argmin(costs))])


def test_a_heavy_weight_pulls_the_medoid_to_its_draw():
    draws_A = np.random.default_rng(1).normal(size=(1, 5, 4, 3))
    weights = np.array([[0.01, 0.01, 0.96, 0.01, 0.01]])
    np.testing.assert_array_equal(weighted_medoid_A(weights, draws_A)[0], draws_A[0, 2])
