"""What band-limited rendering costs against point sampling (the `rendering` setting): the image formation alone
(projection and CTF, forward and backward) and whole default training steps.

Run: .venv/bin/python benchmarks/rendering_cost.py [--formation-rows 214:32:256 ...] [--step-rows 214:32:32:20 ...]
     [--rounds 3] [--out benchmarks/results/rendering_cost.json]
Formation rows are RESIDUES:BOX_PX:IMAGES: random structures of that size in a box of 128 A at random rotations and
origins, through ImageFormation.images with CTFs of defocus 0.5-2 um, then backward from a fixed random linear
functional (the same for both renderings); median of 10 calls after 2. Step rows are train_throughput.py's
(RESIDUES:BOX_PX:BATCH[:SEGMENTS]; AdK at 214 residues, compact synthetic chains otherwise) with the default
objective (Gaussian likelihood, 8 draws). The two renderings alternate `--rounds` times in this one process, so the
ratio compares like with like on a shared machine. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_throughput import DEFAULT_OBJECTIVE, Row, alternated_ms_per_step, row_dataset

from cryoflex.config import RENDERINGS
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic

BOX_A = 128.0
CALLS, WARMUP_CALLS = 10, 2


def formation_ms(residues: int, box_px: int, images: int, rendering: str, seed: int = 0) -> float:
    """Median ms of one forward + backward through ImageFormation.images with this rendering."""
    rng = np.random.default_rng(seed)
    coords = torch.as_tensor(rng.normal(0.0, 12.0, size=(images, residues, 3)), dtype=torch.float32)
    coords.requires_grad_()
    amplitudes = torch.as_tensor(rng.uniform(5.0, 10.0, size=residues), dtype=torch.float32)
    rotations = torch.as_tensor(uniform_random_rotations(images, rng), dtype=torch.float32)
    poses = PoseBatch(rotations, torch.as_tensor(rng.normal(0.0, 2.0, size=(images, 2)), dtype=torch.float32))
    formation = ImageFormation(box_px, BOX_A / box_px, 2.0, band_limited=rendering == "band_limited")
    defocus_A = torch.as_tensor(rng.uniform(5000.0, 20000.0, size=images), dtype=torch.float32)
    ctf = CTFBatch.from_values(defocus_A, defocus_A, 0.0, 300.0, 2.7, 0.1)
    functional = torch.as_tensor(rng.normal(size=(images, box_px, box_px)), dtype=torch.float32)
    times = []
    for call in range(WARMUP_CALLS + CALLS):
        started = time.perf_counter()
        images_out = formation.images(coords, amplitudes, poses, ctf)
        (images_out * functional).sum().backward()
        if call >= WARMUP_CALLS:
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formation-rows", nargs="*", default=["214:32:256", "214:64:128", "2750:64:32",
                                                                 "2750:128:32", "13941:128:32"])  # fmt: skip
    parser.add_argument("--step-rows", nargs="*", type=Row.parse,
                        default=[Row(214, 32, 32, 20), Row(214, 64, 32, 20), Row(2750, 64, 32, 20)])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rendering_cost.json"))
    args = parser.parse_args()
    results = []
    print(f"{'kind':<10} {'row':<14} {'point ms':>9} {'band-limited ms':>16} {'ratio':>6}")
    for spec in args.formation_rows:
        residues, box_px, images = (int(value) for value in spec.split(":"))
        times: dict[str, list[float]] = {rendering: [] for rendering in RENDERINGS}
        for _ in range(args.rounds):
            for rendering in times:
                times[rendering].append(formation_ms(residues, box_px, images, rendering))
        results.append(_row("formation", spec, times))
    with tempfile.TemporaryDirectory() as work_name:
        work = Path(work_name)
        for row in args.step_rows:
            data = row_dataset(row, 4 * row.batch * (args.steps + 2), work, {})
            variants = {name: {"objective": {**DEFAULT_OBJECTIVE, "rendering": name}} for name in RENDERINGS}
            times = alternated_ms_per_step(row, data, work, variants, args.steps, args.rounds)
            results.append(_row("step", row.label, times))
    note = (f"{torch.get_num_threads()} threads; formation: forward + backward through ImageFormation.images; step: "
            "default objective (Gaussian likelihood, 8 draws); the renderings alternated in one process")
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": results}, indent=1))
    print(f"wrote {args.out}")


def _row(kind: str, label: str, times: dict[str, list[float]]) -> dict:
    """One result: both renderings' medians over the rounds, their rounds and the ratio; printed as it comes."""
    point, band = statistics.median(times["point"]), statistics.median(times["band_limited"])
    print(f"{kind:<10} {label:<14} {point:>9.1f} {band:>16.1f} {band / point:>6.2f}", flush=True)
    return dict(kind=kind, row=label, point_ms=point, band_limited_ms=band, ratio=band / point,
                rounds_ms={name: values for name, values in times.items()})  # fmt: skip


if __name__ == "__main__":
    main()
