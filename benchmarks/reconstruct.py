"""Direct Fourier inversion throughput: FourierAccumulator.insert particles/s, volume() time and peak memory.

Run: .venv/bin/python benchmarks/reconstruct.py [--device cpu|cuda] [--boxes 64 128 256]
     [--out benchmarks/results/reconstruct_cpu.json]
Each row: one box size and padding, batches of 64 random images with random poses, origins and a CTF. The floor is
the time of the per-image FFTs alone (torch.fft.rfft2 of the zero-padded batch), so "x floor" = insert time / FFT
time says what the CTF, the phase ramp and the trilinear scatter cost on top of the transform every method needs.
"peak MB" is the growth of the anonymous memory of a fresh process per row (CPU) or the peak allocated device memory
(CUDA) while the row ran: the accumulator's grid plus insert's and volume()'s temporaries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _measure import AnonymousPeak, cpu_name

from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.backprojection import FourierAccumulator
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.io.atomic import write_text_atomic

BATCH = 64
PADDINGS = (2, 1)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call (the least disturbed by other processes)."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronise(device)
        start = time.perf_counter()
        fn()
        _synchronise(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _batch(box_px: int, device: torch.device, seed: int) -> tuple[torch.Tensor, PoseBatch, CTFBatch]:
    """BATCH random images with Haar-uniform rotations, origins up to 5 px and defocus 1-3 um."""
    rng = np.random.default_rng(seed)
    images = torch.tensor(rng.standard_normal((BATCH, box_px, box_px)), dtype=torch.float32, device=device)
    rotations = torch.tensor(uniform_random_rotations(BATCH, rng), dtype=torch.float32, device=device)
    shifts_A = torch.tensor(rng.uniform(-5.0, 5.0, (BATCH, 2)), dtype=torch.float32, device=device)
    defocus_A = rng.uniform(10_000.0, 30_000.0, BATCH)
    ctf = CTFBatch.from_values(defocus_A, defocus_A - 500.0, 30.0, 300.0, 2.7, 0.1, dtype=torch.float32, device=device)
    return images, PoseBatch(rotations, shifts_A), ctf


def measure(box_px: int, padding: int, device: torch.device) -> dict:
    """One row: insert and FFT-floor rates, volume() seconds and peak memory for one box size and padding."""
    pixel_size_A = 1.0
    images, poses, ctf = _batch(box_px, device, seed=box_px + padding)
    padded_px = padding * box_px
    repeats = 3 if box_px * padding <= 256 else 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with AnonymousPeak() as anonymous:
        baseline_MB = anonymous.current_MB()
        accumulator = FourierAccumulator(box_px, pixel_size_A, padding=padding, device=device)
        insert_s = _timed(lambda: accumulator.insert(images, poses, ctf), device, repeats)
        floor_s = _timed(lambda: torch.fft.rfft2(images, s=(padded_px, padded_px)), device, repeats)
        start = time.perf_counter()
        accumulator.volume()
        _synchronise(device)
        volume_s = time.perf_counter() - start
    if device.type == "cuda":
        peak_MB = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_MB = anonymous.peak_MB - baseline_MB
    grid_MB = accumulator._grid.numel() * accumulator._grid.element_size() / 2**20
    return dict(
        box_px=box_px,
        padding=padding,
        padded_px=padded_px,
        batch=BATCH,
        insert_particles_per_s=BATCH / insert_s,
        fft_floor_particles_per_s=BATCH / floor_s,
        insert_over_floor=insert_s / floor_s,
        volume_s=volume_s,
        grid_MB=grid_MB,
        peak_MB=peak_MB,
    )


def _row_in_fresh_process(box_px: int, padding: int, device: str) -> dict:
    """measure() in a new interpreter, so that memory freed by earlier rows cannot hide this row's peak."""
    command = [sys.executable, __file__, "--device", device, "--row", str(box_px), str(padding)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:  # its traceback, not only "exit status 1"
        raise RuntimeError(f"row {box_px} px, padding {padding} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruct_cpu.json"))
    parser.add_argument("--row", type=int, nargs=2, metavar=("BOX", "PADDING"), help="measure one row, print its JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.row:
        print(json.dumps(measure(args.row[0], args.row[1], device)))
        return
    threads = torch.get_num_threads()
    print(f"device {device}, torch {torch.__version__}, {threads} threads, batch {BATCH}")
    print("box padding  insert part/s  FFT floor part/s  x floor  volume s  grid MB  peak MB")
    rows = []
    for box_px in args.boxes:
        for padding in PADDINGS:
            row = _row_in_fresh_process(box_px, padding, args.device)
            rows.append(row)
            print(
                f"{box_px:>3} {padding:>7} {row['insert_particles_per_s']:>14.1f} "
                f"{row['fft_floor_particles_per_s']:>17.0f} {row['insert_over_floor']:>8.1f} "
                f"{row['volume_s']:>9.2f} {row['grid_MB']:>8.0f} {row['peak_MB']:>8.0f}",
                flush=True,
            )
    result = dict(
        device=str(device),
        machine=cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        torch=torch.__version__,
        threads=threads,
        rows=rows,
    )
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
