"""`cryoflex analyze` end to end: from a trained run to latent plots, traversals, segments, motions, exports, report.

Output layout under OUT (default RUN/analysis):
  latent/       latents.npy, pca.npy, kmeans_labels.npy, kmeans_centres.npy, latent_embedding.csv, PNG plots,
                source.json (the epoch and model fingerprint the latents came from)
  traversals/   traversal_pcK.pdb (multi-model, B-factor = segment) + traversal_pcK.cxc; volumes/ with --volumes
  segments/     segmentation.png, nominal_segments.pdb (B-factor = segment), segments.csv
  motions/      segment_motions.csv and .png (rotation angle and translation per particle and segment)
  per_particle_uncertainty.csv  each particle's expected RMSD under the posterior (A) and its rank (with more than
                one posterior sample)
  per_particle_coords.npy and per_particle_spread_A.npy (--per-particle), per_particle_subset.cif (--per-particle-cif)
  subsets/      STAR (and .cs for cryoSPARC input) of chosen clusters (--subset-clusters) or a PC box (--subset-region)
  report.html   one offline page with every figure, the segment table, the training curves and the configuration
  training_curves.png, noise_spectrum.png (noise_model shells), particles.png, per_particle_uncertainty.png  the
                report's figures of the run
Every numeric output is deterministic: the same run and options give byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES, export, figures, latent, report, structures
from cryoflex.analysis.predict import (
    LatentPosterior,
    check_posterior_options,
    decode_latents,
    particle_posteriors,
    population_expected_rmsd_A,
    posterior_latents,
)
from cryoflex.analysis.run import TrainedRun
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.volume import map_box_px
from cryoflex.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)
MAX_VOLUME_BOX_PX = 512  # maps of --volumes: a float32 map of 512^3 voxels is 0.5 GB, and several are rendered

_PARTICLES_CAPTION = (
    "The first particles as the model sees them (downsampled and normalised, top) and the images the model predicts "
    "for them at their poses, with their CTF (bottom)"
)
_SEGMENTS_CAPTION = (
    "Probability of each segment along the chain (posterior-mean mixture); dashed lines mark chain boundaries"
)
_TRACE_CAPTION = "The nominal C-alpha trace coloured by most probable segment, seen down z (left) and down y (right)"
_TRAINING_CAPTION = (
    "Loss terms against the training step: logged steps (line) and epoch means (dots); the image term is "
    "-log p(image | structure) in nats (image_nll), or 1 - correlation with the original objective"
)
_NOISE_CAPTION = (
    "The noise variance the likelihood learned in each Fourier shell (noise_model shells), for each optics group, as "
    "RELION's noise spectra: white noise would be flat; shells beyond Nyquist hold only the box's corners"
)
_UNCERTAINTY_CAPTION = (
    "How sure the model is of each particle's structure: the expected RMSD of the structures decoded from {samples} "
    "samples of the particle's posterior from the structure reported for it (A). A small value means an informative "
    "image; a large one, an image that says little, whose structure is close to a population average. The dotted "
    "line is the population's ({population_A:.2f} A: the same for structures decoded from the prior), what a "
    "particle whose image says nothing would get. Per particle in per_particle_uncertainty.csv, per residue (the RMS "
    "spread) in per_particle_spread_A.npy with --per-particle"
)
# The particles' median expected RMSD over the population's from which analysis warns that single particles' structures
# are mostly the population's average (docs/low_snr.md: on the AdK benchmark 0.16, 0.33, 0.58 and 0.84 at SNR 0.1, 0.01,
# 0.003 and 0.001, where the particles beat the best constant structure down to 0.003 and not at 0.001).
UNINFORMATIVE_RATIO = 0.75


@dataclass
class AnalyzeOptions:
    n_clusters: int = 6
    umap: bool = False
    n_components: int = 2
    n_points: int = 10
    volumes: bool = False
    volume_voxel_A: float | None = None  # default: the run's pixel size
    per_particle: bool = False
    per_particle_cif: list[int] = field(default_factory=list)  # 0-based particle positions
    subset_clusters: list[int] = field(default_factory=list)  # 1-based cluster numbers, as in the CSV
    subset_region: tuple[float, float, float, float] | None = None  # pc1 min, pc1 max, pc2 min, pc2 max
    posterior_samples: int = DEFAULT_POSTERIOR_SAMPLES  # per-particle structures: 0 = decode at the latent mean
    seed: int = 0  # k-means, UMAP and the posterior samples
    progress: bool = True  # progress of the long loops (encoding, posterior weights, structures)


def volume_grid(run: TrainedRun, options: AnalyzeOptions) -> tuple[float, int]:
    """(voxel size in A, even box in voxels) of the maps --volumes writes: the particles' box at --voxel-size-A (default
    the run's pixel size). Refuses a grid above MAX_VOLUME_BOX_PX a side, which would not fit in memory."""
    box_A = run.dataset.box_size_px * run.dataset.pixel_size_A
    voxel_A = options.volume_voxel_A or run.dataset.pixel_size_A
    box_px = map_box_px(box_A, voxel_A, max_box_px=MAX_VOLUME_BOX_PX, bytes_per_voxel=4, maps="maps")
    return voxel_A, box_px


def _volumes(run: TrainedRun, embedding: latent.LatentEmbedding, options: AnalyzeOptions, out: Path) -> list[Path]:
    """Maps along each traversal and at the k-means centres."""
    voxel_A, box_px = volume_grid(run, options)
    sigma_A = float(run.model.sigma_A.detach())  # the width the model renders (learned, unless fixed)
    paths = []
    for component in range(1, min(options.n_components, embedding.n_components) + 1):
        points = latent.traversal_latents(embedding, component, options.n_points)
        names = [f"traversal_pc{component}_{k + 1:02d}" for k in range(len(points))]
        paths += structures.write_volumes(run.model, points, names, out, box_size_px=box_px, voxel_size_A=voxel_A,
                                          sigma_A=sigma_A)
    names = [f"cluster_{k + 1:02d}" for k in range(len(embedding.kmeans_centres))]
    paths += structures.write_volumes(run.model, embedding.kmeans_centres, names, out, box_size_px=box_px,
                                      voxel_size_A=voxel_A, sigma_A=sigma_A)
    return paths


def check_subset_clusters(chosen: Sequence[int], n_clusters: int) -> None:
    """Refuse cluster numbers outside 1..n_clusters: users count clusters from 1, as the CSV and the report do."""
    if n_clusters < 1:
        raise CryoflexInputError(
            None, f"{n_clusters} k-means clusters", fix="give --clusters 1 or more", field="--clusters"
        )
    wrong = sorted({int(k) for k in chosen if not 1 <= k <= n_clusters})
    if wrong:
        raise CryoflexInputError(
            None,
            f"no cluster {', '.join(str(k) for k in wrong)}: the {n_clusters} clusters are numbered 1..{n_clusters}",
            fix=f"choose among 1..{n_clusters} (the cluster column of latent/latent_embedding.csv)",
            field="--subset-clusters",
        )


def check_options(options: AnalyzeOptions, n_particles: int, latent_dim: int) -> None:
    """Refuse options that would fail only after minutes of encoding and sampling, naming the flag and the fix."""
    check_subset_clusters(options.subset_clusters, options.n_clusters)
    check_posterior_options(options.posterior_samples, options.seed)
    if options.n_clusters > n_particles:
        raise CryoflexInputError(
            None, f"{options.n_clusters} k-means clusters for {n_particles} particles",
            fix=f"give --clusters {n_particles} or fewer", field="--clusters",
        )  # fmt: skip
    if options.n_points < 1:
        raise CryoflexInputError(None, f"{options.n_points} structures per traversal", fix="give --points 1 or more",
                                 field="--points")  # fmt: skip
    if options.n_components < 1:
        raise CryoflexInputError(None, f"{options.n_components} principal components", fix="give --pcs 1 or more",
                                 field="--pcs")  # fmt: skip
    if options.n_components > latent_dim:
        logger.warning("--pcs %d is above the run's latent dimension (%d): %d principal component%s traversed",
                       options.n_components, latent_dim, latent_dim, " is" if latent_dim == 1 else "s are")  # fmt: skip
    if options.volume_voxel_A is not None and not options.volumes:
        logger.warning("--voxel-size-A sets the voxel of the maps of --volumes; without --volumes no map is made")
    if options.umap and importlib.util.find_spec("umap") is None:
        raise CryoflexInputError(None, "UMAP needs the optional package umap-learn, which is not installed",
                                 fix="pip install umap-learn, or leave out --umap", field="--umap")  # fmt: skip
    if options.volume_voxel_A is not None and not options.volume_voxel_A > 0:
        raise CryoflexInputError(None, f"voxel size {options.volume_voxel_A:g} A",
                                 fix="give a positive --voxel-size-A, or leave it out for the run's pixel size",
                                 field="--voxel-size-A")  # fmt: skip
    chosen = list(options.per_particle_cif)
    outside = sorted({k for k in chosen if not 0 <= k < n_particles})
    if outside:
        raise CryoflexInputError(
            None, f"no particle {', '.join(map(str, outside))}: the run has {n_particles} particles, at positions "
            f"0..{n_particles - 1}", fix="give 0-based positions in the particle file", field="--per-particle-cif",
        )  # fmt: skip
    if len(set(chosen)) != len(chosen):
        repeated = sorted({k for k in chosen if chosen.count(k) > 1})
        raise CryoflexInputError(None, f"particle {', '.join(map(str, repeated))} given twice",
                                 fix="give each position once", field="--per-particle-cif")  # fmt: skip
    if options.subset_region is not None:
        x0, x1, y0, y1 = options.subset_region
        if latent_dim < 2:
            raise CryoflexInputError(
                None, f"the run's latent has {latent_dim} dimension: there is no PC2 to select a region on",
                fix="select particles with --subset-clusters instead", field="--subset-region",
            )  # fmt: skip
        if not (x0 <= x1 and y0 <= y1):
            raise CryoflexInputError(None, f"the region {options.subset_region} is empty",
                                     fix="give PC1_MIN PC1_MAX PC2_MIN PC2_MAX, each minimum below its maximum",
                                     field="--subset-region")  # fmt: skip


def check_region_holds_particles(embedding: latent.LatentEmbedding, options: AnalyzeOptions) -> None:
    """Refuse a --subset-region that no particle lies in, saying where the particles lie on PC1 and PC2."""
    if options.subset_region is None:
        return
    x0, x1, y0, y1 = options.subset_region
    if export.select_by_region(embedding.pca[:, :2], (x0, x1), (y0, y1)).size == 0:
        pc1, pc2 = embedding.pca[:, 0], embedding.pca[:, 1]
        raise CryoflexInputError(
            None, f"no particle lies in the region PC1 {x0:g} to {x1:g}, PC2 {y0:g} to {y1:g}: the particles span "
            f"PC1 {pc1.min():.2f} to {pc1.max():.2f} and PC2 {pc2.min():.2f} to {pc2.max():.2f}",
            fix="give a region within those ranges (the PCA plot of a run without it shows where the particles lie)",
            field="--subset-region",
        )  # fmt: skip


def _subsets(run: TrainedRun, embedding: latent.LatentEmbedding, options: AnalyzeOptions, out: Path) -> list[Path]:
    paths: list[Path] = []
    metadata = run.dataset.metadata
    if options.subset_clusters:
        check_subset_clusters(options.subset_clusters, len(embedding.kmeans_centres))  # fewer when latents repeat
        chosen = [k - 1 for k in options.subset_clusters]
        indices = export.select_by_clusters(embedding.kmeans_labels, chosen)
        stem = "clusters_" + "_".join(str(k) for k in options.subset_clusters)
        paths += export.write_subset(metadata, indices, out / stem)
        logger.info("subset of clusters %s: %d particles", options.subset_clusters, len(indices))
    if options.subset_region is not None:
        x0, x1, y0, y1 = options.subset_region
        indices = export.select_by_region(embedding.pca[:, :2], (x0, x1), (y0, y1))
        paths += export.write_subset(metadata, indices, out / "region")
        logger.info("subset of the PC region %s: %d particles", options.subset_region, len(indices))
    return paths


def _traversal_figures(run: TrainedRun, embedding: latent.LatentEmbedding, options: AnalyzeOptions, out: Path,
                       segment_ids: np.ndarray) -> list[tuple[str, Path]]:  # fmt: skip
    shown = []
    for component in range(1, min(options.n_components, embedding.n_components) + 1):
        points = latent.traversal_latents(embedding, component, options.n_points)
        frames = np.concatenate(list(decode_latents(run.model, points)))
        path = figures.traversal_figure(
            frames, segment_ids, run.structure.chain_ids, component, out / f"traversal_pc{component}.png"
        )
        caption = (
            f"PC{component} traversal: structures decoded at the 5th (faint) and 95th (solid) percentile of "
            f"PC{component}, the other components at their mean; C-alpha traces coloured by segment, seen down z "
            f"(left) and down y (right); all {options.n_points} structures are in traversal_pc{component}.pdb"
        )
        shown.append((caption, path))
    return shown


def uncertainty_summary(expected_rmsd_A: np.ndarray, samples: int, population_A: float) -> dict[str, int | float]:
    """The report's row for the particles' expected RMSDs: 10th percentile, median and 90th percentile in A, the
    population's (population_expected_rmsd_A) and the median's share of it, which it logs: as a warning where that
    share is UNINFORMATIVE_RATIO or more."""
    low, median, high = np.percentile(expected_rmsd_A, [10, 50, 90])
    ratio = float(median / population_A) if population_A > 0 else math.nan
    if ratio >= UNINFORMATIVE_RATIO:
        logger.warning(
            "the particles' images say little about their own conformations: their median expected RMSD (%.2f A) is "
            "%.0f%% of the population's (%.2f A), so each particle's structure is mostly the population's average. "
            "The population (latent space, clusters, traversals, reconstructions of subsets) is what the data "
            "support, not single particles.", median, 100 * ratio, population_A,
        )  # fmt: skip
    else:
        logger.info(
            "the particles' median expected RMSD is %.2f A, %.0f%% of the population's (%.2f A: what an image that "
            "says nothing would get)", median, 100 * ratio, population_A,
        )  # fmt: skip
    return {"particles": len(expected_rmsd_A), "posterior_samples": samples, "p10_A": float(low),
            "median_A": float(median), "p90_A": float(high), "population_A": population_A,
            "median_over_population": ratio}  # fmt: skip


def _per_particle(
    run: TrainedRun, posterior: LatentPosterior, options: AnalyzeOptions, out_dir: Path, files: list[Path]
) -> np.ndarray | None:
    """Per-particle structures (posterior means) and spreads, as the options ask; appends the files written and
    returns each particle's expected RMSD in A (None without posterior samples: no spread to report)."""
    samples, seed, model = options.posterior_samples, options.seed, run.model
    with_spread = samples > 1
    if options.per_particle_cif:
        files.append(export.export_structures_cif(
            model, posterior, options.per_particle_cif, run.structure, out_dir / "per_particle_subset.cif",
            samples=samples, seed=seed,
        ))  # fmt: skip
    if options.per_particle:
        logger.info("per-particle structures from %d posterior samples each", samples)
        spread_path = out_dir / export.PER_PARTICLE_SPREAD_NAME if with_spread else None
        coords_path = out_dir / export.PER_PARTICLE_NAME
        expected_rmsd_A = export.export_per_particle(
            model, posterior, coords_path, samples=samples, seed=seed, spread_path=spread_path,
            progress=options.progress,
        )
        files += [coords_path] + ([spread_path] if spread_path is not None else [])
    elif with_spread:
        logger.info("per-particle uncertainty from %d posterior samples each", samples)
        expected_rmsd_A = export.expected_rmsds_A(
            model, posterior, samples=samples, seed=seed, progress=options.progress
        )
    if not with_spread:
        return None
    names = run.dataset.metadata.names
    files.append(export.write_uncertainty_table(expected_rmsd_A, names, out_dir / export.UNCERTAINTY_CSV_NAME))
    return expected_rmsd_A


MANIFEST_NAME = "analysis_files.json"  # the files an analysis wrote, so the next one into the folder can tidy them


def remove_earlier_outputs(out_dir: Path, written: Sequence[Path]) -> list[Path]:
    """Delete the files the previous analysis into out_dir listed in its manifest that this one did not write again
    (`written`): per-particle files, subsets or traversals of other options, which would otherwise sit beside this
    analysis's outputs as if they were its own. Files no analysis listed are never touched, nor looked for (out_dir may
    be a large project folder). Then lists this analysis's files in the manifest; returns the paths removed."""
    manifest = out_dir / MANIFEST_NAME
    try:
        earlier = [out_dir / str(name) for name in json.loads(manifest.read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = []
    kept = {Path(path).resolve() for path in written}
    removed = [path for path in earlier if path.resolve() not in kept and path.is_file()]
    for path in removed:
        path.unlink()
    listed = sorted({str(Path(path).relative_to(out_dir)) for path in written})
    write_text_atomic(manifest, json.dumps({"files": listed}, indent=1) + "\n")
    if removed:
        logger.info("removed %d output(s) of the earlier analysis in %s that this one did not make again: %s",
                    len(removed), out_dir, ", ".join(str(p.relative_to(out_dir)) for p in removed))  # fmt: skip
    return removed


def analyze_run(
    run: TrainedRun,
    out_dir: Path,
    options: AnalyzeOptions,
    *,
    extra_sections: list[report.ReportSection] | None = None,
    extra_tables: dict[str, list[dict]] | None = None,
) -> Path:
    """Write every analysis output of `run` under out_dir; returns the report's path. Outputs of an earlier analysis
    into the same folder that this one does not make again are removed (remove_earlier_outputs).

    extra_sections and extra_tables (e.g. a comparison with the truth) are added to the report.
    """
    out_dir = Path(out_dir)
    check_options(options, len(run.dataset), run.model.encoder.latent_dim)  # before minutes of encoding
    if options.volumes:
        volume_grid(run, options)
    names = run.dataset.metadata.names
    model, structure = run.model, run.structure
    logger.info("encoding %d particles", len(run.dataset))
    samples, seed = options.posterior_samples, options.seed
    posterior = particle_posteriors(
        model, run.dataset, weighted=run.has_likelihood, samples=samples, seed=seed, progress=options.progress
    )
    latents = posterior_latents(posterior, samples, seed)
    embedding = latent.embed(latents, n_clusters=options.n_clusters, seed=options.seed, umap=options.umap)
    check_region_holds_particles(embedding, options)  # before anything is written
    if len(embedding.kmeans_centres) < options.n_clusters:
        logger.warning(
            "%d k-means clusters instead of the %d asked: the particles have only %d distinct latents",
            len(embedding.kmeans_centres), options.n_clusters, len(embedding.kmeans_centres),
        )  # fmt: skip
    files = latent.save_embedding(embedding, names, out_dir / "latent")
    files.append(latent.write_source(out_dir / "latent", run.epoch, run.fingerprint))
    latent_figures = latent.plot_embedding(embedding, out_dir / "latent")
    files += structures.write_traversals(
        model, structure, embedding, out_dir / "traversals", n_components=options.n_components,
        n_points=options.n_points,
    )  # fmt: skip
    if options.volumes:
        files += _volumes(run, embedding, options, out_dir / "traversals" / "volumes")

    assignment = structures.model_assignment(model)
    segment_dir = out_dir / "segments"
    segment_figure = structures.segmentation_figure(
        assignment, structure.residue_numbers, structure.chain_ids, segment_dir / "segmentation.png"
    )
    files.append(structures.write_segmented_structure(structure, assignment, segment_dir / "nominal_segments.pdb"))
    ids = structures.segment_ids(assignment)
    on_structure = figures.segments_on_structure_figure(
        structure.coords_A[0], ids, structure.chain_ids, segment_dir / "segments_on_structure.png"
    )
    segment_rows = structures.segment_table(assignment, structure)
    files.append(structures.write_segment_table(segment_rows, segment_dir / "segments.csv"))
    motions = structures.segment_motions(model, latents)
    motion_files = structures.write_segment_motions(motions, names, out_dir / "motions")
    files += motion_files

    expected_rmsd_A = _per_particle(run, posterior, options, out_dir, files)
    files += _subsets(run, embedding, options, out_dir / "subsets")

    particles = figures.particle_images_figure(run, out_dir / "particles.png")
    sections = [
        report.ReportSection("Particles", [(_PARTICLES_CAPTION, particles)]),
        report.ReportSection("Latent space", [(latent.FIGURE_CAPTIONS[p.stem], p) for p in latent_figures]),
        report.ReportSection("Segmentation", [(_SEGMENTS_CAPTION, segment_figure), (_TRACE_CAPTION, on_structure)]),
        report.ReportSection("Traversals", _traversal_figures(run, embedding, options, out_dir / "traversals", ids)),
        report.ReportSection("Motions per segment", [
            (structures.MOTIONS_CAPTION, p) for p in motion_files if p.suffix == ".png"
        ]),  # fmt: skip
    ]
    uncertainty_tables: dict[str, list[dict]] = {}
    if expected_rmsd_A is not None:
        population_A = population_expected_rmsd_A(model, seed=options.seed)
        histogram = figures.uncertainty_histogram_figure(
            expected_rmsd_A, population_A, out_dir / "per_particle_uncertainty.png"
        )
        caption = _UNCERTAINTY_CAPTION.format(samples=options.posterior_samples, population_A=population_A)
        sections.append(report.ReportSection("Per-particle uncertainty", [(caption, histogram)]))
        uncertainty_tables["Per-particle uncertainty (expected RMSD under the posterior, A)"] = [
            uncertainty_summary(expected_rmsd_A, options.posterior_samples, population_A)
        ]
    written = [*files, *(figure for section in sections for _, figure in section.figures)]  # not the extras' figures
    sections += extra_sections or []
    reconstruction_sections, reconstruction_tables = report.reconstruction_content(
        run.paths.reconstruct, run.fingerprint, latent.labels_fingerprint(embedding.kmeans_labels)
    )
    sections += reconstruction_sections
    if run.metrics_path.is_file():
        curves = report.training_curves_figure(run.metrics_path, out_dir / "training_curves.png")
        noise = figures.noise_spectrum_figure(run, out_dir / "noise_spectrum.png")
        written += [curves, *([noise] if noise else [])]
        sections.append(report.ReportSection(
            "Training", [(_TRAINING_CAPTION, curves), *([(_NOISE_CAPTION, noise)] if noise else [])]
        ))  # fmt: skip
    tables = {
        "Segments": [vars(row) for row in segment_rows],
        "Clusters": [
            {"cluster": k + 1, "particles": int(np.sum(embedding.kmeans_labels == k))}
            for k in range(len(embedding.kmeans_centres))
        ],
        **uncertainty_tables,
        **reconstruction_tables,
        **(extra_tables or {}),
    }
    path = report.write_report(
        out_dir / "report.html", title=f"cryoflex analysis of {run.run_dir.name} (epoch {run.epoch})",
        sections=sections, config=run.config.to_dict(), tables=tables, files=files,
    )  # fmt: skip
    remove_earlier_outputs(out_dir, [*written, path])
    return path
