"""Reconstruction at scale: particles/s and peak memory of `reconstruct_groups` over whole simulated datasets.

Run: .venv/bin/python benchmarks/reconstruct_scale.py [--n-images 10000 100000] [--box-px 128] [--padding 1]
     [--device cpu|cuda] [--out benchmarks/results/reconstruct_scale_cpu.json]
Each row simulates N particles of the shipped AdK ensemble (cryoflex simulate's code path, SNR 0.1, CTF) into a
temporary folder, then reconstructs the consensus half-maps from the stacks in a fresh process, reading every image
once in batches. "anon peak MB" is the growth of the process's anonymous memory while it reconstructed (the stacks'
memory-mapped file pages excluded): constant in N when the reconstruction streams.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _measure import AnonymousPeak, cpu_name

from cryoflex.io.atomic import write_text_atomic


def simulate(out_dir: Path, n_images: int, box_px: int) -> Path:
    """N noisy AdK particles at box_px (2 A/px at 64 px, scaled so the molecule fills the same share of the box)."""
    from cryoflex.demo import adk_ensemble
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    config = SimulationConfig(n_images=n_images, box_size_px=box_px, pixel_size_A=128.0 / box_px, snr=0.1,
                              defocus_min_A=10_000.0, defocus_max_A=25_000.0, seed=0)  # fmt: skip
    return simulate_dataset(adk_ensemble(), config, out_dir, progress=False)


def measure(star: Path, padding: int, device: str) -> dict:
    """Consensus half-maps of every particle of `star`, streamed from its stacks (no cache)."""
    import torch

    from cryoflex.analysis.reconstruct import half_split, reconstruct_groups
    from cryoflex.data.dataset import ParticleDataset
    from cryoflex.io.metadata import read_metadata

    dataset = ParticleDataset(read_metadata(star))
    n = dataset.n
    before_MB = AnonymousPeak.current_MB()
    with AnonymousPeak() as anonymous:
        started = time.perf_counter()
        maps = reconstruct_groups(dataset, {"consensus": np.arange(n)}, half_split(n, seed=0), padding=padding,
                                  batch_size=256, device=torch.device(device))  # fmt: skip
        seconds = time.perf_counter() - started
    return {
        "n_images": n, "box_px": dataset.box_size_px, "padding": padding, "device": device,
        "seconds": seconds, "particles_per_s": n / seconds, "anon_peak_MB": anonymous.peak_MB - before_MB,
        "resolution_A": maps["consensus"].resolution_A,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--box-px", type=int, default=128)
    parser.add_argument("--padding", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reconstruct_scale_cpu.json")
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # internal: measure one simulated dataset
    args = parser.parse_args()
    if args.row is not None:
        print(json.dumps(measure(args.row, args.padding, args.device)))
        return
    rows = []
    print(f"{'images':>8} {'box':>4} {'pad':>3} {'particles/s':>12} {'seconds':>8} {'anon peak MB':>13} {'res A':>6}")
    for n_images in args.n_images:
        with tempfile.TemporaryDirectory(prefix="cryoflex_reconstruct_scale_") as folder:
            star = simulate(Path(folder), n_images, args.box_px)
            command = [sys.executable, __file__, "--row", str(star), "--padding", str(args.padding),
                       "--device", args.device]  # fmt: skip
            row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        rows.append(row)
        print(f"{row['n_images']:>8,} {row['box_px']:>4} {row['padding']:>3} {row['particles_per_s']:>12,.0f} "
              f"{row['seconds']:>8.1f} {row['anon_peak_MB']:>13.0f} {row['resolution_A']:>6.2f}", flush=True)
    write_text_atomic(args.out, json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
