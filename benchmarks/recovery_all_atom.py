"""Recovery on particles cryoflex's own image model did not make: the AdK motion simulated from every heavy atom.

Run: .venv/bin/python benchmarks/recovery_all_atom.py --snr 0.01 --density residue_centroid backbone_side_chain
     [--n-images 10000 --epochs 20 --downsample 32 --atom-sigma-A 1.5 --work DIR --out JSON]

recovery_adk.py simulates each residue as one Gaussian at its C-alpha, which is exactly what the model renders. Real
particles, and the independent simulators a held-out check uses, carry every atom's density. Here each heavy atom of
the MD trajectory (tests/data, 98 frames, 1,656 heavy atoms) is a Gaussian of width --atom-sigma-A with its own
electrons (cryoflex's simulator rendering the atoms as pseudo-atoms), and cryoflex gets what a user has: the
full-atom first frame as the nominal structure (a PDB with every atom). Training runs once per --density setting on
the same particles; scores are those of recovery_adk.py on the C-alpha truth: median per-image RMSD of the
posterior-mean structures, LID-NMP distance r, spread-error Spearman, the segmentation's rigid floor and the two
oracle constants (mean structure, best frame). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from recovery_adk import DATA, LID, NMP, _scores, oracle_baselines
from rigid_floor import segmentation_floor_A

from cryoflex.analysis.run import load_run
from cryoflex.config import DENSITIES, load_config
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.structure import Structure
from cryoflex.io.trajectory import atomic_numbers_from_masses, read_trajectory
from cryoflex.simulate import SimulationConfig, centre_ensemble, simulate_dataset
from cryoflex.train.loop import train

HYDROGEN_MAX_DA = 4.5  # atoms up to this mass are hydrogens (atomic_numbers_from_masses' rule)


def _universe():  # type: ignore[no-untyped-def]
    import MDAnalysis as mda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mda.Universe(str(DATA / "adk.psf"), str(DATA / "adk_dims.dcd"))


def simulate_all_atom(out: Path, *, snr: float, n_images: int, atom_sigma_A: float, seed: int = 0) -> Path:
    """Particles of every heavy atom under out/data, the full-atom first frame as out/data/nominal.pdb and the C-alpha
    truth in out/data/truth.npz (conformations_A: each frame's C-alphas in the particles' frame)."""
    universe = _universe()
    heavy = universe.atoms[universe.atoms.masses > HYDROGEN_MAX_DA]
    frames_A = np.stack([heavy.positions.astype(np.float64) for _ in universe.trajectory])
    n = len(heavy)
    atoms = Structure(
        coords_A=frames_A, chain_ids=np.array(["A"] * n), residue_numbers=np.arange(1, n + 1),
        insertion_codes=np.array([""] * n), residue_names=np.array(["ALA"] * n), atom_names=np.array(["CA"] * n),
        amplitudes_e=atomic_numbers_from_masses(heavy.masses).astype(np.float64),
    )  # fmt: skip
    atoms = centre_ensemble(atoms, 0)  # the frame simulate_dataset uses (it centres again: the identity now)
    simulation = SimulationConfig(
        n_images=n_images, box_size_px=64, pixel_size_A=2.0, snr=snr, sigma_A=atom_sigma_A, seed=seed,
        defocus_min_A=5000.0, defocus_max_A=20000.0,
    )  # fmt: skip
    data = out / "data"
    star = simulate_dataset(atoms, simulation, data, progress=False)
    is_ca = heavy.names == "CA"
    truth = dict(np.load(data / "truth.npz"))
    # what the particles were rendered from, for the Bayes oracle (bayes_oracle.py renders these when present)
    truth["rendered_frames_A"], truth["rendered_amplitudes_e"] = truth["conformations_A"], truth["amplitudes_e"]
    truth["conformations_A"] = atoms.coords_A[:, is_ca].astype(np.float32)
    truth["amplitudes_e"] = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd").amplitudes_e
    np.savez(data / "truth.npz", **truth)
    universe.trajectory[0]  # seek the nominal frame, then give it the centred coordinates the particles were made of
    heavy.positions = atoms.coords_A[0]
    with warnings.catch_warnings():  # MDAnalysis fills the columns the topology lacks (elements, chain) with defaults
        warnings.simplefilter("ignore")
        heavy.write(str(data / "nominal.pdb"))  # replaces simulate's pseudo-atom file with the full-atom frame
    return star


def score(run_dir: Path, data: Path, seed: int = 0) -> dict:
    """recovery_adk's figures of a trained run against the C-alpha truth."""
    residues = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd").residue_numbers
    lid = (residues >= LID[0]) & (residues <= LID[1])
    nmp = (residues >= NMP[0]) & (residues <= NMP[1])
    truth = np.load(data / "truth.npz")
    frames_A = truth["conformations_A"]
    run = load_run(run_dir, device="cpu")
    figures = _scores(run, frames_A[truth["conformation_index"]], lid, nmp, seed)
    figures.update(oracle_baselines(frames_A, truth["conformation_index"]))
    with torch.no_grad():
        segments = run.model.segmentation(False).argmax(1).cpu().numpy()
    floor_A = segmentation_floor_A(frames_A[0], frames_A, segments)
    figures["rigid_floor_median_rmsd_A"] = float(np.median(floor_A[truth["conformation_index"]]))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, default=0.01)
    parser.add_argument("--density", nargs="+", choices=DENSITIES, default=list(DENSITIES))
    parser.add_argument("--n-images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--downsample", type=int, default=32)
    parser.add_argument("--atom-sigma-A", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=0, help="training threads (0: automatic)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="training settings (YAML values)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cryoflex_all_atom"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery_all_atom.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = args.work / f"snr{args.snr}"
    data = work / "data"
    if not (data / "truth.npz").is_file():
        simulate_all_atom(work, snr=args.snr, n_images=args.n_images, atom_sigma_A=args.atom_sigma_A)
    settings = {name: yaml.safe_load(value) for name, value in (item.split("=", 1) for item in args.set)}
    rows = []
    for density in args.density:
        values = dict(
            particles=str(data / "particles.star"), structure=str(data / "nominal.pdb"), epochs=args.epochs,
            downsample=args.downsample, density=density, threads=args.threads, progress=False, device="cpu",
            **settings,
        )  # fmt: skip
        run_name = "_".join([density, *args.set]).replace("=", "")
        started = time.perf_counter()
        train(load_config(None, values), work / run_name)
        row = dict(snr=args.snr, density=density, settings=settings, n_images=args.n_images, epochs=args.epochs,
                   atom_sigma_A=args.atom_sigma_A, train_s=time.perf_counter() - started)
        row.update(score(work / run_name, data))
        rows.append(row)
    print("snr      density            RMSD   r      spread rho  floor  mean*  frame*  settings")
    for row in rows:
        print(
            f"{row['snr']:<8} {row['density']:<18} {row['median_rmsd_A']:.2f}  {row['distance_correlation']:.3f}  "
            f"{row['spread_error_spearman']:>9.3f}  {row['rigid_floor_median_rmsd_A']:.2f}   "
            f"{row['ensemble_mean_median_rmsd_A']:.2f}   {row['best_frame_median_rmsd_A']:.2f}   {args.set or ''}"
        )
    print("(* oracle constants chosen with the truth: the mean structure and the best single frame for every image)")
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
