"""benchmarks/bayes_oracle.py: the exact likelihood of every frame, at the simulated box and at a cropped one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.data.downsample import fourier_crop
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bayes_oracle import _images, frame_log_likelihoods  # noqa: E402


@pytest.mark.parametrize("box_px", [32, 16])
def test_the_true_frame_leaves_only_the_noise(data_dir: Path, tmp_path: Path, box_px: int) -> None:
    """Nearly noise-free particles of narrow Gaussians (1 A on 2 A pixels, 4 A once cropped to 16 px, where sampling
    them at the pixels would miss most of their power): the oracle's render of each image's true frame leaves a
    residual of a millionth of the signal, the noise the simulation added, at the full box and cropped alike."""
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    simulation = SimulationConfig(n_images=8, box_size_px=32, pixel_size_A=2.0, sigma_A=1.0, snr=1e6, seed=2)
    simulate_dataset(ensemble, simulation, tmp_path, progress=False)
    log_likelihood, noise_variance = frame_log_likelihoods(tmp_path, box_px, 8)
    truth = np.load(tmp_path / "truth.npz")
    images = fourier_crop(torch.as_tensor(_images(tmp_path, 8)), box_px).numpy()
    signal_variance = float(images.var(axis=(1, 2)).mean())
    assert noise_variance < 1e-5 * signal_variance
    np.testing.assert_array_equal(log_likelihood.argmax(1), truth["conformation_index"][:8])


def test_coloured_noise_is_whitened_by_its_known_spectrum(data_dir: Path, tmp_path: Path) -> None:
    """The same seed draws the same white noise, which --noise-spectrum only colours: whitened by the recorded
    spectrum, the oracle's residual is that white noise again (its variance equal to 1e-3), and the true frame is
    the most likely one as in the white dataset."""
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    variances, best = [], []
    for name, spectrum in [("white", None), ("coloured", ((0.0, 30.0), (0.1, 1.0)))]:
        simulation = SimulationConfig(n_images=8, box_size_px=32, pixel_size_A=2.0, snr=5.0, seed=2,
                                      noise_spectrum=spectrum)  # fmt: skip
        simulate_dataset(ensemble, simulation, tmp_path / name, progress=False)
        log_likelihood, noise_variance = frame_log_likelihoods(tmp_path / name, 32, 8)
        variances.append(noise_variance)
        best.append(log_likelihood.argmax(1))
    assert variances[1] == pytest.approx(variances[0], rel=1e-3)
    np.testing.assert_array_equal(best[1], best[0])
