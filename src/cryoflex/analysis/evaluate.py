"""A trained run against the ground truth of a simulation: structure RMSD, distances, FSC of volumes, clashes.

The truth is the truth.npz that `cryoflex simulate` writes: for every particle (matched by name, never by
position) the index of its conformation, and the conformations in the model frame. Each predicted structure is
the particle's posterior mean, as analysis gives it: structures decoded from draws of q(z | image) with the mean
segmentation, importance-weighted for a model trained with the Gaussian likelihood.

Baselines, so that a number means something: "nominal" predicts the run's nominal structure for every image;
"best fixed" predicts, for every image, the one truth conformation whose median direct RMSD to all images is
lowest (the best any single structure could do, chosen with the truth).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.spatial import cKDTree
from scipy.stats import pearsonr, spearmanr

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.analysis.fsc import FSC_THRESHOLDS, fourier_shell_correlation, resolution_at
from cryoflex.analysis.latent import new_figure, save_figure
from cryoflex.analysis.metrics import centroid_distance_A, json_number, rmsd_A, superposed_rmsd_A
from cryoflex.analysis.predict import (
    check_posterior_options,
    particle_posteriors,
    posterior_structures,
)
from cryoflex.analysis.run import TrainedRun
from cryoflex.errors import CryoflexInputError, numpy_load_problem
from cryoflex.imaging.volume import gaussian_volume, map_box_px
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.metadata import ParticleMetadata
from cryoflex.io.metadata.record import SAME_PARTICLE_DEFOCUS_A, defocus_disagrees
from cryoflex.io.residues import select_residues
from cryoflex.io.structure import Structure
from cryoflex.progress import Progress

logger = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
CLASH_CUTOFF_A = 4.0
_TRUTH_FIELDS = ("conformation_index", "conformations_A", "names")
_FRAME_WARNING_RMSD_A = 1.0


@dataclass(frozen=True)
class Truth:
    """Ground truth of a simulation: conformation of each named particle, and the conformations (model frame)."""

    path: Path
    names: np.ndarray  # (n,) str
    conformation_index: np.ndarray  # (n,) int
    conformations_A: np.ndarray  # (k, n_residues, 3)
    nominal_frame: int | None
    defocus_u_A: np.ndarray | None = None  # (n,) the simulated defocus: tells whether the truth is these particles'


def read_truth(path: Path) -> Truth:
    """Read truth.npz; CryoflexInputError naming the field when it is missing or inconsistent."""
    path = Path(path)
    fix = "give the truth.npz written by cryoflex simulate for these particles"
    if path.is_dir() and (path / "truth.npz").is_file():
        path = path / "truth.npz"  # the folder cryoflex simulate wrote
    if not path.is_file():
        raise CryoflexInputError(path, "a directory, not a file" if path.is_dir() else "no such file", fix=fix,
                                 field="--truth")  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as npz:
            fields = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as error:
        raise CryoflexInputError(
            path, f"not a readable .npz file ({numpy_load_problem(error)})", fix=fix, field="--truth"
        ) from error
    for name in _TRUTH_FIELDS:
        if name not in fields:
            raise CryoflexInputError(path, f"has no field {name!r}", fix=fix, field=name)
    conformations = np.asarray(fields["conformations_A"], dtype=np.float64)
    if conformations.ndim != 3 or conformations.shape[2] != 3:
        raise CryoflexInputError(
            path, f"must have shape (k, n_residues, 3), not {conformations.shape}", fix=fix, field="conformations_A"
        )
    names = np.asarray(fields["names"]).astype(str)
    index = np.asarray(fields["conformation_index"]).astype(np.int64)
    if index.shape != names.shape:
        raise CryoflexInputError(
            path, f"has {index.size} entries but names has {names.size}", fix=fix, field="conformation_index"
        )
    if index.size and (index.min() < 0 or index.max() >= len(conformations)):
        raise CryoflexInputError(
            path, f"points outside the {len(conformations)} conformations", fix=fix, field="conformation_index"
        )
    nominal_frame = int(fields["nominal_frame"]) if "nominal_frame" in fields else None
    defocus_u_A = np.asarray(fields["defocus_u_A"], np.float64) if "defocus_u_A" in fields else None
    if defocus_u_A is not None and defocus_u_A.shape != names.shape:
        raise CryoflexInputError(
            path, f"has {defocus_u_A.size} entries but names has {names.size}", fix=fix, field="defocus_u_A"
        )
    return Truth(path, names, index, conformations, nominal_frame, defocus_u_A)


def truth_rows(particle_names: np.ndarray, truth: Truth) -> np.ndarray:
    """Row of the truth for each particle, matched by name; CryoflexInputError when a particle is not there."""
    truth_index = pd.Index(truth.names)
    if not truth_index.is_unique:
        raise CryoflexInputError(
            truth.path, "particle names are not unique", fix="use the truth.npz of cryoflex simulate", field="names"
        )
    rows = truth_index.get_indexer(np.asarray(particle_names, dtype=str))
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        raise CryoflexInputError(
            truth.path,
            f"{missing.size} of {rows.size} particles of the run are not in the truth "
            f"(first: {str(particle_names[missing[0]])!r})",
            fix="evaluate against the truth.npz of the simulation these particles come from",
            field="names",
        )
    return rows


def check_truth_matches_particles(metadata: ParticleMetadata, rows: np.ndarray, truth: Truth) -> None:
    """Refuse a truth whose simulated defocus is not the particles' own for most of them: particle names such as
    '000001@particles_000.mrcs' repeat in every simulation, so a truth of another one would match them all by name."""
    if truth.defocus_u_A is None or metadata.ctf is None:
        return
    in_file_A, in_truth_A = metadata.ctf.defocus_u_A, truth.defocus_u_A[rows]
    differ = defocus_disagrees(in_file_A, in_truth_A)
    if differ is not None:  # most particles: another dataset, not a refined one
        first = int(np.argmax(differ))
        raise CryoflexInputError(
            truth.path,
            f"the defocus of {int(differ.sum())} of {differ.size} particles in {metadata.source_path} is more than "
            f"{SAME_PARTICLE_DEFOCUS_A:g} A from the truth's (e.g. {metadata.names[first]}: {in_file_A[first]:.1f} A, "
            f"the truth {in_truth_A[first]:.1f} A): it is the truth of another simulation",
            fix="evaluate against the truth.npz written beside these particles by cryoflex simulate",
            field="defocus_u_A",
        )


def parse_residue_group(spec: str, structure: Structure) -> np.ndarray:
    """Residue indices of a group "A:122-159" (chain A, residue numbers 122..159) or "A" (whole chain)."""
    try:
        return select_residues(spec, structure)
    except ValueError as error:
        raise CryoflexInputError(
            structure.source_path,
            f"residue group {spec!r}: {error}",
            fix="write CHAIN or CHAIN:FIRST-LAST, e.g. A:122-159",
            field="--distance",
        ) from None


def clash_count(coords_A: np.ndarray, chain_ids: np.ndarray, cutoff_A: float = CLASH_CUTOFF_A) -> int:
    """Pairs of residues closer than cutoff_A, leaving out consecutive residues (i, i + 1 in the same chain)."""
    pairs = cKDTree(coords_A).query_pairs(cutoff_A, output_type="ndarray")
    if pairs.size == 0:
        return 0
    first, second = pairs.min(axis=1), pairs.max(axis=1)
    close = np.linalg.norm(coords_A[first] - coords_A[second], axis=1) < cutoff_A
    consecutive = (second == first + 1) & (chain_ids[first] == chain_ids[second])
    return int(np.sum(close & ~consecutive))


def _stats(values: np.ndarray) -> dict[str, float | None]:
    return {"median": json_number(float(np.median(values))), "mean": json_number(float(np.mean(values)))}


def _correlations(predicted: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman correlation; NaN when either side is constant."""
    if np.ptp(predicted) == 0 or np.ptp(true) == 0:
        return math.nan, math.nan
    return float(pearsonr(predicted, true).statistic), float(spearmanr(predicted, true).statistic)


@dataclass(frozen=True)
class _VolumeGrid:
    box_size_px: int
    voxel_size_A: float
    sigma_A: float
    amplitudes: torch.Tensor
    device: torch.device

    def volume(self, coords_A: np.ndarray) -> np.ndarray:
        """Float64 map: the Gaussian envelope cancels in the FSC, so its high shells are tiny numbers that matter."""
        coords = torch.as_tensor(coords_A, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            volume = gaussian_volume(coords, self.amplitudes, self.box_size_px, self.voxel_size_A, self.sigma_A)
        return volume.cpu().numpy()


# Default FSC voxel: every residue has the same Gaussian width, so the Gaussian envelope cancels out of the FSC and
# noise-free maps at a coarse pixel stay correlated up to Nyquist; at 1.5 A the curves resolve C-alpha placement.
DEFAULT_FSC_VOXEL_A = 1.5
MAX_FSC_BOX_PX = 256  # float64 maps of 256^3 voxels are 128 MiB each, and each sampled image makes three


def _volume_grid(run: TrainedRun, voxel_size_A: float | None) -> _VolumeGrid:
    """The particle box (it holds the structure: training checks that) at voxel_size_A, default min(pixel, 1.5 A)."""
    box_A = run.dataset.box_size_px * run.dataset.pixel_size_A
    default_A = min(run.dataset.pixel_size_A, DEFAULT_FSC_VOXEL_A)
    voxel = default_A if voxel_size_A is None else float(voxel_size_A)
    box_px = map_box_px(box_A, voxel, max_box_px=MAX_FSC_BOX_PX, bytes_per_voxel=8, maps="FSC maps")
    amplitudes = torch.as_tensor(run.structure.amplitudes_e, dtype=torch.float64, device=run.device)
    return _VolumeGrid(box_px, voxel, run.config.sigma_A, amplitudes, run.device)


def _fsc_summary(
    grid: _VolumeGrid, predicted_A: np.ndarray, truth_A: np.ndarray, nominal_A: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Median resolutions and mean FSC curves of predicted and nominal volumes against the true ones."""
    nominal_volume = grid.volume(nominal_A)
    curves: dict[str, list[np.ndarray]] = {"prediction": [], "nominal": []}
    frequency = np.zeros(0)
    for predicted, truth in zip(predicted_A, truth_A, strict=True):
        true_volume = grid.volume(truth)
        frequency, fsc_prediction = fourier_shell_correlation(grid.volume(predicted), true_volume, grid.voxel_size_A)
        curves["prediction"].append(fsc_prediction)
        curves["nominal"].append(fourier_shell_correlation(nominal_volume, true_volume, grid.voxel_size_A)[1])
    summary: dict[str, Any] = {
        "n_samples": len(predicted_A), "box_size_px": grid.box_size_px, "voxel_size_A": grid.voxel_size_A,
        "sigma_A": grid.sigma_A, "frequency_per_A": frequency.tolist(),
        "note": "resolution at the first crossing below the threshold; null = below already at zero frequency; "
                "a curve that never crosses counts as the Nyquist resolution (2 voxels)",
    }  # fmt: skip
    mean_curves = {}
    for name, per_sample in curves.items():
        entry: dict[str, Any] = {}
        for threshold in FSC_THRESHOLDS:
            resolutions = np.array([resolution_at(frequency, fsc, threshold) for fsc in per_sample])
            entry[f"median_resolution_A_at_{threshold:g}"] = json_number(float(np.median(resolutions)))
        mean_curves[name] = np.mean(per_sample, axis=0)
        entry["mean_fsc"] = mean_curves[name].tolist()
        summary[name] = entry
    return summary, {"frequency_per_A": frequency, **mean_curves}


@dataclass
class _Decoded:
    """Per-image scores of the predicted structures, and the structures of the sampled images."""

    direct_rmsd_A: np.ndarray  # (n,)
    superposed_rmsd_A: np.ndarray  # (n,)
    distances_A: np.ndarray  # (n_group_pairs, n)
    expected_rmsd_A: np.ndarray  # (n,) expected RMSD of the structure under the posterior
    kept: dict[int, np.ndarray]  # image -> (n_residues, 3), for the sampled images only


def _decode_and_score(
    run: TrainedRun,
    true_A: Any,
    groups: list[tuple[np.ndarray, np.ndarray]],
    keep: np.ndarray,
    batch_size: int,
    samples: int,
    seed: int,
    progress: bool,
) -> _Decoded:
    """Every image's posterior-mean structure chunk by chunk (memory of one chunk), scored against
    true_A(start, stop)."""
    posterior = particle_posteriors(
        run.model, run.dataset, weighted=run.has_likelihood, samples=samples, seed=seed, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    n = len(posterior.mean)
    decoded = _Decoded(np.empty(n), np.empty(n), np.empty((len(groups), n)), np.empty(n), {})
    chunks = posterior_structures(run.model, posterior, samples=samples, seed=seed, batch_size=batch_size)
    start = 0
    with Progress(n, "posterior structures", unit="img", enabled=progress) as bar:
        for posterior_chunk in chunks:
            stop = start + len(posterior_chunk.coords_A)
            decoded.expected_rmsd_A[start:stop] = posterior_chunk.expected_rmsd_A
            chunk = posterior_chunk.coords_A.astype(np.float64)
            truth_chunk = true_A(start, stop)
            decoded.direct_rmsd_A[start:stop] = rmsd_A(chunk, truth_chunk)
            decoded.superposed_rmsd_A[start:stop] = superposed_rmsd_A(chunk, truth_chunk)
            for g, (group_a, group_b) in enumerate(groups):
                decoded.distances_A[g, start:stop] = centroid_distance_A(chunk, group_a, group_b)
            for i in keep[(keep >= start) & (keep < stop)]:
                decoded.kept[int(i)] = chunk[i - start]
            bar.update(stop - start)
            start = stop
    return decoded


def _to_each(reference_A: np.ndarray, conformations_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct and superposed RMSD of one structure (n_residues, 3) to each conformation: two (k,) arrays."""
    repeated = np.broadcast_to(reference_A, conformations_A.shape)
    return rmsd_A(repeated, conformations_A), superposed_rmsd_A(repeated, conformations_A)


def _rmsd_section(
    decoded: _Decoded, nominal_A: np.ndarray, conformations_A: np.ndarray, true_index: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """RMSD statistics of the prediction and both baselines, and the per-image direct RMSDs for the histogram."""
    nominal_direct, nominal_superposed = _to_each(nominal_A, conformations_A)
    conformation_direct = np.stack([_to_each(c, conformations_A)[0] for c in conformations_A])
    best = int(np.argmin(np.median(conformation_direct[:, true_index], axis=1)))
    best_direct, best_superposed = _to_each(conformations_A[best], conformations_A)
    section = {
        "prediction": {"direct": _stats(decoded.direct_rmsd_A), "superposed": _stats(decoded.superposed_rmsd_A),
                       "description": "posterior-mean structure of each image vs its true conformation"},
        "nominal_baseline": {"direct": _stats(nominal_direct[true_index]),
                             "superposed": _stats(nominal_superposed[true_index]),
                             "description": "the run's nominal structure for every image"},
        "best_fixed_baseline": {"direct": _stats(best_direct[true_index]),
                                "superposed": _stats(best_superposed[true_index]), "conformation": best,
                                "description": "the one truth conformation with the lowest median direct RMSD "
                                               "to all images, for every image"},
    }  # fmt: skip
    per_image = {"prediction": decoded.direct_rmsd_A, "nominal": nominal_direct[true_index],
                 "best fixed": best_direct[true_index]}  # fmt: skip
    return section, per_image


def _distance_section(
    specs: Sequence[tuple[str, str]],
    groups: list[tuple[np.ndarray, np.ndarray]],
    decoded: _Decoded,
    conformations_A: np.ndarray,
    true_index: np.ndarray,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Correlation of predicted and true centroid distances per group pair, and the true distances per image."""
    entries, true_distances = [], []
    for (spec_a, spec_b), (group_a, group_b), predicted in zip(specs, groups, decoded.distances_A, strict=True):
        true = centroid_distance_A(conformations_A, group_a, group_b)[true_index]
        true_distances.append(true)
        pearson, spearman = _correlations(predicted, true)
        entries.append({
            "group_a": spec_a, "group_b": spec_b, "pearson": json_number(pearson), "spearman": json_number(spearman),
            "predicted_range_A": [float(predicted.min()), float(predicted.max())],
            "true_range_A": [float(true.min()), float(true.max())],
        })  # fmt: skip
    return entries, true_distances


def _clash_section(
    structure: Structure, decoded: _Decoded, picked: np.ndarray, conformations_A: np.ndarray, true_index: np.ndarray
) -> dict[str, Any]:
    chains = structure.chain_ids
    conformation_clashes = np.array([clash_count(c, chains) for c in conformations_A])
    return {
        "cutoff_A": CLASH_CUTOFF_A, "n_structures": len(picked),
        "prediction_mean": float(np.mean([clash_count(decoded.kept[int(i)], chains) for i in picked])),
        "truth_mean": float(np.mean(conformation_clashes[true_index[picked]])),
        "nominal": clash_count(structure.coords_A[0], chains),
        "description": "mean number per structure of residue pairs closer than the cutoff, consecutive residues "
                       "of a chain left out; on a seeded sample of images",
    }  # fmt: skip


def _uncertainty_section(decoded: _Decoded, samples: int) -> dict[str, Any]:
    """How sure the model is of the posterior-mean structures, and whether that ranks their true errors."""
    expected = decoded.expected_rmsd_A
    _, spearman = _correlations(expected, decoded.direct_rmsd_A)
    low, median, high = np.percentile(expected, [10, 50, 90])
    return {
        "posterior_samples": samples, "spearman_expected_vs_true_rmsd": json_number(spearman),
        "expected_rmsd_A": {
            "p10": json_number(float(low)), "median": json_number(float(median)), "p90": json_number(float(high)),
        },
        "description": "expected RMSD = the weighted mean over the posterior samples of the RMSD of the structure "
                       "decoded from each from the posterior-mean structure; Spearman correlation of each image's "
                       "expected RMSD with the direct RMSD of its posterior-mean structure to the truth (null without "
                       "samples)",
    }  # fmt: skip


def _frame_rmsd_A(nominal_A: np.ndarray, truth: Truth) -> float | None:
    """Direct RMSD of the run's nominal structure to the truth's nominal conformation: ~0 when the frames agree."""
    if truth.nominal_frame is None or not 0 <= truth.nominal_frame < len(truth.conformations_A):
        return None
    rmsd = float(rmsd_A(nominal_A[None], truth.conformations_A[truth.nominal_frame][None])[0])
    if rmsd > _FRAME_WARNING_RMSD_A:
        logger.warning(
            "the run's nominal structure is %.2f A (direct RMSD) from the truth's nominal conformation: "
            "if the frames differ, direct RMSDs and FSCs are meaningless",
            rmsd,
        )
    return rmsd


def evaluate(
    run: TrainedRun,
    truth_path: Path,
    *,
    distance_groups: Sequence[tuple[str, str]] = (),
    fsc_samples: int = 50,
    clash_samples: int = 1000,
    seed: int = 0,
    voxel_size_A: float | None = None,
    out_dir: Path | None = None,
    batch_size: int = 256,
    posterior_samples: int = DEFAULT_POSTERIOR_SAMPLES,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `run` against truth.npz; writes OUT/eval.json and PNG plots (OUT default RUN/eval), returns the dict.

    Structures are posterior means over posterior_samples quasi-random draws of q(z | image) drawn with `seed`,
    importance-weighted for runs of the Gaussian likelihood (0 or 1: decoded at the latent mean); errors are ranked
    by each particle's expected RMSD. FSC uses a seeded sample of fsc_samples images, clash counts one of
    clash_samples images (all when fewer).
    """
    check_posterior_options(posterior_samples, seed)
    if fsc_samples < 1 or clash_samples < 1:
        raise CryoflexInputError(
            None,
            f"need at least 1 sampled image, got {fsc_samples} for the FSC and {clash_samples} for clashes",
            fix="give a positive number",
            field="--fsc-samples",
        )
    if voxel_size_A is not None and not voxel_size_A > 0:
        raise CryoflexInputError(
            None, f"voxel size {voxel_size_A} A", fix="give a positive size", field="--voxel-size-A"
        )
    truth = read_truth(truth_path)
    structure = run.structure
    if truth.conformations_A.shape[1] != structure.n_residues:
        raise CryoflexInputError(
            truth.path,
            f"conformations have {truth.conformations_A.shape[1]} residues, the run's structure "
            f"{structure.source_path} has {structure.n_residues}",
            fix="evaluate against the truth of the simulation made from this run's nominal structure",
            field="conformations_A",
        )
    groups = [(parse_residue_group(a, structure), parse_residue_group(b, structure)) for a, b in distance_groups]
    names = run.dataset.metadata.names
    rows = truth_rows(names, truth)
    check_truth_matches_particles(run.dataset.metadata, rows, truth)
    true_index = truth.conformation_index[rows]
    conformations, nominal = truth.conformations_A, structure.coords_A[0]
    n = len(names)
    rng = np.random.default_rng(seed)
    if fsc_samples > n:
        logger.info("--fsc-samples %d is above the run's %d images: the FSC uses all of them", fsc_samples, n)
    fsc_pick = np.sort(rng.choice(n, size=min(fsc_samples, n), replace=False))
    clash_pick = np.sort(rng.choice(n, size=min(clash_samples, n), replace=False))

    grid = _volume_grid(run, voxel_size_A)  # refuses a grid too large before the decoding
    logger.info("decoding %d images", n)
    decoded = _decode_and_score(run, lambda start, stop: conformations[true_index[start:stop]], groups,
                                np.union1d(fsc_pick, clash_pick), batch_size, posterior_samples, seed,
                                progress)  # fmt: skip
    rmsd, rmsd_per_image = _rmsd_section(decoded, nominal, conformations, true_index)
    distances, true_distances = _distance_section(distance_groups, groups, decoded, conformations, true_index)
    logger.info("FSC of %d images on a %d^3 grid at %.3g A", len(fsc_pick), grid.box_size_px, grid.voxel_size_A)
    fsc, fsc_curves = _fsc_summary(grid, np.stack([decoded.kept[int(i)] for i in fsc_pick]),
                                   conformations[true_index[fsc_pick]], nominal)  # fmt: skip
    clashes = _clash_section(structure, decoded, clash_pick, conformations, true_index)

    out = Path(out_dir) if out_dir is not None else run.paths.eval
    out.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(out, rmsd_per_image, distances, decoded.distances_A, true_distances, fsc_curves, len(fsc_pick))
    _remove_earlier_plots(out, plots)
    result = {
        "run": str(run.run_dir), "epoch": run.epoch, "truth": str(truth.path), "n_images": n, "seed": seed,
        "nominal_vs_truth_nominal_rmsd_A": _frame_rmsd_A(nominal, truth), "rmsd_A": rmsd, "distances": distances,
        "fsc": fsc, "clashes": clashes, "uncertainty": _uncertainty_section(decoded, posterior_samples),
        "plots": plots,
    }  # fmt: skip
    write_text_atomic(out / EVAL_JSON, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _crossing_text(frequency_per_A: np.ndarray, fsc: np.ndarray, threshold: float) -> str:
    """Where a curve falls below `threshold`, for a legend: the resolution in A, or why there is none."""
    resolution_A = resolution_at(frequency_per_A, fsc, threshold)
    if not math.isfinite(resolution_A):
        return "below from the start"
    if bool(np.all(np.asarray(fsc) >= threshold)):
        return f"beyond Nyquist {resolution_A:.1f} A"
    return f"{resolution_A:.1f} A"


def fsc_figure(frequency_per_A: np.ndarray, curves: dict[str, np.ndarray], n_images: int) -> Figure:
    """FSC curves against the true maps, the 0.5 (dashed) and 0.143 (dotted) thresholds in the legend, and in each
    curve's legend entry the resolution where it falls below each threshold."""
    figure = new_figure(6.5, 4.5)
    axes = figure.add_subplot()
    for name, fsc in curves.items():
        crossings = ", ".join(f"{t:g}: {_crossing_text(frequency_per_A, fsc, t)}" for t in FSC_THRESHOLDS)
        axes.plot(frequency_per_A, fsc, label=f"{name} ({crossings})")
    for threshold, style in zip(FSC_THRESHOLDS, ("--", ":"), strict=True):
        axes.axhline(threshold, color="grey", lw=0.8, ls=style, label=f"FSC = {threshold:g}")
    axes.set(xlabel="spatial frequency (1/A)", ylabel="mean FSC to the true volume", ylim=(-0.1, 1.05),
             title=f"FSC against the true maps, mean of {n_images} images")  # fmt: skip
    axes.legend(fontsize="small", loc="upper right")
    return figure


def figure_captions(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(plot file name, report caption) for each plot of an evaluate() result, in its order."""
    fsc = result["fsc"]
    captions = {
        "rmsd_histogram.png": "Per-image C-alpha RMSD to the true structure (A, without superposition): the "
        "prediction, the nominal structure for every image, and the best single true conformation for every image; "
        "medians in the legend",
        "fsc.png": f"Mean Fourier shell correlation of the predicted and of the nominal maps against the true maps "
        f"over {fsc['n_samples']} sampled images ({fsc['voxel_size_A']:g} A voxels); the legend gives where each "
        "curve falls below 0.5 (dashed) and 0.143 (dotted)",
    }
    for g, entry in enumerate(result["distances"]):
        captions[f"distance_{g + 1}.png"] = (
            f"Distance between the centroids of residues {entry['group_a']} and {entry['group_b']}, predicted "
            "against true, one dot per image (grey line: equal); Pearson correlation in the title"
        )
    return [(name, captions[name]) for name in result["plots"]]


def _write_plots(
    out: Path,
    rmsd_per_image: dict[str, np.ndarray],
    distances: list[dict[str, Any]],
    predicted_distances: np.ndarray,
    true_distances: list[np.ndarray],
    fsc_curves: dict[str, np.ndarray],
    n_fsc_images: int,
) -> list[str]:
    """RMSD histograms, predicted vs true distance per group pair, mean FSC curves; returns the PNG names."""
    written = []

    def save(fig: Figure, name: str) -> None:
        save_figure(fig, out / name)
        written.append(name)

    fig = new_figure(6, 4)
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate(list(rmsd_per_image.values())), bins=40).tolist()
    for label, values in rmsd_per_image.items():
        ax.hist(values, bins=bins, histtype="step", label=f"{label} (median {np.median(values):.2f} A)")
    ax.set(xlabel="C-alpha RMSD to the truth (A, direct)", ylabel="images")
    ax.legend()
    save(fig, "rmsd_histogram.png")

    for g, (entry, predicted, true) in enumerate(zip(distances, predicted_distances, true_distances, strict=True)):
        fig = new_figure(5, 5)
        ax = fig.subplots()
        ax.scatter(true, predicted, s=4, alpha=0.5)
        low, high = min(true.min(), predicted.min()), max(true.max(), predicted.max())
        ax.plot([low, high], [low, high], color="grey", lw=1)
        pearson = "n/a" if entry["pearson"] is None else f"{entry['pearson']:.3f}"
        ax.set(xlabel="true distance (A)", ylabel="predicted distance (A)",
               title=f"{entry['group_a']} to {entry['group_b']}: Pearson {pearson}")  # fmt: skip
        save(fig, f"distance_{g + 1}.png")

    frequency = fsc_curves["frequency_per_A"]
    curves = {name: fsc_curves[name] for name in ("prediction", "nominal")}
    save(fsc_figure(frequency, curves, n_fsc_images), "fsc.png")
    return written


def _remove_earlier_plots(out: Path, written: Sequence[str]) -> None:
    """Delete the plots an earlier evaluation into `out` listed in its eval.json that this one did not write again
    (distance plots of more --distance pairs); nothing else in the folder is touched."""
    try:
        earlier = json.loads((out / EVAL_JSON).read_text()).get("plots", [])
    except (OSError, ValueError, AttributeError):
        return
    for name in earlier:
        if isinstance(name, str) and name not in written and Path(name).name == name and name.endswith(".png"):
            (out / name).unlink(missing_ok=True)
