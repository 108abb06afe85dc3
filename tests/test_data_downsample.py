"""Fourier-crop downsampling: smooth images keep their values and physical position on the coarser grid."""

import numpy as np
import pytest
import torch

from cryoflex.data.downsample import downsampled_pixel_size_A, fourier_crop


def _grid_A(box_px: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in A of every pixel: (i, j) at ((j - N//2) a, (i - N//2) a) (docs/conventions.md, "Image pixel grid")."""
    axis = (np.arange(box_px) - box_px // 2) * pixel_size_A
    return np.meshgrid(axis, axis, indexing="xy")


def _gaussian(box_px: int, pixel_size_A: float, centre_A=(0.0, 0.0), sigma_A: float = 4.0) -> np.ndarray:
    x, y = _grid_A(box_px, pixel_size_A)
    return np.exp(-((x - centre_A[0]) ** 2 + (y - centre_A[1]) ** 2) / (2 * sigma_A**2))


def _crop(image: np.ndarray, box_out_px: int) -> np.ndarray:
    return fourier_crop(torch.from_numpy(image)[None], box_out_px)[0].numpy()


@pytest.mark.parametrize(("box_in_px", "box_out_px"), [(64, 32), (64, 48), (63, 32), (65, 34)])
@pytest.mark.parametrize("centre_A", [(0.0, 0.0), (5.3, -7.1)])
def test_gaussian_is_resampled_at_same_physical_place(box_in_px, box_out_px, centre_A):
    pixel_size_A = 1.0
    image = _gaussian(box_in_px, pixel_size_A, centre_A)
    coarse_pixel_A = downsampled_pixel_size_A(pixel_size_A, box_in_px, box_out_px)
    expected = _gaussian(box_out_px, coarse_pixel_A, centre_A)
    cropped = _crop(image, box_out_px)
    assert cropped.shape == (box_out_px, box_out_px)
    np.testing.assert_allclose(cropped, expected, rtol=0, atol=1e-5)
    peak = np.unravel_index(np.argmax(cropped), cropped.shape)
    assert np.argmax(expected) == np.ravel_multi_index(peak, cropped.shape)


def test_band_limited_cosine_is_exact():
    box_in_px, box_out_px = 64, 32
    x, y = _grid_A(box_in_px, 1.0)
    length_A = box_in_px * 1.0
    wave = lambda x, y: np.cos(2 * np.pi * (3 * x - 5 * y) / length_A + 0.7)  # noqa: E731
    coarse_x, coarse_y = _grid_A(box_out_px, 2.0)
    np.testing.assert_allclose(_crop(wave(x, y), box_out_px), wave(coarse_x, coarse_y), atol=1e-12)


def test_output_is_real_for_noise_and_nyquist_is_averaged():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 40, 40))
    cropped = fourier_crop(torch.from_numpy(noise), 16).numpy()
    # Reference: full 2-D crop of the centred spectrum, Nyquist bins as the mean of the +-D/2 components.
    spectrum = np.fft.fft2(np.roll(noise, (-20, -20), axis=(1, 2)))
    freqs = np.arange(-8, 9)
    weights = np.where(np.abs(freqs) == 8, 0.5, 1.0)
    window = spectrum[:, freqs[:, None] % 40, freqs[None, :] % 40] * np.outer(weights, weights)
    folded = np.zeros((3, 16, 16), dtype=complex)
    np.add.at(folded, (slice(None), (freqs % 16)[:, None], (freqs % 16)[None, :]), window)
    reference = np.fft.ifft2(folded) * (16 / 40) ** 2
    assert np.abs(reference.imag).max() < 1e-12
    np.testing.assert_allclose(cropped, np.roll(reference.real, (8, 8), axis=(1, 2)), atol=1e-12)


def test_same_box_is_identity_and_dtype_is_kept():
    images = torch.randn(2, 32, 32)
    assert fourier_crop(images, 32) is images
    assert fourier_crop(images, 16).dtype == torch.float32
    assert fourier_crop(images.double(), 16).dtype == torch.float64


def test_constant_image_keeps_its_value():
    images = torch.full((1, 48, 48), 3.5, dtype=torch.float64)
    np.testing.assert_allclose(fourier_crop(images, 24).numpy(), 3.5, atol=1e-12)


@pytest.mark.parametrize("box_out_px", [0, 15, 66])
def test_bad_output_box_is_rejected(box_out_px):
    with pytest.raises(ValueError, match="even"):
        fourier_crop(torch.zeros(1, 64, 64), box_out_px)


def test_pixel_size_helper():
    assert downsampled_pixel_size_A(1.5, 256, 64) == pytest.approx(6.0)
