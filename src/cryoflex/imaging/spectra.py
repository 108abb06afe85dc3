"""Images as half spectra on torch.fft.rfft2's grid, and the sums over pixels that the losses take from them.

The likelihoods compare a rendered image with an observed one through sums over pixels of centred images (each minus
its mean): their powers and inner product. By Parseval's theorem each sum equals a weighted sum over the half
spectrum, so the rendered image never needs its inverse FFT (training renders the CTF-weighted spectrum, and the
observed images are transformed once per batch, not once per latent draw):
  sum_pixels (a - mean a)(b - mean b) = sum_k w_k Re(A_k conj(B_k)),
with w = 0 at frequency (0, 0) (the mean), 1 / N^2 on the columns stored once (0, and N/2 for even N) and 2 / N^2 on
the others, whose conjugate twins are not stored.
"""

from __future__ import annotations

import torch


def centred_sum_weights(box_size_px: int, *, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """(N, N//2 + 1) weights w with sum_k w_k Re(A_k conj(B_k)) = sum over pixels of the centred images' product."""
    columns = box_size_px // 2 + 1
    weights = torch.full((box_size_px, columns), 2.0, dtype=dtype, device=device)
    weights[:, 0] = 1.0
    if box_size_px % 2 == 0:
        weights[:, -1] = 1.0
    weights[0, 0] = 0.0
    return weights / box_size_px**2


def centred_inner(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., N, N//2 + 1) half spectra (broadcastable) -> (...) sum over pixels of their centred images' product."""
    return ((a.real * b.real + a.imag * b.imag) * weights).sum((-2, -1))


def centred_power(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., N, N//2 + 1) half spectra -> (...) sum over pixels of the centred image squared."""
    return ((a.real.square() + a.imag.square()) * weights).sum((-2, -1))


def real_image_transfer(transfer: torch.Tensor) -> torch.Tensor:
    """A real, centrosymmetric transfer function on the half-spectrum grid (..., N, N//2+1) -> the one whose product
    with a real image's half spectrum is again a real image's: for even N the Nyquist column, which stands for both
    +N/2 and -N/2, takes the mean of the values at (k_y, N/2) and (-k_y, N/2). An astigmatic CTF differs between them;
    irfft2 keeps only this mean anyway, so the spectra compared are exactly those of the real images."""
    size = transfer.shape[-2]
    if size % 2:
        return transfer
    nyquist = transfer[..., -1]
    mirrored = torch.roll(torch.flip(nyquist, dims=[-1]), shifts=1, dims=-1)  # row (N - j) mod N: frequency -k_y
    return torch.cat([transfer[..., :-1], (0.5 * (nyquist + mirrored))[..., None]], dim=-1)


def half_spectra(images: torch.Tensor) -> torch.Tensor:
    """(..., N, N) real images -> (..., N, N//2 + 1) half spectra (torch.fft.rfft2, unnormalised)."""
    return torch.fft.rfft2(images)


def images_from_spectra(spectra: torch.Tensor, box_size_px: int) -> torch.Tensor:
    """(..., N, N//2 + 1) half spectra -> (..., N, N) real images, the inverse of half_spectra."""
    return torch.fft.irfft2(spectra, s=(box_size_px, box_size_px))
