"""Pseudo-atom Gaussians -> 2-D projection images (cryoSPHERE's forward model), with origin shift and CTF.

Conventions (docs/conventions.md: "Image pixel grid", "Rotations and projection", "Origins (particle shifts)"):
- Image N x N, row = y, column = x; pixel (i, j) sits at ((j - N//2) * apix, (i - N//2) * apix).
- Model coordinates x (A, centred on the box centre) go to x' = R x and are projected along z.
- Each residue a is a 3-D Gaussian A_a exp(-|r - x_a|^2 / (2 sigma^2)). Its z line integral is analytic,
  A_a sqrt(2 pi) sigma exp(-((x - x'_a)^2 + (y - y'_a)^2) / (2 sigma^2)), so a **pixel value is the projected
  density (amplitude x A) sampled at the pixel centre** - no cutoff, no pixel-area integration.
- The 2-D Gaussian is separable: image[b] = Ey[b]^T diag(A) Ex[b] with exp tables of shape (B, n, N): one
  batched matmul, never a (B, n, N, N) tensor.
- RELION origin: observed(x) = centred_projection(x + origin). For Gaussians this is exact in real space:
  the projected centres move by -origin before the exp tables are built (no interpolation, no periodic
  wrap-around, exact even where sigma is under-sampled, where a Fourier phase ramp would alias).
- CTF: one rfft2 -> multiply by the real, even CTF on the torch.fft.rfft2 grid -> irfft2. A circular
  convolution commutes with circular shifts, so the result is the convolution about the box centre (N//2)
  without any centring ramp; the tests check it against an explicit ifftshift / fftshift implementation.
"""

from __future__ import annotations

import math

import torch

_SQRT_2PI = math.sqrt(2.0 * math.pi)
# Exponents below this are clamped before exp: exp(-80) = 1.8e-35 is 0 for all purposes, and exp of very negative
# arguments (underflow to denormals / 0) takes a slow path on CPUs: clamping made the projector ~5x faster there.
_MIN_EXPONENT = -40.0


def pixel_coordinates_A(
    box_size_px: int,
    pixel_size_A: float,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pixel-centre coordinates (N,) in A along one image axis: (index - N//2) * pixel_size_A."""
    return (torch.arange(box_size_px, device=device, dtype=dtype) - box_size_px // 2) * pixel_size_A


def rotate_coordinates(coords_A: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x' = R x for each image: coords (n, 3) or (B, n, 3), rotations (B, 3, 3) -> (B, n, 3)."""
    if coords_A.ndim == 2:
        return torch.einsum("bij,aj->bai", rotations, coords_A)
    return torch.einsum("bij,baj->bai", rotations, coords_A)


class _GaussianTable(torch.autograd.Function):
    """exp(-(c - g)^2 / (2 sigma^2)) built in place (one (B, n, N) buffer instead of four) with a matching backward.

    The backward needs only the table and the centres: d table / d c = -table * (c - g) / sigma^2.
    Tables are float32 or float64; the backward's c * sum(W) - W g form loses no accuracy at the box sizes used
    (|c|, |g| < a few hundred A).
    """

    @staticmethod
    def forward(ctx, centres_A: torch.Tensor, grid_A: torch.Tensor, sigma_A: float) -> torch.Tensor:
        inverse_variance = 1.0 / sigma_A**2
        table = centres_A.unsqueeze(-1) - grid_A
        table.square_().mul_(-0.5 * inverse_variance).clamp_min_(_MIN_EXPONENT).exp_()
        ctx.save_for_backward(centres_A, grid_A, table)
        ctx.inverse_variance = inverse_variance
        return table

    @staticmethod
    def backward(ctx, grad_table: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        centres_A, grid_A, table = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # sum_p W_p (c - g_p) = c sum_p W_p - sum_p W_p g_p with W = grad * table: one (B, n, N) pass, no offsets
        weighted = grad_table * table
        grad_centres = centres_A * weighted.sum(-1) - weighted @ grid_A
        return grad_centres * (-ctx.inverse_variance), None, None


class _SeparableImages(torch.autograd.Function):
    """images = table_y^T table_x per image, (B, n, N) x (B, n, N) -> (B, N, N), with a backward whose products read
    contiguous operands: the gradient arriving from the CTF's FFTs is strided, and a batched matmul of strided
    operands copies each image's matrix separately (measured 3-5x slower than these two products)."""

    @staticmethod
    def forward(ctx, table_y: torch.Tensor, table_x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table_y, table_x)
        return torch.bmm(table_y.transpose(1, 2), table_x)

    @staticmethod
    def backward(ctx, grad_images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        table_y, table_x = ctx.saved_tensors
        grad = grad_images.contiguous()
        grad_y = torch.bmm(table_x, grad.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_x = torch.bmm(table_y, grad) if ctx.needs_input_grad[1] else None
        return grad_y, grad_x


def _gaussian_table(centres_A: torch.Tensor, grid_A: torch.Tensor, sigma_A: float) -> torch.Tensor:
    """exp(-(c - g)^2 / (2 sigma^2)) for centres (B, n) and grid (N,) -> (B, n, N), exponent clamped at -40."""
    return _GaussianTable.apply(centres_A, grid_A, sigma_A)


def _batched_amplitudes(amplitudes: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """Amplitudes (n,) or (B, n) -> (B, n)."""
    if amplitudes.shape not in ((n,), (batch, n)):
        raise ValueError(
            f"amplitudes must have shape ({n},) or ({batch}, {n}), got {tuple(amplitudes.shape)}"
        )
    return amplitudes.expand(batch, n)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Convolve images (B, N, N) with the PSF whose transfer function is ctf (B or 1, N, N//2+1)."""
    size = images.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(images) * ctf, s=size)


def project_on_grid(
    coords_A: torch.Tensor,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    grid_A: torch.Tensor,
    sigma_A: float,
    shifts_A: torch.Tensor | None,
    ctf: torch.Tensor | None,
) -> torch.Tensor:
    """project_gaussians on a given (N,) pixel-centre grid in A (ImageFormation keeps that grid built once)."""
    if rotations.ndim != 3 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (B, 3, 3), got {tuple(rotations.shape)}")
    if coords_A.shape[-1] != 3 or coords_A.ndim not in (2, 3):
        raise ValueError(f"coords_A must have shape (n, 3) or (B, n, 3), got {tuple(coords_A.shape)}")
    batch, n = rotations.shape[0], coords_A.shape[-2]
    rotated = rotate_coordinates(coords_A, rotations)
    x_A, y_A = rotated[..., 0], rotated[..., 1]
    if shifts_A is not None:
        x_A = x_A - shifts_A[:, 0:1]
        y_A = y_A - shifts_A[:, 1:2]
    weights = _batched_amplitudes(amplitudes, batch, n) * (_SQRT_2PI * sigma_A)
    table_x = _gaussian_table(x_A, grid_A, sigma_A)
    table_y = _gaussian_table(y_A, grid_A, sigma_A) * weights.unsqueeze(-1)
    images = _SeparableImages.apply(table_y, table_x)
    if ctf is not None:
        images = apply_ctf(images, ctf)
    return images


def project_gaussians(
    coords_A: torch.Tensor,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    *,
    box_size_px: int,
    pixel_size_A: float,
    sigma_A: float = 2.0,
    shifts_A: torch.Tensor | None = None,
    ctf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project Gaussian pseudo-atoms along z after rotation: -> images (B, N, N) (see module docstring).

    coords_A (n, 3) or (B, n, 3); amplitudes (n,) or (B, n); rotations (B, 3, 3); shifts_A (B, 2) = RELION
    (originX, originY) in A; ctf (B, N, N//2+1) on the torch.fft.rfft2 grid. Differentiable in all tensors.
    """
    grid_A = pixel_coordinates_A(box_size_px, pixel_size_A, device=coords_A.device, dtype=coords_A.dtype)
    return project_on_grid(coords_A, amplitudes, rotations, grid_A, sigma_A, shifts_A, ctf)


def fourier_shift_images(images: torch.Tensor, shifts_A: torch.Tensor, pixel_size_A: float) -> torch.Tensor:
    """Translate images (B, N, N) by +shifts_A (B, 2) = (x, y) in A, out(r) = in(r - s), by a Fourier ramp.

    With RELION's observed(x) = centred(x + origin), shifting an observed particle by +origin centres it.
    The shift is periodic (content leaving one edge re-enters the other); for even N, irfft2 keeps only the
    Hermitian part of the ramped Nyquist terms.
    """
    rows, cols = images.shape[-2:]
    real_dtype = images.dtype
    ky = torch.fft.fftfreq(rows, d=pixel_size_A, device=images.device, dtype=real_dtype)
    kx = torch.fft.rfftfreq(cols, d=pixel_size_A, device=images.device, dtype=real_dtype)
    phase = kx * shifts_A[:, 0, None, None] + ky[:, None] * shifts_A[:, 1, None, None]
    ramp = torch.polar(torch.ones_like(phase), phase * (-2.0 * math.pi))
    return torch.fft.irfft2(torch.fft.rfft2(images) * ramp, s=(rows, cols))
