"""Run the method end to end on a shipped AdK closed -> open ensemble: simulate, train, analyse, evaluate, summarise.

About 5-10 minutes on a 2-core laptop CPU (under a minute with --quick); uses the GPU when there is one. Writes OUT/data
(simulated particles and truth), OUT/run (the training run), OUT/eval and OUT/analysis/report.html.

examples:
  cryoflex demo
  cryoflex demo --quick --out demo_quick
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from cryoflex.cli import DEVICE_HELP, check_output_directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("cryoflex_demo"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset and shorter training (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation and the training (default 0)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    from cryoflex.demo import run_demo
    from cryoflex.errors import CryoflexInputError

    check_output_directory(args.out)
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            raise CryoflexInputError(args.out, "the output directory is not empty", "pass --overwrite or another --out")
        shutil.rmtree(args.out)
    summary = run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device)
    print("\n".join(summary.lines()))
    return 0
