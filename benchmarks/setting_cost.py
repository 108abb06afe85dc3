"""What one training setting costs per step, with the default objective (8 importance-weighted draws, 20 segments:
the automatic count at low SNR).

Run: .venv/bin/python benchmarks/setting_cost.py --setting noise_model --values white shells
     [--rows 214:32:32 2750:64:32] [--steps 10] [--rounds 3] [--out benchmarks/results/setting_cost.json]
Each row (RESIDUES:BOX_PX:BATCH, train_throughput's particles) is timed with every value in turn, `--rounds` times
alternating, in this one process, so that the ratios compare like with like on a shared machine. Prints ms per step
and the ratio to the first value (medians over the rounds, and the ratio of the sums), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from train_throughput import DEFAULT_OBJECTIVE, Row, row_structure, simulate_particles, time_steps

from cryoflex.io.atomic import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="a TrainConfig field, e.g. noise_model")
    parser.add_argument("--values", nargs="+", required=True, help="its values (YAML), the first the reference")
    parser.add_argument("--rows", type=Row.parse, nargs="+", default=[Row(214, 32, 32, 20), Row(2750, 64, 32, 20)])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/setting_cost.json"))
    args = parser.parse_args()
    values = [yaml.safe_load(value) for value in args.values]
    results = []
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        for row in args.rows:
            structure = row_structure(row.residues, work)
            n_images = 4 * row.batch * (args.steps + 2)
            data = simulate_particles(structure, row.box_px, n_images, work / f"data_{row.residues}")
            times: list[list[float]] = [[] for _ in values]
            for round_ in range(args.rounds):
                for k, value in enumerate(values):
                    objective = {**DEFAULT_OBJECTIVE, args.setting: value}
                    run_dir = work / f"run_{row.residues}_{row.box_px}_{k}_{round_}"
                    step = time_steps(row, data, run_dir, args.steps, "cpu", objective=objective)
                    times[k].append(step["median_ms_per_step"])
            for value, rounds_ms in zip(values, times, strict=True):
                results.append(dict(
                    row=row.label, setting=args.setting, value=value, median_ms_per_step=statistics.median(rounds_ms),
                    ratio_of_medians=statistics.median(rounds_ms) / statistics.median(times[0]),
                    ratio_of_sums=sum(rounds_ms) / sum(times[0]), rounds_ms=rounds_ms, threads=torch.get_num_threads(),
                ))  # fmt: skip
    print(f"{'row':<16} {args.setting:>14} {'ms/step':>9} {'ratio':>6} {'sums':>6}  rounds ms")
    for result in results:
        rounds = ", ".join(f"{ms:.1f}" for ms in result["rounds_ms"])
        print(f"{result['row']:<16} {result['value']!s:>14} {result['median_ms_per_step']:>9.1f} "
              f"{result['ratio_of_medians']:>6.2f} {result['ratio_of_sums']:>6.2f}  {rounds}")  # fmt: skip
    note = "default objective (Gaussian likelihood, 8 draws), alternated in one process"
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
