"""Evaluate a trained run against the ground truth of a simulation: RMSD, distances, FSC, clashes.

Needs the truth.npz that `cryoflex simulate` wrote for the particles the run was trained on (particles are
matched by name). Per image: C-alpha RMSD of the posterior-mean structure to the true conformation (direct, and after
superposition) against two baselines (the nominal structure for every image; the best single truth
conformation); per --distance pair of residue groups, the correlation of predicted and true centroid distances;
FSC of predicted and true volumes for a seeded sample of images (resolution at 0.5 and 0.143); clashes (C-alpha
pairs under 4 A, consecutive residues left out). Writes OUT/eval.json and PNG plots (OUT default RUN/eval).

examples:
  cryoflex eval run1 --truth sim/truth.npz
  cryoflex eval run1 --truth sim/truth.npz --distance A:122-159 A:30-59 --fsc-samples 100 --out run1/eval_e10 --epoch 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.cli import (
    DEVICE_HELP,
    add_checkpoint_arguments,
    add_threads_argument,
    apply_threads,
    check_output_directory,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory (the --out of cryoflex train)")
    parser.add_argument("--truth", type=Path, required=True, help="truth.npz written by cryoflex simulate")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", type=Path, help="output directory (default RUN/eval)")
    parser.add_argument(
        "--distance",
        nargs=2,
        action="append",
        default=[],
        metavar=("SEL_A", "SEL_B"),
        help="two residue groups, CHAIN or CHAIN:FIRST-LAST (e.g. A:122-159 A:30-59); repeatable",
    )
    parser.add_argument("--fsc-samples", type=int, default=50, help="images sampled for the FSC (default 50)")
    parser.add_argument(
        "--voxel-size-A", type=float, help="voxel of the FSC volumes (default: the run's pixel size, at most 1.5 A)"
    )
    parser.add_argument("--posterior-samples", type=int, default=DEFAULT_POSTERIOR_SAMPLES, metavar="K",
                        help="score the posterior mean over K quasi-random draws of q(z | image) (importance-weighted "
                             "for runs of the Gaussian likelihood), and rank errors by each particle's expected RMSD "
                             f"(drawn with --seed; default {DEFAULT_POSTERIOR_SAMPLES}; 0 or 1: decode at the latent "
                             "mean)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the image samples and the posterior draws (default 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A short table of the headline numbers of an evaluation."""
    rmsd = result["rmsd_A"]
    lines = [f"{'C-alpha RMSD (A), median':32s} {'direct':>8s} {'superposed':>11s}"]
    for key, label in (("prediction", "prediction"), ("nominal_baseline", "nominal"),
                       ("best_fixed_baseline", "best fixed conformation")):  # fmt: skip
        lines.append(f"  {label:30s} {_number(rmsd[key]['direct']['median']):>8s} "
                     f"{_number(rmsd[key]['superposed']['median']):>11s}")  # fmt: skip
    for entry in result["distances"]:
        lines.append(f"distance {entry['group_a']} to {entry['group_b']}: Pearson {_number(entry['pearson'], 3)}, "
                     f"Spearman {_number(entry['spearman'], 3)}")  # fmt: skip
    fsc = result["fsc"]
    for key, label in (("prediction", "prediction"), ("nominal", "nominal")):
        lines.append(f"FSC {label:10s} median resolution (A): {_number(fsc[key]['median_resolution_A_at_0.5'])} "
                     f"at 0.5, {_number(fsc[key]['median_resolution_A_at_0.143'])} at 0.143")  # fmt: skip
    uncertainty = result["uncertainty"]
    lines.append(f"uncertainty ranks errors: Spearman r = {_number(uncertainty['spearman_expected_vs_true_rmsd'], 3)} "
                 f"({uncertainty['posterior_samples']} posterior samples)")  # fmt: skip
    clashes = result["clashes"]
    lines.append(f"clashes per structure: prediction {clashes['prediction_mean']:.2f}, "
                 f"truth {clashes['truth_mean']:.2f}, nominal {clashes['nominal']}")  # fmt: skip
    return lines


def run(args: argparse.Namespace) -> int:
    from cryoflex.analysis.evaluate import EVAL_JSON, evaluate
    from cryoflex.analysis.run import load_run

    check_output_directory(args.out)
    apply_threads(args)
    trained = load_run(
        args.run_dir, epoch=args.epoch, checkpoint=args.checkpoint, device=args.device, datadir=args.datadir
    )
    out = args.out if args.out is not None else trained.paths.eval
    result = evaluate(
        trained, args.truth, distance_groups=[tuple(pair) for pair in args.distance], fsc_samples=args.fsc_samples,
        seed=args.seed, voxel_size_A=args.voxel_size_A, out_dir=out, posterior_samples=args.posterior_samples,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"epoch {result['epoch']}, {result['n_images']} images")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out / EVAL_JSON} and {len(result['plots'])} plots")
    return 0
