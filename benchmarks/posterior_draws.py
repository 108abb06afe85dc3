"""How many posterior draws analysis takes per particle, and how: the accuracy of the posterior-mean structures and
how well the predicted uncertainty ranks the true errors, on runs trained by recovery_adk.py.

Run: .venv/bin/python benchmarks/posterior_draws.py WORK [WORK ...] [--draws 16 64] [--particles N]
     [--out benchmarks/results/posterior_draws.json]
WORK is a recovery_adk.py work folder of one SNR (it holds data/truth.npz and run/). For each number of draws, two
kinds of draws: "independent", standard normal draws as analysis took them before, and "quasi-random", the randomised
quasi-Monte Carlo draws it takes now (cryoflex.analysis.predict.posterior_noise). Each particle's draws are weighted
by the model's likelihood and decoded as analysis does; prints median RMSD to the truth and the Spearman correlation
of each particle's expected RMSD (the uncertainty analysis reports) with that RMSD, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from cryoflex.analysis import predict
from cryoflex.analysis.metrics import rmsd_A
from cryoflex.analysis.run import load_run
from cryoflex.io.atomic import write_text_atomic

Noise = Callable[[int, np.ndarray, int, int], np.ndarray]
SEED = 0


def independent_noise(seed: int, positions: np.ndarray, samples: int, latent_dim: int) -> np.ndarray:
    """Independent standard normal draws, particle p's from a stream per block of NOISE_BLOCK particles."""
    positions = np.asarray(positions, dtype=np.int64)
    draws = np.empty((len(positions), samples, latent_dim), np.float32)
    block_of = positions // predict.NOISE_BLOCK
    for block in np.unique(block_of):
        rows = block_of == block
        stream = np.random.default_rng([seed, int(block)])
        block_draws = stream.standard_normal((predict.NOISE_BLOCK, samples, latent_dim), dtype=np.float32)
        draws[rows] = block_draws[positions[rows] % predict.NOISE_BLOCK]
    return draws


def score(work: Path, noise: Noise, samples: int, particles: int | None) -> dict:
    """Posterior-mean structures and expected RMSDs of the first `particles` particles with these draws, against the
    truth."""
    run = load_run(work / "run", device="cpu")
    truth = np.load(work / "data" / "truth.npz")
    truth_A = truth["conformations_A"][truth["conformation_index"]]
    positions = np.arange(len(run.dataset) if particles is None else min(particles, len(run.dataset)))
    original, predict.posterior_noise = predict.posterior_noise, noise
    try:
        started = time.perf_counter()
        posterior = predict.latent_posteriors(run.model, run.dataset).subset(positions)
        log_weights = predict.importance_log_weights(run.model, run.dataset, posterior, samples=samples, seed=SEED,
                                                     positions=positions)  # fmt: skip
        weighted = predict.LatentPosterior(posterior.mean, posterior.std, log_weights, SEED)
        chunks = list(
            predict.posterior_structures(run.model, weighted, samples=samples, seed=SEED, positions=positions)
        )
        seconds = time.perf_counter() - started
    finally:
        predict.posterior_noise = original
    predicted = np.concatenate([chunk.coords_A for chunk in chunks])
    expected_A = np.concatenate([chunk.expected_rmsd_A for chunk in chunks])
    error_A = rmsd_A(predicted, truth_A[positions])
    return dict(median_rmsd_A=float(np.median(error_A)), spread_error_spearman=float(spearmanr(expected_A, error_A)[0]),
                particles=len(positions), seconds=seconds)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="+", type=Path)
    parser.add_argument("--draws", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--particles", type=int, help="the first N particles (default all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/posterior_draws.json"))
    args = parser.parse_args()
    kinds: dict[str, Noise] = {"independent": independent_noise, "quasi-random": predict.posterior_noise}
    print(f"{'run':<40} {'draws':>5} {'kind':>13} {'RMSD A':>7} {'spearman':>9} {'s':>6}")
    results = []
    for work in args.work:
        for samples in args.draws:
            for kind, noise in kinds.items():
                result = dict(run=str(work), draws=samples, kind=kind, **score(work, noise, samples, args.particles))
                results.append(result)
                print(f"{str(work)[-40:]:<40} {samples:>5} {kind:>13} {result['median_rmsd_A']:>7.3f} "
                      f"{result['spread_error_spearman']:>9.3f} {result['seconds']:>6.1f}", flush=True)  # fmt: skip
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
