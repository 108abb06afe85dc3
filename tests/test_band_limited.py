"""Band-limited rendering: equal to a Fourier crop of a finely sampled projection, conventions, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cryoflex.imaging.band_limited as band_limited
import cryoflex.imaging.projector as projector
from cryoflex.data.downsample import fourier_crop
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.band_limited import _PhaseSums, phase_terms
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.projector import apply_ctf

F64 = torch.float64


def _particles(seed: int, n: int, images: int, spread_A: float) -> tuple[torch.Tensor, torch.Tensor, PoseBatch]:
    """n residues within +-spread_A of the box centre, amplitudes in [0.5, 2], random rotations and origins."""
    rng = np.random.default_rng(seed)
    coords = torch.as_tensor(rng.uniform(-spread_A, spread_A, size=(n, 3)), dtype=F64)
    amplitudes = torch.as_tensor(rng.uniform(0.5, 2.0, size=n), dtype=F64)
    rotations = torch.as_tensor(uniform_random_rotations(images, rng), dtype=F64)
    shifts = torch.as_tensor(rng.uniform(-3.0, 3.0, size=(images, 2)), dtype=F64)
    return coords, amplitudes, PoseBatch(rotations, shifts)


def _ctf(images: int) -> CTFBatch:
    """Astigmatic CTFs of defocus 0.8-2 um, one per image."""
    return CTFBatch.from_values(
        torch.linspace(8000.0, 20000.0, images, dtype=F64), 9000.0, 30.0, 300.0, 2.7, 0.1, dtype=F64
    )


@pytest.mark.parametrize(("box", "sigma_A", "spread_A"), [(32, 2.0, 12.0), (24, 1.0, 12.0), (16, 3.0, 4.0)])
def test_equals_the_fourier_crop_of_a_finely_sampled_projection(box: int, sigma_A: float, spread_A: float) -> None:
    """What a downsampled particle stack holds: sampled at 1/8 of the pixel (no aliasing left), then cropped. The
    particles lie well inside the box: the band-limited image is periodic, the sampled one is cut at the edges."""
    coords, amplitudes, poses = _particles(0, 12, 3, spread_A=spread_A)
    apix = 4.0
    fine = ImageFormation(8 * box, apix / 8, sigma_A).images(coords, amplitudes, poses, None)
    expected = fourier_crop(fine, box)
    rendered = ImageFormation(box, apix, sigma_A, band_limited=True).images(coords, amplitudes, poses, None)
    torch.testing.assert_close(rendered, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    sampled = ImageFormation(box, apix, sigma_A).images(coords, amplitudes, poses, None)
    if sigma_A / apix <= 0.5:  # the point samples alias: they are not what the cropped particle holds
        assert float((sampled - expected).norm() / expected.norm()) > 0.1


@pytest.mark.parametrize("box", [64, 65])
def test_equals_point_samples_where_the_gaussians_are_wide_and_applies_the_ctf(box: int) -> None:
    """Odd and even boxes, origins and the CTF: with sigma 3 pixels nothing lies above Nyquist, so the band-limited
    image is the point-sampled one (cryoflex.imaging.projector, tested against brute-force integrals)."""
    coords, amplitudes, poses = _particles(1, 9, 4, spread_A=5.0)
    apix, sigma_A = 1.0, 3.0
    ctf = _ctf(4)
    sampled = ImageFormation(box, apix, sigma_A).images(coords, amplitudes, poses, ctf)
    rendered = ImageFormation(box, apix, sigma_A, band_limited=True).images(coords, amplitudes, poses, ctf)
    torch.testing.assert_close(rendered, sampled, rtol=0, atol=1e-9 * float(sampled.abs().max()))


def test_ctf_multiplies_the_spectrum_as_for_a_cropped_image() -> None:
    coords, amplitudes, poses = _particles(2, 10, 3, spread_A=10.0)
    box, apix, sigma_A = 20, 3.0, 2.0
    formation = ImageFormation(box, apix, sigma_A, band_limited=True)
    ctf = _ctf(3)
    expected = apply_ctf(formation.images(coords, amplitudes, poses, None), formation.ctf_rfft(ctf))
    torch.testing.assert_close(formation.images(coords, amplitudes, poses, ctf), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("box", [8, 9])
@pytest.mark.parametrize("chunk", [1, None])
def test_phase_sums_backward_is_exact(box: int, chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """gradcheck, for an even box (whose Nyquist cosine's derivative is outside the table) and an odd one, with the
    batch in one chunk and one image per chunk."""
    if chunk is not None:
        monkeypatch.setattr(band_limited, "images_per_chunk", lambda *_: chunk)
    rng = np.random.default_rng(3)
    x, y = (torch.as_tensor(rng.uniform(0, 30, size=(2, 5)), dtype=F64).requires_grad_() for _ in range(2))
    weights = torch.as_tensor(rng.uniform(0.5, 2, size=(2, 5)), dtype=F64).requires_grad_()
    terms = phase_terms(box, 4.0, F64, torch.device("cpu"))
    assert terms.omega.shape == (box,)  # as many table columns as pixels
    assert torch.autograd.gradcheck(lambda a, b, w: _PhaseSums.apply(a, b, w, terms, False), (x, y, weights))


def test_phase_tables_kept_for_backward_give_the_rebuilt_tables_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    x, y = (torch.as_tensor(rng.uniform(0, 30, size=(3, 6)), dtype=F64).requires_grad_() for _ in range(2))
    weights = torch.as_tensor(rng.uniform(0.5, 2, size=(3, 6)), dtype=F64).requires_grad_()
    terms = phase_terms(9, 4.0, F64, torch.device("cpu"))
    probe = torch.as_tensor(rng.normal(size=(3, 9, 9)), dtype=F64)

    def sums_and_gradients() -> tuple[int, list[torch.Tensor]]:
        sums = _PhaseSums.apply(x, y, weights, terms, False)
        return len(sums.grad_fn.saved_tensors), [sums, *torch.autograd.grad((sums * probe).sum(), (x, y, weights))]

    saved_kept, kept = sums_and_gradients()
    monkeypatch.setattr(projector, "_CPU_KEPT_TABLE_ELEMENTS", 0)
    saved_rebuilt, rebuilt = sums_and_gradients()
    assert (saved_kept, saved_rebuilt) == (3 + 2, 3)  # the inputs, then the two tables when kept
    for a, b in zip(kept, rebuilt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradients_through_positions_width_and_ctf_and_chunks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    coords, amplitudes, poses = _particles(4, 4, 3, spread_A=5.0)
    coords.requires_grad_()
    sigma_A = torch.tensor(2.0, dtype=F64, requires_grad=True)
    formation = ImageFormation(10, 2.0, band_limited=True)
    ctf = _ctf(3)

    def render(c: torch.Tensor, s: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        return formation.images(c, amplitudes, PoseBatch(poses.rotations, shifts), ctf, sigma_A=s)

    shifts = poses.shifts_A.clone().requires_grad_()
    assert torch.autograd.gradcheck(render, (coords, sigma_A, shifts))
    whole = render(coords, sigma_A, shifts)
    gradients = torch.autograd.grad(whole.square().sum(), (coords, sigma_A))
    monkeypatch.setattr(projector, "_CPU_CHUNK_ELEMENTS", 1)  # one image per chunk (the chunks are projector's)
    for kept_elements in (projector._CPU_KEPT_TABLE_ELEMENTS, 0):  # tables kept for backward, then rebuilt in it
        monkeypatch.setattr(projector, "_CPU_KEPT_TABLE_ELEMENTS", kept_elements)
        chunked = render(coords, sigma_A, shifts)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
        got = torch.autograd.grad(chunked.square().sum(), (coords, sigma_A))
        for value, expected in zip(got, gradients, strict=True):
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
