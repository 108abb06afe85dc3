"""Which single structure to report per particle, and which summary of its posterior ranks its error, on runs trained
by recovery_adk.py.

Run: .venv/bin/python benchmarks/posterior_estimators.py WORK [WORK ...] [--particles 3000]
     [--out benchmarks/results/posterior_estimators.json]
WORK is a recovery_adk.py work folder of one SNR (it holds data/truth.npz and run/). Each particle's 64 posterior
draws are taken and weighted as analysis takes them (the last checkpoint), decoded, and reduced to one structure in
seven ways: the weighted mean of the structures (what analysis reports), that mean with each learned segment made
rigid again (the nominal segment superposed onto it), the structure decoded at the weighted mean of
the latents (the particle's point in the latent plots), the one decoded at the mean of q(z | image), the weighted
geometric median of the structures (the estimate with the least expected RMSD under the posterior;
bayes_oracle.geometric_median_A), the weighted medoid (the draw with the least expected RMSD: a structure the decoder
made, not an average) and the draw of largest weight. For each: median and mean RMSD to the truth, the
LID-NMP distance correlation, the mean change of the radius of gyration against the truth's (averaging structures
contracts them), and the Spearman correlation with the error of three uncertainty summaries of the same draws: the
mean over residues of the per-residue spread (what analysis reported before the expected RMSD), its root mean
square over residues, and the expected RMSD of a draw from the estimate (what analysis reports). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bayes_oracle import geometric_median_A
from recovery_adk import LID, NMP
from scipy.stats import spearmanr

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.analysis.metrics import centroid_distance_A, rmsd_A
from cryoflex.analysis.predict import importance_log_weights, latent_posteriors, posterior_noise
from cryoflex.analysis.run import load_run
from cryoflex.geometry.superposition import superpose_A
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import read_trajectory

SEED = 0
CHUNK = 100  # particles decoded at a time: CHUNK x 64 structures in memory
ESTIMATORS = (
    "posterior_mean", "rigid_segment_mean", "at_posterior_mean_latent", "at_encoder_mean", "geometric_median",
    "weighted_medoid", "largest_weight",
)  # fmt: skip
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def radius_of_gyration_A(coords_A: np.ndarray) -> np.ndarray:
    """(k, n, 3) -> (k,) radius of gyration of the C-alpha atoms."""
    return np.sqrt(np.square(coords_A - coords_A.mean(-2, keepdims=True)).sum(-1).mean(-1))


def weighted_medoid_A(weights: np.ndarray, draws_A: np.ndarray) -> np.ndarray:
    """(B, K) weights, (B, K, n, 3) draws -> (B, n, 3): each particle's draw with the least weighted sum of RMSDs to
    its draws (the geometric median restricted to structures the decoder made, so never an average of them)."""
    flat = torch.as_tensor(draws_A.reshape(*draws_A.shape[:2], -1))
    pairwise_A = torch.cdist(flat, flat).numpy() / np.sqrt(draws_A.shape[2])  # (B, K, K) RMSD between draws
    best = np.einsum("bjk,bk->bj", pairwise_A, weights).argmin(1)
    return draws_A[np.arange(len(draws_A)), best]


def rigid_segment_mean_A(mean_A: np.ndarray, nominal_A: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """(B, n, 3) posterior means -> (B, n, 3): each segment's nominal residues superposed onto their mean (the
    rigid placement of the segment with the least expected squared error under the posterior; the mean itself is
    contracted where the draws rotate a segment differently). `segment`: (n,) each residue's segment."""
    out = mean_A.copy()
    for m in np.unique(segment):
        rows = segment == m
        if rows.sum() >= 3:
            out[:, rows] = superpose_A(nominal_A[rows], mean_A[:, rows])
    return out


@torch.no_grad()
def score(work: Path, particles: int) -> dict:
    """Every estimator and uncertainty summary on the first `particles` particles of one run."""
    run = load_run(work / "run", device="cpu")
    model, dataset = run.model, run.dataset
    truth = np.load(work / "data" / "truth.npz")
    positions = np.arange(min(particles, len(dataset)))
    truth_A = truth["conformations_A"][truth["conformation_index"]][positions]
    samples = DEFAULT_POSTERIOR_SAMPLES
    posterior = latent_posteriors(model, dataset).subset(positions)
    log_weights = importance_log_weights(model, dataset, posterior, samples=samples, seed=SEED, positions=positions)
    weights = np.exp(log_weights - log_weights.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    latents = posterior.mean[:, None] + posterior.std[:, None] * posterior_noise(
        SEED, positions, samples, posterior.mean.shape[1]
    )
    n_residues = int(model.nominal_coords_A.shape[0])
    estimates = {name: np.empty((len(positions), n_residues, 3)) for name in ESTIMATORS}
    summaries = {"mean_spread": np.empty(len(positions)), "rms_spread": np.empty(len(positions))}
    expected = {name: np.empty(len(positions)) for name in ESTIMATORS}
    model.eval()
    nominal_A = model.nominal_coords_A.double().numpy()
    segment = model.segmentation(False).argmax(1).numpy()

    def decode(z: np.ndarray) -> np.ndarray:
        coords_A, _ = model.decode(torch.as_tensor(z, dtype=torch.float32), sample_segmentation=False)
        return coords_A.double().numpy()

    for start in range(0, len(positions), CHUNK):
        rows = slice(start, min(start + CHUNK, len(positions)))
        w = weights[rows]
        z = latents[rows]
        draws_A = decode(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:2], n_residues, 3)
        mean_A = np.einsum("bk,bkni->bni", w, draws_A)
        estimates["posterior_mean"][rows] = mean_A
        estimates["rigid_segment_mean"][rows] = rigid_segment_mean_A(mean_A, nominal_A, segment)
        estimates["at_posterior_mean_latent"][rows] = decode(np.einsum("bk,bkl->bl", w, z))
        estimates["at_encoder_mean"][rows] = decode(posterior.mean[rows])
        estimates["geometric_median"][rows] = [geometric_median_A(w[i : i + 1], draws_A[i])[0] for i in range(len(w))]
        estimates["weighted_medoid"][rows] = weighted_medoid_A(w, draws_A)
        estimates["largest_weight"][rows] = draws_A[np.arange(len(w)), w.argmax(1)]
        spread_A = np.sqrt(np.einsum("bk,bkn->bn", w, np.square(draws_A - mean_A[:, None]).sum(-1)))
        summaries["mean_spread"][rows] = spread_A.mean(-1)
        summaries["rms_spread"][rows] = np.sqrt(np.square(spread_A).mean(-1))
        for name in ESTIMATORS:
            deviation_A = np.sqrt(np.square(draws_A - estimates[name][rows][:, None]).sum(-1).mean(-1))
            expected[name][rows] = np.einsum("bk,bk->b", w, deviation_A)
    numbers = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd").residue_numbers
    lid = (numbers >= LID[0]) & (numbers <= LID[1])
    nmp = (numbers >= NMP[0]) & (numbers <= NMP[1])
    true_distance_A = centroid_distance_A(truth_A, lid, nmp)
    true_gyration_A = radius_of_gyration_A(truth_A)
    result: dict = {"run": str(work), "particles": len(positions), "samples": samples, "estimators": {}}
    for name, estimate_A in estimates.items():
        error_A = rmsd_A(estimate_A, truth_A)
        distance_A = centroid_distance_A(estimate_A, lid, nmp)
        result["estimators"][name] = {
            "median_rmsd_A": float(np.median(error_A)),
            "mean_rmsd_A": float(error_A.mean()),
            "distance_correlation": float(np.corrcoef(distance_A, true_distance_A)[0, 1]),
            "radius_of_gyration_change_A": float((radius_of_gyration_A(estimate_A) - true_gyration_A).mean()),
            "spearman_mean_spread": float(spearmanr(summaries["mean_spread"], error_A).statistic),
            "spearman_rms_spread": float(spearmanr(summaries["rms_spread"], error_A).statistic),
            "spearman_expected_rmsd": float(spearmanr(expected[name], error_A).statistic),
        }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="+", type=Path)
    parser.add_argument("--particles", type=int, default=3000, help="the first N particles")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/posterior_estimators.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'run':<32} {'estimator':<25} {'median A':>8} {'mean A':>7} {'r':>6} {'dRg A':>6} "
          f"{'rho mean spread':>15} {'rho rms spread':>14} {'rho E[RMSD]':>11}")  # fmt: skip
    for work in args.work:
        rows.append(score(work, args.particles))
        for name, figures in rows[-1]["estimators"].items():
            print(f"{str(work)[-32:]:<32} {name:<25} {figures['median_rmsd_A']:>8.3f} {figures['mean_rmsd_A']:>7.3f} "
                  f"{figures['distance_correlation']:>6.3f} {figures['radius_of_gyration_change_A']:>+6.3f} "
                  f"{figures['spearman_mean_spread']:>15.3f} {figures['spearman_rms_spread']:>14.3f} "
                  f"{figures['spearman_expected_rmsd']:>11.3f}", flush=True)  # fmt: skip
        write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
