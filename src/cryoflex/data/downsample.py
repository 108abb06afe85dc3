"""Fourier-crop downsampling of particle images, centred on pixel N//2 so the physical frame is kept.

Cropping an N x N image to its central D x D Fourier components resamples the same band-limited function on a
coarser grid: pixel size becomes pixel_size_A * N / D, and pixel D//2 of the output sits at the same physical
point as pixel N//2 of the input (docs/conventions.md, "Image pixel grid"). Values are scaled
by (D / N)^2 so that a smooth image keeps its pixel values. The two input frequencies +-D/2, which both alias to
the output Nyquist row/column, are averaged (the Hermitian-symmetric part), so the output is real.
"""

from __future__ import annotations

import torch


def downsampled_pixel_size_A(pixel_size_A: float, box_in_px: int, box_out_px: int) -> float:
    """Pixel size in A after Fourier-cropping a box of box_in_px pixels to box_out_px pixels."""
    return float(pixel_size_A) * box_in_px / box_out_px


def check_box_out(box_in_px: int, box_out_px: int) -> None:
    """Raise ValueError unless box_out_px is even and 2 <= box_out_px <= box_in_px (or equal to it)."""
    if box_out_px == box_in_px:
        return
    if box_out_px % 2 or not 2 <= box_out_px < box_in_px:
        raise ValueError(
            f"the downsampled box must be even and between 2 and the original box ({box_in_px} px), "
            f"got {box_out_px} px"
        )


def _crop_axis(images: torch.Tensor, box_out_px: int, dim: int) -> torch.Tensor:
    """Fourier-crop one axis: centre pixel N//2 -> index 0, keep |k| <= D/2 (Nyquist averaged), back to D//2."""
    box_in_px = images.shape[dim]
    centred = torch.roll(images, shifts=-(box_in_px // 2), dims=dim)
    spectrum = torch.fft.rfft(centred, dim=dim).narrow(dim, 0, box_out_px // 2 + 1)
    # The output's Nyquist bin receives both +D/2 and -D/2 = conj(+D/2): their mean is the real part.
    nyquist = spectrum.narrow(dim, box_out_px // 2, 1)
    spectrum = torch.cat([spectrum.narrow(dim, 0, box_out_px // 2), nyquist.real.to(spectrum.dtype)], dim=dim)
    cropped = torch.fft.irfft(spectrum, n=box_out_px, dim=dim) * (box_out_px / box_in_px)
    return torch.roll(cropped, shifts=box_out_px // 2, dims=dim)


def fourier_crop(images: torch.Tensor, box_out_px: int) -> torch.Tensor:
    """Downsample real images (..., N, N) to (..., D, D) by keeping the central D x D Fourier components.

    D must be even with 2 <= D <= N (N may be odd); D == N returns the input unchanged. Output pixel size is
    downsampled_pixel_size_A(pixel_size_A, N, D); the dtype is kept.
    """
    if images.ndim < 2 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must have shape (..., N, N), got {tuple(images.shape)}")
    if images.is_complex() or not images.is_floating_point():
        raise TypeError(f"images must be real floating point, got {images.dtype}")
    box_in_px = images.shape[-1]
    check_box_out(box_in_px, box_out_px)
    if box_out_px == box_in_px:
        return images
    return _crop_axis(_crop_axis(images, box_out_px, -1), box_out_px, -2)
