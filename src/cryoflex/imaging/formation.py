"""The one image-formation model: structures + poses + CTF -> images, for training, simulation and checks.

ImageFormation owns one image geometry (box, pixel size, Gaussian width) and how the Gaussians are rendered: sampled
at the pixel centres (cryoflex.imaging.projector), or band-limited to the box's Nyquist frequency as a Fourier-cropped
image is (cryoflex.imaging.band_limited); then the CTF on the torch.fft.rfft2 grid (cryoflex.imaging.ctf). The
model's render, the simulator's clean images, the training loop's contrast check and the figures all call images();
the model's likelihood, which is a sum over the same grid (cryoflex.imaging.noise), takes the half spectra from
spectra(), which band-limited rendering computes directly (no inverse FFT, and none forward for the likelihood); code
that works in Fourier space (e.g. back-projection for a reconstruction) takes the CTF from ctf_rfft().
Images are noise-free; the simulator adds its noise itself.

The physics runs in the structures' dtype: poses and CTF parameters are cast to it (a no-op for the float32 batches
of the dataset).
"""

from __future__ import annotations

import torch

from cryoflex.imaging.band_limited import band_limited_spectra
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.ctf import ctf_rfft
from cryoflex.imaging.projector import batched_amplitudes, pixel_coordinates_A, project_on_grid, projected_positions_A


class ImageFormation:
    """Gaussian pseudo-atoms projected along z at given poses, convolved with each particle's CTF; N x N images.

    band_limited renders each image's spectrum up to the box's Nyquist frequency, exactly what a Fourier crop of a
    finer image holds (the model, which trains on Fourier-cropped particles); otherwise the projected Gaussians are
    sampled at the pixel centres (the simulator, which makes particles at their own pixel size).
    """

    def __init__(self, box_size_px: int, pixel_size_A: float, sigma_A: float = 2.0, *, band_limited: bool = False):
        if box_size_px < 1 or not pixel_size_A > 0 or not sigma_A > 0:
            raise ValueError(
                "need box_size_px >= 1, pixel_size_A > 0, sigma_A > 0; "
                f"got {box_size_px}, {pixel_size_A}, {sigma_A}"
            )
        self.box_size_px = box_size_px
        self.pixel_size_A = pixel_size_A
        self.sigma_A = sigma_A
        self.band_limited = band_limited
        # The projections' batched products on TF32 tensor cores, on CUDA (projector.tf32_products); training sets it
        # with its precision setting, everything else renders in plain float32.
        self.tf32_products = False
        self._grids: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def pixel_grid_A(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (N,) pixel-centre coordinates (index - N//2) * pixel_size_A on `device` with `dtype`, built once."""
        key = (device, dtype)
        if key not in self._grids:
            self._grids[key] = pixel_coordinates_A(self.box_size_px, self.pixel_size_A, device=device, dtype=dtype)
        return self._grids[key]

    def ctf_rfft(self, ctf: CTFBatch) -> torch.Tensor:
        """The CTF of this batch on the torch.fft.rfft2 grid of these images: (B, N, N//2+1), RELION's sign."""
        return ctf_rfft(self.box_size_px, self.pixel_size_A, ctf)

    def _in_dtype_of(
        self, coords_A: torch.Tensor, poses: PoseBatch, ctf: CTFBatch | None
    ) -> tuple[PoseBatch, torch.Tensor | None]:
        """The poses, and the CTF on the rfft2 grid (None without a CTF), on the structures' device and dtype."""
        dtype, device = coords_A.dtype, coords_A.device
        transfer = None if ctf is None else self.ctf_rfft(ctf.to(device, dtype=dtype))
        return poses.to(device, dtype=dtype), transfer

    def images(
        self,
        coords_A: torch.Tensor,
        amplitudes: torch.Tensor,
        poses: PoseBatch,
        ctf: CTFBatch | None,
        sigma_A: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise-free images (B, N, N) of structures (n, 3) or (B, n, 3) in A with amplitudes (n,) or (B, n).

        poses: rotations x' = R x and RELION origins; ctf None leaves the projections unfiltered; sigma_A replaces
        this geometry's Gaussian width (a model's learned width, a 0-dim tensor). Differentiable in coordinates,
        amplitudes, poses, CTF parameters and a tensor width.
        """
        if self.band_limited:
            return images_from_spectra(self.spectra(coords_A, amplitudes, poses, ctf, sigma_A))
        poses, transfer = self._in_dtype_of(coords_A, poses, ctf)
        grid_A = self.pixel_grid_A(coords_A.device, coords_A.dtype)
        sigma_A = self.sigma_A if sigma_A is None else sigma_A
        return project_on_grid(
            coords_A, amplitudes, poses.rotations, grid_A, sigma_A, poses.shifts_A, transfer, tf32=self.tf32_products
        )

    def spectra(
        self,
        coords_A: torch.Tensor,
        amplitudes: torch.Tensor,
        poses: PoseBatch,
        ctf: CTFBatch | None,
        sigma_A: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The images' half spectra (B, N, N//2 + 1), torch.fft.rfft2 of images() with the same arguments: rendered
        directly when band-limited, else the FFT of the point-sampled images."""
        if not self.band_limited:
            return torch.fft.rfft2(self.images(coords_A, amplitudes, poses, ctf, sigma_A))
        poses, transfer = self._in_dtype_of(coords_A, poses, ctf)
        x_A, y_A = projected_positions_A(coords_A, poses.rotations, poses.shifts_A)
        return band_limited_spectra(
            x_A, y_A, batched_amplitudes(amplitudes, *x_A.shape), box_size_px=self.box_size_px,
            pixel_size_A=self.pixel_size_A, sigma_A=self.sigma_A if sigma_A is None else sigma_A, transfer=transfer,
            tf32=self.tf32_products,
        )  # fmt: skip


def images_from_spectra(spectra: torch.Tensor) -> torch.Tensor:
    """Half spectra on the rfft2 grid of N x N images, (..., N, N//2 + 1) -> the images (..., N, N)."""
    box_size_px = spectra.shape[-2]
    return torch.fft.irfft2(spectra, s=(box_size_px, box_size_px))
