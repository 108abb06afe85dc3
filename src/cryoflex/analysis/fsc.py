"""Fourier shell correlation (FSC) between two maps on the same cubic grid, and the resolution where it drops.

Shells are one Fourier voxel wide: a Fourier voxel at integer frequency index k (cycles per box, per axis) belongs
to shell round(|k|), for shells 0 .. N//2 (Nyquist); the corners beyond Nyquist are left out. Shell s is at
s / (N * voxel_size_A) per A. FSC_s = Re(sum F_a conj(F_b)) / sqrt(sum |F_a|^2 sum |F_b|^2) over the full 3-D
spectrum; it is computed from the real-input half spectrum (numpy rfftn) with every half-plane column but the
first (and, for even N, the Nyquist one) counted twice, which gives the full-spectrum sums exactly. A shell where
either map has no power has FSC 0 (nothing correlates there).
"""

from __future__ import annotations

import numpy as np

# The FSC values at which resolutions are reported: 0.5 (model against map) and 0.143 (half maps).
FSC_THRESHOLDS = (0.5, 0.143)


def _shell_index(box_size_px: int) -> np.ndarray:
    """(N, N, N//2 + 1) shell of each rfftn voxel: round(|k|) in Fourier voxels; N//2 + 1 marks beyond Nyquist."""
    k_full = np.fft.fftfreq(box_size_px) * box_size_px
    k_half = np.fft.rfftfreq(box_size_px) * box_size_px
    radius = np.sqrt(k_full[:, None, None] ** 2 + k_full[None, :, None] ** 2 + k_half[None, None, :] ** 2)
    shells = np.rint(radius).astype(np.int64)
    return np.minimum(shells, box_size_px // 2 + 1)


def _half_spectrum_weights(box_size_px: int) -> np.ndarray:
    """(N//2 + 1,) multiplicity of each rfftn column in the full spectrum: 1 for column 0 and even-N Nyquist, else 2."""
    weights = np.full(box_size_px // 2 + 1, 2.0)
    weights[0] = 1.0
    if box_size_px % 2 == 0:
        weights[-1] = 1.0
    return weights


def fourier_shell_correlation(
    map_a: np.ndarray, map_b: np.ndarray, voxel_size_A: float
) -> tuple[np.ndarray, np.ndarray]:
    """FSC of two real cubic maps (N, N, N): (frequency_per_A (N//2 + 1,), fsc (N//2 + 1,)), shells 0 .. Nyquist."""
    a, b = np.asarray(map_a, dtype=np.float64), np.asarray(map_b, dtype=np.float64)
    if a.ndim != 3 or len(set(a.shape)) != 1 or a.shape != b.shape:
        raise ValueError(f"need two cubic maps of the same shape, got {a.shape} and {b.shape}")
    if not voxel_size_A > 0:
        raise ValueError(f"voxel_size_A must be positive, got {voxel_size_A}")
    box_size_px = a.shape[0]
    n_shells = box_size_px // 2 + 1
    f_a, f_b = np.fft.rfftn(a), np.fft.rfftn(b)
    weights = _half_spectrum_weights(box_size_px)
    shells = _shell_index(box_size_px).ravel()

    def shell_sums(values: np.ndarray) -> np.ndarray:
        return np.bincount(shells, weights=(values * weights).ravel(), minlength=n_shells + 1)[:n_shells]

    cross = shell_sums(np.real(f_a * np.conj(f_b)))
    power = shell_sums(np.abs(f_a) ** 2) * shell_sums(np.abs(f_b) ** 2)
    fsc = np.divide(cross, np.sqrt(power), out=np.zeros(n_shells), where=power > 0)
    frequency_per_A = np.arange(n_shells) / (box_size_px * voxel_size_A)
    return frequency_per_A, fsc


def resolution_at(frequency_per_A: np.ndarray, fsc: np.ndarray, threshold: float) -> float:
    """Resolution in A where the FSC first falls below `threshold`, interpolated linearly in frequency between shells.

    inf when it is already below at shell 0; when it never falls below, the Nyquist resolution 1 / frequency[-1]
    (the best a map on this grid can show: a bound, not a measurement).
    """
    frequency = np.asarray(frequency_per_A, dtype=np.float64)
    values = np.asarray(fsc, dtype=np.float64)
    below = np.flatnonzero(values < threshold)
    if below.size == 0:
        return float(1.0 / frequency[-1])
    first = int(below[0])
    if first == 0:
        return float("inf")
    f0, f1, v0, v1 = frequency[first - 1], frequency[first], values[first - 1], values[first]
    crossing = f0 + (v0 - threshold) / (v0 - v1) * (f1 - f0)
    return float(1.0 / crossing) if crossing > 0 else float("inf")
