"""Pseudo-atom Gaussians -> 2-D projection images sampled at the pixel centres (cryoSPHERE's forward model), with
origin shift and CTF. The simulator renders this way; the model renders band-limited images by default
(cryoflex.imaging.band_limited; docs/conventions.md, "Rendering on the pixels").

Conventions (docs/conventions.md: "Image pixel grid", "Rotations and projection", "Origins (particle shifts)"):
- Image N x N, row = y, column = x; pixel (i, j) sits at ((j - N//2) * apix, (i - N//2) * apix).
- Model coordinates x (A, centred on the box centre) go to x' = R x and are projected along z.
- Each residue a is a 3-D Gaussian A_a exp(-|r - x_a|^2 / (2 sigma^2)). Its z line integral is analytic,
  A_a sqrt(2 pi) sigma exp(-((x - x'_a)^2 + (y - y'_a)^2) / (2 sigma^2)), so a **pixel value is the projected
  density (amplitude x A) sampled at the pixel centre** - no cutoff, no pixel-area integration.
- The 2-D Gaussian is separable: image[b] = Ey[b]^T diag(A) Ex[b] with exp tables of shape (n, N) per image: batched
  matmuls over chunks of images, never a (B, n, N, N) tensor, and the tables are rebuilt for the backward pass
  rather than stored, unless they are small (_SeparableProjection, keeps_tables).
- RELION origin: observed(x) = centred_projection(x + origin). For Gaussians this is exact in real space:
  the projected centres move by -origin before the exp tables are built (no interpolation, no periodic
  wrap-around, exact even where sigma is under-sampled, where a Fourier phase ramp would alias).
- CTF: one rfft2 -> multiply by the real, even CTF on the torch.fft.rfft2 grid -> irfft2. A circular
  convolution commutes with circular shifts, so the result is the convolution about the box centre (N//2)
  without any centring ramp; the tests check it against an explicit ifftshift / fftshift implementation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

_SQRT_2PI = math.sqrt(2.0 * math.pi)
# Exponents below this are clamped before exp: exp(-80) = 1.8e-35 is 0 for all purposes, and exp of very negative
# arguments (underflow to denormals / 0) takes a slow path on CPUs: clamping made the projector ~5x faster there.
_MIN_EXPONENT = -40.0
# Elements of one exp table per chunk of the projection on a CPU: 2^19 float32 = 2 MiB, so a chunk's tables and their
# products stay in cache instead of streaming (B, n, N) tables through memory (2^18-2^20 measured best; at 2,750
# residues, 64 px and 256 images, forward + backward ran 2.1x faster than with whole-batch tables: projector_versus.py).
_CPU_CHUNK_ELEMENTS = 2**19
# Elements of one (B, n, N) table up to which a CPU projection keeps its tables from forward for backward, instead of
# rebuilding them chunk by chunk: rebuilding costs an exp or cos per element, reading a kept table a pass over
# memory, which wins while the tables are small: 0.70-0.93x the time at 1.75 million elements (256 structures of 214
# residues at 32 px), 0.80-1.28x at 3.5-5.6 million, 1.04-1.51x from 11 million (benchmarks/kept_tables.py, two
# runs). 2^21 float32 = 8 MiB.
_CPU_KEPT_TABLE_ELEMENTS = 2**21
# On an accelerator a chunk is the whole batch up to this many elements per table: 2^28 float32 = 1 GiB, with up to
# six such tables alive in the backward pass. 256 images of 13,941 residues at 128 px (the default's 8 draws of a batch
# of 32) take two chunks, and a GPU of 16-24 GB is not run out of memory by the tables alone. Not measured on a GPU.
_ACCELERATOR_CHUNK_ELEMENTS = 2**28


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


def _gaussian_table(
    centres_A: torch.Tensor, grid_A: torch.Tensor, inverse_variance: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(-(c - g)^2 / (2 sigma^2)) for centres (B, n) and grid (N,) -> (B, n, N), built in one buffer (out, if
    given), the exponent clamped at _MIN_EXPONENT."""
    table = torch.sub(centres_A.unsqueeze(-1), grid_A, out=out)
    return table.square_().mul_(-0.5 * inverse_variance).clamp_min_(_MIN_EXPONENT).exp_()


def images_per_chunk(batch: int, n: int, box_size_px: int, device: torch.device) -> int:
    """Images per chunk of a separable projection (this module's and cryoflex.imaging.band_limited's): on CPUs few
    enough that a chunk's (chunk, n, N) tables stay in cache (_CPU_CHUNK_ELEMENTS each); on accelerators the whole
    batch, up to _ACCELERATOR_CHUNK_ELEMENTS per table."""
    elements = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(batch, elements // (n * box_size_px)))


@contextlib.contextmanager
def tf32_products(enabled: bool) -> Iterator[None]:
    """Inside, CUDA's float32 matrix products may run on TF32 tensor cores, if enabled: operands rounded to 10 mantissa
    bits, sums kept in float32. On a projection that costs 1.3-1.7e-4 of its images' norm and 2.6e-4 of the gradient's,
    4-5e-5 of the noise at SNR 0.1 (emulated on a CPU, benchmarks/tf32_rendering.py), for tensor cores' speed on the
    largest products of a step."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 sets it as fp32_precision; older versions only have the flag that 2.9 deprecates
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def keeps_tables(batch: int, n: int, box_size_px: int, device: torch.device, needs_grad: bool) -> bool:
    """Whether a separable projection that will be differentiated keeps its (B, n, N) tables for its backward pass
    (on a CPU, up to _CPU_KEPT_TABLE_ELEMENTS each) rather than rebuilding them. Accelerators rebuild them: their exp
    and cos are cheap beside reading a table back from memory."""
    return needs_grad and device.type == "cpu" and batch * n * box_size_px <= _CPU_KEPT_TABLE_ELEMENTS


class _SeparableProjection(torch.autograd.Function):
    """images[b] = table_y[b]^T diag(w[b]) table_x[b] with table_x = exp(-(x - g)^2 / (2 sigma^2)) (and table_y from y):
    the Gaussians' projections summed on the pixel grid, (B, n) centres and weights -> (B, N, N).

    Forward and backward run over chunks of images and the backward rebuilds each chunk's tables instead of keeping
    them, unless they are small (keeps_tables): nothing large of size (B, n, N) is stored, and on a CPU every
    elementwise pass reads tables that are still in cache. With A = table_y G (G = dL/dimages) and C = table_x G^T,
    the gradients are
      dL/dw = sum_p C * table_y,
      dL/dy = -w / sigma^2 * (y sum_p V - V g)  with V = C * table_y,   (likewise x with U = w A * table_x)
    so each chunk costs two exp tables and two batched products in each direction (the sums over p are one product
    of U or V with [1, g] each). With a width sigma that needs a gradient (a learned one),
    dL/d(1/sigma^2) = -1/2 sum_j (U_jp (x_j - g_p)^2 + w_j V_jp (y_j - g_p)^2) summed over p, which those products
    give with one more column, g^2.
    """

    @staticmethod
    def forward(
        ctx,
        x_A: torch.Tensor,
        y_A: torch.Tensor,
        weights: torch.Tensor,
        grid_A: torch.Tensor,
        sigma_A: float | torch.Tensor,
        tf32: bool,
    ) -> torch.Tensor:
        ctx.sigma_needs_grad = isinstance(sigma_A, torch.Tensor) and sigma_A.requires_grad
        ctx.sigma_dtype = sigma_A.dtype if isinstance(sigma_A, torch.Tensor) else None
        # a tensor width stays a tensor (no host sync on a GPU); its gradient is computed by hand in backward
        inverse_variance = (sigma_A.detach() if isinstance(sigma_A, torch.Tensor) else sigma_A) ** -2
        batch, n = x_A.shape
        size = grid_A.shape[0]
        chunk = images_per_chunk(batch, n, size, x_A.device)
        keep = keeps_tables(batch, n, size, x_A.device, any(ctx.needs_input_grad))
        kept = tuple(x_A.new_empty(batch, n, size) for _ in range(2 if keep else 0))
        images = x_A.new_empty(batch, size, size)
        ctx.tf32 = tf32 and x_A.is_cuda
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            out_x, out_y = (kept[0][rows], kept[1][rows]) if keep else (None, None)
            table_x = _gaussian_table(x_A[rows], grid_A, inverse_variance, out=out_x)
            table_y = _gaussian_table(y_A[rows], grid_A, inverse_variance, out=out_y)
            weighted_y = table_y * weights[rows].unsqueeze(-1) if keep else table_y.mul_(weights[rows].unsqueeze(-1))
            with tf32_products(ctx.tf32):
                torch.bmm(weighted_y.transpose(1, 2), table_x, out=images[rows])
        ctx.save_for_backward(x_A, y_A, weights, grid_A, *kept)
        ctx.inverse_variance = inverse_variance
        ctx.chunk = chunk
        return images

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_images: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_A, y_A, weights, grid_A, *kept = ctx.saved_tensors
        inverse_variance = ctx.inverse_variance
        grad = grad_images.contiguous()  # the gradient from the CTF's FFTs is strided: products of it copy per image
        grad_x, grad_y, grad_weights = torch.empty_like(x_A), torch.empty_like(y_A), torch.empty_like(weights)
        grad_inverse_variance = x_A.new_zeros(())
        # sum_p, sum_p g_p (and sum_p g_p^2 for the width) of U and V over the pixels, in one product each
        powers = torch.stack([torch.ones_like(grid_A), grid_A, grid_A.square()][: 3 if ctx.sigma_needs_grad else 2], 1)
        for start in range(0, len(x_A), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x, y, w, g = x_A[rows], y_A[rows], weights[rows], grad[rows]
            if kept:
                table_x, table_y = kept[0][rows], kept[1][rows]
            else:
                table_x = _gaussian_table(x, grid_A, inverse_variance)
                table_y = _gaussian_table(y, grid_A, inverse_variance)
            # TF32 for the two batched products only: in the moments' products it would round the pixel coordinates
            # g_p by up to 0.05 A, in sums y sum_p V - sum_p V g_p that cancel down to the Gaussian's width. One
            # product at a time, so that no more than three (chunk, n, N) tensors are alive.
            with tf32_products(ctx.tf32):
                product = torch.bmm(table_x, g.transpose(1, 2))
            moments_y = (product.mul_(table_y) @ powers).unbind(-1)  # of V = C * table_y
            del product
            with tf32_products(ctx.tf32):
                product = torch.bmm(table_y, g)
            moments_x = (product.mul_(table_x) @ powers).unbind(-1)  # of U / w
            grad_weights[rows] = moments_y[0]
            grad_y[rows] = (y * moments_y[0] - moments_y[1]) * w
            grad_x[rows] = (x * moments_x[0] - moments_x[1]) * w
            if ctx.sigma_needs_grad:  # sum_p U (x - g_p)^2 + V (y - g_p)^2, expanded in the moments
                spread = sum(c * (c * m[0] - 2.0 * m[1]) + m[2] for c, m in ((x, moments_x), (y, moments_y)))
                grad_inverse_variance -= 0.5 * (w * spread).sum()
        grad_sigma = None
        if ctx.sigma_needs_grad:
            grad_sigma = (grad_inverse_variance * (-2.0 * inverse_variance**1.5)).to(ctx.sigma_dtype)
        return grad_x * -inverse_variance, grad_y * -inverse_variance, grad_weights, None, grad_sigma, None


def projected_positions_A(
    coords_A: torch.Tensor, rotations: torch.Tensor, shifts_A: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each Gaussian's projected image position (x, y), each (B, n) in A from the box centre: x' = R x, then moved
    by -origin (RELION's observed(x) = centred(x + origin))."""
    if rotations.ndim != 3 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must have shape (B, 3, 3), got {tuple(rotations.shape)}")
    if coords_A.shape[-1] != 3 or coords_A.ndim not in (2, 3):
        raise ValueError(f"coords_A must have shape (n, 3) or (B, n, 3), got {tuple(coords_A.shape)}")
    rotated = rotate_coordinates(coords_A, rotations)
    x_A, y_A = rotated[..., 0], rotated[..., 1]
    if shifts_A is not None:
        x_A = x_A - shifts_A[:, 0:1]
        y_A = y_A - shifts_A[:, 1:2]
    return x_A, y_A


def batched_amplitudes(amplitudes: torch.Tensor, batch: int, n: int) -> torch.Tensor:
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
    sigma_A: float | torch.Tensor,
    shifts_A: torch.Tensor | None,
    ctf: torch.Tensor | None,
    tf32: bool = False,
) -> torch.Tensor:
    """project_gaussians on a given (N,) pixel-centre grid in A (ImageFormation keeps that grid built once); tf32: the
    projection's batched products on TF32 tensor cores, on CUDA (tf32_products)."""
    x_A, y_A = projected_positions_A(coords_A, rotations, shifts_A)
    weights = batched_amplitudes(amplitudes, *x_A.shape) * (_SQRT_2PI * sigma_A)
    images = _SeparableProjection.apply(
        x_A.contiguous(), y_A.contiguous(), weights.contiguous(), grid_A, sigma_A, tf32
    )
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
    sigma_A: float | torch.Tensor = 2.0,
    shifts_A: torch.Tensor | None = None,
    ctf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Project Gaussian pseudo-atoms along z after rotation: -> images (B, N, N) (see module docstring).

    coords_A (n, 3) or (B, n, 3); amplitudes (n,) or (B, n); rotations (B, 3, 3); sigma_A a float or a 0-dim tensor
    (a learned width); shifts_A (B, 2) = RELION (originX, originY) in A; ctf (B, N, N//2+1) on the torch.fft.rfft2
    grid. Differentiable in all tensors.
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
