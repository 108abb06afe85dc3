"""Simulate a particle dataset with known truth from a structure ensemble or an MD trajectory.

Each image draws a conformation (uniformly, or by --weights), a Haar-uniform rotation, a shift and a defocus, is
projected with the CTF, and gets white noise at the given SNR (signal variance / noise variance, see docs). Writes
OUT/stacks/*.mrcs, OUT/particles.star (RELION 3.1), OUT/nominal.pdb and OUT/truth.npz. Deterministic for a seed.

examples:
  cryoflex simulate --structure ensemble.pdb --out sim --n-images 10000 --snr 0.1
  cryoflex simulate --topology adk.psf --trajectory adk_dims.dcd --out sim --n-images 5000 --snr 0.01
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.simulate import SimulationConfig, simulate_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("ensemble (one of)")
    source.add_argument("--structure", type=Path, help="multi-model PDB/mmCIF ensemble")
    source.add_argument("--topology", type=Path, help="MD topology (with --trajectory)")
    source.add_argument("--trajectory", type=Path, help="MD trajectory (with --topology)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--weights", type=Path, help="text file of one weight per conformation (default: uniform)")
    defaults = SimulationConfig(n_images=1)
    for field in fields(SimulationConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=f"(default: {default})")
        elif field.name == "n_images":
            parser.add_argument(flag, type=int, required=True, help="number of images")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"(default: {default})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.structure is not None:
        from cryoflex.io.structure import read_structure

        ensemble = read_structure(args.structure)
    elif args.topology is not None and args.trajectory is not None:
        from cryoflex.io.trajectory import read_trajectory

        ensemble = read_trajectory(args.topology, args.trajectory)
    else:
        raise CryoflexInputError(None, "no ensemble given", "pass --structure FILE or --topology T --trajectory X")
    config = SimulationConfig(**{f.name: getattr(args, f.name) for f in fields(SimulationConfig)})
    if not 0 <= config.nominal_frame < ensemble.n_models:
        raise CryoflexInputError(
            args.structure or args.trajectory,
            f"nominal frame {config.nominal_frame} is out of range: the ensemble has {ensemble.n_models} models",
            "pick a valid --nominal-frame",
        )
    weights = None
    if args.weights is not None:
        weights = np.loadtxt(args.weights, ndmin=1)
        if weights.shape != (ensemble.n_models,) or np.any(weights < 0) or weights.sum() <= 0:
            raise CryoflexInputError(
                args.weights,
                f"need {ensemble.n_models} non-negative weights, got {weights.size}",
                "one weight per conformation, one per line",
            )
    star = simulate_dataset(ensemble, config, args.out, weights=weights, progress=not args.no_progress)
    print(f"wrote {config.n_images} images: {star}")
    return 0
