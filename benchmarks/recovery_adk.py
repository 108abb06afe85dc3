"""End-to-end recovery of the AdK closed -> open motion: simulate, train on this machine, compare with the truth.

Run: .venv/bin/python benchmarks/recovery_adk.py --snr 0.1 --n-images 10000 --epochs 20 [--out benchmarks/results/...]
Simulates from the MD trajectory in tests/data (98 frames, 214 residues, frame 0 = closed = nominal), trains cryoflex
on the CPU, reopens the run as analysis does (the last checkpoint; the best by validation loss is scored too), takes
every particle's posterior-mean structure (64 structures decoded from samples of q(z | image), importance-weighted for
a model trained with the Gaussian likelihood, as analysis does) and reports: median per-image C-alpha RMSD to the true
conformation (and that of the structure decoded at the latent mean; both also split into the particles held out of
training, the validation share, and the trained ones) vs three constant predictions (the nominal
structure; two oracles chosen with the truth: the mean structure and the best single trajectory frame), the Bayes
bound (bayes_oracle.py: the exact posterior over the true frames), the Spearman correlation of each particle's
predicted uncertainty (its expected RMSD, as analysis reports it; the mean per-residue spread before) with its error,
the correlation of predicted vs true LID-NMP centroid distance (LID 122-159, NMP 30-59), the agreement of the learned
segments with LID/NMP/CORE (F1 of the segments whose majority is LID, resp. NMP),
the floor of the learned segmentation (rigid_floor.py: the median RMSD left when each segment is fitted rigidly onto
each image's true conformation), the learned population (structures decoded from the prior: LID-NMP distance
quantiles beside the truth's, RMSD to the nearest trajectory frame), the Bayes bound with the learned segmentation
(the exact posterior's average of the frames as the learned segments fit them: what a perfect encoder and decoder
with this segmentation would reach) and the wall times. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from math import nan
from pathlib import Path

import numpy as np
import torch
import yaml
from bayes_oracle import oracle_scores
from rigid_floor import runs_of, segmentation_floor_A
from scipy.stats import spearmanr

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.analysis.metrics import centroid_distance_A, domain_f1, recovery_summary, rmsd_A
from cryoflex.analysis.predict import (
    decode_latents,
    particle_posteriors,
    population_expected_rmsd_A,
    posterior_structures,
)
from cryoflex.analysis.run import TrainedRun, load_run
from cryoflex.config import load_config
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import read_trajectory
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.run_dir import RunDir
from cryoflex.simulate import SimulationConfig, read_noise_spectrum, simulate_dataset
from cryoflex.train.loop import train
from cryoflex.train.setup import read_particles, validation_mask

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
POSTERIOR_SAMPLES = DEFAULT_POSTERIOR_SAMPLES
BAYES_ORACLE_IMAGES = 3000  # the Bayes bound is a per-image expectation: 3,000 images pin it to about +-0.02
POPULATION_DRAWS = 1000  # latents from the prior decoded to describe the learned population
QUANTILES = (5, 25, 50, 75, 95)
BAYES_FIGURES = ("median_rmsd_A", "distance_correlation", "spread_error_spearman", "n_images")
LID = (122, 159)
NMP = (30, 59)


def domain_labels(residue_numbers: np.ndarray) -> np.ndarray:
    """0 = CORE, 1 = NMP, 2 = LID for each residue number."""
    labels = np.zeros(len(residue_numbers), dtype=int)
    labels[(residue_numbers >= NMP[0]) & (residue_numbers <= NMP[1])] = 1
    labels[(residue_numbers >= LID[0]) & (residue_numbers <= LID[1])] = 2
    return labels


def oracle_baselines(conformations_A: np.ndarray, conformation_index: np.ndarray) -> dict[str, float]:
    """Median per-image RMSD of the two best constant predictions, both chosen with the truth: the mean structure of the
    images' true conformations, and the single trajectory frame with the lowest median RMSD to them."""
    truth_A = conformations_A[conformation_index]
    mean_A = truth_A.mean(axis=0)
    counts = np.bincount(conformation_index, minlength=len(conformations_A))
    frame_medians = [
        float(np.median(np.repeat(rmsd_A(np.broadcast_to(frame, conformations_A.shape), conformations_A), counts)))
        for frame in conformations_A
    ]
    return {
        "ensemble_mean_median_rmsd_A": float(np.median(rmsd_A(np.broadcast_to(mean_A, truth_A.shape), truth_A))),
        "best_frame_median_rmsd_A": min(frame_medians),
        "best_frame": int(np.argmin(frame_medians)),
    }


def population_figures(
    model: CryoSphere, frames_A: np.ndarray, truth_A: np.ndarray, lid: np.ndarray, nmp: np.ndarray, seed: int
) -> dict:
    """The model's population without any image: structures decoded from POPULATION_DRAWS latents of the prior, their
    LID-NMP distance quantiles beside the true conformations', and their median RMSD to the nearest trajectory frame
    (how far the decoder's structures lie off the trajectory; compare with the segmentation's floor)."""
    latents = np.random.default_rng(seed).standard_normal((POPULATION_DRAWS, model.encoder.latent_dim))
    decoded = np.concatenate(list(decode_latents(model, latents.astype(np.float32))))
    nearest = [float(rmsd_A(np.broadcast_to(structure, frames_A.shape), frames_A).min()) for structure in decoded]
    return {
        "population_distance_quantiles_A": np.percentile(centroid_distance_A(decoded, lid, nmp), QUANTILES).tolist(),
        "truth_distance_quantiles_A": np.percentile(centroid_distance_A(truth_A, lid, nmp), QUANTILES).tolist(),
        "population_nearest_frame_median_rmsd_A": float(np.median(nearest)),
    }


def _scores(run: TrainedRun, truth_A: np.ndarray, lid: np.ndarray, nmp: np.ndarray, seed: int) -> dict:
    """Posterior-mean structures of every particle (and those decoded at the latent mean) against the truth."""
    model, dataset = run.model, run.dataset
    posterior = particle_posteriors(model, dataset, weighted=run.has_likelihood, samples=POSTERIOR_SAMPLES, seed=seed)
    chunks = list(posterior_structures(model, posterior, samples=POSTERIOR_SAMPLES, seed=seed))
    predicted = np.concatenate([chunk.coords_A for chunk in chunks])
    expected_rmsd_A = np.concatenate([chunk.expected_rmsd_A for chunk in chunks])  # the uncertainty analysis reports
    at_mean = np.concatenate(list(decode_latents(model, posterior.mean)))
    held_out = validation_mask(read_particles(run.config).names, run.config.validation_fraction)
    nominal_A = model.nominal_coords_A.cpu().numpy()
    figures = recovery_summary(predicted, truth_A, nominal_A, lid, nmp)
    at_mean_figures = recovery_summary(at_mean, truth_A, nominal_A, lid, nmp)
    figures.update(
        epoch=run.epoch, posterior_samples=POSTERIOR_SAMPLES,
        at_latent_mean_median_rmsd_A=at_mean_figures["median_rmsd_A"],
        at_latent_mean_distance_correlation=at_mean_figures["distance_correlation"],
        spread_error_spearman=float(spearmanr(expected_rmsd_A, rmsd_A(predicted, truth_A)).statistic),
        sigma_A=float(model.sigma_A.detach()),  # the width the model renders (learned unless fixed)
        # how much the images say, as analysis reports it: the particles' median expected RMSD against the population's
        median_expected_rmsd_A=float(np.median(expected_rmsd_A)),
        population_expected_rmsd_A=population_expected_rmsd_A(model, seed=seed),
    )  # fmt: skip
    # The particles held out of training (the validation share): what a particle the model never trained on gets.
    # The encoder learns q(z | image) of the training images from their importance weights, so its mean says more
    # about those than about new images; the weighted posterior is the model's whatever q learned, while q's draws
    # still cover it.
    if held_out.any():
        figures.update(
            held_out_particles=int(held_out.sum()),
            held_out_median_rmsd_A=float(np.median(rmsd_A(predicted[held_out], truth_A[held_out]))),
            trained_median_rmsd_A=float(np.median(rmsd_A(predicted[~held_out], truth_A[~held_out]))),
            held_out_at_latent_mean_median_rmsd_A=float(np.median(rmsd_A(at_mean[held_out], truth_A[held_out]))),
            trained_at_latent_mean_median_rmsd_A=float(np.median(rmsd_A(at_mean[~held_out], truth_A[~held_out]))),
        )  # fmt: skip
    return figures


def run_recovery(
    out: Path,
    *,
    snr: float,
    n_images: int,
    epochs: int,
    box_size_px: int = 64,
    pixel_size_A: float = 2.0,
    downsample: int | None = None,
    seed: int = 0,
    train_overrides: dict | None = None,
    noise_spectrum: tuple[tuple[float, float], ...] | None = None,
    progress: bool = True,
) -> dict:
    """Simulate, train and evaluate under `out`; returns the figures."""
    ensemble = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd")
    started = time.perf_counter()
    simulation = SimulationConfig(
        n_images=n_images, box_size_px=box_size_px, pixel_size_A=pixel_size_A, snr=snr, seed=seed,
        defocus_min_A=5000.0, defocus_max_A=20000.0, noise_spectrum=noise_spectrum,
    )  # fmt: skip
    star = simulate_dataset(ensemble, simulation, out / "data", progress=progress)
    simulate_s = time.perf_counter() - started
    values = dict(
        particles=str(star), structure=str(out / "data" / "nominal.pdb"), epochs=epochs, downsample=downsample,
        seed=seed, progress=progress, device="cpu",
    )  # fmt: skip
    values.update(train_overrides or {})
    config = load_config(None, values)
    started = time.perf_counter()
    train(config, out / "run")
    train_s = time.perf_counter() - started

    truth = np.load(out / "data" / "truth.npz")
    truth_A = truth["conformations_A"][truth["conformation_index"]]
    numbers = ensemble.residue_numbers
    lid = (numbers >= LID[0]) & (numbers <= LID[1])
    nmp = (numbers >= NMP[0]) & (numbers <= NMP[1])
    summary: dict = {}
    has_best = RunDir(out / "run").best_checkpoint.is_file()
    for checkpoint in ("best", "last") if has_best else ("last",):  # analysis loads the last by default: main figures
        run = load_run(out / "run", checkpoint=checkpoint, device="cpu")
        figures = _scores(run, truth_A, lid, nmp, seed)
        if checkpoint == "best":
            summary.update({f"best_checkpoint_{name}": value for name, value in figures.items()})
        else:
            summary.update(figures)
    summary.update(oracle_baselines(truth["conformations_A"], truth["conformation_index"]))
    summary.update(population_figures(run.model, truth["conformations_A"], truth_A, lid, nmp, seed))
    model = run.model
    with torch.no_grad():
        segments = model.segmentation(False).argmax(1).cpu().numpy()
    bayes = oracle_scores(out / "data", downsample or box_size_px, BAYES_ORACLE_IMAGES, segmentation=segments)
    summary.update({f"bayes_{name}": bayes[name] for name in BAYES_FIGURES})
    summary["bayes_learned_segmentation_median_rmsd_A"] = bayes["ideal_rigid_segments"]["given"]["median_rmsd_A"]
    conformations_A = truth["conformations_A"]
    floor_A = segmentation_floor_A(conformations_A[int(truth["nominal_frame"])], conformations_A, segments)
    summary.update(
        snr=snr, n_images=n_images, epochs=epochs, box_px=box_size_px, downsample=downsample,
        nmp_f1=domain_f1(segments, domain_labels(numbers), 1), lid_f1=domain_f1(segments, domain_labels(numbers), 2),
        segment_ranges=[f"{numbers[a]}-{numbers[b - 1]}" for a, b in runs_of(segments)],
        rigid_floor_median_rmsd_A=float(np.median(floor_A[truth["conformation_index"]])),
        simulate_s=simulate_s, train_s=train_s,
        train_images_per_s=n_images * epochs / train_s, threads=torch.get_num_threads(),
    )  # fmt: skip
    return summary


def print_table(rows: list[dict]) -> None:
    """One line per run: the posterior-mean RMSD and distance correlation beside the constant predictions."""
    print(
        "snr     images epochs  RMSD  at-mean  nominal  mean*  frame*  Bayes*  dist r (Bayes*)  spread rho (Bayes*)"
        "  floor  Bayes|seg*  NMP F1  LID F1  train s"
    )
    for row in rows:
        print(
            f"{row['snr']:<7} {row['n_images']:>6} {row['epochs']:>6} {row['median_rmsd_A']:>5.2f} "
            f"{row['at_latent_mean_median_rmsd_A']:>8.2f} {row['baseline_median_rmsd_A']:>8.2f} "
            f"{row['ensemble_mean_median_rmsd_A']:>6.2f} {row['best_frame_median_rmsd_A']:>7.2f} "
            f"{row['bayes_median_rmsd_A']:>7.2f} {row['distance_correlation']:>7.3f} "
            f"({row['bayes_distance_correlation']:.3f}) {row['spread_error_spearman']:>11.3f} "
            f"({row['bayes_spread_error_spearman']:.3f}) "
            f"{row['rigid_floor_median_rmsd_A']:>6.2f} "
            f"{row.get('bayes_learned_segmentation_median_rmsd_A', nan):>11.2f} "
            f"{row['nmp_f1']:>7.3f} {row['lid_f1']:>7.3f} {row['train_s']:>8.0f}"
            + (f"   best.pt: epoch {row['best_checkpoint_epoch']}, RMSD {row['best_checkpoint_median_rmsd_A']:.2f}, "
               f"r {row['best_checkpoint_distance_correlation']:.3f}" if "best_checkpoint_epoch" in row else "")
        )
    print(
        "(* oracles chosen with the truth: the mean structure and the best single frame for every image; Bayes: the"
        " exact posterior over the true frames, bayes_oracle.py; Bayes|seg: the same posterior's average of the"
        " frames as the learned segments fit them rigidly, what a perfect decoder with this segmentation would reach)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--box-px", type=int, default=64)
    parser.add_argument("--pixel-size-A", type=float, default=2.0)
    parser.add_argument("--downsample", type=int)
    parser.add_argument("--segments", type=int, help="(default: the training default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the simulated images and the training")
    parser.add_argument("--noise-spectrum", type=Path, metavar="CSV",
                        help="coloured noise (cryoflex simulate --noise-spectrum), e.g. real_noise_spectrum.py's")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="training settings (YAML values)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryoflex_recovery"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery_adk.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = {name: yaml.safe_load(value) for name, value in (item.split("=", 1) for item in args.set)}
    rows = []
    for snr in args.snr:
        work = args.work / f"snr{snr}"
        if work.exists():
            import shutil

            shutil.rmtree(work)
        row = run_recovery(
            work, snr=snr, n_images=args.n_images, epochs=args.epochs, box_size_px=args.box_px,
            pixel_size_A=args.pixel_size_A, downsample=args.downsample, seed=args.seed,
            train_overrides={**settings, **({} if args.segments is None else {"segments": args.segments})},
            noise_spectrum=None if args.noise_spectrum is None else read_noise_spectrum(args.noise_spectrum),
        )  # fmt: skip
        row["noise_spectrum"] = None if args.noise_spectrum is None else args.noise_spectrum.name
        rows.append(row)
        print(json.dumps(row, indent=1))
    print_table(rows)
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
