"""Time the original cryoSPHERE's (PyPI cryosphere 0.6.1) training step; runs inside that package's own environment.

compare_original.py starts this file with the Python of the original's virtual environment (it cannot import cryoflex).
Set-up is the original's own cryosphere.model.utils.parse_yaml, from experiment and image YAML files written here for
the simulated data set. Each step is the body of the batch loop of cryosphere_train.start_training, calling the
original's functions in its order: the next batch of a DataLoader over its ImageDataSet, SpatialGridTranslate.transform
and low_pass_images of the images, VAE.sample_latent (encoder), Segmentation.sample_segments, VAE.decode,
compute_translations_per_residue, deform_structure, renderer.rotate_structure, renderer.project, renderer.apply_ctf
divided by the data set's std, compute_loss (correlation, latent and segmentation KLs, l2 penalty, continuity, clash),
backward, Adam step, zero_grad.

Deviations, all from running in one CPU process (the original's train() needs CUDA and NCCL): no
DistributedDataParallel wrapper (the loop calls the bare modules through .module anyway), no DistributedSampler (a
DataLoader that shuffles with a seeded generator as that sampler does, with the loop's batch size, workers and
drop_last), and parse_yaml's device ('cpu' for device: CPU) where the loop passes its GPU rank. The first warm-up steps
run untimed; each timed step starts before its batch is loaded, as in train_throughput.py; the loss is read back after
the step's clock stops. Prints one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import starfile
import torch
import yaml
from _measure import AnonymousPeak, peak_rss_MB
from cryosphere.model import renderer
from cryosphere.model.loss import compute_loss
from cryosphere.model.utils import compute_translations_per_residue, deform_structure, low_pass_images, parse_yaml
from torch.utils.data import DataLoader

RESULT_PREFIX = "RESULT "  # as train_throughput.py's (which imports cryoflex, absent here)
RANK = 0  # the loop's process rank: the one that would log (wandb is off)
TRACKED_LOSSES = (
    "correlation_loss", "kl_prior_latent", "kl_prior_segmentation_mean", "kl_prior_segmentation_std",
    "kl_prior_segmentation_proportions", "l2_pen", "continuity_loss", "clashing_loss",
)  # fmt: skip
# Values of the original's example parameters.yaml for what cryoflex has no counterpart of.
EPSILON_KL = "1e-10"  # the original eval()s this text
L2_PENALTY_WEIGHT = 1e-6
INPUT_MASK_RADIUS = 1
CLASH_PAIR_RANGE_A = (4.0, 10.0)  # base-structure distances of the pairs of the light clash loss
VERSIONS_OF = ("cryosphere", "torch", "numpy", "roma", "biotite", "einops", "wandb")


def write_experiment(settings: dict[str, Any], data_dir: Path, structure: Path, work_dir: Path) -> Path:
    """Write the original's experiment and image YAML files for the data set; returns the experiment file."""
    star = data_dir / "particles.star"
    optics = starfile.read(star)["optics"]
    loss_term = {"schedule": "constant"}
    experiment = {
        "name": "compare_original", "wandb": False, "folder_path": str(work_dir),
        "base_structure_path": str(structure), "image_yaml": "images.yaml",
        "particles_path": str(data_dir), "cs_star_file": {"file": str(star)},
        "segmentation_config": {"part1": {"all_protein": True, "N_segm": settings["segments"]}},
        "lp_bandwidth": None, "input_mask_radius": INPUT_MASK_RADIUS,
        "latent_dimension": settings["latent_dim"], "tau_segmentation": 1.0 / settings["tau"], "device": "CPU",
        "num_workers": settings["num_workers"], "amortized": True, "N_images": None, "N_epochs": 1,
        "batch_size": settings["batch_size"], "epsilon_kl": EPSILON_KL, "seed": settings["seed"],
        "deterministic_cuda": False,
        "encoder": {"hidden_dimensions": settings["encoder_hidden"]},
        "decoder": {"hidden_dimensions": settings["decoder_hidden"]},
        "optimizer": {
            "name": "adam", "learning_rate": settings["learning_rate"],
            "learning_rate_segmentation": settings["segmentation_learning_rate"],
        },
        "loss": {
            "clashing_loss": {
                **loss_term, "beta": settings["clash_weight"], "full_clashing_loss": settings["full_clash"],
                "clashing_cutoff": settings["clash_cutoff_A"], "min_clashing_cutoff_pairs": CLASH_PAIR_RANGE_A[0],
                "max_clashing_cutoff_pairs": CLASH_PAIR_RANGE_A[1],
            },
            "continuity_loss": {**loss_term, "beta": settings["continuity_weight"]},
            "KL_prior_latent": {**loss_term, "beta": settings["latent_kl_weight"]},
            "KL_prior_segmentation_mean": {**loss_term, "beta": settings["segmentation_kl_weight"]},
            "KL_prior_segmentation_std": {**loss_term, "beta": settings["segmentation_kl_weight"]},
            "KL_prior_segmentation_proportions": {**loss_term, "beta": settings["segmentation_kl_weight"]},
            "l2_pen": {**loss_term, "beta": L2_PENALTY_WEIGHT},
        },
        "resume_training": {"model": None, "segmentation": None},
    }  # fmt: skip
    images = {
        "apix": float(optics["rlnImagePixelSize"].iloc[0]), "Npix": int(optics["rlnImageSize"].iloc[0]),
        "Npix_downsize": int(optics["rlnImageSize"].iloc[0]), "sigma_gmm": settings["sigma_A"],
    }  # fmt: skip
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "images.yaml").write_text(yaml.safe_dump(images))
    path = work_dir / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def time_steps(experiment: Path, seed: int, warmup: int, steps: int) -> dict[str, Any]:
    """Set up through parse_yaml, then run warmup + steps steps of the original's loop body; seconds per step."""
    (vae, image_translator, ctf, grid, gmm_repr, optimizer, dataset, _n_epochs, batch_size, experiment_settings,
     device, _scheduler, base_structure, lp_mask2d, _mask_images, amortized, path_results,
     structural_loss_parameters, segmenter) = parse_yaml(str(experiment), RANK)  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=True,
        num_workers=experiment_settings["num_workers"],
    )  # fmt: skip
    if len(loader) < warmup + steps:
        raise RuntimeError(f"{len(dataset)} particles: {len(loader)} batches of {batch_size}, need {warmup + steps}")
    n_residues = base_structure.coord.shape[0]
    tracking: dict[str, Any] = {"wandb": False, "epoch": 0, "path_results": path_results}
    tracking.update({name: [] for name in TRACKED_LOSSES})
    step_s, load_s, losses = [], [], []
    batches = iter(loader)
    started = time.perf_counter()
    for _ in range(warmup + steps):
        indexes, images, poses, shifts_px, _ = next(batches)
        loaded = time.perf_counter()
        centred = low_pass_images(image_translator.transform(images, shifts_px[:, None, :]), lp_mask2d)
        if amortized:
            latent, latent_mean, latent_std = vae.sample_latent(images.flatten(start_dim=-2))
        else:
            latent, latent_mean, latent_std = vae.sample_latent(None, indexes)
        segmentation = segmenter.sample_segments(images.shape[0])
        quaternions, translations = vae.decode(latent)
        shifts_per_residue = compute_translations_per_residue(
            translations, segmentation, n_residues, batch_size, device
        )
        deformed = deform_structure(gmm_repr.mus, shifts_per_residue, quaternions, segmentation, device)
        projections = renderer.project(
            renderer.rotate_structure(deformed, poses), gmm_repr.sigmas, gmm_repr.amplitudes, grid
        )
        predicted = renderer.apply_ctf(projections, ctf, indexes) / dataset.f_std
        loss = compute_loss(
            predicted, centred, None, latent_mean, latent_std, vae, segmenter, experiment_settings, tracking,
            structural_loss_parameters=structural_loss_parameters, epoch=0, predicted_structures=deformed,
            device=device,
        )  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        finished = time.perf_counter()
        step_s.append(finished - started)
        load_s.append(loaded - started)
        losses.append(loss.item())
        started = time.perf_counter()
    timed = step_s[warmup:]
    clash_pairs = structural_loss_parameters["clash_pairs"]
    return {
        "steps": steps,
        "ms_per_step": 1000.0 * sum(timed) / len(timed),
        "median_ms_per_step": 1000.0 * statistics.median(timed),
        "images_per_s": batch_size * len(timed) / sum(timed),
        "load_ms_per_step": 1000.0 * sum(load_s[warmup:]) / len(timed),
        "residues": n_residues,
        "clash": "full" if clash_pairs is None else f"{len(clash_pairs)} pairs",
        "nonfinite_loss_steps": sum(not math.isfinite(value) for value in losses),
        "losses": losses,
        "step_s": step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds particles.star and its stacks")
    parser.add_argument("--structure", type=Path, required=True, help="the base structure (PDB)")
    parser.add_argument("--work-dir", type=Path, required=True, help="for the YAML files and the original's outputs")
    parser.add_argument("--settings", type=json.loads, required=True, help="JSON: the run's settings")
    parser.add_argument("--warmup", type=int, required=True, help="untimed steps first")
    parser.add_argument("--steps", type=int, required=True, help="timed steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline_MB = peak_rss_MB()
    with AnonymousPeak() as anonymous:
        experiment = write_experiment(
            args.settings, args.data_dir.resolve(), args.structure.resolve(), args.work_dir.resolve()
        )
        result = time_steps(experiment, args.settings["seed"], args.warmup, args.steps)
    peak_MB = peak_rss_MB()
    result.update(
        baseline_rss_MB=baseline_MB, peak_rss_MB=peak_MB, rss_increase_MB=peak_MB - baseline_MB,
        peak_anonymous_rss_MB=anonymous.peak_MB, threads=torch.get_num_threads(),
        versions={name: metadata.version(name) for name in VERSIONS_OF},
    )  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
