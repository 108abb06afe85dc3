"""The best any estimator can do on a simulated dataset: the exact posterior over the true conformations.

Run: .venv/bin/python benchmarks/bayes_oracle.py DATA_DIR [DATA_DIR ...] [--box-px 64 32] [--max-images 10000]
DATA_DIR is a `cryoflex simulate` output (truth.npz, particles.star, stacks/). For every image the oracle knows
everything but the conformation: the trajectory frames, each image's pose and CTF, the image-formation model and the
noise variance. It scores each frame by the exact Gaussian log-likelihood of the image, takes the posterior over frames
(prior = how often the simulation drew each frame) and reports the posterior-mean structure and LID-NMP distance, scored
as recovery_adk.py scores a trained model. No method that learns the conformations from the images can beat it in
expectation; it bounds what the benchmark's targets can ask for. The posterior mean has the least expected squared
RMSD; the targets count RMSD, whose least expected value belongs to the posterior's geometric median, also reported.
How well uncertainty can rank the errors: the Spearman correlation with the posterior mean's RMSD of its RMS spread
and of its expected RMSD (the posterior-weighted RMSD of the frames from it, what cryoflex analysis reports).
--box-px 32 repeats it on the Fourier-cropped images that training at --downsample 32 sees (each frame rendered in the
full box and cropped the same way; noise variance measured from the residual of the true frame). Coloured noise
(`cryoflex simulate --noise-spectrum`, recorded in truth.npz) is whitened by its known spectrum in the full box,
images and frames alike, so the likelihood stays exact. On
recovery_all_atom.py's particles it renders every heavy atom, as they were made. --scale-per-image repeats it with
each image's scale fitted, as cryoflex's likelihood once did. --segments K [K ...] adds, for each K, the ideal
K-segment model: the same exact posterior, but every frame replaced by its best rigid fit with the best contiguous
K-segmentation of the trajectory (rigid_floor.py), which is what a cryoSPHERE model with K segments, a perfect decoder
and an exact posterior would average. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np
import torch
from rigid_floor import best_contiguous_cuts, labels_of, runs_of, segment_costs_A2
from scipy.stats import spearmanr

from cryoflex.analysis.metrics import centroid_distance_A, rmsd_A
from cryoflex.data.downsample import fourier_crop
from cryoflex.geometry.superposition import superpose_A
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.metadata import read_metadata
from cryoflex.simulate import noise_colouring

LID = (122, 159)
NMP = (30, 59)
FRAMES_PER_CHUNK_IMAGES = 32


def _images(data_dir: Path, count: int) -> np.ndarray:
    """The first `count` noisy images of the dataset, in star-file order."""
    out = []
    for path in sorted((data_dir / "stacks").glob("*.mrcs")):
        with mrcfile.mmap(path, mode="r", permissive=True) as stack:
            out.append(np.asarray(stack.data[: count - sum(len(o) for o in out)], dtype=np.float32))
        if sum(len(o) for o in out) >= count:
            break
    return np.concatenate(out)


def frame_log_likelihoods(
    data_dir: Path, box_px: int, n_images: int, *, scale_per_image: bool = False
) -> tuple[np.ndarray, float]:
    """(n_images, n_frames) Gaussian log-likelihood of every image under every frame, and the noise variance used.

    scale_per_image: each image's own least-squares scale (>= 0) and offset instead of the known ones (the likelihood
    cryoflex trained with before it learned one scale), to measure what fitting them costs.
    """
    truth = np.load(data_dir / "truth.npz")
    metadata = read_metadata(data_dir / "particles.star")
    # the particles' own density: every heavy atom for recovery_all_atom.py's particles, else the scored frames
    every_atom = "rendered_frames_A" in truth
    frames_key, amplitudes_key = (
        ("rendered_frames_A", "rendered_amplitudes_e") if every_atom else ("conformations_A", "amplitudes_e")
    )
    frames = torch.as_tensor(truth[frames_key], dtype=torch.float32)
    amplitudes = torch.as_tensor(truth[amplitudes_key], dtype=torch.float32)
    full_box = metadata.box_size_px
    spectrum = truth["noise_spectrum"] if "noise_spectrum" in truth else np.zeros((0, 2))
    colouring = None
    if len(spectrum):
        colouring = torch.as_tensor(noise_colouring(spectrum, full_box, float(truth["pixel_size_A"])))

    def whitened(images: torch.Tensor) -> torch.Tensor:
        """Images whose noise is white: divided in Fourier space by the colouring the simulation applied."""
        if colouring is None:
            return images
        return torch.fft.irfft2(torch.fft.rfft2(images.double()) / colouring, s=images.shape[-2:]).to(images.dtype)

    # rendered as the particles were, in the full box, then Fourier-cropped as they are: exact at any box (a render
    # at the cropped box would alias narrow Gaussians, e.g. atoms of 1.5 A on 4 A pixels)
    formation = ImageFormation(full_box, float(truth["pixel_size_A"]), float(truth["sigma_A"]))
    poses = PoseBatch(torch.as_tensor(metadata.rotations, dtype=torch.float32),
                      torch.as_tensor(metadata.shifts_A, dtype=torch.float32))  # fmt: skip
    ctf = CTFBatch.from_record(metadata.ctf, dtype=torch.float32)
    observed = whitened(torch.as_tensor(_images(data_dir, n_images)))
    if box_px != full_box:
        observed = fourier_crop(observed, box_px)
    observed = observed.double()
    index = truth["conformation_index"][:n_images]
    n_frames = len(frames)
    residual_sq = torch.zeros(n_images, n_frames, dtype=torch.float64)
    fitted_residual_sq = torch.zeros_like(residual_sq)
    with torch.no_grad():
        for start in range(0, n_images, FRAMES_PER_CHUNK_IMAGES):
            stop = min(n_images, start + FRAMES_PER_CHUNK_IMAGES)
            b = stop - start
            rows = torch.arange(start, stop).repeat_interleave(n_frames)
            coords = frames.repeat(b, 1, 1)
            clean = whitened(formation.images(coords, amplitudes, poses[rows], ctf[rows]))
            if box_px != full_box:
                clean = fourier_crop(clean, box_px)
            clean = clean.reshape(b, n_frames, box_px * box_px).double()
            images = observed[start:stop, None].flatten(2)
            residual_sq[start:stop] = (images - clean).square().sum(-1)
            clean = clean - clean.mean(-1, keepdim=True)
            images = images - images.mean(-1, keepdim=True)
            inner = (images * clean).sum(-1).clamp_min(0.0)
            fitted_residual_sq[start:stop] = images.square().sum(-1) - inner.square() / clean.square().sum(-1)
    pixels = box_px * box_px
    noise_variance = float(residual_sq[torch.arange(n_images), torch.as_tensor(index)].mean() / pixels)
    chosen = fitted_residual_sq if scale_per_image else residual_sq
    return (-chosen / (2 * noise_variance)).numpy(), noise_variance


def rigid_segment_frames_A(
    frames_A: np.ndarray, nominal_frame: int, segments: Sequence[int]
) -> dict[int, np.ndarray]:
    """For each K in segments: every frame (f, n, 3) as the best rigid fit of each segment of the nominal frame onto
    it, with the contiguous K-segmentation that fits the whole trajectory best."""
    if not segments:
        return {}
    nominal_A = frames_A[nominal_frame]
    cost_A2 = segment_costs_A2(nominal_A, frames_A)
    return {k: fitted_frames_A(nominal_A, frames_A, labels_of(best_contiguous_cuts(cost_A2, k))) for k in segments}


def fitted_frames_A(nominal_A: np.ndarray, frames_A: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """frames_A with each contiguous run of labels (one per residue) replaced by the rigid fit of the nominal's
    residues onto it."""
    fitted = np.empty_like(frames_A)
    for a, b in runs_of(labels):
        fitted[:, a:b] = superpose_A(nominal_A[a:b], frames_A[:, a:b])
    return fitted


def geometric_median_A(weights: np.ndarray, structures_A: np.ndarray, *, iterations: int = 30) -> np.ndarray:
    """(i, k) weights (rows sum to 1) over k structures (k, n, 3) -> (i, n, 3): for each row the structure x that
    minimises sum_k w_k ||x - X_k||, i.e. the expected RMSD (the posterior mean minimises the expected squared RMSD
    instead). Weiszfeld's iteration, started from the weighted mean."""
    estimate = np.einsum("ik,knd->ind", weights, structures_A)
    for _ in range(iterations):
        distance = np.sqrt(np.square(estimate[:, None] - structures_A[None]).sum((-1, -2)))
        inverse = weights / np.maximum(distance, 1e-9)
        estimate = np.einsum("ik,knd->ind", inverse, structures_A) / inverse.sum(1)[:, None, None]
    return estimate


def expected_rmsd_A(weights: np.ndarray, structures_A: np.ndarray, estimate_A: np.ndarray) -> np.ndarray:
    """(i, k) weights over k structures (k, n, 3) and an estimate (i, n, 3) per row -> (i,) the weighted mean RMSD of
    the structures from the row's estimate: the uncertainty analysis reports for each particle."""
    distance_A = np.sqrt(np.square(estimate_A[:, None] - structures_A[None]).sum(-1).mean(-1))
    return (weights * distance_A).sum(1)


def oracle_scores(
    data_dir: Path,
    box_px: int,
    n_images: int,
    *,
    scale_per_image: bool = False,
    segments: Sequence[int] = (),
    segmentation: np.ndarray | None = None,
) -> dict:
    """Posterior-mean structure and distance of every image under the exact frame posterior, against the truth
    (scale_per_image: under the likelihood that fits each image's scale, see frame_log_likelihoods). Also the ideal
    model with each number of rigid segments in `segments` (rigid_segment_frames_A) and, as "given", with the
    segmentation `segmentation` (a segment label per residue, e.g. a trained model's)."""
    truth = np.load(data_dir / "truth.npz")
    n_images = min(n_images, len(truth["conformation_index"]))
    log_likelihood, noise_variance = frame_log_likelihoods(data_dir, box_px, n_images, scale_per_image=scale_per_image)
    frames_A = truth["conformations_A"].astype(np.float64)
    index = truth["conformation_index"]
    prior = np.bincount(index, minlength=len(frames_A)) / len(index)
    log_posterior = log_likelihood + np.log(np.maximum(prior, 1e-300))
    log_posterior -= log_posterior.max(axis=1, keepdims=True)
    posterior = np.exp(log_posterior)
    posterior /= posterior.sum(axis=1, keepdims=True)
    index = index[:n_images]
    truth_A = frames_A[index]
    predicted_A = np.einsum("ik,knd->ind", posterior, frames_A)
    numbers = np.arange(1, frames_A.shape[1] + 1)
    lid = (numbers >= LID[0]) & (numbers <= LID[1])
    nmp = (numbers >= NMP[0]) & (numbers <= NMP[1])
    frame_distance_A = centroid_distance_A(frames_A, lid, nmp)
    predicted_distance_A = posterior @ frame_distance_A
    # RMS distance of the posterior's frames from the posterior mean: E||X||^2 - ||E X||^2 per residue
    frame_power = np.square(frames_A).sum((1, 2))
    spread_A = np.sqrt(np.maximum(posterior @ frame_power - np.square(predicted_A).sum((1, 2)), 0) / frames_A.shape[1])
    expected_A = expected_rmsd_A(posterior, frames_A, predicted_A)
    nominal_frame = int(truth["nominal_frame"])
    by_count = rigid_segment_frames_A(frames_A, nominal_frame, segments)
    models = {f"segments_{k}": fitted_A for k, fitted_A in by_count.items()}
    if segmentation is not None:
        models["given"] = fitted_frames_A(frames_A[nominal_frame], frames_A, segmentation)
    ideal = {}
    for name, fitted_A in models.items():
        ideal[name] = {
            "median_rmsd_A": float(np.median(rmsd_A(np.einsum("ik,knd->ind", posterior, fitted_A), truth_A))),
            "distance_correlation": float(np.corrcoef(
                posterior @ centroid_distance_A(fitted_A, lid, nmp), frame_distance_A[index])[0, 1]),
            "floor_median_rmsd_A": float(np.median(rmsd_A(fitted_A[index], truth_A))),
            "best_frame_median_rmsd_A": min(float(np.median(rmsd_A(frame[None], truth_A))) for frame in fitted_A),
        }  # fmt: skip
    entropy = -(posterior * np.log(np.maximum(posterior, 1e-300))).sum(1)
    prior_entropy = -(prior[prior > 0] * np.log(prior[prior > 0])).sum()
    return {
        "data": str(data_dir), "snr": float(truth["snr"]), "box_px": box_px, "n_images": n_images,
        "scale_per_image": scale_per_image,
        "noise_variance": noise_variance,
        "median_rmsd_A": float(np.median(rmsd_A(predicted_A, truth_A))),
        "distance_correlation": float(np.corrcoef(predicted_distance_A, frame_distance_A[index])[0, 1]),
        "map_frame_median_rmsd_A": float(np.median(rmsd_A(frames_A[posterior.argmax(1)], truth_A))),
        "geometric_median_median_rmsd_A": float(np.median(rmsd_A(geometric_median_A(posterior, frames_A), truth_A))),
        "spread_error_spearman": float(spearmanr(spread_A, rmsd_A(predicted_A, truth_A)).statistic),
        "expected_rmsd_error_spearman": float(spearmanr(expected_A, rmsd_A(predicted_A, truth_A)).statistic),
        "information_nats": float(prior_entropy - entropy.mean()),
        "ideal_rigid_segments": ideal,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--box-px", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--max-images", type=int, default=10000)
    parser.add_argument("--scale-per-image", action="store_true",
                        help="also score under the likelihood that fits each image's scale (cryoflex's earlier one)")
    parser.add_argument("--segments", type=int, nargs="+", default=[],
                        help="also score the ideal model with each of these numbers of rigid segments")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bayes_oracle.json"))
    args = parser.parse_args()
    rows = [
        oracle_scores(data, box, args.max_images, scale_per_image=fitted, segments=args.segments)
        for fitted in ((False, True) if args.scale_per_image else (False,))
        for data in args.data
        for box in args.box_px
    ]
    print("snr      box  images  scale      posterior-mean RMSD  geometric median  MAP frame RMSD  dist r  spread rho"
          "  E[RMSD] rho  information")
    for row in rows:
        scale = "per image" if row["scale_per_image"] else "known"
        print(
            f"{row['snr']:<8} {row['box_px']:>3} {row['n_images']:>7}  {scale:<9} {row['median_rmsd_A']:>20.2f} "
            f"{row['geometric_median_median_rmsd_A']:>17.2f} {row['map_frame_median_rmsd_A']:>15.2f} "
            f"{row['distance_correlation']:>7.3f} "
            f"{row['spread_error_spearman']:>11.3f} {row['expected_rmsd_error_spearman']:>12.3f} "
            f"{row['information_nats']:>6.2f} nats"
        )
    for row in rows:
        for name, ideal in row["ideal_rigid_segments"].items():
            print(
                f"{row['snr']:<8} {row['box_px']:>3}  ideal model, {name.replace('_', ' ')}: posterior-mean RMSD "
                f"{ideal['median_rmsd_A']:.2f}, dist r {ideal['distance_correlation']:.3f}, floor "
                f"{ideal['floor_median_rmsd_A']:.2f}, its best frame {ideal['best_frame_median_rmsd_A']:.2f}"
            )
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
