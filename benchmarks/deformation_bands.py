"""What applying each segment's rotation to its band of residues saves: the deformation's forward + backward with the
bands (the default) against every residue through every segment (dense=True, the path torch.compile takes), and the
two forms of the banded chain of rotations that deform chooses between by the structures' size (LAYERED_MAX_POINTS):
segment by segment, and in layers.

Run: .venv/bin/python benchmarks/deformation_bands.py [--rows 256:214:12 ...] [--repeats 10] [--rounds 3]
     [--out benchmarks/results/deformation_bands.json]
Rows are STRUCTURES:RESIDUES:SEGMENTS (structures = images x latent draws: batch 32 with the default 8 draws is 256).
The segmentation is the model's own mixture at its initial state (equal segments, tau 20), sampled as in training for
every call, and the backward is that of a fixed random linear functional of the structures. Both variants are timed
`--rounds` times in turn in this one process (median of `--repeats` calls each, after one warm-up call). Prints the
residues the bands hold against M x n, ms per call of each (dense and banded as deform chooses; the banded chain
forced segment by segment and in layers), the bands' speed-up and the layers' time as a share of segment by segment,
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cryoflex.io.atomic import write_text_atomic
from cryoflex.model import deformation
from cryoflex.model.deformation import assignment_bands, deform
from cryoflex.model.segmentation import Segmentation, SegmentedPart

DEFAULT_ROWS = ("256:214:20", "128:214:6", "256:450:20", "256:700:20", "32:2750:20", "256:2750:20", "32:13941:20")
ROTATION_SCALE_RAD = 0.3
SEED = 0


# variant -> (dense, the largest structures x residues that deform applies in layers; None = its own choice)
VARIANTS = {"dense": (True, None), "banded": (False, None), "segment by segment": (False, 0), "layers": (False, 10**12)}


def median_call_ms(segmentation: Segmentation, coords_A: torch.Tensor, vectors: torch.Tensor,
                   translations_A: torch.Tensor, weights: torch.Tensor, variant: str, repeats: int) -> float:
    """Median ms of sampling G, deforming and back-propagating a linear functional, after one warm-up call."""
    dense, most_points = VARIANTS[variant]
    chosen = deformation.LAYERED_MAX_POINTS
    deformation.LAYERED_MAX_POINTS = chosen if most_points is None else most_points
    try:
        return _median_ms(segmentation, coords_A, vectors, translations_A, weights, dense, repeats)
    finally:
        deformation.LAYERED_MAX_POINTS = chosen


def _median_ms(segmentation: Segmentation, coords_A: torch.Tensor, vectors: torch.Tensor,
               translations_A: torch.Tensor, weights: torch.Tensor, dense: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        moved = deform(coords_A, segmentation(True), vectors, translations_A, dense=dense)
        (moved * weights).sum().backward()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[1:])


def measure_row(structures: int, residues: int, segments: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(SEED)
    segmentation = Segmentation(residues, [SegmentedPart("all", np.arange(residues), segments)])
    coords_A = torch.randn(residues, 3) * 15
    vectors = (torch.randn(structures, segments, 3) * ROTATION_SCALE_RAD).requires_grad_()
    translations_A = torch.randn(structures, segments, 3).requires_grad_()
    weights = torch.randn(structures, residues, 3)
    band_residues = sum(end - first for _, first, end in assignment_bands(segmentation(True).detach()))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in times:
            times[name].append(median_call_ms(segmentation, coords_A, vectors, translations_A, weights, name, repeats))
    ms = {name: statistics.median(values) for name, values in times.items()}
    layered = structures * residues <= deformation.LAYERED_MAX_POINTS
    return dict(structures=structures, residues=residues, segments=segments, band_residues=band_residues,
                dense_residues=segments * residues, dense_ms=ms["dense"], banded_ms=ms["banded"],
                segment_by_segment_ms=ms["segment by segment"], layers_ms=ms["layers"],
                speed_up=ms["dense"] / ms["banded"], layers_share=ms["layers"] / ms["segment by segment"],
                deform_uses="layers" if layered else "segment by segment",
                rounds_ms=times, threads=torch.get_num_threads())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="STRUCTURES:RESIDUES:SEGMENTS")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deformation_bands.json"))
    args = parser.parse_args()
    print(f"{'row':<14} {'band residues':>14} {'M x n':>8} {'dense ms':>9} {'banded ms':>10} {'speed-up':>9} "
          f"{'by segment ms':>14} {'layers ms':>10} {'layers/segment':>15}  deform uses")
    results = []
    for row in args.rows:
        structures, residues, segments = (int(v) for v in row.split(":"))
        result = measure_row(structures, residues, segments, args.repeats, args.rounds)
        results.append(result)
        print(f"{row:<14} {result['band_residues']:>14} {result['dense_residues']:>8} {result['dense_ms']:>9.1f} "
              f"{result['banded_ms']:>10.1f} {result['speed_up']:>9.2f} {result['segment_by_segment_ms']:>14.1f} "
              f"{result['layers_ms']:>10.1f} {result['layers_share']:>15.2f}  {result['deform_uses']}",
              flush=True)  # fmt: skip
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "rows": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
