"""How far each per-residue density model is from particles made from every heavy atom (noise-free, one frame).

Run: .venv/bin/python benchmarks/density_models.py [--images 64 --box-px 32 --atom-sigma-A 1.5 2.5]
     [--widths-A 1.5 2 2.5 3 3.5] [--rendering band_limited point] [--out benchmarks/results/density_models.json]
The particles: AdK's first trajectory frame, every heavy atom a Gaussian of --atom-sigma-A (each value in turn: how
blurred the particles are, by the atoms' motion and the microscope's envelope) with its own electrons, rendered at
64 px and 2 A/px with a CTF (defocus 0.5-2 um) and Fourier-cropped to --box-px (what training sees with
--downsample). Each model renders the same poses and CTF directly at --box-px: one Gaussian per residue at its C-alpha,
or at its heavy atoms' electron centroid (with one width, or a per-residue width that adds the atoms' spread), two
per residue (the backbone's and the side chain's centroids), or every heavy atom, band-limited (the model's default)
or sampled at the pixel centres (`rendering: point`), each value of --rendering in turn. Each image is fitted with its
own least-squares scale; the figure is the median residual power as a share of the particles' power, for each model
width in --widths-A (a learned width finds the best of them). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from recovery_adk import DATA

from cryoflex.config import RENDERINGS
from cryoflex.data.downsample import fourier_crop
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.trajectory import atomic_numbers_from_masses

BACKBONE = ("N", "CA", "C", "O")
WIDTH_BINS = 8  # per-residue widths are rendered in this many groups of equal width (the projector takes one width)


def residue_groups(
    coords_A: torch.Tensor, electrons: torch.Tensor, residue: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per residue, over the atoms in `mask`: electrons (n,), their electron-weighted centroid (n, 3) and per-axis
    variance (n,) in A^2."""
    n = int(residue.max()) + 1
    z, x, r = electrons[mask], coords_A[mask], residue[mask]
    total = torch.zeros(n, dtype=x.dtype).index_add_(0, r, z)
    centroid = torch.zeros(n, 3, dtype=x.dtype).index_add_(0, r, x * z[:, None]) / total.clamp_min(1e-12)[:, None]
    spread = torch.zeros(n, dtype=x.dtype).index_add_(0, r, z * (x - centroid[r]).square().sum(1))
    return total, centroid, spread / total.clamp_min(1e-12) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--box-px", type=int, default=32)
    parser.add_argument("--atom-sigma-A", type=float, nargs="+", default=[1.5, 2.5])
    parser.add_argument("--widths-A", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 3.5])
    parser.add_argument("--rendering", nargs="+", choices=RENDERINGS, default=["band_limited"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/density_models.json"))
    args = parser.parse_args()
    import MDAnalysis as mda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        universe = mda.Universe(str(DATA / "adk.psf"), str(DATA / "adk_dims.dcd"))
    heavy = universe.atoms[universe.atoms.masses > 4.5]
    coords_A = torch.as_tensor(heavy.positions.astype(np.float64))
    coords_A -= coords_A.mean(0)
    electrons = torch.as_tensor(atomic_numbers_from_masses(heavy.masses).astype(np.float64))
    residue = torch.as_tensor(heavy.resindices.astype(np.int64))
    backbone = torch.as_tensor(np.isin(heavy.names, BACKBONE))
    count = args.images
    poses = PoseBatch(torch.as_tensor(uniform_random_rotations(count, np.random.default_rng(0))),
                      torch.zeros(count, 2, dtype=torch.float64))  # fmt: skip
    defocus_A = torch.linspace(5000.0, 20000.0, count, dtype=torch.float64)
    ctf = CTFBatch.from_values(defocus_A, defocus_A, 0.0, 300.0, 2.7, 0.1)
    pixel_A = 2.0 * 64 / args.box_px

    def residual(images: torch.Tensor, particles: torch.Tensor) -> float:
        scale = (images * particles).sum((1, 2)) / images.square().sum((1, 2))
        left = (scale[:, None, None] * images - particles).square().sum((1, 2))
        return float((left / particles.square().sum((1, 2))).median())

    def render(points_A: torch.Tensor, amplitudes: torch.Tensor, sigma_A: float) -> torch.Tensor:
        formation = ImageFormation(args.box_px, pixel_A, sigma_A, band_limited=rendering == "band_limited")
        return formation.images(points_A, amplitudes, poses, ctf)

    everything = torch.ones_like(backbone)
    amplitudes, centroids, spread_A2 = residue_groups(coords_A, electrons, residue, everything)
    bb_electrons, bb_centroids, _ = residue_groups(coords_A, electrons, residue, backbone)
    sc_electrons, sc_centroids, _ = residue_groups(coords_A, electrons, residue, ~backbone)
    c_alpha = coords_A[torch.as_tensor(heavy.names == "CA")]
    rows = []
    for rendering, atom_sigma_A in itertools.product(args.rendering, args.atom_sigma_A):
        particles = fourier_crop(ImageFormation(64, 2.0, atom_sigma_A).images(coords_A, electrons, poses, ctf),
                                 args.box_px)  # fmt: skip
        for sigma_A in args.widths_A:
            widths_A = torch.sqrt(sigma_A**2 + spread_A2)
            edges = torch.quantile(widths_A, torch.linspace(0, 1, WIDTH_BINS + 1, dtype=widths_A.dtype))
            group = torch.bucketize(widths_A, edges[1:-1], right=True)
            per_residue_width = sum(
                render(centroids[group == k], amplitudes[group == k], float(widths_A[group == k].mean()))
                for k in range(WIDTH_BINS) if (group == k).any()
            )  # fmt: skip
            models = {
                "C-alpha": render(c_alpha, amplitudes, sigma_A),
                "residue centroid": render(centroids, amplitudes, sigma_A),
                "residue centroid, per-residue width": per_residue_width,
                "backbone + side-chain centroids": render(
                    torch.cat([bb_centroids, sc_centroids]), torch.cat([bb_electrons, sc_electrons]), sigma_A
                ),
                "every heavy atom": render(coords_A, electrons, sigma_A),
            }
            rows += [dict(model=name, rendering=rendering, atom_sigma_A=atom_sigma_A, sigma_A=sigma_A,
                          residual=residual(images, particles)) for name, images in models.items()]  # fmt: skip
    widths = " ".join(f"{f'width {w:g} A':>11}" for w in args.widths_A)
    print(f"{'rendering':<13} {'atoms A':>7} {'model':<38} {widths}")
    for rendering, atom_sigma_A in itertools.product(args.rendering, args.atom_sigma_A):
        for name in dict.fromkeys(row["model"] for row in rows):
            cells = [100 * r["residual"] for r in rows
                     if (r["model"], r["rendering"], r["atom_sigma_A"]) == (name, rendering, atom_sigma_A)]
            shares = " ".join(f"{cell:>10.1f}%" for cell in cells)
            print(f"{rendering:<13} {atom_sigma_A:>7.1f} {name:<38} {shares}")
    note = (f"AdK frame 0, heavy atoms as Gaussians of atom_sigma_A at 64 px / 2 A with CTF, Fourier-cropped to "
            f"{args.box_px} px; models rendered at {args.box_px} px with width sigma_A; median over {count} poses")
    write_text_atomic(args.out, json.dumps({"torch": torch.__version__, "note": note, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
