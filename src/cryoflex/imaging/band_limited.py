"""Band-limited projection of Gaussian pseudo-atoms, rendered directly on the torch.fft.rfft2 grid.

A particle image Fourier-cropped to N pixels (how every downsampled stack is made: cryoflex's own, RELION's,
cryoSPARC's) holds the projected density's Fourier components up to the box's Nyquist frequency, and nothing above
it. Point samples of the density at the coarse pixel centres (cryoflex.imaging.projector) differ from that image
wherever the Gaussians are narrow against the pixels: at sigma 2 A on 4 A pixels the frequencies above Nyquist fold
back into the image (aliasing). Here each image's spectrum is computed exactly instead, frequency by frequency:

    F(kx, ky) = (2 pi)^(3/2) sigma^3 / p^2 exp(-2 pi^2 sigma^2 |k|^2) sum_a A_a exp(-2 pi i (kx x_a + ky y_a))

with p the pixel size and positions measured from pixel 0, as the DFT does (the box centre, pixel N//2, is at
(N//2) p). Multiplied by the CTF and brought back with one irfft2, it is the band-limited, periodic image that a
Fourier crop of a finely sampled projection gives (test_band_limited.py). Even boxes keep the Nyquist row and
column's Hermitian part, as cryoflex.data.downsample does (docs/conventions.md, "Rendering on the pixels").

The phase sum is separable. A table of cos(omega_k x) for k = 0..N//2 and sin(omega_k x) for the k whose sine is not
identically 0 (N columns, as many as a point-sampled table has pixels) gives, per image, one batched product
[Cy Sy]^T diag(A) [Cx Sx], whose four blocks make every row of the half spectrum, the negative ky rows included
(cosine even, sine odd). That product costs what the point-sampled image product costs, and the CTF needs no
forward FFT.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from cryoflex.imaging.ctf import rfft_frequencies_A
from cryoflex.imaging.projector import images_per_chunk, keeps_tables, tf32_products


class PhaseTerms(NamedTuple):
    """The columns of one axis's phase table cos(omega x + phase): the cosines of the frequencies 0..N//2, then the
    sines of those whose sine is not 0 for every x (all but 0 and an even box's Nyquist frequency, whose Hermitian
    part a Fourier crop keeps): N columns in all, as many as the pixels of a point-sampled table."""

    omega: torch.Tensor  # (N,) rad/A
    phase: torch.Tensor  # (N,) 0 for a cosine, -pi/2 for a sine
    cosines: int  # N//2 + 1


@functools.lru_cache(maxsize=16)
def phase_terms(box_size_px: int, pixel_size_A: float, dtype: torch.dtype, device: torch.device) -> PhaseTerms:
    """The phase table's columns for an N-pixel box with pixels of pixel_size_A (angular frequencies 2 pi k / (N p)),
    built once per box, pixel size, dtype and device (outside inference mode, so autograd may save them later)."""
    cosines = box_size_px // 2 + 1
    with torch.inference_mode(False):
        k = torch.cat([torch.arange(cosines), torch.arange(1, box_size_px - cosines + 1)]).to(device, dtype)
        phase = torch.zeros_like(k)
        phase[cosines:] = -0.5 * math.pi
        return PhaseTerms(k * (2.0 * math.pi / (box_size_px * pixel_size_A)), phase, cosines)


@functools.lru_cache(maxsize=16)
def _squared_frequency_A2(
    box_size_px: int, pixel_size_A: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """|k|^2 in 1/A^2 on the rfft2 grid, (N, N//2 + 1), built once per box, pixel size, dtype and device."""
    with torch.inference_mode(False):
        kx, ky = rfft_frequencies_A(box_size_px, pixel_size_A, dtype=dtype, device=device)
        return kx.square() + ky.square()


def _table(positions_A: torch.Tensor, terms: PhaseTerms, out: torch.Tensor | None = None) -> torch.Tensor:
    """cos(omega x + phase) for positions (B, n) -> (B, n, N), in out if given."""
    return torch.addcmul(terms.phase, positions_A.unsqueeze(-1), terms.omega, out=out).cos_()


def _paired_sine_sums(q: torch.Tensor, table: torch.Tensor, terms: PhaseTerms, out: torch.Tensor) -> torch.Tensor:
    """sum_j q_j omega_j sin(omega_j x + phase_j) over the table's columns but an even box's Nyquist cosine, (B, n) into
    out: minus the position gradient sum_j q_j dT_j/dx of T = cos(omega x + phase) without that column's term
    (_PhaseSums.backward adds it for the whole batch at once).

    The table holds the sines it needs: the sine of cosine column k is sine column k, and that of sine column k is
    minus cosine column k; the Nyquist cosine's sine is the one outside the table."""
    cosines, sines = terms.cosines, table.shape[-1] - terms.cosines
    # one product and one fused multiply-subtract: 0.7-0.8x the time of two products and a difference
    paired = torch.mul(q[..., 1 : sines + 1], table[..., cosines:])
    paired.addcmul_(q[..., cosines:], table[..., 1 : sines + 1], value=-1.0)
    return torch.matmul(paired, terms.omega[1 : sines + 1], out=out)


class _PhaseSums(torch.autograd.Function):
    """sums[b] = T_y[b]^T diag(w[b]) T_x[b] with T = cos(omega x + phase) (PhaseTerms): (B, n) positions and weights
    -> (B, N, N), the cosine and sine blocks of sum_a w_a exp(-i (kx x_a + ky y_a)) (spectrum_from_sums).

    As in projector._SeparableProjection, forward and backward run over chunks of images and the backward rebuilds
    each chunk's tables, unless they are small enough to keep (keeps_tables). With G = dL/dsums, Q_y = T_x G^T and
    Q_x = T_y G (each (B, n, N)):
      dL/dw = sum_j Q_y * T_y,   dL/dx = w sum_j Q_x dT_x/dx,   dL/dy = w sum_j Q_y dT_y/dy   (_paired_sine_sums).
    """

    @staticmethod
    def forward(
        ctx, x_A: torch.Tensor, y_A: torch.Tensor, weights: torch.Tensor, terms: PhaseTerms, tf32: bool
    ) -> torch.Tensor:
        batch, n = x_A.shape
        size = terms.omega.shape[0]
        chunk = images_per_chunk(batch, n, size, x_A.device)
        keep = keeps_tables(batch, n, size, x_A.device, any(ctx.needs_input_grad))
        kept = tuple(x_A.new_empty(batch, n, size) for _ in range(2 if keep else 0))
        sums = x_A.new_empty(batch, size, size)
        ctx.tf32 = tf32 and x_A.is_cuda
        for start in range(0, batch, chunk):
            rows = slice(start, start + chunk)
            out_x, out_y = (kept[0][rows], kept[1][rows]) if keep else (None, None)
            table_x = _table(x_A[rows], terms, out=out_x)
            table_y = _table(y_A[rows], terms, out=out_y)
            weighted_y = table_y * weights[rows].unsqueeze(-1) if keep else table_y.mul_(weights[rows].unsqueeze(-1))
            with tf32_products(ctx.tf32):
                torch.bmm(weighted_y.transpose(1, 2), table_x, out=sums[rows])
        ctx.save_for_backward(x_A, y_A, weights, *kept)
        ctx.terms, ctx.chunk = terms, chunk
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_A, y_A, weights, *kept = ctx.saved_tensors
        terms = ctx.terms
        grad = grad_sums.contiguous()
        grad_x, grad_y, grad_weights = torch.empty_like(x_A), torch.empty_like(y_A), torch.empty_like(weights)
        # an even box's Nyquist cosine, whose sine is not in the table: its q per chunk, its term for the whole batch
        nyquist = terms.cosines - 1 if terms.cosines - 1 > terms.omega.shape[0] - terms.cosines else None
        nyquist_q = [torch.empty_like(x_A), torch.empty_like(y_A)] if nyquist is not None else [None, None]
        for start in range(0, len(x_A), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            x, y, g = x_A[rows], y_A[rows], grad[rows]
            table_x, table_y = (kept[0][rows], kept[1][rows]) if kept else (_table(x, terms), _table(y, terms))
            with tf32_products(ctx.tf32):
                q_y = torch.bmm(table_x, g.transpose(1, 2))  # dL/d(w T_y)
                q_x = torch.bmm(table_y, g)  # dL/dT_x / w
            torch.sum(q_y * table_y, dim=-1, out=grad_weights[rows])
            _paired_sine_sums(q_x, table_x, terms, out=grad_x[rows])
            _paired_sine_sums(q_y, table_y, terms, out=grad_y[rows])
            for saved, q in zip(nyquist_q, (q_x, q_y), strict=True):
                if saved is not None:
                    saved[rows] = q[..., nyquist]
        # dL/dx = w sum_j Q_x dT_x/dx = -w (the paired sine sums + the Nyquist cosine's q omega sin(omega x))
        for gradient, positions, column in zip((grad_x, grad_y), (x_A, y_A), nyquist_q, strict=True):
            if column is not None:
                omega = terms.omega[nyquist]
                gradient.addcmul_(column, torch.sin(positions * omega).mul_(omega))
            gradient.mul_(weights).neg_()
        return grad_x, grad_y, grad_weights, None, None


def spectrum_from_sums(sums: torch.Tensor, box_size_px: int, cosines: int) -> torch.Tensor:
    """_PhaseSums' (B, N, N) blocks -> sum_a w_a exp(-i (kx x_a + ky y_a)) on the rfft2 grid, (B, N, N//2 + 1).

    With the absent sines (frequency 0, an even box's Nyquist) as zeros, rows ky >= 0 are
    Cy Cx - Sy Sx - i (Cy Sx + Sy Cx), and rows ky < 0 the same with Sy negated.
    """
    sines = box_size_px - cosines
    pad = (1, cosines - 1 - sines)  # sine columns k = 1..sines within 0..N//2

    def padded(block: torch.Tensor, rows: bool, columns: bool) -> torch.Tensor:
        block = torch.nn.functional.pad(block, pad) if columns else block
        return torch.nn.functional.pad(block, (0, 0, *pad)) if rows else block

    cc = sums[..., :cosines, :cosines]
    cs = padded(sums[..., :cosines, cosines:], rows=False, columns=True)
    sc = padded(sums[..., cosines:, :cosines], rows=True, columns=False)
    ss = padded(sums[..., cosines:, cosines:], rows=True, columns=True)
    positive = torch.complex(cc - ss, -(cs + sc))
    negative = torch.complex(cc + ss, sc - cs)
    # fftfreq order: 0 .. ceil(N/2) - 1, then -(N//2) .. -1
    return torch.cat([positive[..., : box_size_px - box_size_px // 2, :], negative[..., 1:, :].flip(-2)], dim=-2)


def band_limited_spectra(
    x_A: torch.Tensor,
    y_A: torch.Tensor,
    amplitudes: torch.Tensor,
    *,
    box_size_px: int,
    pixel_size_A: float,
    sigma_A: float | torch.Tensor,
    transfer: torch.Tensor | None,
    tf32: bool = False,
) -> torch.Tensor:
    """Half spectra (B, N, N//2 + 1) on the rfft2 grid of the images of Gaussians at projected positions x_A, y_A
    (B, n) in A from the box centre, amplitudes (B, n), band-limited to the box's Nyquist frequency: torch.fft.irfft2
    of them, with s=(N, N), gives the images. transfer: the CTF on the rfft2 grid (B or 1, N, N//2 + 1) or None; tf32:
    the phase sums' batched products on TF32 tensor cores, on CUDA (projector.tf32_products). Differentiable in
    positions, amplitudes, a tensor width and the transfer."""
    terms = phase_terms(box_size_px, pixel_size_A, x_A.dtype, x_A.device)
    # phases from pixel 0, where the DFT puts its origin: the box centre is pixel N//2
    origin_A = (box_size_px // 2) * pixel_size_A
    x_A, y_A = (x_A + origin_A).contiguous(), (y_A + origin_A).contiguous()
    sums = _PhaseSums.apply(x_A, y_A, amplitudes.contiguous(), terms, tf32)
    spectrum = spectrum_from_sums(sums, box_size_px, terms.cosines)
    envelope = (2.0 * math.pi) ** 1.5 * sigma_A**3 / pixel_size_A**2 * torch.exp(
        (-2.0 * math.pi**2) * sigma_A**2 * _squared_frequency_A2(box_size_px, pixel_size_A, x_A.dtype, x_A.device)
    )
    if transfer is not None:
        envelope = envelope * transfer
    return spectrum * envelope
