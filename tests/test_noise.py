"""The noise model per Fourier shell (cryoflex.imaging.noise) and coloured noise in simulated particles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.noise import (
    multiplicity,
    n_shells,
    per_pixel_variance,
    sample_noise,
    shell_counts,
    shell_index,
    shell_sums,
    stationary_nll,
)
from cryoflex.model.losses import gaussian_image_nll


def _circulant_covariance(variances: np.ndarray) -> np.ndarray:
    """(N, N) variance at each frequency of the full fft2 grid -> the (P, P) covariance of stationary noise with that
    spectrum, built pixel by pixel: column j is ifft2(v * fft2(e_j))."""
    box = variances.shape[0]
    columns = [np.fft.ifft2(variances * np.fft.fft2(e.reshape(box, box))).real.ravel() for e in np.eye(box * box)]
    return np.stack(columns, axis=1)


def _residual_nll(residual_spectra: torch.Tensor, log_noise_variance: torch.Tensor) -> torch.Tensor:
    """stationary_nll of residuals: observed images that are the residuals, nothing predicted."""
    zero = torch.zeros((), dtype=residual_spectra.real.dtype)
    return stationary_nll(residual_spectra, torch.zeros_like(residual_spectra), zero, log_noise_variance)


def _composed_nll(
    observed: torch.Tensor, predicted: torch.Tensor, log_scale: torch.Tensor, log_noise_variance: torch.Tensor
) -> torch.Tensor:
    """stationary_nll written with torch's operations on complex tensors, autograd's gradient (the reference)."""
    box = predicted.shape[-2]
    power = (observed - log_scale.exp() * predicted).abs().square()
    weights = multiplicity(box, torch.float64, power.device)
    if log_noise_variance.dim() == 0:
        return (power * weights).sum((-2, -1)) / (2 * box**2) * (-log_noise_variance).exp() + 0.5 * box**2 * (
            log_noise_variance
        )
    log_variances = log_noise_variance[..., shell_index(box, power.device)]
    quadratic = (power * weights * (-log_variances).exp()).sum((-2, -1)) / (2 * box**2)
    return quadratic + 0.5 * (weights * log_variances).sum((-2, -1))


@pytest.mark.parametrize(
    ("observed_shape", "predicted_shape", "noise_shape"),
    [
        ((3, 1), (3, 4), (n_shells(6),)),  # training: each image against its draws, one spectrum
        ((3, 1), (3, 4), (3, 1, n_shells(6))),  # a spectrum per image (optics groups)
        ((3, 1), (3, 4), ()),  # white
        ((3,), (3,), (3, n_shells(6))),
        ((3, 1), (3, 3), (3, n_shells(6))),  # broadcast from the right: a spectrum per draw, not per image
        ((2, 3), (3,), (n_shells(6),)),  # predicted broadcast over the observed
        ((), (), (2, n_shells(6))),  # more spectra of the noise than images
    ],
)
def test_stationary_nll_and_its_gradient_equal_torch_operations_on_complex_spectra(
    observed_shape: tuple[int, ...], predicted_shape: tuple[int, ...], noise_shape: tuple[int, ...]
) -> None:
    """The hand-written quadratic form (one autograd function) against the same likelihood composed of torch's
    complex operations: values and the gradients in every input, float64, to 1e-12; and torch.autograd.gradcheck."""
    generator = torch.Generator().manual_seed(5)

    def spectra(shape: tuple[int, ...]) -> torch.Tensor:
        images = torch.randn(*shape, 6, 6, generator=generator, dtype=torch.float64)
        return torch.fft.rfft2(images).requires_grad_()

    observed, predicted = spectra(observed_shape), spectra(predicted_shape)
    log_scale = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    log_noise = torch.randn(noise_shape, generator=generator, dtype=torch.float64).requires_grad_()
    inputs = (observed, predicted, log_scale, log_noise)
    got, expected = stationary_nll(*inputs), _composed_nll(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(got.shape, generator=generator, dtype=torch.float64)
    for grad_got, grad_expected in zip(
        torch.autograd.grad((got * weights).sum(), inputs), torch.autograd.grad((expected * weights).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(stationary_nll, inputs)


@pytest.mark.parametrize("box", [6, 5])
def test_stationary_nll_is_the_gaussian_density_of_stationary_noise_with_the_offset_free(box: int) -> None:
    """Against scipy's multivariate normal with the explicit covariance (frequency 0 given no variance: the offset is
    free), its pseudo-determinant and pseudo-inverse: -log p = -logpdf - (P - 1) log(2 pi) / 2, scipy given each
    residual minus its mean (its support), stationary_nll the spectrum of the residual with an offset."""
    generator = np.random.default_rng(0)
    log_variances = generator.normal(size=n_shells(box))
    full_grid_shells = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(box) * box, np.fft.fftfreq(box) * box,
                                                     indexing="ij"))).astype(int)  # fmt: skip
    variances = np.exp(log_variances)[full_grid_shells]
    variances[0, 0] = 0.0
    covariance = _circulant_covariance(variances)
    residuals = generator.normal(size=(3, box, box))
    expected = [
        -multivariate_normal(np.zeros(box * box), covariance, allow_singular=True).logpdf(r.ravel() - r.mean())
        - 0.5 * (box * box - 1) * np.log(2 * np.pi)
        for r in residuals
    ]
    got = _residual_nll(torch.fft.rfft2(torch.as_tensor(residuals + 2.5)), torch.as_tensor(log_variances))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_equal_shells_are_white_noise_and_the_likelihood_follows_the_scale() -> None:
    """Every shell at sigma^2: the white likelihood but for its P log sigma^2 / 2 (the shells count P - 1
    frequencies, the offset's left out); the residual is observed - s predicted in both."""
    generator = torch.Generator().manual_seed(1)
    predicted = torch.randn(4, 8, 8, generator=generator, dtype=torch.float64)
    observed = torch.randn(4, 8, 8, generator=generator, dtype=torch.float64) + 3.0
    log_scale, log_variance = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    spectra = torch.fft.rfft2(predicted), torch.fft.rfft2(observed)
    white = gaussian_image_nll(*spectra, log_variance, log_scale)
    shells = gaussian_image_nll(*spectra, log_variance.expand(n_shells(8)).clone(), log_scale)
    torch.testing.assert_close(shells, white - 0.5 * log_variance, rtol=1e-12, atol=1e-10)


def test_sampled_noise_has_the_spectrum_and_the_per_pixel_variance_it_is_given() -> None:
    """4,000 noise images of 16 px: each shell's mean power within 6% of its variance, and the variance per pixel
    within 2% of per_pixel_variance."""
    box = 16
    torch.manual_seed(0)
    log_variances = torch.log(1.0 + 9.0 * torch.exp(-torch.arange(n_shells(box), dtype=torch.float64) / 3.0))
    noise = sample_noise(torch.zeros(4000, box, box, dtype=torch.float64), log_variances)
    spectrum = torch.fft.rfft2(noise)
    measured = shell_sums(spectrum.abs().square() / box**2) / (shell_counts(box) * len(noise))
    np.testing.assert_allclose(measured[1:].numpy(), log_variances.exp()[1:].numpy(), rtol=0.06)
    centred = noise - noise.mean(dim=(-2, -1), keepdim=True)
    pixel_variance = float(centred.square().sum() / (len(noise) * (box * box - 1)))
    assert pixel_variance == pytest.approx(float(per_pixel_variance(log_variances, box)), rel=0.02)
    assert float(per_pixel_variance(torch.tensor(0.5), box)) == pytest.approx(np.exp(0.5))


def test_shells_cover_the_grid_and_count_the_full_spectrum() -> None:
    """Every frequency of the rfft2 grid is in a shell; the counts add up to the P - 1 frequencies of the full
    spectrum, for odd and even boxes."""
    for box in (7, 8, 32):
        index = shell_index(box, torch.device("cpu"))
        assert index.shape == (box, box // 2 + 1) and int(index.max()) == n_shells(box) - 1
        counts = shell_counts(box)
        assert counts[0] == 0 and float(counts.sum()) == box * box - 1


def test_simulated_coloured_noise_follows_the_given_spectrum_at_the_same_snr(tmp_path: Path) -> None:
    """cryoflex simulate --noise-spectrum: the noise (noisy minus clean images) has the requested relative power per
    shell and the per-pixel variance the SNR sets (truth.npz's noise_std), and the spectrum is recorded."""
    import mrcfile

    from cryoflex.io.structure import Structure
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    generator = np.random.default_rng(3)
    coords = generator.normal(scale=8.0, size=(2, 30, 3))
    ensemble = Structure(
        coords_A=coords, residue_names=np.array(["ALA"] * 30), residue_numbers=np.arange(1, 31),
        chain_ids=np.array(["A"] * 30), amplitudes_e=np.full(30, 6.0), insertion_codes=np.array([""] * 30),
        atom_names=np.array(["CA"] * 30),
    )  # fmt: skip
    spectrum = ((0.0, 20.0), (0.05, 4.0), (0.125, 1.0))
    config = SimulationConfig(n_images=600, box_size_px=32, pixel_size_A=4.0, snr=0.1, noise_spectrum=spectrum,
                              save_clean=True)  # fmt: skip
    simulate_dataset(ensemble, config, tmp_path, progress=False)
    with mrcfile.open(tmp_path / "stacks" / "particles_00000.mrcs") as noisy, \
            mrcfile.open(tmp_path / "clean" / "particles_00000.mrcs") as clean:  # fmt: skip
        noise = torch.as_tensor(noisy.data - clean.data, dtype=torch.float64)
    truth = np.load(tmp_path / "truth.npz")
    np.testing.assert_allclose(truth["noise_spectrum"], spectrum)
    centred = noise - noise.mean(dim=(-2, -1), keepdim=True)
    assert float(centred.square().mean()) == pytest.approx(float(truth["noise_std"]) ** 2, rel=0.03)
    power = shell_sums(torch.fft.rfft2(noise).abs().square() / 32**2) / (shell_counts(32) * len(noise))
    frequency_per_A = np.arange(n_shells(32)) / (32 * 4.0)
    relative = np.interp(frequency_per_A, *np.array(spectrum).T)
    ratio = power.numpy()[1:17] / relative[1:17]  # to Nyquist: shells beyond hold the corners only
    np.testing.assert_allclose(ratio / ratio.mean(), 1.0, rtol=0.1)


def test_a_noise_spectrum_that_cannot_colour_noise_is_refused_with_the_file_named(tmp_path: Path) -> None:
    from cryoflex.simulate import read_noise_spectrum

    path = tmp_path / "spectrum.csv"
    path.write_text("frequency_per_A,power\n0.0,4.0\n0.1,1.0\n")
    assert read_noise_spectrum(path) == ((0.0, 4.0), (0.1, 1.0))
    for text, message in [("frequency,power\n0,1\n0.1,1\n", "no column frequency_per_A"),
                          ("frequency_per_A,power\n0.1,1\n0.0,1\n", "increasing"),
                          ("frequency_per_A,power\n0.0,1\n0.1,0\n", "positive")]:  # fmt: skip
        path.write_text(text)
        with pytest.raises(CryoflexInputError, match=message) as error:
            read_noise_spectrum(path)
        assert "spectrum.csv" in str(error.value)


def test_shells_that_hold_next_to_no_noise_are_found() -> None:
    """A zero-padded stack leaves its outer shells empty: training warns about them (train.loop.empty_noise_shells)."""
    from cryoflex.train.loop import empty_noise_shells

    variances = np.array([0.0, 4.0, 2.0, 1.0, 1.0, 0.9, 1e-5, 1e-6])
    assert empty_noise_shells(variances) == [6, 7]
    assert empty_noise_shells(np.array([0.0, 4.0, 2.0, 1.0, 0.5])) == []


def test_a_spectrum_per_image_is_each_image_scored_and_sampled_with_its_own() -> None:
    """(B, S) spectra: each image's likelihood is stationary_nll with its own (S,) spectrum, and noise sampled with them
    has each image's spectrum (two spectra, 2,000 images each, within 6% per shell)."""
    box = 12
    generator = torch.Generator().manual_seed(2)
    spectra = torch.randn(3, n_shells(box), generator=generator, dtype=torch.float64)
    residuals = torch.randn(3, box, box, generator=generator, dtype=torch.float64)
    residual_spectra = torch.fft.rfft2(residuals)
    expected = torch.cat([_residual_nll(r[None], s) for r, s in zip(residual_spectra, spectra, strict=True)])
    torch.testing.assert_close(_residual_nll(residual_spectra, spectra), expected, rtol=1e-12, atol=1e-12)

    torch.manual_seed(3)
    flat = torch.zeros(n_shells(box), dtype=torch.float64)
    coloured = torch.linspace(1.5, -1.0, n_shells(box), dtype=torch.float64)
    rows = torch.arange(4000) % 2
    noise = sample_noise(torch.zeros(4000, box, box, dtype=torch.float64), torch.stack([flat, coloured])[rows])
    for row, spectrum in enumerate((flat, coloured)):
        power = torch.fft.rfft2(noise[rows == row]).abs().square() / box**2
        measured = shell_sums(power) / (shell_counts(box) * 2000)
        np.testing.assert_allclose(measured[1:].numpy(), spectrum.exp()[1:].numpy(), rtol=0.06)
    both = torch.stack([flat, coloured])
    assert float(per_pixel_variance(both, box)) == pytest.approx(
        0.5 * float(per_pixel_variance(flat, box) + per_pixel_variance(coloured, box)), rel=1e-12
    )
