"""What the clash neighbour list costs to rebuild (training rebuilds it every neighbour_list_every_steps steps): the
list from every structure of a default batch (32 images x 8 draws) against the list from each image's first draw (what
training passes), and the union of the structures' pairs by sorting every key (the previous code) against hashing
(pandas.unique, ClashNeighbourList now).

Run: .venv/bin/python benchmarks/clash_list.py [--residues 214 2750 13941] [--images 32] [--draws 8] [--rounds 3]
     [--out benchmarks/results/clash_list.json]
Structures: the compact synthetic chains of train_throughput.py, each moved by independent Gaussian noise of 1 A per
coordinate (the draws of a batch differ). The variants are timed --rounds times in turn in this one process (one call
each per round, after one warm-up call); prints the median seconds per rebuild, the seconds per training step at one
rebuild in 10 steps, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from train_throughput import row_structure

from cryoflex.io.atomic import write_text_atomic
from cryoflex.model import losses
from cryoflex.model.losses import ClashNeighbourList

NOISE_A = 1.0
SEED = 0
REBUILD_EVERY_STEPS = 10  # TrainConfig.neighbour_list_every_steps


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The previous union: sorted distinct keys by sorting all of them (np.sort + neighbour comparison)."""
    values = np.sort(values)
    keep = np.ones(values.shape, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_row(residues: int, args: argparse.Namespace, generator: torch.Generator, work: Path) -> dict:
    """Seconds per rebuild of each variant at this size, alternated args.rounds times after one warm-up call."""
    structure = row_structure(residues, work)
    nominal = torch.as_tensor(structure.coords_A[0], dtype=torch.float32)
    batch = nominal + NOISE_A * torch.randn(args.images, args.draws, residues, 3, generator=generator)
    neighbours = ClashNeighbourList(structure.chain_ids)
    every, first = batch.flatten(0, 1), batch[:, 0]

    def every_sorted() -> None:
        with mock.patch.object(losses.pd, "unique", sorted_unique):  # the previous union, the same code otherwise
            neighbours.update(every)

    variants = {"every_sorted": every_sorted, "every_hashed": lambda: neighbours.update(every),
                "first_hashed": lambda: neighbours.update(first)}  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for function in variants.values():
        function()  # warm-up
    for _ in range(args.rounds):
        for name, function in variants.items():
            seconds[name].append(timed(function))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return dict(residues=residues, images=args.images, draws=args.draws, pairs=len(neighbours.update(first)),
                seconds=seconds, median_s=median,
                ms_per_step={name: 1000 * value / REBUILD_EVERY_STEPS for name, value in median.items()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--residues", type=int, nargs="+", default=[214, 2750, 13941])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clash_list.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(SEED)
    rows = []
    print(f"{torch.get_num_threads()} threads; seconds per rebuild (median of {args.rounds}), ms per step at 1 in 10")
    print("residues  every draw, sorted  every draw, hashed  first draws, hashed   pairs  ms/step before -> now")
    with tempfile.TemporaryDirectory() as work:
        for residues in args.residues:
            row = measure_row(residues, args, generator, Path(work))
            rows.append(row)
            median, per_step = row["median_s"], row["ms_per_step"]
            print(
                f"{residues:>8} {median['every_sorted']:>19.3f} {median['every_hashed']:>19.3f} "
                f"{median['first_hashed']:>19.3f} {row['pairs']:>7} {per_step['every_sorted']:>9.1f} -> "
                f"{per_step['first_hashed']:.1f}",
                flush=True,
            )
    result = dict(torch=torch.__version__, threads=torch.get_num_threads(), noise_A=NOISE_A, rows=rows)
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
