"""How far images rendered with TF32 matrix products are from float32 ones: emulated on a CPU, measured on CUDA.

On NVIDIA GPUs since Ampere, float32 matrix products may run on TF32 tensor cores: each operand is rounded to 10
mantissa bits, the products are summed in float32. The projections' batched products (the separable Gaussian
tables, or the band-limited phase tables, against each other and, in the backward pass, against the images'
gradient) are the largest floating-point work of a step. This script rounds every operand of torch.bmm the way TF32
does (to nearest, ties away from zero, on the bits) and compares the images and their gradients with respect to the
coordinates against a float64 rendering, beside plain float32 and beside the noise of an SNR 0.1 image. With
--device cuda the TF32 images are those of the tensor cores themselves (ImageFormation.tf32_products, as training
sets it on CUDA), all three renderings on the GPU.

Run: .venv/bin/python benchmarks/tf32_rendering.py [--rows 214:32:64 2750:64:16 13941:128:4] [--device cpu|cuda]
     [--out ...]
Rows are RESIDUES:BOX_PX:IMAGES: AdK at 214 residues, the compact synthetic chains of train_throughput.py otherwise;
uniformly random rotations, the dataset-like CTF of simulate (defocus 1-2 um, 300 kV), band-limited (the model's
rendering) and point-sampled. Prints relative errors (norm of the difference / norm of the float64 result) and writes
JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _measure import cpu_name
from train_throughput import BOX_MARGIN, diameter_A, row_structure

from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic

DEFAULT_ROWS = ("214:32:64", "2750:64:16", "13941:128:4")
TF32_DROPPED_BITS = 13  # float32 keeps 23 mantissa bits, TF32 10
SNR = 0.1  # noise norm / signal norm = 1 / sqrt(SNR) for an image of this SNR


def to_tf32(values: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 mantissa bits; ties away from zero), still stored as float32."""
    bits = values.contiguous().view(torch.int32)
    half = 1 << (TF32_DROPPED_BITS - 1)
    rounded = (bits + half) & ~((1 << TF32_DROPPED_BITS) - 1)  # on the magnitude bits: sign-magnitude format
    return rounded.view(torch.float32)


@contextlib.contextmanager
def tf32_bmm() -> Iterator[None]:
    """torch.bmm with both operands rounded to TF32 (float32 accumulation), as tensor cores compute it."""
    original = torch.bmm

    def bmm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        if a.dtype != torch.float32:
            return original(a, b, out=out)
        return original(to_tf32(a), to_tf32(b), out=out)

    torch.bmm = bmm  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.bmm = original


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def measure(residues: int, box_px: int, images: int, band_limited: bool, work: Path, device: torch.device) -> dict:
    """Relative errors of float32 and TF32 images and coordinate gradients against float64, for one row: TF32
    emulated on a CPU, the tensor cores' own on CUDA."""
    structure = row_structure(residues, work)
    coords = structure.coords_A[0] - structure.coords_A[0].mean(axis=0)
    pixel_size_A = BOX_MARGIN * diameter_A(coords) / box_px
    rng = np.random.default_rng(0)
    rotations = torch.as_tensor(uniform_random_rotations(images, rng))
    defocus = torch.as_tensor(rng.uniform(10000.0, 20000.0, images))
    ctf = CTFBatch.from_values(defocus, defocus, 0.0, 300.0, 2.7, 0.1, dtype=torch.float64)
    poses = PoseBatch(rotations, torch.zeros(images, 2, dtype=torch.float64))
    formation = ImageFormation(box_px, pixel_size_A, 2.0, band_limited=band_limited)
    probe = torch.as_tensor(rng.normal(size=(images, box_px, box_px)))
    amplitudes = torch.ones(residues, dtype=torch.float64)

    def render(dtype: torch.dtype, tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(coords, dtype=dtype, device=device).expand(images, -1, -1).clone().requires_grad_()
        formation.tf32_products = tf32
        rendered = formation.images(
            x, amplitudes.to(device, dtype), poses.to(device, dtype=dtype), ctf.to(device, dtype=dtype)
        )
        (gradient,) = torch.autograd.grad((rendered * probe.to(device, dtype)).sum(), x)
        return rendered.detach().cpu(), gradient.cpu()

    reference, reference_gradient = render(torch.float64)
    single, single_gradient = render(torch.float32)
    if device.type == "cuda":
        tf32, tf32_gradient = render(torch.float32, tf32=True)
    else:
        with tf32_bmm():
            tf32, tf32_gradient = render(torch.float32)
    return dict(
        residues=residues, box_px=box_px, images=images, rendering="band_limited" if band_limited else "point",
        tf32="tensor cores" if device.type == "cuda" else "emulated",
        float32_image=relative(single, reference), tf32_image=relative(tf32, reference),
        float32_gradient=relative(single_gradient, reference_gradient),
        tf32_gradient=relative(tf32_gradient, reference_gradient),
        tf32_image_over_noise_at_snr=relative(tf32, reference) * math.sqrt(SNR),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="RESIDUES:BOX_PX:IMAGES")
    parser.add_argument("--device", default="cpu", help="cpu (TF32 emulated) or cuda (the tensor cores)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tf32_rendering.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{where}, torch {torch.__version__}; relative error against float64 (norm of difference / norm)")
    print(f"{'rendering':>12} {'row':>12} {'fp32 image':>11} {'tf32 image':>11} {'fp32 grad':>10} {'tf32 grad':>10} "
          f"{'tf32 / noise at SNR ' + str(SNR):>22}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryoflex_tf32_") as work:
        for spec in args.rows:
            residues, box_px, images = (int(v) for v in spec.split(":"))
            for band_limited in (True, False):
                row = measure(residues, box_px, images, band_limited, Path(work), device)
                rows.append(row)
                print(f"{row['rendering']:>12} {spec:>12} {row['float32_image']:>11.1e} {row['tf32_image']:>11.1e} "
                      f"{row['float32_gradient']:>10.1e} {row['tf32_gradient']:>10.1e} "
                      f"{row['tf32_image_over_noise_at_snr']:>22.1e}", flush=True)  # fmt: skip
    write_text_atomic(args.out, json.dumps(dict(device=where, torch=torch.__version__, snr=SNR, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
