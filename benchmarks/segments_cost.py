"""What the number of segments costs per training step, with the default objective (8 importance-weighted draws).

Run: .venv/bin/python benchmarks/segments_cost.py [--rows 214:32:32 2750:64:32] [--segments 6 12 20] [--steps 10]
     [--rounds 3] [--out benchmarks/results/segments_cost.json]
Each row (RESIDUES:BOX_PX:BATCH, train_throughput's particles) is timed with every segment count in turn, `--rounds`
times alternating, in this one process, so that the ratios compare like with like on a shared machine. Prints ms per
step and the ratio to the first segment count, and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch
from train_throughput import DEFAULT_OBJECTIVE, Row, row_structure, simulate_particles, time_steps

from cryoflex.io.atomic import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Row.parse, nargs="+", default=[Row(214, 32, 32), Row(2750, 64, 32)])
    parser.add_argument("--segments", type=int, nargs="+", default=[6, 12, 20])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/segments_cost.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        for base in args.rows:
            n_images = 4 * base.batch * (args.steps + 2)
            structure = row_structure(base.residues, work)
            data = simulate_particles(structure, base.box_px, n_images, work / f"data_{base.label}")
            rows = [dataclasses.replace(base, segments=count) for count in args.segments]
            times: dict[int, list[float]] = {row.segments: [] for row in rows}
            for round_ in range(args.rounds):
                for row in rows:
                    run_dir = work / f"run_{row.label.replace(':', '_')}_{round_}"
                    step = time_steps(row, data, run_dir, args.steps, "cpu", objective=DEFAULT_OBJECTIVE)
                    times[row.segments].append(step["median_ms_per_step"])
            first = statistics.median(times[args.segments[0]])
            for count, values in times.items():
                ms = statistics.median(values)
                results.append(dict(row=f"{base.residues}:{base.box_px}:{base.batch}", segments=count,
                                    median_ms_per_step=ms, ratio=ms / first, rounds_ms=values,
                                    threads=torch.get_num_threads()))  # fmt: skip
    print(f"{'row':<14} {'segments':>8} {'ms/step':>9} {'ratio':>6}")
    for result in results:
        ms, ratio = result["median_ms_per_step"], result["ratio"]
        print(f"{result['row']:<14} {result['segments']:>8} {ms:>9.1f} {ratio:>6.2f}")
    note = "default objective (Gaussian likelihood, 8 draws), 2 threads, alternated in one process"
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
