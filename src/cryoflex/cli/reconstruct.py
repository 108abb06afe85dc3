"""Reconstruct density maps from the particle images of a trained run, grouped by what the model learned.

Direct Fourier inversion of the images with their poses and CTF, per group of particles: the consensus (all particles,
always written) and, with no group option, one map per k-means cluster when `cryoflex analyze RUN` has run (--clusters
asks for them); or equal-count bins along a principal component (--pc K --bins B), or particle subsets (--subset
FILE.star ..., matched by name, else by image and pose). Gold standard: the refinement's half sets (rlnRandomSubset,
alignments3D/split), else a fixed seeded half split (RUN/reconstruct/half_split.npy, reused), two half-maps per group,
their FSC and the resolution at 0.143, the full map and that map low-pass filtered at the resolution. Model-bias
check: FSC of each group's map against the mean map of each group's decoded structures; the learned motion is
supported by the data when each map agrees best with its own structures. Writes under --out (default RUN/reconstruct):
NAME.mrc, NAME_filtered.mrc, NAME_half_a.mrc, NAME_half_b.mrc, NAME.pdb, NAME_structures.mrc per group,
fsc.csv/.json/.png, model_bias.csv/.json/.png, reconstruct.cxc (open in ChimeraX) and report.html; `cryoflex analyze
RUN` then adds them to its report too.

examples:
  cryoflex reconstruct run1                          # consensus, and one map per k-means cluster of cryoflex analyze
  cryoflex reconstruct run1 --pc 1 --bins 5          # five equal-count bins along PC1
  cryoflex reconstruct run1 --subset run1/analysis/subsets/clusters_2_3.star --box-size-px 128 --device cuda
  cryoflex reconstruct run1 --all --deformed         # consensus, and the motion-corrected (deformed) consensus
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryoflex.cli import (
    DEVICE_HELP,
    add_checkpoint_arguments,
    add_threads_argument,
    apply_threads,
    check_output_directory,
)
from cryoflex.config import check_seed
from cryoflex.errors import CryoflexInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", type=Path, help="run directory written by cryoflex train")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", type=Path, help="output directory (default RUN/reconstruct)")
    parser.add_argument("--analysis", type=Path, help="output of cryoflex analyze (default RUN/analysis)")
    groups = parser.add_mutually_exclusive_group()
    groups.add_argument("--clusters", action="store_true", help="one map per k-means cluster of cryoflex analyze")
    groups.add_argument("--pc", type=int, metavar="K", help="maps of equal-count bins along principal component K")
    groups.add_argument(
        "--subset",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="one map per particle subset (star or .cs, e.g. from cryoflex analyze --subset-clusters)",
    )
    groups.add_argument("--all", action="store_true", help="the consensus map only")
    parser.add_argument("--bins", type=int, help="bins along --pc (default 5)")
    parser.add_argument("--box-size-px", type=int,
                        help="box of the maps, read from the original stacks and Fourier-cropped (default: the run's "
                        "training box, from its cache); at most the particles' box")  # fmt: skip
    parser.add_argument("--padding", type=int, default=2, help="Fourier grid oversampling (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="images read and inserted at once (default 256)")
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=8.0,
        help="memory for the groups' Fourier grids; more groups take several passes (default 8)",
    )
    parser.add_argument(
        "--max-structures",
        type=int,
        default=500,
        help="decoded structures averaged per group for the model-bias check (default 500)",
    )
    parser.add_argument(
        "--deformed",
        action="store_true",
        help="also the deformed (motion-corrected) consensus, compared with the plain one",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the half split and structure samples (default 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from cryoflex.analysis.reconstruct import ReconstructOptions, reconstruct_run
    from cryoflex.analysis.run import load_run

    check_output_directory(args.out)
    check_seed(args.seed)
    if not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
        raise CryoflexInputError(
            None, f"--memory-gb {args.memory_gb:g}", fix="give a positive size, e.g. --memory-gb 8", field="--memory-gb"
        )
    if args.bins is not None and args.pc is None:
        raise CryoflexInputError(
            None, "--bins without --pc", fix="add --pc K to bin the particles along principal component K",
            field="--bins",
        )  # fmt: skip
    apply_threads(args)
    trained = load_run(
        args.run_dir, epoch=args.epoch, checkpoint=args.checkpoint, device=args.device, datadir=args.datadir
    )
    options = ReconstructOptions(
        clusters=args.clusters, pc=args.pc, subsets=list(args.subset), consensus_only=args.all,
        **({} if args.bins is None else {"bins": args.bins}),
        analysis_dir=args.analysis, box_size_px=args.box_size_px, padding=args.padding, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress, memory_budget_bytes=int(args.memory_gb * 2**30),
        max_structures=args.max_structures, deformed=args.deformed,
    )  # fmt: skip
    page = reconstruct_run(trained, args.out or trained.paths.reconstruct, options)
    print(f"reconstruction of {args.run_dir} (epoch {trained.epoch}): {page}")
    return 0
