"""CTF checks: cisTEM reference values, an independent numpy cryoDRGN formula, grids and parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoflex.imaging.batches import CTFBatch
from cryoflex.imaging.ctf import (
    ctf_at_frequencies,
    ctf_full_grid,
    ctf_rfft,
    electron_wavelength_A,
    rfft_frequencies_A,
)

F64 = torch.float64


def _cistem_wavelength_A(voltage_kV: np.ndarray) -> np.ndarray:
    """cisTEM's ReturnWavelenthInAngstroms (and cryoDRGN's): 12.2639 / sqrt(V + 0.97845e-6 V^2)."""
    volts = voltage_kV * 1000.0
    return 12.2639 / np.sqrt(volts + 0.97845e-6 * volts**2)


def _voltage_kV_for_wavelength(wavelength_A: np.ndarray) -> np.ndarray:
    """Voltage (kV) at which our wavelength formula gives wavelength_A: solves a V^2 + V = (c / lambda)^2."""
    a = 0.978466e-6
    rhs = (12.2643247 / wavelength_A) ** 2
    return (np.sqrt(1.0 + 4.0 * a * rhs) - 1.0) / (2.0 * a) / 1000.0


def _cryodrgn_ctf(kx, ky, dfu, dfv, dfang_deg, wavelength_A, cs_mm, w, phase_deg, bfactor, scale):
    """My numpy version of cryoDRGN's CTF formula (its own sign), float64: (B,) params -> (B, *grid)."""
    values = (dfu, dfv, dfang_deg, wavelength_A, cs_mm, w, phase_deg, bfactor, scale)
    dfu, dfv, dfang, lam, cs, w, phase, bfactor, scale = (
        np.asarray(v, np.float64)[:, None, None] for v in values
    )
    cs_A = cs * 1e7
    s2 = kx**2 + ky**2
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2.0 * (np.arctan2(ky, kx) - np.deg2rad(dfang))))
    gamma = 2.0 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs_A * lam**3 * s2**2) - np.deg2rad(phase)
    ctf = np.sqrt(1.0 - w**2) * np.sin(gamma) - w * np.cos(gamma)
    return ctf * np.exp(-bfactor / 4.0 * s2) * scale


def _numpy_rfft_grid(n: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(kx, ky) in 1/A: columns rfftfreq, rows fftfreq."""
    return np.meshgrid(np.fft.rfftfreq(n, pixel_size_A), np.fft.fftfreq(n, pixel_size_A), indexing="xy")


def _random_parameters(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """Realistic random CTF parameters for a batch of particles."""
    return {
        "defocus_u_A": rng.uniform(5000.0, 30000.0, batch),
        "defocus_v_A": rng.uniform(5000.0, 30000.0, batch),
        "defocus_angle_deg": rng.uniform(-180.0, 180.0, batch),
        "voltage_kV": rng.choice([120.0, 200.0, 300.0], batch),
        "cs_mm": rng.uniform(0.0, 3.0, batch),
        "amplitude_contrast": rng.uniform(0.0, 0.2, batch),
        "phase_shift_deg": rng.uniform(0.0, 120.0, batch),
        "bfactor_A2": rng.uniform(0.0, 200.0, batch),
        "scale": rng.uniform(0.5, 1.5, batch),
    }


def _torch_parameters(params: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: torch.as_tensor(value, dtype=dtype) for key, value in params.items()}


def _cryodrgn_from_parameters(kx: np.ndarray, ky: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """cryoDRGN's CTF with our (RELION) wavelength, so that the two must agree to rounding."""
    wavelength = np.array([electron_wavelength_A(float(v)) for v in params["voltage_kV"]])
    return _cryodrgn_ctf(
        kx, ky, params["defocus_u_A"], params["defocus_v_A"], params["defocus_angle_deg"], wavelength,
        params["cs_mm"], params["amplitude_contrast"], params["phase_shift_deg"], params["bfactor_A2"],
        params["scale"],
    )  # fmt: skip


def test_wavelength_known_values() -> None:
    # 300 kV: 0.019687 A; cisTEM's unit test values (to its 4 significant figures) at 300 / 200 / 120 kV.
    assert electron_wavelength_A(300.0) == pytest.approx(0.0196876, rel=1e-5)
    for kv, expected in [(300.0, 0.01969), (200.0, 0.02508), (120.0, 0.03349)]:
        assert electron_wavelength_A(kv) == pytest.approx(expected, abs=6e-6)
    volts = torch.tensor([120.0, 200.0, 300.0], dtype=F64)
    expected = torch.tensor([electron_wavelength_A(float(v)) for v in volts], dtype=F64)
    torch.testing.assert_close(electron_wavelength_A(volts), expected, rtol=1e-15, atol=0.0)
    # RELION's and cisTEM's constants differ by 3.3e-5 relative (docs/conventions.md, "CTF").
    relative = electron_wavelength_A(300.0) / _cistem_wavelength_A(300.0) - 1.0
    assert relative == pytest.approx(3.28e-5, abs=1e-6)


def test_rfft_frequencies_match_torch_rfft2() -> None:
    n, pixel_size = 32, 1.7
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    image = torch.as_tensor(np.cos(2.0 * np.pi * (3 * cols + 5 * rows) / n))  # 3 cycles along x, 5 along y
    spectrum = torch.fft.rfft2(image).abs()
    kx, ky = rfft_frequencies_A(n, pixel_size, dtype=F64)
    assert kx.shape == ky.shape == spectrum.shape == (n, n // 2 + 1)
    peak = divmod(int(spectrum.argmax()), n // 2 + 1)
    assert float(kx[peak]) == pytest.approx(3.0 / (n * pixel_size))
    assert float(ky[peak]) == pytest.approx(5.0 / (n * pixel_size))
    # One grid per particle for a (B,) tensor of pixel sizes.
    sizes = torch.tensor([1.0, 1.7, 2.5], dtype=F64)
    kx_b, ky_b = rfft_frequencies_A(n, sizes)
    assert kx_b.shape == (3, n, n // 2 + 1) and kx_b.dtype == F64
    torch.testing.assert_close(kx_b[1], kx, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(ky_b[2], rfft_frequencies_A(n, 2.5, dtype=F64)[1], rtol=1e-15, atol=0.0)


class TestCistemReference:
    """cisTEM values: cryojax 0.6.0 tests/data/cistem_ctf.npz (generate_cistem_references.py, pycistem 0.4.1).

    Each row of "parameters" is (defocus1 A, defocus2 A, astigmatism angle deg, kV, Cs mm, amplitude contrast,
    pixel A); "ctf" is cisTEM's CTF::Evaluate(s^2, azimuth) on cryojax's 128 x 65 frequency grid, as float32.
    cisTEM's CTF is minus ours. Two facts found by fitting the file: cisTEM used its wavelength
    12.2639 / sqrt(V + 0.97845e-6 V^2) (with it all nine sets agree to 2.4e-4; with RELION's, to 2e-2), and
    the grid's first frequency component (its azimuth's x) runs down the rows: transposed relative to ours.
    The 2.4e-4 is cisTEM's float32 arithmetic: chi reaches ~500 rad at 0.9 A/px (float32 spacing 3e-5 rad).
    """

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, data_dir) -> dict[str, np.ndarray]:
        with np.load(data_dir / "cistem_ctf.npz") as npz:
            return {key: npz[key] for key in npz.files}

    def test_file_layout(self, reference: dict[str, np.ndarray]) -> None:
        assert int(reference["grid_size"]) == 128
        assert reference["parameters"].shape == (9, 7)
        assert reference["ctf"].shape == (9, 128, 65)
        # Zero frequency: cisTEM gives -sin(asin(w)) = -w.
        np.testing.assert_allclose(reference["ctf"][:, 0, 0], -reference["parameters"][:, 5], atol=1e-7)

    def test_literal_grid_with_cistem_wavelength(self, reference: dict[str, np.ndarray]) -> None:
        n = int(reference["grid_size"])
        for (df1, df2, angle, kv, cs, w, pixel), expected in zip(
            reference["parameters"], reference["ctf"], strict=True
        ):
            # The reference grid: x = rows (fftfreq), y = columns (rfftfreq).
            x, y = np.meshgrid(np.fft.fftfreq(n, pixel), np.fft.rfftfreq(n, pixel), indexing="ij")
            voltage = _voltage_kV_for_wavelength(_cistem_wavelength_A(kv))
            ours = ctf_at_frequencies(
                torch.as_tensor(x), torch.as_tensor(y), CTFBatch.from_values(df1, df2, angle, voltage, cs, w, dtype=F64)
            )
            np.testing.assert_allclose(ours.numpy(), -expected, rtol=0.0, atol=3e-4)

    def test_batched_rfft_with_cistem_wavelength(self, reference: dict[str, np.ndarray]) -> None:
        """All nine sets in one batch (mixed pixel sizes) on our grid, with our angle = 90 deg - theirs."""
        df1, df2, angle, kv, cs, w, pixel = torch.as_tensor(reference["parameters"]).T
        voltage = torch.as_tensor(_voltage_kV_for_wavelength(_cistem_wavelength_A(kv.numpy())))
        ours = ctf_rfft(128, pixel, CTFBatch.from_values(df1, df2, 90.0 - angle, voltage, cs, w))
        np.testing.assert_allclose(ours.numpy(), -reference["ctf"], rtol=0.0, atol=3e-4)
        # The same angle without the transposition is far off for the astigmatic sets: the check has teeth.
        wrong = ctf_rfft(128, pixel, CTFBatch.from_values(df1, df2, angle, voltage, cs, w))
        assert np.abs(wrong.numpy()[3] + reference["ctf"][3]).max() > 1.0

    def test_batched_rfft_with_relion_wavelength(self, reference: dict[str, np.ndarray]) -> None:
        """With our own wavelength the 3.3e-5 relative difference moves values by up to ~2e-2 near Nyquist."""
        df1, df2, angle, kv, cs, w, pixel = torch.as_tensor(reference["parameters"]).T
        ours = ctf_rfft(128, pixel, CTFBatch.from_values(df1, df2, 90.0 - angle, kv, cs, w)).numpy()
        difference = np.abs(ours + reference["ctf"])
        assert difference.max() < 2.5e-2
        s = np.hypot(*_numpy_rfft_grid(128, 1.0))[None] / reference["parameters"][:, 6, None, None]
        assert difference[s < 0.1].max() < 1e-3


class TestCryodrgnFormula:
    """ours == -cryoDRGN (its sqrt(1-w^2) sin(gamma) - w cos(gamma) form), with the same wavelength."""

    def test_float64(self) -> None:
        rng = np.random.default_rng(0)
        params = _random_parameters(rng, 6)
        n, pixel = 64, 1.3
        ours = ctf_rfft(n, pixel, CTFBatch.from_values(**_torch_parameters(params, F64)))
        assert ours.dtype == F64 and ours.shape == (6, n, n // 2 + 1)
        expected = -_cryodrgn_from_parameters(*_numpy_rfft_grid(n, pixel), params)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=0.0, atol=1e-10)

    def test_float32(self) -> None:
        """float32 cannot do better than rounding chi itself: a few float32 spacings at the largest |chi|."""
        rng = np.random.default_rng(1)
        params = _random_parameters(rng, 6)
        n, pixel = 128, 1.0
        ours = ctf_rfft(n, pixel, CTFBatch.from_values(**_torch_parameters(params, torch.float32)))
        assert ours.dtype == torch.float32
        kx, ky = _numpy_rfft_grid(n, pixel)
        expected = -_cryodrgn_from_parameters(kx, ky, params)
        error = np.abs(ours.numpy() - expected)
        s2 = kx**2 + ky**2
        # Everywhere (|chi| < 1600 rad), and below 0.1 1/A (|chi| < 32 rad).
        for region in (s2 <= s2.max(), s2 < 0.1**2):
            max_chi = np.pi * 0.0335 * 30000.0 * s2[region].max()  # bound on |chi|: 120 kV, 3 um
            assert error[:, region].max() < 4.0 * np.spacing(np.float32(max_chi))

    def test_full_grid(self) -> None:
        rng = np.random.default_rng(2)
        params = _random_parameters(rng, 3)
        n, pixel = 33, 2.1  # odd box: the centre is still (N//2, N//2)
        ours = ctf_full_grid(n, pixel, CTFBatch.from_values(**_torch_parameters(params, F64)))
        assert ours.shape == (3, n, n)
        k = np.fft.fftshift(np.fft.fftfreq(n, pixel))
        kx, ky = np.meshgrid(k, k, indexing="xy")
        expected = -_cryodrgn_from_parameters(kx, ky, params)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=0.0, atol=1e-10)
        # Its centre is the zero frequency, where only the constant phase remains.
        centre = np.sin(np.deg2rad(params["phase_shift_deg"]) + np.arcsin(params["amplitude_contrast"]))
        np.testing.assert_allclose(ours[:, n // 2, n // 2].numpy(), centre * params["scale"], atol=1e-14)


def _default_ctf(**overrides: float | torch.Tensor) -> torch.Tensor:
    """A float64 CTF for one typical particle (N = 64, 1.5 A) with some parameters replaced."""
    params: dict[str, float | torch.Tensor] = {
        "pixel_size_A": 1.5, "defocus_u_A": torch.tensor([15000.0], dtype=F64), "defocus_v_A": 13000.0,
        "defocus_angle_deg": 25.0, "voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1,
    }  # fmt: skip
    params.update(overrides)
    pixel_size_A = params.pop("pixel_size_A")
    return ctf_rfft(64, pixel_size_A, CTFBatch.from_values(**params))


def test_phase_shift_90_without_amplitude_contrast_gives_cosine() -> None:
    ctf = _default_ctf(amplitude_contrast=0.0, phase_shift_deg=90.0, scale=0.7)
    assert float(ctf[0, 0, 0]) == pytest.approx(0.7, abs=1e-15)
    plain = _default_ctf(amplitude_contrast=0.0, phase_shift_deg=0.0)  # sin(chi0)
    cosine = ctf / 0.7  # cos(chi0) = sin(chi0 + pi/2)
    torch.testing.assert_close(cosine.square() + plain.square(), torch.ones_like(plain), rtol=0.0, atol=1e-12)
    # Below 0.02 1/A, |chi0| < 0.4 rad: cos(chi0) = cos(asin(sin chi0)), sign included.
    kx, ky = rfft_frequencies_A(64, 1.5, dtype=F64)
    low = kx.square() + ky.square() < 0.02**2
    torch.testing.assert_close(cosine[0][low], torch.cos(torch.asin(plain[0][low])), rtol=0.0, atol=1e-12)


def test_bfactor_envelope_and_scale() -> None:
    plain = _default_ctf()
    damped = _default_ctf(bfactor_A2=torch.tensor([80.0], dtype=F64), scale=torch.tensor([2.5], dtype=F64))
    kx, ky = rfft_frequencies_A(64, 1.5, dtype=F64)
    envelope = torch.exp(-80.0 * (kx.square() + ky.square()) / 4.0)
    torch.testing.assert_close(damped, plain * envelope * 2.5, rtol=1e-12, atol=1e-15)
    # Python float and tensor B-factor 0 agree exactly; at Nyquist the envelope is tiny, not 1.
    torch.testing.assert_close(_default_ctf(bfactor_A2=torch.zeros(1, dtype=F64)), plain, rtol=0.0, atol=0.0)
    assert float(envelope[0, 32]) == pytest.approx(math.exp(-80.0 / (4.0 * 3.0**2)), rel=1e-12)


def test_rotating_astigmatism_by_90_and_swapping_defoci_is_identity() -> None:
    ctf = _default_ctf()
    swapped = _default_ctf(defocus_u_A=torch.tensor([13000.0], dtype=F64), defocus_v_A=15000.0,
                           defocus_angle_deg=25.0 + 90.0)  # fmt: skip
    torch.testing.assert_close(swapped, ctf, rtol=0.0, atol=1e-12)
    # Not trivially so: the angle alone matters.
    assert (_default_ctf(defocus_angle_deg=115.0) - ctf).abs().max() > 0.5


def test_mixed_pixel_sizes_in_one_batch_equal_separate_calls() -> None:
    rng = np.random.default_rng(3)
    params = _torch_parameters(_random_parameters(rng, 4), F64)
    pixel_sizes = torch.tensor([0.8, 1.0, 1.7, 3.2], dtype=F64)
    batched = ctf_rfft(48, pixel_sizes, CTFBatch.from_values(**params))
    for i in range(4):
        one = {key: value[i : i + 1] for key, value in params.items()}
        single = ctf_rfft(48, float(pixel_sizes[i]), CTFBatch.from_values(**one))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0.0, atol=1e-12)


def test_dtypes_shapes_and_python_floats() -> None:
    floats = ctf_rfft(16, 1.0, CTFBatch.from_values(10000.0, 9000.0, 10.0, 300.0, 2.7, 0.1))
    assert floats.shape == (16, 9) and floats.dtype == torch.get_default_dtype()
    f32 = ctf_rfft(16, 1.0, CTFBatch.from_values(torch.tensor([10000.0, 20000.0]), 9000.0, 10.0, 300.0, 2.7, 0.1))
    assert f32.shape == (2, 16, 9) and f32.dtype == torch.float32
    f64 = ctf_rfft(
        16, 1.0, CTFBatch.from_values(torch.tensor([10000.0, 20000.0], dtype=F64), 9000.0, 10.0, 300.0, 2.7, 0.1)
    )
    assert f64.dtype == F64
    torch.testing.assert_close(f32, f64.float(), rtol=0.0, atol=2e-4)  # |chi| <= 310 rad: float32 rounding
    torch.testing.assert_close(floats, f32[:1].squeeze(0), rtol=0.0, atol=0.0)


def test_gradient_wrt_defocus_is_finite_and_correct() -> None:
    defocus = torch.tensor([12000.0, 25000.0], dtype=F64, requires_grad=True)
    ctf = ctf_rfft(16, 1.2, CTFBatch.from_values(defocus, defocus.detach() - 500.0, 30.0, 300.0, 2.7, 0.07))
    (grad,) = torch.autograd.grad(ctf.square().sum(), defocus)
    assert torch.isfinite(grad).all() and (grad != 0).all()
    torch.autograd.gradcheck(
        lambda df: ctf_rfft(8, 1.2, CTFBatch.from_values(df, 11000.0, 30.0, 300.0, 2.7, 0.07, bfactor_A2=50.0)),
        (defocus,),
    )


def test_grid_cached_under_inference_mode_still_supports_autograd() -> None:
    with torch.inference_mode():
        first_use_of_23 = CTFBatch.from_values(torch.tensor([10000.0]), 9000.0, 10.0, 300.0, 2.7, 0.1)
        ctf_rfft(23, 1.0, first_use_of_23)
    defocus = torch.tensor([10000.0], requires_grad=True)
    ctf_rfft(23, 1.0, CTFBatch.from_values(defocus, 9000.0, 10.0, 300.0, 2.7, 0.1)).sum().backward()
    assert defocus.grad is not None and torch.isfinite(defocus.grad).all()
