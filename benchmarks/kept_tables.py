"""Whether the separable projections should keep their (B, n, N) tables from the forward pass for the backward pass
(projector.keeps_tables) or rebuild them there, chunk by chunk: forward + backward of the point-sampled and the
band-limited projection, both ways, at the sizes of a training step (B = images x draws).

Run: .venv/bin/python benchmarks/kept_tables.py [--rows 256:214:32 256:214:64 ...] [--repeats 10] [--rounds 3]
     [--out benchmarks/results/kept_tables.json]
Rows are STRUCTURES:RESIDUES:BOX_PX. Uniform random positions in the box, random weights and a random probe of the
images; the two ways alternate --rounds times in this one process, each timed as the median of --repeats calls after
two warm-up calls. Prints each way's median over the rounds, the ratio kept / rebuilt and the table's elements
(B n N, against the threshold projector._CPU_KEPT_TABLE_ELEMENTS), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import cpu_name, median_ms

from cryoflex.imaging import projector
from cryoflex.imaging.band_limited import _PhaseSums, phase_terms
from cryoflex.io.atomic import write_text_atomic

PIXEL_SIZE_A = 4.0
SIGMA_A = 2.0
DEFAULT_ROWS = (
    "256:214:32", "128:214:64", "256:214:64", "128:214:128", "256:700:64", "32:2750:64", "256:2750:64", "64:2750:128"
)
WAYS = {"rebuilt": 0, "kept": 2**62}  # _CPU_KEPT_TABLE_ELEMENTS for each way


def forward_backward(kind: str, structures: int, residues: int, box_px: int) -> Callable[[], None]:
    """One projection of `kind` (point | band_limited) and its backward pass, on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    extent_A = box_px * PIXEL_SIZE_A
    x, y = (torch.rand(structures, residues, generator=generator) * extent_A for _ in range(2))
    weights = torch.rand(structures, residues, generator=generator)
    probe = torch.randn(structures, box_px, box_px, generator=generator)
    leaves = [t.requires_grad_() for t in (x, y, weights)]
    grid_A = (torch.arange(box_px) - box_px // 2) * PIXEL_SIZE_A
    terms = phase_terms(box_px, PIXEL_SIZE_A, torch.float32, torch.device("cpu"))

    def run() -> None:
        if kind == "point":
            images = projector._SeparableProjection.apply(*leaves, grid_A + extent_A / 2, SIGMA_A, False)
        else:
            images = _PhaseSums.apply(*leaves, terms, False)
        (images * probe).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="STRUCTURES:RESIDUES:BOX_PX")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kept_tables.json"))
    args = parser.parse_args()
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, ms")
    print(f"{'projection':>12} {'row':>14} {'elements':>10} {'rebuilt':>8} {'kept':>8} {'kept/rebuilt':>12}")
    results = []
    default_threshold = projector._CPU_KEPT_TABLE_ELEMENTS
    for spec in args.rows:
        structures, residues, box_px = (int(v) for v in spec.split(":"))
        for kind in ("point", "band_limited"):
            run = forward_backward(kind, structures, residues, box_px)
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(args.rounds):
                for way, threshold in WAYS.items():
                    projector._CPU_KEPT_TABLE_ELEMENTS = threshold
                    times[way].append(median_ms(run, args.repeats))
            projector._CPU_KEPT_TABLE_ELEMENTS = default_threshold
            medians = {way: statistics.median(values) for way, values in times.items()}
            elements = structures * residues * box_px
            row = dict(projection=kind, structures=structures, residues=residues, box_px=box_px, elements=elements,
                       kept_by_default=elements <= default_threshold, rounds_ms=times, median_ms=medians,
                       kept_over_rebuilt=medians["kept"] / medians["rebuilt"])  # fmt: skip
            results.append(row)
            print(f"{kind:>12} {spec:>14} {elements:>10,} {medians['rebuilt']:>8.1f} {medians['kept']:>8.1f} "
                  f"{row['kept_over_rebuilt']:>12.2f}{'' if row['kept_by_default'] else '  (rebuilt by default)'}",
                  flush=True)  # fmt: skip
    write_text_atomic(args.out, json.dumps(dict(
        cpu=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
        rounds=args.rounds, threshold_elements=default_threshold, rows=results,
    ), indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
