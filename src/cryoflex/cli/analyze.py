"""Analyse a trained run: latent space, PC traversals, segments, per-segment motions, exports and an HTML report.

Writes under --out (default RUN/analysis): latent/ (embedding arrays, CSV keyed by particle name, PCA and k-means
plots), traversals/ (one multi-model PDB per principal component with a ChimeraX script that plays it; maps with
--volumes), segments/ (figure, nominal structure with the segment in the B-factor column, boundary table), motions/
(rotation angle and translation per particle and segment), optional per-particle structures and particle subsets for
re-refinement, and report.html. The same run and options give byte-identical numeric outputs.

examples:
  cryoflex analyze run1
  cryoflex analyze run1 --epoch 10 --clusters 8 --volumes --per-particle
  cryoflex analyze run1 --subset-clusters 2 3          # RELION star (and .cs for cryoSPARC input) of clusters 2 and 3
  cryoflex analyze run1 --subset-region -1 0.5 -2 2    # particles with -1 <= PC1 <= 0.5 and -2 <= PC2 <= 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.cli import (
    DEVICE_HELP,
    add_checkpoint_arguments,
    add_threads_argument,
    apply_threads,
    check_output_directory,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", type=Path, help="run directory written by cryoflex train")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", type=Path, help="output directory (default RUN/analysis)")
    parser.add_argument("--clusters", type=int, default=6, help="k-means clusters (default 6)")
    parser.add_argument("--umap", action="store_true", help="also a UMAP embedding (pip install umap-learn)")
    parser.add_argument("--pcs", type=int,
                        help="principal components to traverse (default 2, or 1 for a run with a latent of 1)")
    parser.add_argument("--points", type=int, default=10, help="structures per traversal, 5th-95th pct (default 10)")
    parser.add_argument("--volumes", action="store_true", help="maps along the traversals and at the cluster centres")
    parser.add_argument("--voxel-size-A", type=float, help="voxel of the maps (default: the run's pixel size)")
    parser.add_argument("--per-particle", action="store_true",
                        help="every particle's structure: per_particle_coords.npy, float32 (n, residues, 3) in A")
    parser.add_argument("--per-particle-cif", type=int, nargs="+", default=[], metavar="K",
                        help="also a multi-model mmCIF of these particles (0-based positions in the particle file)")
    parser.add_argument("--subset-clusters", type=int, nargs="+", default=[], metavar="C",
                        help="write the particles of these k-means clusters (1-based, as in the CSV)")
    parser.add_argument("--subset-region", type=float, nargs=4, metavar=("PC1_MIN", "PC1_MAX", "PC2_MIN", "PC2_MAX"),
                        help="write the particles inside this box of the PC1/PC2 plane")
    parser.add_argument("--posterior-samples", type=int, default=DEFAULT_POSTERIOR_SAMPLES, metavar="K",
                        help="per-particle structures: the mean of K structures decoded from quasi-random draws of "
                             "q(z | image), weighted by how well each explains the image (the model's posterior; "
                             "equal weights for runs of the correlation loss), with each particle's expected RMSD "
                             f"as its uncertainty (drawn with --seed; default {DEFAULT_POSTERIOR_SAMPLES}; 0 or 1: "
                             "decode at the latent mean, no uncertainty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of k-means, UMAP and the posterior draws (default 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from cryoflex.analysis.analyze import AnalyzeOptions, analyze_run
    from cryoflex.analysis.run import load_run

    check_output_directory(args.out)
    apply_threads(args)
    trained = load_run(
        args.run_dir, epoch=args.epoch, checkpoint=args.checkpoint, device=args.device, datadir=args.datadir
    )
    pcs = min(2, trained.model.encoder.latent_dim) if args.pcs is None else args.pcs
    options = AnalyzeOptions(
        n_clusters=args.clusters, umap=args.umap, n_components=pcs, n_points=args.points,
        volumes=args.volumes, volume_voxel_A=args.voxel_size_A, per_particle=args.per_particle,
        per_particle_cif=args.per_particle_cif, subset_clusters=args.subset_clusters,
        subset_region=None if args.subset_region is None else tuple(args.subset_region),
        posterior_samples=args.posterior_samples, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    report = analyze_run(trained, args.out or trained.paths.analysis, options)
    print(f"analysis of {args.run_dir} (epoch {trained.epoch}): {report}")
    return 0
