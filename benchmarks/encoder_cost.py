"""What the encoder's input size costs per training step: the original's encoder, which reads the full box, against
cryoflex's default, which reads the image Fourier-cropped to half the box (encoder_downsample 2, never below 32 px).

Run: .venv/bin/python benchmarks/encoder_cost.py [--rows 214:64:128:6 214:128:128:6 2750:64:32:6] [--steps 10]
     [--rounds 3] [--out benchmarks/results/encoder_cost.json]
Each row (RESIDUES:BOX_PX:BATCH[:SEGMENTS], train_throughput's particles and step: one draw, the original objective)
is timed with each encoder in turn, `--rounds` times alternating, in this one process: separate processes on this
shared machine differ by more than the encoder costs. Prints ms per step and the speed-up, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from train_throughput import Row, alternated_ms_per_step, row_structure, simulate_particles

from cryoflex.io.atomic import write_text_atomic

VARIANTS = {"full box (the original's)": {"encoder_downsample": 1}, "half box (default)": {"encoder_downsample": 2}}
DEFAULT_ROWS = ("214:64:128:6", "214:128:128:6", "2750:64:32:6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Row.parse, nargs="+", default=[Row.parse(r) for r in DEFAULT_ROWS])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_cost.json"))
    args = parser.parse_args()
    results = []
    print(f"{'row':<14} {'full box ms/step':>17} {'half box ms/step':>17} {'speed-up':>9}", flush=True)
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        for row in args.rows:
            data = simulate_particles(row_structure(row.residues, work), row.box_px, 4 * row.batch * (args.steps + 2),
                                      work / f"data_{row.label.replace(':', '_')}")  # fmt: skip
            times = alternated_ms_per_step(row, data, work, VARIANTS, args.steps, args.rounds)
            full, half = (statistics.median(times[name]) for name in VARIANTS)
            results.append(dict(row=row.label, full_box_ms=full, half_box_ms=half, speed_up=full / half,
                                rounds_ms=times, threads=torch.get_num_threads()))  # fmt: skip
            print(f"{row.label:<14} {full:>17.1f} {half:>17.1f} {full / half:>9.2f}", flush=True)
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
