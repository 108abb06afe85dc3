"""What rendering each residue off its C-alpha, and learning the Gaussians' width, cost per training step (density
backbone_side_chain and residue_centroid against pseudo_atom; learn_sigma on and off), with the default objective
(8 importance-weighted draws).

Run: .venv/bin/python benchmarks/density_cost.py [--residues 214 --box-px 64 --batch 32 --steps 10 --rounds 3]
     [--widths learned fixed] [--out benchmarks/results/density_cost.json]
At 214 residues the particles and the full-atom nominal structure are recovery_all_atom.py's (AdK, 64 px; a smaller
--box-px trains on them downsampled), a few hundred of them. At any other size they are train_throughput.py's
synthetic chain at --box-px, whose nominal structure is rewritten as alanines with a C-beta 1.5 A from each C-alpha,
so that every residue has a side chain (their amplitudes are then the two atoms' 12 electrons, split in half): the
step's time depends on the number of Gaussians, not on where they are or what they weigh. With one centroid the
deformation moves two points per residue (the C-alpha and its centroid) instead of one; with two, three points, and
the projector renders two Gaussians per residue. A learned width needs its gradient from the rendering: one more
column in the point projector's backward products, or through the band-limited spectrum's envelope (the default
rendering since 3d374c4; the recorded width figures are from before it, with point samples). The settings alternate
`--rounds` times in this one process, so that the ratio (to pseudo_atom with the first of --widths) compares like
with like on a shared machine. Prints ms per step and the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import gemmi
import torch
from recovery_all_atom import simulate_all_atom
from train_throughput import ADK_RESIDUES, DEFAULT_OBJECTIVE, Row, row_dataset, time_steps

from cryoflex.config import DENSITIES
from cryoflex.io.atomic import write_text_atomic

C_BETA_OFFSET_A = 1.5
ALL_ATOM_BOX_PX = 64  # recovery_all_atom.simulate_all_atom's box
WIDTHS = {"learned": True, "fixed": False}  # --widths: the learn_sigma setting of each


def add_side_chains(path: Path) -> None:
    """Rewrite a C-alpha PDB as alanines with a C-beta C_BETA_OFFSET_A from each C-alpha (along x)."""
    structure = gemmi.read_structure(str(path))
    for residue in (residue for chain in structure[0] for residue in chain):
        residue.name = "ALA"
        c_beta = gemmi.Atom()
        c_beta.name, c_beta.element = "CB", gemmi.Element("C")
        c_beta.pos = residue[0].pos + gemmi.Position(C_BETA_OFFSET_A, 0.0, 0.0)
        residue.add_atom(c_beta)
    structure.write_pdb(str(path))


def particles(residues: int, box_px: int, n_images: int, work: Path) -> Path:
    """The data directory (particles.star and a nominal.pdb with side chains) for this size."""
    if residues == ADK_RESIDUES:
        simulate_all_atom(work, snr=0.01, n_images=n_images, atom_sigma_A=1.5)
        return work / "data"
    data = row_dataset(Row(residues, box_px, batch=1), n_images, work, {})  # the data do not depend on the batch
    add_side_chains(data / "nominal.pdb")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--residues", type=int, default=ADK_RESIDUES)
    parser.add_argument("--box-px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", nargs="+", choices=WIDTHS, default=list(WIDTHS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/density_cost.json"))
    args = parser.parse_args()
    row = Row(args.residues, args.box_px, args.batch, segments=20)
    if args.residues == ADK_RESIDUES and args.box_px > ALL_ATOM_BOX_PX:
        parser.error(f"the AdK particles are {ALL_ATOM_BOX_PX} px: --box-px can be at most that")
    downsample = {"downsample": args.box_px} if args.residues == ADK_RESIDUES and args.box_px < ALL_ATOM_BOX_PX else {}
    variants = [(density, width) for width in args.widths for density in DENSITIES]
    times: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        data = particles(args.residues, args.box_px, 4 * args.batch * (args.steps + 2), work)
        for round_ in range(args.rounds):
            for density, width in variants:
                objective = {**DEFAULT_OBJECTIVE, "density": density, "learn_sigma": WIDTHS[width], **downsample}
                step = time_steps(row, data, work / f"run_{density}_{width}_{round_}", args.steps, "cpu",
                                  objective=objective)  # fmt: skip
                times[density, width].append(step["median_ms_per_step"])
    base = statistics.median(times["pseudo_atom", args.widths[0]])
    results = [
        dict(row=f"{args.residues}:{args.box_px}:{args.batch}", density=density, width=width,
             median_ms_per_step=statistics.median(values), ratio=statistics.median(values) / base, rounds_ms=values,
             threads=torch.get_num_threads())
        for (density, width), values in times.items()
    ]  # fmt: skip
    print(f"{'row':<12} {'density':<20} {'width':<8} {'ms/step':>8} {'ratio':>6}")
    for result in results:
        ms, ratio = result["median_ms_per_step"], result["ratio"]
        print(f"{result['row']:<12} {result['density']:<20} {result['width']:<8} {ms:>8.1f} {ratio:>6.2f}")
    note = "default objective (Gaussian likelihood, 8 draws), 20 segments, alternated in one process"
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
