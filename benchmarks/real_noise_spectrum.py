"""The radial power spectrum of real particle images, as a noise spectrum for `cryoflex simulate --noise-spectrum`.

Reads the 5 RELION particles of the data pack (256 px at 2.806 A; cryoDRGN's test data, real micrographs), takes
each image minus its mean, and averages |F|^2 / N^2 over the images and over each Fourier shell. At their SNR the
power is mostly noise (the particle adds to the lowest shells). Prints the table relative to the mean power above
1/12 A and writes the CSV (frequency_per_A, power) and a JSON.

    python benchmarks/real_noise_spectrum.py [--stack ../shared/data/cryoem/relion31.mrcs --pixel-size-A 2.806]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryoflex.imaging.noise import shell_counts, shell_sums
from cryoflex.io.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def radial_power(images: np.ndarray, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, N) images -> (frequency in 1/A, mean power |F|^2 / N^2) for shells 1 .. N/2."""
    box = images.shape[-1]
    tensor = torch.as_tensor(images, dtype=torch.float64)
    tensor = tensor - tensor.mean(dim=(-2, -1), keepdim=True)
    sums = shell_sums(torch.fft.rfft2(tensor).abs().square() / box**2)
    power = (sums / (shell_counts(box) * len(images)))[1 : box // 2 + 1].numpy()
    return np.arange(1, box // 2 + 1) / (box * pixel_size_A), power


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", type=Path, default=ROOT.parent / "shared/data/cryoem/relion31.mrcs")
    parser.add_argument("--pixel-size-A", type=float, default=2.806)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/real_noise_spectrum.csv")
    args = parser.parse_args()
    with warnings.catch_warnings():  # this file's header lacks the MAP stamp: mrcfile warns and reads it
        warnings.simplefilter("ignore")
        with mrcfile.open(args.stack, permissive=True) as handle:
            images = np.asarray(handle.data, dtype=np.float64)
    frequency_per_A, power = radial_power(images, args.pixel_size_A)
    relative = power / power[frequency_per_A >= 1 / 12].mean()
    print(f"{len(images)} images of {images.shape[-1]} px at {args.pixel_size_A} A/px: power relative to above 1/12 A")
    print("| resolution A | relative power |\n|---:|---:|")
    for shell in np.unique(np.geomspace(1, len(power), 12).astype(int)):
        print(f"| {1 / frequency_per_A[shell - 1]:.1f} | {relative[shell - 1]:.2f} |")
    rows = "".join(f"{f:.6g},{p:.6g}\n" for f, p in zip(frequency_per_A, relative, strict=True))
    write_text_atomic(args.out, "frequency_per_A,power\n" + rows)
    summary = {"stack": args.stack.name, "images": len(images), "pixel_size_A": args.pixel_size_A,
               "frequency_per_A": frequency_per_A.tolist(), "relative_power": relative.tolist()}  # fmt: skip
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
