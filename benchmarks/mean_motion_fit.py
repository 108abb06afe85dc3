"""Is a trained model's population offset under-optimised, or does the training objective itself prefer it?

Run: .venv/bin/python benchmarks/mean_motion_fit.py WORK [WORK ...] [--fit 7000] [--held-out 3000] [--iterations 15]
     [--out benchmarks/results/mean_motion_fit.json]
WORK is a recovery_adk.py work folder of one SNR (data/truth.npz, run/). Only the decoder's output bias is refitted
(6 numbers per segment: the motion added to every latent's, which sets the population's mean motion), by full-batch
L-BFGS on the training objective over the first FIT particles: the importance-weighted bound with the run's number of
draws (fixed draws of q, the mean segmentation) minus the continuity and clash priors at the run's weights. Everything
else stays as trained. Before and after it reports
- the bound on the next HELD_OUT particles, as a paired mean change +- its standard error (nats per image): above
  zero, training left the mean motion short of its objective's optimum in a way that holds for other images;
- the same on the fitted particles (fitting 6M numbers to N images gains about 6M / (2N) nats per image from their
  noise alone);
- the median RMSD to the truth of analysis's posterior-mean structures (64 weighted draws) on SCORED held-out and
  SCORED fitted particles;
- the population offset: the RMS over residues between the mean of POPULATION structures decoded from the prior and
  the mean of the ideal model over the particles (each segment fitted rigidly onto each particle's true frame, with
  the run's segmentation), and how much of it points from that ideal mean towards the nominal structure.
Given runs on independent datasets (recovery_adk.py --seed), it also splits their offsets before the fit into the part
they share (a bias of the method) and each run's own part (noise of the data and the optimiser).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rigid_floor import runs_of

from cryoflex.analysis.metrics import rmsd_A
from cryoflex.analysis.predict import (
    LatentPosterior,
    decode_latents,
    importance_log_weights,
    latent_posteriors,
    posterior_noise,
    posterior_structures,
)
from cryoflex.analysis.run import TrainedRun, load_run
from cryoflex.data.dataset import particle_loader
from cryoflex.geometry.superposition import superpose_A
from cryoflex.io.atomic import write_text_atomic
from cryoflex.model.cryosphere import noise_over_draws
from cryoflex.model.losses import (
    ClashNeighbourList,
    clash_loss,
    consecutive_pairs,
    continuity_loss,
    gaussian_image_nll,
    log_importance_weights,
)

SEED = 0
CHUNK = 256  # particles rendered at a time
SCORED = 2000  # particles whose posterior-mean structures are scored, in each of the two sets
POPULATION = 4000  # latents from the prior whose mean structure is the population's mean
SCORE_DRAWS = 64  # analysis's draws per particle


def ideal_mean_A(nominal_A: np.ndarray, truth_A: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 3) mean over particles of the ideal model's structure: each segment fitted rigidly onto each true frame."""
    fitted = np.empty_like(truth_A)
    for start, stop in runs_of(labels):
        fitted[:, start:stop] = superpose_A(nominal_A[start:stop], truth_A[:, start:stop])
    return fitted.mean(0)


class Objective:
    """The training objective of fixed particles and fixed draws, as a function of the decoder's output bias only."""

    def __init__(self, run: TrainedRun, posteriors: LatentPosterior, positions: np.ndarray):
        model, config = run.model, run.config
        self.model, self.config = model, config
        self.samples = max(config.importance_samples, 1)
        posterior = posteriors.subset(positions)
        chunks = [positions[start : start + CHUNK].tolist() for start in range(0, len(positions), CHUNK)]
        self.batches = list(particle_loader(run.dataset, chunks, num_workers=0))
        self.means = torch.as_tensor(posterior.mean).split(CHUNK)
        self.stds = torch.as_tensor(posterior.std).split(CHUNK)
        noise = posterior_noise(SEED + 1, positions, self.samples, posterior.mean.shape[1])  # not analysis's draws
        self.noises = torch.as_tensor(noise).split(CHUNK)
        self.pairs = consecutive_pairs(run.structure.chain_ids)
        nominal = model.nominal_coords_A
        self.reference_A = (nominal[self.pairs[:, 0]] - nominal[self.pairs[:, 1]]).norm(dim=-1)
        self.neighbours = ClashNeighbourList(
            run.structure.chain_ids, cutoff_A=config.clash_cutoff_A, skin_A=config.clash_skin_A
        )

    def per_image(self, with_grad: bool) -> tuple[np.ndarray, float]:
        """The bound of every particle (nats) and the mean loss (minus bound plus priors); with_grad accumulates
        the mean loss's gradient into the parameters that require it."""
        model, config, n = self.model, self.config, sum(len(b) for b in self.batches)
        bounds, total = [], 0.0
        for batch, mean, std, noise in zip(self.batches, self.means, self.stds, self.noises, strict=True):
            with torch.set_grad_enabled(with_grad):
                latent = mean[:, None] + std[:, None] * noise
                coords_A, density_A, _ = model.decode_with_density(latent.flatten(0, 1), sample_segmentation=False)
                rows = torch.arange(len(batch)).repeat_interleave(self.samples)
                spectra = model.render_spectra(density_A, batch.poses[rows], batch.ctf[rows])
                nll = gaussian_image_nll(
                    spectra.unflatten(0, (len(batch), self.samples)), torch.fft.rfft2(batch.images)[:, None],
                    noise_over_draws(model.noise_spectra(batch.optics_groups)), model.log_image_scale,
                )  # fmt: skip
                log_w = log_importance_weights(nll, latent, mean, std, config.latent_kl_weight)
                bound = torch.logsumexp(log_w, 1) - np.log(self.samples)
                loss = -bound.sum()
                if config.continuity_weight > 0 and len(self.pairs):
                    continuity = continuity_loss(coords_A, self.pairs[:, 0], self.reference_A)
                    continuity = continuity.view(len(batch), -1).mean(1)
                    loss = loss + config.continuity_weight * continuity.sum()
                if config.clash_weight > 0:
                    self.neighbours.update(coords_A.detach())
                    clash = clash_loss(coords_A, self.neighbours.pairs, cutoff_A=config.clash_cutoff_A)
                    loss = loss + config.clash_weight * clash.view(len(batch), -1).mean(1).sum()
                if with_grad:
                    (loss / n).backward()
            bounds.append(bound.detach().double().numpy())
            total += float(loss.detach()) / n
        return np.concatenate(bounds), total


def posterior_mean_rmsd_A(
    run: TrainedRun, posteriors: LatentPosterior, positions: np.ndarray, truth_A: np.ndarray
) -> float:
    """Median RMSD to the truth of analysis's posterior-mean structures of these particles."""
    posterior = posteriors.subset(positions)
    log_weights = importance_log_weights(
        run.model, run.dataset, posterior, samples=SCORE_DRAWS, seed=SEED, positions=positions
    )
    posterior = replace(posterior, log_weights=log_weights, weights_seed=SEED)
    chunks = posterior_structures(run.model, posterior, samples=SCORE_DRAWS, seed=SEED, positions=positions)
    predicted = np.concatenate([chunk.coords_A for chunk in chunks])
    return float(np.median(rmsd_A(predicted, truth_A[positions])))


def population_offset(run: TrainedRun, ideal_A: np.ndarray) -> dict:
    """How far the population's mean structure is from the ideal model's, and how much of that points to the nominal."""
    model = run.model
    latents = np.random.default_rng(SEED).standard_normal((POPULATION, model.encoder.latent_dim)).astype(np.float32)
    population_A = np.mean(np.concatenate(list(decode_latents(model, latents))), axis=0)
    offset_A = population_A - ideal_A
    towards_nominal_A = model.nominal_coords_A.numpy() - ideal_A
    cosine = float(np.sum(offset_A * towards_nominal_A) / np.linalg.norm(offset_A) / np.linalg.norm(towards_nominal_A))
    return {
        "offset_rms_A": float(np.sqrt(np.square(offset_A).sum(-1).mean())),
        "offset_cosine_to_nominal": cosine,
        "offset_vector_A": offset_A.tolist(),
    }


def offset_split(offsets_A: list[np.ndarray]) -> dict:
    """The population offsets of k runs on independent data, o_i = b + e_i, split into the part b that they share (a
    bias of the method) and the parts e_i of each run (data and optimiser noise, independent, of equal expected size):
    unbiased estimates of |b|^2 and E|e|^2, as RMS over residues."""
    stacked = np.stack(offsets_A)  # (k, n, 3)
    k = len(stacked)
    mean_A = stacked.mean(0)
    per_run_A2 = float(np.square(stacked - mean_A).sum(-1).mean(-1).sum() / (k - 1))
    shared_A2 = max(float(np.square(mean_A).sum(-1).mean()) - per_run_A2 / k, 0.0)
    return {
        "shared_rms_A": float(np.sqrt(shared_A2)),
        "per_run_rms_A": float(np.sqrt(per_run_A2)),
        "shared_share": shared_A2 / (shared_A2 + per_run_A2),
        "offset_rms_A": [float(np.sqrt(np.square(o).sum(-1).mean())) for o in stacked],
        "cosine_first_two": float(
            np.sum(stacked[0] * stacked[1]) / np.linalg.norm(stacked[0]) / np.linalg.norm(stacked[1])
        ),
    }


def fit(work: Path, n_fit: int, n_held_out: int, iterations: int) -> dict:
    torch.manual_seed(SEED)
    run = load_run(work / "run", device="cpu")
    model = run.model
    model.eval()
    truth = np.load(work / "data" / "truth.npz")
    truth_A = truth["conformations_A"][truth["conformation_index"]]
    fitted, held_out = np.arange(n_fit), np.arange(n_fit, n_fit + n_held_out)
    with torch.no_grad():
        labels = model.segmentation(False).argmax(1).numpy()
    ideal_A = ideal_mean_A(model.nominal_coords_A.numpy(), truth_A, labels)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    bias = model.decoder.net[-1].bias
    bias.requires_grad_(True)
    posteriors = latent_posteriors(model, run.dataset)  # the encoder is not refitted: its posteriors hold throughout
    objectives = {"fitted": Objective(run, posteriors, fitted), "held_out": Objective(run, posteriors, held_out)}

    def state() -> dict:
        figures: dict = {"offset": population_offset(run, ideal_A)}
        for name, objective in objectives.items():
            figures[f"{name}_bounds"], figures[f"{name}_loss"] = objective.per_image(with_grad=False)
            scored = (fitted if name == "fitted" else held_out)[:SCORED]
            figures[f"{name}_median_rmsd_A"] = posterior_mean_rmsd_A(run, posteriors, scored, truth_A)
        return figures

    started = time.perf_counter()
    before = state()
    initial_bias = bias.detach().clone()
    optimiser = torch.optim.LBFGS([bias], max_iter=iterations, line_search_fn="strong_wolfe", history_size=20)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        _, loss = objectives["fitted"].per_image(with_grad=True)
        return torch.tensor(loss)

    optimiser.step(closure)
    after = state()
    row: dict = {"work": str(work), "fitted": n_fit, "held_out": n_held_out, "iterations": iterations}
    for name in objectives:
        change = after[f"{name}_bounds"] - before[f"{name}_bounds"]
        row[f"{name}_bound_change"] = float(change.mean())
        row[f"{name}_bound_change_se"] = float(change.std(ddof=1) / np.sqrt(len(change)))
        row[f"{name}_loss_change"] = after[f"{name}_loss"] - before[f"{name}_loss"]
        row[f"{name}_median_rmsd_A"] = [before[f"{name}_median_rmsd_A"], after[f"{name}_median_rmsd_A"]]
    row["offset_rms_A"] = [before["offset"]["offset_rms_A"], after["offset"]["offset_rms_A"]]
    row["offset_cosine_to_nominal"] = [
        before["offset"]["offset_cosine_to_nominal"], after["offset"]["offset_cosine_to_nominal"]
    ]  # fmt: skip
    row["offset_vector_A"] = before["offset"]["offset_vector_A"]
    row["bias_change_rms"] = float((bias.detach() - initial_bias).square().mean().sqrt())
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, nargs="+")
    parser.add_argument("--fit", type=int, default=7000)
    parser.add_argument("--held-out", type=int, default=3000)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mean_motion_fit.json"))
    args = parser.parse_args()
    rows = [fit(work, args.fit, args.held_out, args.iterations) for work in args.work]
    print("| run | bound change, held out | fitted | RMSD held out (before -> after) | fitted | offset (A) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['work']} | {row['held_out_bound_change']:+.4f} +- {row['held_out_bound_change_se']:.4f} "
            f"| {row['fitted_bound_change']:+.4f} +- {row['fitted_bound_change_se']:.4f} "
            f"| {row['held_out_median_rmsd_A'][0]:.3f} -> {row['held_out_median_rmsd_A'][1]:.3f} "
            f"| {row['fitted_median_rmsd_A'][0]:.3f} -> {row['fitted_median_rmsd_A'][1]:.3f} "
            f"| {row['offset_rms_A'][0]:.3f} -> {row['offset_rms_A'][1]:.3f} |"
        )
    result: dict = {"runs": rows}
    if len(rows) > 1:
        result["offset_split"] = offset_split([np.asarray(row["offset_vector_A"]) for row in rows])
        split = result["offset_split"]
        print(
            f"population offsets of {len(rows)} runs: {split['shared_rms_A']:.3f} A shared by all, "
            f"{split['per_run_rms_A']:.3f} A of each run's own "
            f"({split['shared_share']:.0%} of the squared offset shared)"
        )
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
