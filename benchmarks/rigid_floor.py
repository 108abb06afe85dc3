"""How close rigid segments can get to a trajectory: the floor under any cryoSPHERE model with a given segmentation.

Run: .venv/bin/python benchmarks/rigid_floor.py [--segments 3 6 12 20] [--out benchmarks/results/rigid_floor.json]
The model moves each segment of the nominal structure rigidly, so even a perfect encoder and decoder leave each
conformation at the RMSD of the best rigid fit of every segment onto it. For the DIMS AdK trajectory in tests/data
(98 frames, 214 residues, frame 0 = closed = nominal, as in recovery_adk.py) this prints, for each number of
segments, that floor over frames 1-97 with the best contiguous segmentation (found exactly by dynamic programming over
the cut points, each segment at least MIN_LENGTH residues), and writes JSON. recovery_adk.py reports the floor of the
segmentation it learned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cryoflex.geometry.superposition import superpose_A
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import read_trajectory

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
MIN_LENGTH = 3  # residues: shorter segments fit anything and say nothing about domains


def rigid_fit_sse_A2(nominal_A: np.ndarray, frames_A: np.ndarray) -> np.ndarray:
    """Sum of squared distances (A^2) left after the best rigid fit of nominal (n, 3) onto each frame (f, n, 3)."""
    return np.square(superpose_A(nominal_A, frames_A) - frames_A).sum((-1, -2))


def runs_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each contiguous run of equal labels."""
    cuts = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist(), len(labels)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def segmentation_floor_A(nominal_A: np.ndarray, frames_A: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RMSD (A) per frame when every contiguous run of `labels` (one per residue) moves rigidly, each fitted best."""
    sse = sum(rigid_fit_sse_A2(nominal_A[a:b], frames_A[:, a:b]) for a, b in runs_of(labels))
    return np.sqrt(np.asarray(sse) / len(labels))


def segment_costs_A2(nominal_A: np.ndarray, frames_A: np.ndarray, min_length: int = MIN_LENGTH) -> np.ndarray:
    """cost[a, b]: the squared rigid-fit residual summed over frames of residues a..b-1 as one segment (inf when
    shorter than min_length)."""
    n = len(nominal_A)
    cost = np.full((n + 1, n + 1), np.inf)
    for a in range(n):
        for b in range(a + min_length, n + 1):
            cost[a, b] = rigid_fit_sse_A2(nominal_A[a:b], frames_A[:, a:b]).sum()
    return cost


def best_contiguous_cuts(cost_A2: np.ndarray, n_segments: int) -> list[int]:
    """Cut points [0, ..., n] of the contiguous segmentation into n_segments with the least total cost (exact, by
    dynamic programming over the cut points)."""
    n = len(cost_A2) - 1
    total = np.full((n_segments + 1, n + 1), np.inf)
    previous = np.zeros((n_segments + 1, n + 1), dtype=int)
    total[0, 0] = 0.0
    for k in range(1, n_segments + 1):
        for b in range(1, n + 1):
            candidates = total[k - 1, :b] + cost_A2[:b, b]
            previous[k, b] = int(np.argmin(candidates))
            total[k, b] = candidates[previous[k, b]]
    if not np.isfinite(total[n_segments, n]):
        raise ValueError(f"{n} residues cannot be cut into {n_segments} segments of the minimum length")
    cuts = [n]
    for k in range(n_segments, 0, -1):
        cuts.append(int(previous[k, cuts[-1]]))
    return cuts[::-1]


def labels_of(cuts: list[int]) -> np.ndarray:
    """Segment index of every residue for contiguous cut points."""
    return np.repeat(np.arange(len(cuts) - 1), np.diff(cuts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rigid_floor.json"))
    args = parser.parse_args()
    ensemble = read_trajectory(DATA / "adk.psf", DATA / "adk_dims.dcd")
    coords_A = np.asarray(ensemble.coords_A, dtype=np.float64)
    nominal_A, frames_A = coords_A[0], coords_A[1:]
    numbers = np.asarray(ensemble.residue_numbers)
    rows = []
    print(f"{'segments':>8} {'median A':>9} {'max A':>7}  first residue of each segment")
    cost_A2 = segment_costs_A2(nominal_A, frames_A)
    for n_segments in args.segments:
        cuts = best_contiguous_cuts(cost_A2, n_segments)
        floor_A = segmentation_floor_A(nominal_A, frames_A, labels_of(cuts))
        starts = [int(numbers[c]) for c in cuts[:-1]]
        rows.append(dict(
            segments=n_segments, median_floor_A=float(np.median(floor_A)), mean_floor_A=float(floor_A.mean()),
            max_floor_A=float(floor_A.max()), segment_starts=starts,
        ))  # fmt: skip
        print(f"{n_segments:>8} {np.median(floor_A):>9.2f} {floor_A.max():>7.2f}  {starts}")
    summary = {"frames": len(frames_A), "residues": len(nominal_A), "rows": rows}
    write_text_atomic(args.out, json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
