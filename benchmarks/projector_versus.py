"""The projector against its version at another git revision, alternated in one process: the speed-up as a ratio.

Run: .venv/bin/python benchmarks/projector_versus.py --rev REV [--rows 2750:64:32 ...] [--repeats 7]
     [--out benchmarks/results/projector_versus.json]
Loads src/cryoflex/imaging/projector.py as it was at REV (git show) beside the current one and times, for each row
(RESIDUES:BOX_PX:BATCH), project_on_grid forward (no grad) and forward + backward of a random linear functional of
the images, the two versions in turn, median of `repeats` after two warm-up calls each. A ratio measured this way
survives a shared machine, whose absolute speed drifts between runs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging import projector
from cryoflex.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "src/cryoflex/imaging/projector.py"
DEFAULT_ROWS = ("214:64:32", "214:128:32", "2750:64:32", "2750:64:256", "2750:128:128")
PIXEL_SIZE_A = 2.0


def projector_at(revision: str, scratch: Path) -> ModuleType:
    """The projector module as it was at `revision`, imported under another name."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{SOURCE}"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    path = scratch / "projector_at_revision.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("projector_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls(module: ModuleType, residues: int, box_px: int, batch: int) -> dict[str, Callable[[], object]]:
    """Forward and forward + backward of one batch of random structures (seeded: both versions get the same)."""
    rng = np.random.default_rng(0)
    coords = torch.as_tensor(rng.normal(size=(batch, residues, 3)) * 20, dtype=torch.float32).requires_grad_()
    amplitudes = torch.ones(residues)
    rotations = torch.as_tensor(uniform_random_rotations(batch, rng), dtype=torch.float32)
    grid_A = projector.pixel_coordinates_A(box_px, PIXEL_SIZE_A)
    probe = torch.as_tensor(rng.normal(size=(batch, box_px, box_px)), dtype=torch.float32)

    def images() -> torch.Tensor:
        return module.project_on_grid(coords, amplitudes, rotations, grid_A, 2.0, None, None)

    def forward() -> None:
        with torch.no_grad():
            images()

    def forward_backward() -> None:
        (images() * probe).sum().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def alternated_ms(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median ms of each of two calls, timed in turn."""
    for _ in range(2):
        first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, record in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            function()
            record.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="git revision of the projector to compare with")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="RESIDUES:BOX_PX:BATCH")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projector_versus.json"))
    args = parser.parse_args()
    sys.dont_write_bytecode = True
    with tempfile.TemporaryDirectory() as scratch:
        then = projector_at(args.rev, Path(scratch))
    results = []
    print(f"{'row':<14} {'pass':<17} {args.rev[:10]:>10} ms {'now':>8} ms {'speed-up':>9}")
    for spec in args.rows:
        residues, box_px, batch = (int(value) for value in spec.split(":"))
        old_calls, new_calls = calls(then, residues, box_px, batch), calls(projector, residues, box_px, batch)
        for name in old_calls:
            old_ms, new_ms = alternated_ms(old_calls[name], new_calls[name], args.repeats)
            results.append(dict(row=spec, name=name, then_ms=old_ms, now_ms=new_ms, speed_up=old_ms / new_ms))
            print(f"{spec:<14} {name:<17} {old_ms:>13.1f} {new_ms:>11.1f} {old_ms / new_ms:>9.2f}", flush=True)
    summary = {"revision": args.rev, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": results}
    write_text_atomic(args.out, json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
