"""Contrast transfer function (CTF) in torch, batched over particles, RELION sign (docs/conventions.md, "CTF").

    lambda_A = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)),  V in volts
    df(theta) = 0.5 (dfU + dfV + (dfU - dfV) cos 2(theta - angle_ast)),  theta = atan2(ky, kx)
    chi = pi lambda df s^2 - (pi/2) Cs lambda^3 s^4 + phase_shift + asin(w),  s = |k| in 1/A, Cs in A
    CTF = sin(chi) exp(-B s^2 / 4) scale

asin(w) equals atan(w / sqrt(1 - w^2)). This CTF is exactly minus cryoDRGN's and cisTEM's.

Speed: the CTF runs once per image per training step. Using cos 2(theta - a) s^2 = (kx^2 - ky^2) cos 2a +
2 kx ky sin 2a, chi is a sum of four fixed per-pixel grid terms (frequencies in cycles per pixel, cached per
box size, dtype and device) weighted by per-particle coefficients that absorb the pixel size. There is no
per-pixel trigonometry except the final sin, and particles with different pixel sizes share one grid.

Grids: rfft = torch.fft.rfft2 of an N x N image (rows = y: fftfreq; columns = x: rfftfreq), (N, N//2+1);
full = fftshifted full grid, (N, N), zero frequency at (N//2, N//2).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from cryoflex.imaging.batches import CTFBatch

Scalar = float | torch.Tensor

_RELATIVISTIC_PER_V = 0.978466e-6
_WAVELENGTH_CONSTANT_A = 12.2643247  # h / sqrt(2 m e), in A sqrt(V)


class _GridTerms(NamedTuple):
    """Per-pixel terms of chi on a grid (frequencies in cycles per unit length)."""

    s2: torch.Tensor  # kx^2 + ky^2
    cos_term: torch.Tensor  # kx^2 - ky^2 = s^2 cos 2 theta
    sin_term: torch.Tensor  # 2 kx ky = s^2 sin 2 theta
    s4: torch.Tensor  # s^4


def electron_wavelength_A(voltage_kV: Scalar) -> Scalar:
    """Relativistic electron wavelength in A for an acceleration voltage in kV (RELION's constants)."""
    volts = voltage_kV * 1000.0
    if isinstance(volts, torch.Tensor):
        return _WAVELENGTH_CONSTANT_A * torch.rsqrt(volts * (1.0 + _RELATIVISTIC_PER_V * volts))
    return _WAVELENGTH_CONSTANT_A / math.sqrt(volts * (1.0 + _RELATIVISTIC_PER_V * volts))


def _rfft_frequencies_px(
    box_size_px: int, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in cycles per pixel on the torch.fft.rfft2 grid, each (N, N//2+1)."""
    kx = torch.fft.rfftfreq(box_size_px, dtype=dtype, device=device)
    ky = torch.fft.fftfreq(box_size_px, dtype=dtype, device=device)
    return torch.broadcast_tensors(kx[None, :], ky[:, None])


def _full_frequencies_px(
    box_size_px: int, dtype: torch.dtype, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in cycles per pixel on the fftshifted full grid, each (N, N)."""
    k = torch.fft.fftshift(torch.fft.fftfreq(box_size_px, dtype=dtype, device=device))
    return torch.broadcast_tensors(k[None, :], k[:, None])


def rfft_frequencies_A(
    box_size_px: int,
    pixel_size_A: Scalar,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in 1/A on the torch.fft.rfft2 grid of an N x N image: (N, N//2+1), or (B, N, N//2+1).

    A (B,) tensor of pixel sizes gives one grid per particle; dtype and device default to its own.
    """
    if isinstance(pixel_size_A, torch.Tensor):
        dtype = dtype or (pixel_size_A.dtype if pixel_size_A.is_floating_point() else None)
        device = device or pixel_size_A.device
    kx, ky = _rfft_frequencies_px(box_size_px, dtype or torch.get_default_dtype(), device)
    pixel_size = torch.as_tensor(pixel_size_A, dtype=kx.dtype, device=kx.device)[..., None, None]
    return kx / pixel_size, ky / pixel_size


def _grid_terms(kx: torch.Tensor, ky: torch.Tensor) -> _GridTerms:
    """The four per-pixel terms of chi for frequencies kx, ky."""
    kx2, ky2 = kx.square(), ky.square()
    s2 = kx2 + ky2
    return _GridTerms(s2=s2, cos_term=kx2 - ky2, sin_term=2.0 * kx * ky, s4=s2.square())


@functools.lru_cache(maxsize=16)
def _cached_grid_terms(box_size_px: int, full: bool, dtype: torch.dtype, device: torch.device) -> _GridTerms:
    """Grid terms in cycles per pixel, computed once per (box size, grid kind, dtype, device).

    Built outside inference mode so that a first call under torch.inference_mode cannot cache tensors that
    autograd later refuses to save.
    """
    make = _full_frequencies_px if full else _rfft_frequencies_px
    with torch.inference_mode(False):
        return _grid_terms(*make(box_size_px, dtype, device))


def _ctf_on_grid(terms: _GridTerms, pixel_size_A: Scalar, ctf: CTFBatch) -> torch.Tensor:
    """CTF on grid terms in cycles per pixel_size_A; parameters of shape P (broadcast with pixel_size_A) -> P + grid."""
    dtype, device = ctf.defocus_u_A.dtype, ctf.defocus_u_A.device
    values: tuple[Scalar, ...] = (pixel_size_A, ctf.defocus_u_A, ctf.defocus_v_A, ctf.defocus_angle_deg, ctf.voltage_kV,
                                  ctf.cs_mm, ctf.amplitude_contrast, ctf.phase_shift_deg, ctf.scale)
    params = torch.broadcast_tensors(*(_on_device(v, dtype, device) for v in values))
    apix, df_u, df_v, angle_deg, kv, cs, w, phase_deg, scale_t = (p[..., None, None] for p in params)
    wavelength = electron_wavelength_A(kv)
    inv_apix2 = 1.0 / apix.square()
    half_pi_lambda = (0.5 * math.pi) * wavelength * inv_apix2  # pi lambda df s^2 = half_pi_lambda (2 df) s^2
    astig = half_pi_lambda * (df_u - df_v)
    two_angle = 2.0 * torch.deg2rad(angle_deg)
    # one multiply-add pass over the grid per term (the per-particle coefficients are tiny tensors)
    offset = torch.deg2rad(phase_deg) + torch.asin(w)
    chi = torch.addcmul(offset, half_pi_lambda * (df_u + df_v), terms.s2)
    chi = chi.addcmul_(astig * torch.cos(two_angle), terms.cos_term)
    chi = chi.addcmul_(astig * torch.sin(two_angle), terms.sin_term)
    chi = chi.addcmul_((-0.5e7 * math.pi) * cs * wavelength**3 * inv_apix2.square(), terms.s4)
    ctf_values = torch.sin(chi)
    bfactor = ctf.bfactor_A2[..., None, None]
    if not _constant(bfactor, 0.0):  # B = 0 (most particles): the envelope is 1
        ctf_values = ctf_values * torch.exp((-0.25 * bfactor * inv_apix2) * terms.s2)
    if not _constant(scale_t, 1.0):
        ctf_values = ctf_values * scale_t
    return ctf_values


def _on_device(value: Scalar, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """value as a tensor on device. A Python number is filled in place there: torch.as_tensor would copy it from the
    host, and on a GPU that copy waits for every queued kernel (the pixel size, on each call)."""
    if isinstance(value, (int, float)):
        return torch.full((), float(value), dtype=dtype, device=device)
    return torch.as_tensor(value, dtype=dtype, device=device)


def _constant(values: torch.Tensor, constant: float) -> bool:
    """Whether a CTF parameter is `constant` for every particle and needs no gradient, so its pass over the grid can
    be skipped. Checked on the CPU only: on a GPU the check would wait for the device, costing more than the pass."""
    return values.device.type == "cpu" and not values.requires_grad and bool((values == constant).all())


def ctf_rfft(box_size_px: int, pixel_size_A: Scalar, ctf: CTFBatch) -> torch.Tensor:
    """CTF on the torch.fft.rfft2 grid: a batch of shape (B,) -> (B, N, N//2+1) (shape P -> P + grid).

    dtype and device follow the batch; pixel_size_A is a float or a tensor broadcasting with it. Differentiable in
    every tensor.
    """
    terms = _cached_grid_terms(box_size_px, False, ctf.defocus_u_A.dtype, ctf.defocus_u_A.device)
    return _ctf_on_grid(terms, pixel_size_A, ctf)


def ctf_full_grid(box_size_px: int, pixel_size_A: Scalar, ctf: CTFBatch) -> torch.Tensor:
    """As ctf_rfft, on the fftshifted full grid (zero frequency at (N//2, N//2)), for plots: -> (B, N, N)."""
    terms = _cached_grid_terms(box_size_px, True, ctf.defocus_u_A.dtype, ctf.defocus_u_A.device)
    return _ctf_on_grid(terms, pixel_size_A, ctf)


def ctf_at_frequencies(kx_per_A: torch.Tensor, ky_per_A: torch.Tensor, ctf: CTFBatch) -> torch.Tensor:
    """CTF at arbitrary frequencies kx, ky in 1/A of 2-D shape G: a batch of shape P -> P + G.

    The astigmatism angle is measured from the kx axis towards ky (theta = atan2(ky, kx)); dtype and device
    follow kx_per_A.
    """
    return _ctf_on_grid(_grid_terms(kx_per_A, ky_per_A), 1.0, ctf.to(kx_per_A.device, dtype=kx_per_A.dtype))
