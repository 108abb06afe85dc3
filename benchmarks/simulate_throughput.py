"""`cryoflex simulate` throughput (images/s, MB/s written) and peak memory, and how memory grows with n_images.

Run: .venv/bin/python benchmarks/simulate_throughput.py [--boxes 64 128 256] [--n-images 20000 10000 2000]
     [--scaling-box 128] [--scaling-n-images 2000 20000] [--quick] [--out benchmarks/results/simulate_cpu.json]
Each row runs the real command (cryoflex.cli.main(["simulate", ...])) on the AdK trajectory in tests/data (98 frames,
214 residues) at SNR 0.1, in a fresh subprocess, writing to a temporary directory that is removed afterwards. The
pixel size makes the box BOX_MARGIN x the diameter of the first frame. Time = the whole command (reading the
trajectory included). Memory: peak RSS (ru_maxrss) and its increase over the RSS right after imports, and the peak
anonymous RSS (sampled), which leaves out the file pages of the memory-mapped stacks being written: those count in
RSS but are page cache the kernel can write back and drop. The scaling rows repeat one box at several n_images: with
streaming, the anonymous peak stays flat as n_images grows once n_images exceeds the 512 images that
simulate_dataset renders at once to set the noise level (below that the pilot grows with n_images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _measure import AnonymousPeak, cpu_name, peak_rss_MB

from cryoflex.cli import main as cryoflex_main
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import read_trajectory

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TOPOLOGY = DATA / "adk.psf"
TRAJECTORY = DATA / "adk_dims.dcd"
BOX_MARGIN = 1.3
SNR = 0.1
BOXES_PX = (64, 128, 256)
N_IMAGES = (20000, 10000, 2000)
SCALING_BOX_PX = 128
SCALING_N_IMAGES = (2000, 20000)
QUICK_BOXES_PX = (32, 64)
QUICK_N_IMAGES = (200, 100)
QUICK_SCALING_BOX_PX = 32
QUICK_SCALING_N_IMAGES = (600, 1200)  # both above the 512-image SNR pilot, as at full size
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Row:
    box_px: int
    n_images: int
    pixel_size_A: float

    def label(self) -> str:
        return f"{self.box_px}:{self.n_images}:{self.pixel_size_A!r}"

    @staticmethod
    def parse(spec: str) -> Row:
        """'BOX_PX:N_IMAGES:PIXEL_SIZE_A' -> Row."""
        box, n_images, pixel_size = spec.split(":")
        return Row(int(box), int(n_images), float(pixel_size))


# ---------------------------------------------------------------- one row, in its own process


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def run_single_row(row: Row, out_dir: Path) -> None:
    """Child process: run `cryoflex simulate` for the row and print its figures as one JSON line."""
    import MDAnalysis  # noqa: F401  (before the baseline: the command imports it to read the trajectory)

    baseline_MB = peak_rss_MB()
    argv = [
        "simulate", "--topology", str(TOPOLOGY), "--trajectory", str(TRAJECTORY), "--out", str(out_dir),
        "--n-images", str(row.n_images), "--box-size-px", str(row.box_px), "--pixel-size-A", repr(row.pixel_size_A),
        "--snr", str(SNR), "--no-progress",
    ]  # fmt: skip
    with AnonymousPeak() as anonymous:
        started = time.perf_counter()
        code = cryoflex_main(argv)
        seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(code)
    peak_MB = peak_rss_MB()
    written_MB = directory_bytes(out_dir) / 2**20
    stacks_MB = directory_bytes(out_dir / "stacks") / 2**20
    result = dict(
        asdict(row), seconds=seconds, images_per_s=row.n_images / seconds, written_MB=written_MB,
        stacks_MB=stacks_MB, written_MB_per_s=written_MB / seconds, baseline_rss_MB=baseline_MB,
        peak_rss_MB=peak_MB, rss_increase_MB=peak_MB - baseline_MB, peak_anonymous_rss_MB=anonymous.peak_MB,
        threads=torch.get_num_threads(),
    )  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- all rows


def measure_in_subprocess(row: Row, work: Path) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix="simulate_", dir=work))
    command = [
        sys.executable, str(Path(__file__).resolve()), "--single-row", row.label(), "--row-out", str(out_dir)
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, capture_output=True, text=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"row {row.label()} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def pixel_size_A(box_px: int, diameter_A: float) -> float:
    return BOX_MARGIN * diameter_A / box_px


def first_frame_diameter_A() -> float:
    """Twice the largest distance from the centroid in the trajectory's first frame."""
    coords_A = read_trajectory(TOPOLOGY, TRAJECTORY).coords_A[0]
    return 2.0 * float(np.linalg.norm(coords_A - coords_A.mean(axis=0), axis=1).max())


def print_row(row: dict, kind: str) -> None:
    print(
        f"{kind:<8} {row['box_px']:>4} {row['n_images']:>8} {row['seconds']:>8.1f} {row['images_per_s']:>8.0f} "
        f"{row['written_MB']:>9.0f} {row['written_MB_per_s']:>7.1f} {row['peak_rss_MB']:>8.0f} "
        f"{row['rss_increase_MB']:>8.0f} {row['peak_anonymous_rss_MB']:>8.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, nargs="+", help=f"box sizes in px (default {BOXES_PX})")
    parser.add_argument("--n-images", type=int, nargs="+", help=f"images per box, one per box (default {N_IMAGES})")
    parser.add_argument("--scaling-box", type=int, help=f"box of the memory-scaling rows (default {SCALING_BOX_PX})")
    parser.add_argument(
        "--scaling-n-images", type=int, nargs="*", help=f"n_images of the scaling rows (default {SCALING_N_IMAGES})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking the script")
    parser.add_argument("--work", type=Path, help="directory for the temporary outputs (default: the system's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate_cpu.json"))
    parser.add_argument("--single-row", type=Row.parse, help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_row is not None:
        run_single_row(args.single_row, args.row_out)
        return
    boxes = args.boxes or (QUICK_BOXES_PX if args.quick else BOXES_PX)
    n_images = args.n_images or (QUICK_N_IMAGES if args.quick else N_IMAGES)
    if len(n_images) != len(boxes):
        parser.error(f"--n-images needs one value per box ({len(boxes)})")
    scaling_box = args.scaling_box or (QUICK_SCALING_BOX_PX if args.quick else SCALING_BOX_PX)
    scaling_n = args.scaling_n_images if args.scaling_n_images is not None else (
        QUICK_SCALING_N_IMAGES if args.quick else SCALING_N_IMAGES
    )  # fmt: skip
    diameter_A = first_frame_diameter_A()
    main_rows = [Row(box, n, pixel_size_A(box, diameter_A)) for box, n in zip(boxes, n_images, strict=True)]
    scaling_rows = [Row(scaling_box, n, pixel_size_A(scaling_box, diameter_A)) for n in scaling_n]
    print(
        f"cryoflex simulate, AdK 214 residues x 98 frames, diameter {diameter_A:.1f} A, SNR {SNR}; {cpu_name()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print("row       box   images        s    img/s  written MB    MB/s  peak MB  +RSS MB  anon MB")
    work = args.work or Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    measured: dict[Row, dict] = {}
    results = []
    for kind, rows in (("main", main_rows), ("scaling", scaling_rows)):
        for row in rows:
            if row not in measured:
                measured[row] = measure_in_subprocess(row, work)
            results.append(dict(measured[row], kind=kind))
            print_row(measured[row], kind)
    scaling = sorted((measured[row] for row in set(scaling_rows)), key=lambda result: result["n_images"])
    growth = {}
    if len(scaling) >= 2:
        low, high = scaling[0], scaling[-1]
        growth = dict(
            box_px=scaling_box, n_images=[low["n_images"], high["n_images"]],
            peak_rss_MB=[low["peak_rss_MB"], high["peak_rss_MB"]],
            peak_anonymous_rss_MB=[low["peak_anonymous_rss_MB"], high["peak_anonymous_rss_MB"]],
            anonymous_MB_per_1000_images=1000.0 * (high["peak_anonymous_rss_MB"] - low["peak_anonymous_rss_MB"])
            / (high["n_images"] - low["n_images"]),
        )  # fmt: skip
        print(
            f"memory growth at {scaling_box} px, {low['n_images']} -> {high['n_images']} images: peak RSS "
            f"{low['peak_rss_MB']:.0f} -> {high['peak_rss_MB']:.0f} MB, anonymous {low['peak_anonymous_rss_MB']:.0f}"
            f" -> {high['peak_anonymous_rss_MB']:.0f} MB ({growth['anonymous_MB_per_1000_images']:+.1f} MB per "
            "1000 images)"
        )
    result = dict(
        machine=platform.machine(), cpu=cpu_name(), cpus=os.cpu_count(), torch=torch.__version__,
        threads=torch.get_num_threads(), snr=SNR, diameter_A=diameter_A, quick=args.quick, rows=results,
        memory_growth=growth,
    )  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
