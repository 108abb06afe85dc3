"""Simulate a particle dataset with known truth from a structure ensemble or an MD trajectory.

Each image draws a conformation (uniformly, or by --weights), a Haar-uniform rotation, a shift and a defocus, is
projected with the CTF, and gets white (or, with --noise-spectrum, coloured) noise at the given SNR (signal variance /
noise variance, see docs). Writes OUT/stacks/*.mrcs, OUT/particles.star (RELION 3.1), OUT/nominal.pdb and
OUT/truth.npz. Deterministic for a seed.

examples:
  cryoflex simulate --structure ensemble.pdb --out sim --n-images 10000 --snr 0.1
  cryoflex simulate --topology adk.psf --trajectory adk_dims.dcd --out sim --n-images 5000 --snr 0.01
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryoflex.cli import add_threads_argument, apply_threads, check_output_directory
from cryoflex.config import check_seed
from cryoflex.errors import CryoflexInputError

# Flags of SimulationConfig's fields: (type, help). Defaults stay in SimulationConfig (cryoflex.simulate imports torch,
# which `cryoflex --help` should not wait for); a flag left out keeps SimulationConfig's default.
_SIMULATION_FLAGS: dict[str, tuple[type, str]] = {
    "box_size_px": (int, "image box in pixels (default 64)"),
    "pixel_size_A": (float, "pixel size in A (default 2.0)"),
    "snr": (float, "signal variance / noise variance (default 0.1)"),
    "sigma_A": (float, "Gaussian width of a residue in A (default 2.0)"),
    "defocus_min_A": (float, "smallest defocus in A (default 10000)"),
    "defocus_max_A": (float, "largest defocus in A (default 25000)"),
    "astigmatism_max_A": (float, "largest defocus U - V in A (default 0)"),
    "voltage_kV": (float, "acceleration voltage in kV (default 300)"),
    "cs_mm": (float, "spherical aberration in mm (default 2.7)"),
    "amplitude_contrast": (float, "amplitude contrast fraction (default 0.1)"),
    "shift_std_A": (float, "standard deviation of the particle shifts in A (default 0)"),
    "images_per_file": (int, "images per .mrcs stack (default 10000)"),
    "batch_size": (int, "images projected at once (default 256)"),
    "nominal_frame": (int, "model of the ensemble written as nominal.pdb, 0-based (default 0)"),
    "seed": (int, "random seed (default 0)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("ensemble (one of)")
    source.add_argument("--structure", type=Path, help="multi-model PDB/mmCIF ensemble")
    source.add_argument("--topology", type=Path, help="MD topology (with --trajectory)")
    source.add_argument("--trajectory", type=Path, help="MD trajectory (with --topology)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-images", type=int, required=True, help="number of images")
    parser.add_argument("--weights", type=Path, help="text file of one weight per conformation (default: uniform)")
    for name, (kind, help_text) in _SIMULATION_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    parser.add_argument("--noise-spectrum", type=Path, metavar="CSV",
                        help="colour the noise: a CSV with columns frequency_per_A and power (relative; linear "
                             "between the rows, flat beyond them), e.g. measured on real particles; the variance per "
                             "pixel, and so the SNR, is unchanged (default: white noise)")
    parser.add_argument("--save-clean", action="store_true", help="also write the noiseless images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cryoflex.simulate import SimulationConfig, read_noise_spectrum, simulate_dataset

    check_output_directory(args.out)
    if args.seed is not None:
        check_seed(args.seed)
    written = [name for name in ("particles.star", "truth.npz", "stacks") if (args.out / name).exists()]
    if written:
        raise CryoflexInputError(
            args.out, f"already holds a dataset ({', '.join(written)}), which this would overwrite",
            "pass another --out, or delete the old dataset first", field="--out",
        )  # fmt: skip
    sources = [args.structure is not None, args.topology is not None or args.trajectory is not None]
    if all(sources):
        raise CryoflexInputError(
            args.structure, "both --structure and --topology/--trajectory were given",
            "pass one ensemble: --structure FILE, or --topology T --trajectory X",
        )  # fmt: skip
    apply_threads(args)
    if args.structure is not None:
        from cryoflex.io.structure import read_structure

        ensemble = read_structure(args.structure)
    elif args.topology is not None and args.trajectory is not None:
        from cryoflex.io.trajectory import read_trajectory

        ensemble = read_trajectory(args.topology, args.trajectory)
    elif args.topology is not None or args.trajectory is not None:
        given_flag, missing_flag = ("--topology", "--trajectory") if args.topology is not None else (
            "--trajectory", "--topology")  # fmt: skip
        raise CryoflexInputError(args.topology or args.trajectory, f"{given_flag} was given without {missing_flag}",
                                 "pass both: --topology T --trajectory X", field=missing_flag)  # fmt: skip
    else:
        raise CryoflexInputError(None, "no ensemble given", "pass --structure FILE or --topology T --trajectory X")
    given = {name: getattr(args, name) for name in _SIMULATION_FLAGS if getattr(args, name) is not None}
    if args.noise_spectrum is not None:
        given["noise_spectrum"] = read_noise_spectrum(args.noise_spectrum)
    config = SimulationConfig(n_images=args.n_images, save_clean=args.save_clean, **given)
    if not 0 <= config.nominal_frame < ensemble.n_models:
        raise CryoflexInputError(
            args.structure or args.trajectory,
            f"nominal frame {config.nominal_frame} is out of range: the ensemble has {ensemble.n_models} models",
            "pick a valid --nominal-frame",
        )
    weights = None
    if args.weights is not None:
        try:
            weights = np.loadtxt(args.weights, ndmin=1)
        except (OSError, ValueError) as error:
            raise CryoflexInputError(
                args.weights, f"cannot read it as numbers ({error})", "one weight per conformation, one per line",
                field="--weights",
            ) from error
        if weights.shape != (ensemble.n_models,):
            problem = f"need {ensemble.n_models} weights, one per conformation; got {weights.size}"
        elif not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
            problem = "weights must be finite, none negative, and not all zero"
        else:
            problem = ""
        if problem:
            raise CryoflexInputError(args.weights, problem, "one weight per conformation, one per line",
                                     field="--weights")  # fmt: skip
    star = simulate_dataset(ensemble, config, args.out, weights=weights, progress=not args.no_progress)
    print(f"wrote {config.n_images} images: {star}")
    return 0
