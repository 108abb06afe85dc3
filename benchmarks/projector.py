"""Projector throughput (images/s, forward and forward+backward) with the matmul FLOP floor beside each figure.

Run: .venv/bin/python benchmarks/projector.py [--device cpu|cuda] [--rows 13941:128:32 ...]
     [--out benchmarks/results/projector_cpu.json]
The floor is the time the dominant batched matmul needs at the machine's measured dense-matmul rate
(2 B N^2 n FLOPs forward), so "x floor" says how far the projector is from the matmul alone. Rows are
RESIDUES:BOX_PX:BATCH (default: every combination of RESIDUES, BOXES_PX and BATCHES); on CUDA each row also records
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _measure import cpu_name

from cryoflex.imaging.batches import PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic

RESIDUES = (214, 2750, 13941)
BOXES_PX = (64, 128, 256)
BATCHES = (32, 128)


def parse_row(spec: str) -> tuple[int, int, int]:
    """'RESIDUES:BOX_PX:BATCH' -> (residues, box, batch)."""
    values = [int(value) for value in spec.split(":")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"row {spec!r}: use RESIDUES:BOX_PX:BATCH")
    return values[0], values[1], values[2]


def _synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that the clock sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds per call over `repeats` calls after one warm-up call."""
    fn()
    _synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronise(device)
    return (time.perf_counter() - start) / repeats


def matmul_rate_flops(device: torch.device) -> float:
    """Measured dense float32 matmul rate of this device (FLOP/s)."""
    a = torch.randn(64, 256, 2048, device=device)
    b = torch.randn(64, 2048, 256, device=device)
    seconds = _time(lambda: torch.bmm(a, b), device, 5)
    return 2 * 64 * 256 * 2048 * 256 / seconds


def measure(
    formation: ImageFormation, coords: torch.Tensor, amplitudes: torch.Tensor, poses: PoseBatch, repeats: int
) -> tuple[float, float]:
    """Seconds per call of the forward pass (no grad) and of forward + backward, without CTF."""
    device = coords.device
    with torch.no_grad():
        forward_s = _time(lambda: formation.images(coords, amplitudes, poses, None), device, repeats)
    target = torch.randn(coords.shape[0], formation.box_size_px, formation.box_size_px, device=device)
    backward_s = _time(
        lambda: (formation.images(coords, amplitudes, poses, None) * target).sum().backward(), device, repeats
    )
    return forward_s, backward_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--rows", nargs="+", type=parse_row, help="RESIDUES:BOX_PX:BATCH (default: every residues x box x batch)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projector_cpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    specs = args.rows or list(itertools.product(RESIDUES, BOXES_PX, BATCHES))
    torch.manual_seed(0)
    rate = matmul_rate_flops(device)
    rows = []
    threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    print(f"device {args.device}, matmul rate {rate / 1e9:.1f} GFLOP/s, torch {torch.__version__}, {threads} threads")
    print("residues  box batch  fwd img/s  fwd+bwd img/s  floor img/s  x floor" + ("  cuda MB" if cuda else ""))
    for n, box, batch in specs:
        formation = ImageFormation(box, pixel_size_A=256.0 / box * 1.5, sigma_A=2.0)
        coords = (torch.randn(batch, n, 3, device=device) * 20).requires_grad_(True)
        amplitudes = torch.ones(n, device=device)
        rotations = torch.eye(3, device=device).expand(batch, 3, 3).contiguous()
        poses = PoseBatch(rotations, torch.zeros(batch, 2, device=device))
        repeats = 3 if n * box * batch < 5e7 else 1
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        forward_s, backward_s = measure(formation, coords, amplitudes, poses, repeats)
        floor_s = 2 * batch * box * box * n / rate
        row = dict(
            residues=n,
            box_px=box,
            batch=batch,
            forward_images_per_s=batch / forward_s,
            forward_backward_images_per_s=batch / backward_s,
            floor_images_per_s=batch / floor_s,
            forward_over_floor=forward_s / floor_s,
        )
        if cuda:
            row["cuda_peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        print(
            f"{n:>8} {box:>4} {batch:>5} {row['forward_images_per_s']:>10.0f} "
            f"{row['forward_backward_images_per_s']:>14.0f} {row['floor_images_per_s']:>12.0f} "
            f"{row['forward_over_floor']:>8.2f}" + (f" {row['cuda_peak_allocated_MB']:>8.0f}" if cuda else ""),
            flush=True,
        )
    result = dict(
        device=args.device,
        device_name=torch.cuda.get_device_name(device) if cuda else cpu_name(),
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        matmul_flops_per_s=rate,
        rows=rows,
    )
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
