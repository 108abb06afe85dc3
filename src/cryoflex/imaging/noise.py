"""Stationary Gaussian noise in particle images: white, or with one variance per Fourier shell.

Real particle images do not carry white noise: the ice, the detector's response and the particle's neighbours put
several times more noise power at low spatial frequencies than at high ones (docs/conventions.md, "Noise"). Noise
that is stationary is diagonal in Fourier space, so its log density is a sum over the rfft2 grid: with R the residual
image's spectrum (torch.fft.rfft2, unnormalised), v_k the variance at frequency k in per-pixel units (white noise of
per-pixel variance sigma^2 has v_k = sigma^2 everywhere) and m_k the column's multiplicity in the full spectrum,

    -log p = sum_k m_k |R_k|^2 / (2 N^2 v_k) + sum_k m_k log(v_k) / 2   (+ a constant),

which for white noise is ||r||^2 / (2 sigma^2) + P log(sigma^2) / 2 (Parseval). The frequency 0 is left out (m_0 = 0):
the likelihood fits each image's offset. v_k is one learned value per shell round(|k| N), as RELION's noise spectra
are (its sigma2 per resolution shell), from shell 1 to the corner of the box. A spectrum is (S,) log variances, shared
by the images, or (B, S), one per image (each image its optics group's: cryoflex.model.cryosphere).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.autograd.function import once_differentiable


def n_shells(box_size_px: int) -> int:
    """Shells round(|k| N) of an N x N rfft2 grid, the frequency 0 (shell 0) to the corner's."""
    return round(math.sqrt(2.0) * (box_size_px // 2)) + 1


@functools.lru_cache(maxsize=16)
def shell_index(box_size_px: int, device: torch.device) -> torch.Tensor:
    """(N, N//2 + 1) shell of each rfft2 frequency: round(|k| N), |k| in cycles per pixel."""
    with torch.inference_mode(False):
        ky = torch.fft.fftfreq(box_size_px, device=device, dtype=torch.float64) * box_size_px
        kx = torch.fft.rfftfreq(box_size_px, device=device, dtype=torch.float64) * box_size_px
        return torch.hypot(ky[:, None], kx[None, :]).round().long()


@functools.lru_cache(maxsize=16)
def multiplicity(box_size_px: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(N, N//2 + 1) m_k: how often each rfft2 frequency stands in the full spectrum (1 for column 0 and an even
    box's Nyquist column, 2 for the others), with the frequency 0 set to 0 (the offset each image is fitted)."""
    with torch.inference_mode(False):
        weights = torch.full((box_size_px, box_size_px // 2 + 1), 2.0, dtype=dtype, device=device)
        weights[:, 0] = 1.0
        if box_size_px % 2 == 0:
            weights[:, -1] = 1.0
        weights[0, 0] = 0.0
        return weights


def frequency_log_variances(log_noise_variance: torch.Tensor, box_size_px: int) -> torch.Tensor:
    """(..., S) log variance per shell -> (..., N, N//2 + 1) log variance at every rfft2 frequency, per-pixel units."""
    return log_noise_variance[..., shell_index(box_size_px, log_noise_variance.device)]


def per_pixel_variance(log_noise_variance: torch.Tensor, box_size_px: int) -> torch.Tensor:
    """The noise's variance per pixel, (scalar): the mean of v_k over the full spectrum without frequency 0, what one
    white variance with the same power would be, averaged over the spectra of a (G, S) or (B, S) stack. A white
    model's own variance is returned as it is."""
    if log_noise_variance.dim() == 0:
        return log_noise_variance.exp()
    weights = multiplicity(box_size_px, log_noise_variance.dtype, log_noise_variance.device)
    variances = frequency_log_variances(log_noise_variance, box_size_px).exp()
    return (weights * variances).sum(dim=(-2, -1)).mean() / weights.sum()


def stationary_nll(
    observed_spectra: torch.Tensor,
    predicted_spectra: torch.Tensor,
    log_scale: torch.Tensor,
    log_noise_variance: torch.Tensor,
) -> torch.Tensor:
    """-log p(observed) in nats up to a constant, for observed = exp(log_scale) * predicted + an offset + stationary
    noise (module docstring; the offset is fitted). observed and predicted are half spectra (..., N, N//2 + 1)
    (torch.fft.rfft2), broadcast against each other (e.g. (B, 1, ...) images against (B, K, ...) draws) -> the
    broadcast leading shape. log_noise_variance: a scalar, white noise of that per-pixel variance (P log sigma^2 / 2
    for its normaliser, P = N^2 pixels); or one log variance per shell, (S,) for every image or (..., S) broadcast
    against the leading dimensions; log_scale: a scalar tensor. Differentiable once in everything: the residual's
    quadratic form and its gradient are one autograd function (_ResidualPower), 0.3x the time of the same sum in
    torch's complex operations at 64 and 128 px, 0.6x at 32 px (256 draws against 32 images, forward and backward;
    docs/benchmarks.md)."""
    box_size_px = predicted_spectra.shape[-2]
    real = torch.view_as_real(predicted_spectra)
    weights = multiplicity(box_size_px, real.dtype, real.device)
    log_noise_variance = log_noise_variance.to(real.dtype)
    if log_noise_variance.dim() == 0:
        inverse_variances = weights * torch.exp(-log_noise_variance)
        normaliser = 0.5 * box_size_px**2 * log_noise_variance
    else:
        log_variances = frequency_log_variances(log_noise_variance, box_size_px)
        inverse_variances = weights * torch.exp(-log_variances)
        normaliser = 0.5 * (weights * log_variances).sum(dim=(-2, -1))
    leading = torch.broadcast_shapes(observed_spectra.shape[:-2], predicted_spectra.shape[:-2], normaliser.shape)
    if leading != torch.broadcast_shapes(observed_spectra.shape[:-2], predicted_spectra.shape[:-2]):
        real = real.expand(*leading, *real.shape[-3:])  # more spectra of the noise than residuals
    coefficients = _grouped(inverse_variances / (2.0 * box_size_px**2), leading)
    log_scale = log_scale.to(real.dtype)
    quadratic = _ResidualPower.apply(torch.view_as_real(observed_spectra), real, log_scale, coefficients)
    return quadratic.view(leading) + normaliser


def _grouped(coefficients: torch.Tensor, leading: torch.Size) -> torch.Tensor:
    """(..., N, M) coefficients -> (G, N, M), one row per group of consecutive residuals that share them. Their
    leading shape, aligned on the right as broadcasting aligns it and with its trailing 1s dropped, must be the start
    of the residuals' leading shape; otherwise they are expanded to it (a copy)."""
    aligned = [1] * (len(leading) - (coefficients.dim() - 2)) + list(coefficients.shape[:-2])
    while aligned and aligned[-1] == 1:
        aligned.pop()
    if tuple(aligned) != tuple(leading[: len(aligned)]):
        coefficients = coefficients.expand(*leading, *coefficients.shape[-2:])
    return coefficients.reshape(-1, *coefficients.shape[-2:])


class _ResidualPower(torch.autograd.Function):
    """sum_k c_k |O_k - s P_k|^2 over the rfft2 grid for observed and predicted spectra as real pairs (..., N, M, 2),
    broadcast against each other, a scale s = exp(log_scale) and coefficients c (G, N, M), each row shared by as many
    consecutive residuals -> (number of residuals,). With R = O - s P and g = dL/d(sum): dL/dP = -2 s g c R,
    dL/dlog_scale = sum dL/dP . P, dL/dO = 2 g c R and dL/dc = the sum of g |R|^2 over each row's residuals. Four
    passes over the residuals forward and backward, where torch's operations on complex tensors take about ten."""

    @staticmethod
    def forward(
        ctx, observed: torch.Tensor, predicted: torch.Tensor, log_scale: torch.Tensor, coefficients: torch.Tensor
    ) -> torch.Tensor:
        scale = log_scale.exp()
        residual = torch.addcmul(observed, predicted, -scale)
        squared = residual.square()
        groups = len(coefficients)
        pairs = coefficients.unsqueeze(-1).expand(*coefficients.shape, 2).reshape(groups, -1, 1)
        quadratic = torch.bmm(squared.reshape(groups, -1, pairs.shape[1]), pairs).flatten()
        ctx.save_for_backward(predicted, scale, coefficients, residual, squared)
        ctx.observed_shape = observed.shape
        return quadratic

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_quadratic: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        predicted, scale, coefficients, residual, squared = ctx.saved_tensors
        groups, rows = len(coefficients), len(grad_quadratic) // len(coefficients)
        grad = grad_quadratic.reshape(groups, rows, 1)
        grad_observed = grad_predicted = grad_log_scale = grad_coefficients = None
        if ctx.needs_input_grad[3]:
            power = torch.bmm(grad.transpose(1, 2), squared.reshape(groups, rows, -1))
            grad_coefficients = power.view(coefficients.shape + (2,)).sum(-1)
        factor = 2.0 * grad * coefficients.view(groups, 1, -1)  # dL/dR = factor R, one factor per complex number
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_predicted = residual * (factor * -scale).view(residual.shape[:-1] + (1,))
            grad_predicted = grad_predicted.sum_to_size(predicted.shape)
            if ctx.needs_input_grad[2]:
                grad_log_scale = torch.dot(grad_predicted.flatten(), predicted.flatten()).reshape(scale.shape)
        if ctx.needs_input_grad[0]:
            grad_observed = (residual * factor.view(residual.shape[:-1] + (1,))).sum_to_size(ctx.observed_shape)
        return grad_observed, grad_predicted, grad_log_scale, grad_coefficients


def sample_noise(like: torch.Tensor, log_noise_variance: torch.Tensor) -> torch.Tensor:
    """Noise images shaped like `like` (B, N, N): white of variance exp(log_noise_variance) for a scalar, else with
    variance v_k at each frequency, (S,) for every image or (B, S) for each (white noise of unit variance has N^2 per
    rfft2 coefficient; each is scaled by sqrt(v_k)). The frequency 0 keeps the white noise's, which the likelihood
    ignores."""
    white = torch.randn_like(like)
    if log_noise_variance.dim() == 0:
        return (0.5 * log_noise_variance).exp() * white
    box_size_px = like.shape[-1]
    amplitude = (0.5 * frequency_log_variances(log_noise_variance, box_size_px)).exp().to(like.dtype)  # a new tensor
    amplitude[..., 0, 0] = 1.0
    return torch.fft.irfft2(torch.fft.rfft2(white) * amplitude, s=like.shape[-2:])


def shell_sums(values: torch.Tensor) -> torch.Tensor:
    """(..., N, N//2 + 1) real values on the rfft2 grid -> (S,) float64 sums of m_k values_k over each shell and over
    the leading dimensions: with values |F_k|^2 / N^2 of images, each shell's share of their power (the images minus
    their means, in all: Parseval)."""
    box_size_px = values.shape[-2]
    weights = multiplicity(box_size_px, torch.float64, values.device)
    summed = (values.double() * weights).reshape(-1, *weights.shape).sum(0)
    index = shell_index(box_size_px, values.device).flatten()
    shells = torch.zeros(n_shells(box_size_px), dtype=torch.float64, device=values.device)
    return shells.index_add_(0, index, summed.flatten())


def shell_counts(box_size_px: int, device: torch.device | None = None) -> torch.Tensor:
    """(S,) float64 frequencies of the full spectrum in each shell (frequency 0 not counted): shell_sums of ones."""
    return shell_sums(torch.ones(box_size_px, box_size_px // 2 + 1, device=device))
