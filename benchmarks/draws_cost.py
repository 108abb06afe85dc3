"""What the objective costs per training step: the original loss with one draw, the Gaussian likelihood with one draw,
and the importance-weighted bound with 4 and with 8 draws per image (the default).
Everything but the objective and the segment count (6, as train_throughput's rows) is the training default
(band-limited rendering since that became the default).

Run: .venv/bin/python benchmarks/draws_cost.py [--rows 214:32:32 2750:64:32] [--steps 10] [--rounds 2]
Each row (RESIDUES:BOX_PX:BATCH, train_throughput's particles) is timed for every objective in turn, `--rounds` times
alternating, in this one process, so that the ratios compare like with like on a shared machine. Prints a table of
ms per step and the ratio to the step with the original's loss (1 - correlation, one draw), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from train_throughput import DEFAULT_OBJECTIVE, Row, alternated_ms_per_step, row_structure, simulate_particles

from cryoflex.io.atomic import write_text_atomic

OBJECTIVES = {
    "correlation, 1 draw": {"likelihood": "correlation", "importance_samples": 1},
    "gaussian, 1 draw": {"likelihood": "gaussian", "importance_samples": 1},
    "gaussian, 4 draws": {"likelihood": "gaussian", "importance_samples": 4},
    "gaussian, 8 draws (default)": DEFAULT_OBJECTIVE,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Row.parse, nargs="+", default=[Row(214, 32, 32), Row(2750, 64, 32)])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/draws_cost.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        for row in args.rows:
            data = simulate_particles(row_structure(row.residues, work), row.box_px, 4 * row.batch * (args.steps + 2),
                                      work / f"data_{row.label}")  # fmt: skip
            variants = {name: {"objective": objective} for name, objective in OBJECTIVES.items()}
            times = alternated_ms_per_step(row, data, work, variants, args.steps, args.rounds)
            base = statistics.median(times["correlation, 1 draw"])
            for name, values in times.items():
                ms = statistics.median(values)
                results.append(dict(row=row.label, objective=name, median_ms_per_step=ms, ratio=ms / base,
                                    rounds_ms=values, threads=torch.get_num_threads()))  # fmt: skip
    print(f"{'row':<14} {'objective':<28} {'ms/step':>9} {'x original loss':>16}")
    for result in results:
        print(f"{result['row']:<14} {result['objective']:<28} {result['median_ms_per_step']:>9.1f} "
              f"{result['ratio']:>16.2f}")  # fmt: skip
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
