"""Projector throughput (images/s, forward and forward+backward) with the matmul FLOP floor beside each figure.

Run: .venv/bin/python benchmarks/projector.py [--device cpu|cuda] [--out benchmarks/results/projector_cpu.json]
The floor is the time the dominant batched matmul needs at the machine's measured dense-matmul rate
(2 B N^2 n FLOPs forward), so "x floor" says how far the projector is from the matmul alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cryoflex.imaging.batches import PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic

RESIDUES = (214, 2750, 13941)
BOXES_PX = (64, 128, 256)
BATCHES = (32, 128)


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def matmul_rate_flops(device: str) -> float:
    """Measured dense float32 matmul rate of this device (FLOP/s)."""
    a = torch.randn(64, 256, 2048, device=device)
    b = torch.randn(64, 2048, 256, device=device)
    seconds = _time(lambda: torch.bmm(a, b), 5)
    return 2 * 64 * 256 * 2048 * 256 / seconds


def measure(formation: ImageFormation, coords, amplitudes, poses: PoseBatch, repeats: int) -> tuple[float, float]:
    """Seconds per call of the forward pass (no grad) and of forward + backward, without CTF."""
    with torch.no_grad():
        forward_s = _time(lambda: formation.images(coords, amplitudes, poses, None), repeats)
    target = torch.randn(coords.shape[0], formation.box_size_px, formation.box_size_px, device=coords.device)
    backward_s = _time(lambda: (formation.images(coords, amplitudes, poses, None) * target).sum().backward(), repeats)
    return forward_s, backward_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projector_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rate = matmul_rate_flops(args.device)
    rows = []
    threads = torch.get_num_threads()
    print(f"device {args.device}, matmul rate {rate / 1e9:.1f} GFLOP/s, torch {torch.__version__}, {threads} threads")
    print("residues  box batch  fwd img/s  fwd+bwd img/s  floor img/s  x floor")
    for n in RESIDUES:
        for box in BOXES_PX:
            formation = ImageFormation(box, pixel_size_A=256.0 / box * 1.5, sigma_A=2.0)
            for batch in BATCHES:
                coords = (torch.randn(batch, n, 3, device=args.device) * 20).requires_grad_(True)
                amplitudes = torch.ones(n, device=args.device)
                rotations = torch.eye(3, device=args.device).expand(batch, 3, 3).contiguous()
                poses = PoseBatch(rotations, torch.zeros(batch, 2, device=args.device))
                repeats = 3 if n * box * batch < 5e7 else 1
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
                rows.append(row)
                print(
                    f"{n:>8} {box:>4} {batch:>5} {row['forward_images_per_s']:>10.0f} "
                    f"{row['forward_backward_images_per_s']:>14.0f} {row['floor_images_per_s']:>12.0f} "
                    f"{row['forward_over_floor']:>8.2f}",
                    flush=True,
                )
    result = dict(
        device=args.device,
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
