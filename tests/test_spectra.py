"""Half spectra: the Parseval weights give the centred images' sums over pixels, for even and odd boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoflex.imaging.spectra import (
    centred_inner,
    centred_power,
    centred_sum_weights,
    half_spectra,
    images_from_spectra,
)


@pytest.mark.parametrize("box", [16, 15, 2, 1])
def test_weighted_spectral_sums_equal_the_centred_images_sums_over_pixels(box: int) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, box, box, generator=generator, dtype=torch.float64) + 2.0
    b = torch.randn(3, box, box, generator=generator, dtype=torch.float64) - 1.0
    a_centred = a.numpy() - a.numpy().mean(axis=(1, 2), keepdims=True)
    b_centred = b.numpy() - b.numpy().mean(axis=(1, 2), keepdims=True)
    weights = centred_sum_weights(box, dtype=torch.float64)
    inner = centred_inner(half_spectra(a), half_spectra(b), weights)
    np.testing.assert_allclose(inner.numpy(), (a_centred * b_centred).sum(axis=(1, 2)), rtol=1e-12, atol=1e-12)
    power = centred_power(half_spectra(a), weights)
    np.testing.assert_allclose(power.numpy(), np.square(a_centred).sum(axis=(1, 2)), rtol=1e-12, atol=1e-12)


def test_spectra_broadcast_draws_against_their_image_and_transform_back() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 12, 12, generator=generator, dtype=torch.float64)
    draws = torch.randn(2, 3, 12, 12, generator=generator, dtype=torch.float64)
    weights = centred_sum_weights(12, dtype=torch.float64)
    paired = centred_inner(half_spectra(draws), half_spectra(images)[:, None], weights)
    repeated = centred_inner(half_spectra(draws), half_spectra(images[:, None].expand(-1, 3, -1, -1)), weights)
    assert paired.shape == (2, 3)
    torch.testing.assert_close(paired, repeated, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(images_from_spectra(half_spectra(images), 12), images, rtol=1e-12, atol=1e-12)
