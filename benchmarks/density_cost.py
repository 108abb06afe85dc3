"""What rendering each residue off its C-alpha costs per training step (density residue_centroid and
backbone_side_chain against pseudo_atom), with the default objective (8 importance-weighted draws).

Run: .venv/bin/python benchmarks/density_cost.py [--box-px 64 --batch 32 --steps 10 --rounds 3]
     [--out benchmarks/results/density_cost.json]
The particles and the full-atom nominal structure are recovery_all_atom.py's (AdK, 214 residues), a few hundred of
them. With one centroid the deformation moves two points per residue (the C-alpha and its centroid) instead of one;
with two, three points, and the projector renders two Gaussians per residue. The settings alternate `--rounds` times
in this one process, so that the ratio
compares like with like on a shared machine. Prints ms per step and the ratio, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from recovery_all_atom import simulate_all_atom
from train_throughput import Row, time_steps

from cryoflex.config import DENSITIES
from cryoflex.io.atomic import write_text_atomic

DEFAULT_OBJECTIVE = {"likelihood": "gaussian", "importance_samples": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box-px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/density_cost.json"))
    args = parser.parse_args()
    row = Row(214, args.box_px, args.batch, segments=20)
    times: dict[str, list[float]] = {density: [] for density in DENSITIES}
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        simulate_all_atom(work, snr=0.01, n_images=4 * args.batch * (args.steps + 2), atom_sigma_A=1.5)
        for round_ in range(args.rounds):
            for density in DENSITIES:
                objective = {**DEFAULT_OBJECTIVE, "density": density}
                step = time_steps(row, work / "data", work / f"run_{density}_{round_}", args.steps, "cpu",
                                  objective=objective)  # fmt: skip
                times[density].append(step["median_ms_per_step"])
    base = statistics.median(times["pseudo_atom"])
    results = [
        dict(row=f"214:{args.box_px}:{args.batch}", density=density, median_ms_per_step=statistics.median(values),
             ratio=statistics.median(values) / base, rounds_ms=values, threads=torch.get_num_threads())
        for density, values in times.items()
    ]  # fmt: skip
    print(f"{'row':<12} {'density':<17} {'ms/step':>8} {'ratio':>6}")
    for result in results:
        ms, ratio = result["median_ms_per_step"], result["ratio"]
        print(f"{result['row']:<12} {result['density']:<17} {ms:>8.1f} {ratio:>6.2f}")
    note = "default objective (Gaussian likelihood, 8 draws), 20 segments, alternated in one process"
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
