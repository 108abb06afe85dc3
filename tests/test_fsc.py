"""Fourier shell correlation against analytic cases and an independent full-spectrum loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cryoflex.analysis.fsc import fourier_shell_correlation, resolution_at


def _loop_fsc(map_a: np.ndarray, map_b: np.ndarray) -> np.ndarray:
    """Plain FSC: every voxel of the full complex spectrum, shell = nearest integer radius, one at a time."""
    n = map_a.shape[0]
    f_a, f_b = np.fft.fftn(map_a), np.fft.fftn(map_b)
    cross, power_a, power_b = np.zeros(n // 2 + 1), np.zeros(n // 2 + 1), np.zeros(n // 2 + 1)
    for index in itertools.product(range(n), repeat=3):
        k = [i if i < n - i else i - n for i in index]  # signed frequency; -n/2 for the even-n Nyquist index
        shell = int(round(float(np.sqrt(sum(c * c for c in k)))))
        if shell <= n // 2:
            cross[shell] += (f_a[index] * np.conj(f_b[index])).real
            power_a[shell] += abs(f_a[index]) ** 2
            power_b[shell] += abs(f_b[index]) ** 2
    return cross / np.sqrt(power_a * power_b)


def _shell_mean_cos(n: int, shift_px: np.ndarray) -> np.ndarray:
    """Mean over the voxels of each shell of cos(2 pi k . t / n): the FSC of a white map and its shifted copy."""
    total, count = np.zeros(n // 2 + 1), np.zeros(n // 2 + 1)
    for index in itertools.product(range(n), repeat=3):
        k = np.array([i if i <= n // 2 else i - n for i in index], dtype=float)
        shell = int(round(float(np.linalg.norm(k))))
        if shell <= n // 2:
            total[shell] += np.cos(2 * np.pi * k @ shift_px / n)
            count[shell] += 1
    return total / count


def _phase_shifted(volume: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """volume(r - t) by a Fourier phase ramp (odd n: the ramp is Hermitian, so the result is exactly real)."""
    n = volume.shape[0]
    k = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij")
    ramp = np.exp(-2j * np.pi * sum(ki * ti for ki, ti in zip(k, shift_px, strict=True)))
    return np.fft.irfftn(np.fft.rfftn(volume) * ramp, s=volume.shape, axes=(0, 1, 2))


def test_identical_maps_correlate_fully() -> None:
    volume = np.random.default_rng(0).normal(size=(16, 16, 16))
    frequency, fsc = fourier_shell_correlation(volume, volume, voxel_size_A=2.0)
    np.testing.assert_allclose(fsc, 1.0, atol=1e-12)
    np.testing.assert_allclose(frequency, np.arange(9) / 32.0)
    assert resolution_at(frequency, fsc, 0.143) == pytest.approx(4.0)  # never crosses: Nyquist, 2 voxels


@pytest.mark.parametrize("shift_px", [(0.3, -0.2, 0.45), (1.5, 0.0, 0.7)])
def test_shifted_white_map_follows_the_phase_ramp(shift_px: tuple[float, float, float]) -> None:
    n = 15
    delta = np.zeros((n, n, n))
    delta[n // 2, n // 2, n // 2] = 1.0  # flat power spectrum: the shell FSC is the plain mean of cos(2 pi k.t)
    t = np.array(shift_px)
    shifted = _phase_shifted(delta, t)
    assert not np.allclose(shifted, delta)
    _, fsc = fourier_shell_correlation(delta, shifted, voxel_size_A=1.0)
    expected = _shell_mean_cos(n, t)
    np.testing.assert_allclose(fsc, expected, atol=1e-10)
    # and the continuum limit: the sphere average of cos(2 pi k.t) is sinc(2 |k| |t| / n) (numpy's sinc has the pi)
    shells = np.arange(3, n // 2 + 1)
    np.testing.assert_allclose(fsc[shells], np.sinc(2 * shells * np.linalg.norm(t) / n), atol=0.06)


@pytest.mark.parametrize("n", [8, 9])
def test_random_maps_match_the_full_spectrum_loop(n: int) -> None:
    rng = np.random.default_rng(n)
    map_a = rng.normal(size=(n, n, n))
    map_b = 0.6 * map_a + rng.normal(size=(n, n, n))
    _, fsc = fourier_shell_correlation(map_a, map_b, voxel_size_A=1.3)
    np.testing.assert_allclose(fsc, _loop_fsc(map_a, map_b), atol=1e-12)


def test_independent_noise_is_uncorrelated() -> None:
    rng = np.random.default_rng(1)
    map_a, map_b = rng.normal(size=(2, 32, 32, 32))
    _, fsc = fourier_shell_correlation(map_a, map_b, voxel_size_A=1.0)
    assert np.all(np.abs(fsc[3:]) < 0.1)
    assert np.abs(fsc[3:]).mean() < 0.03


def test_resolution_interpolates_the_first_crossing() -> None:
    frequency = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    fsc = np.array([1.0, 0.9, 0.3, 0.6, 0.1])  # first below 0.5 between 0.1 and 0.2, at 0.1 + 0.4/0.6 * 0.1
    assert resolution_at(frequency, fsc, 0.5) == pytest.approx(1.0 / (0.1 + 0.4 / 0.6 * 0.1))
    assert resolution_at(frequency, fsc, 0.95) == pytest.approx(1.0 / 0.05)
    assert resolution_at(frequency, np.array([0.1, 0.0, 0.0, 0.0, 0.0]), 0.5) == np.inf
    assert resolution_at(frequency, fsc, 0.05) == pytest.approx(2.5)


def test_zero_power_shell_gives_zero_and_shapes_are_checked() -> None:
    _, fsc = fourier_shell_correlation(np.zeros((6, 6, 6)), np.ones((6, 6, 6)), voxel_size_A=1.0)
    np.testing.assert_array_equal(fsc, 0.0)
    with pytest.raises(ValueError, match="cubic"):
        fourier_shell_correlation(np.zeros((6, 6, 6)), np.zeros((6, 6, 5)), voxel_size_A=1.0)
