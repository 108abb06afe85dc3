"""End to end: simulate the AdK closed -> open motion, train on the CPU, recover the motion per image.

The nominal structure is the closed state (trajectory frame 0); every image comes from one of the 98 frames. Predicting
the nominal structure for every image gives a median C-alpha RMSD of ~4.7 A; the per-particle structures analysis
reports (posterior means: importance-weighted draws of q(z | image)) must do far better and order the images by
their LID-NMP opening.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.analysis.metrics import domain_f1, recovery_summary
from cryoflex.analysis.predict import particle_posteriors, posterior_structures
from cryoflex.config import load_config
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset
from cryoflex.train.loop import train
from cryoflex.train.setup import prepare_inputs

pytestmark = pytest.mark.slow  # trains a model end to end: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def recovered(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(2)
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd")
    out = tmp_path_factory.mktemp("recovery")
    simulation = SimulationConfig(
        n_images=2000, box_size_px=32, pixel_size_A=4.0, sigma_A=2.0, snr=0.1, seed=11,
        defocus_min_A=5000.0, defocus_max_A=20000.0,
    )  # fmt: skip
    star = simulate_dataset(ensemble, simulation, out / "data", progress=False)
    config = load_config(None, dict(
        particles=str(star), structure=str(out / "data" / "nominal.pdb"), epochs=8, segments=6, sigma_A=3.0,
        progress=False, device="cpu", seed=0, threads=2,
    ))  # fmt: skip
    model = train(config, out / "run").model
    dataset = prepare_inputs(config, out / "run", progress=False).dataset

    def analysed() -> np.ndarray:
        posterior = particle_posteriors(model, dataset, weighted=True, samples=16, seed=0)
        return np.concatenate([chunk.coords_A for chunk in posterior_structures(model, posterior, samples=16, seed=0)])

    predicted = analysed()
    truth = np.load(out / "data" / "truth.npz")
    numbers = ensemble.residue_numbers
    lid, nmp = (numbers >= 122) & (numbers <= 159), (numbers >= 30) & (numbers <= 59)
    summary = recovery_summary(
        predicted, truth["conformations_A"][truth["conformation_index"]], model.nominal_coords_A.numpy(), lid, nmp
    )
    domains = np.where(lid, 2, np.where(nmp, 1, 0))
    segments = model.segmentation(False).argmax(1).numpy()
    summary["nmp_f1"], summary["lid_f1"] = domain_f1(segments, domains, 1), domain_f1(segments, domains, 2)
    summary["decoded_again"] = analysed()
    summary["predicted"] = predicted
    return summary


def test_recovers_the_motion_far_beyond_the_baseline(recovered: dict) -> None:
    print({k: v for k, v in recovered.items() if not isinstance(v, np.ndarray)})
    assert recovered["baseline_median_rmsd_A"] > 4.0
    # 1.45 A and r 0.945 here (16 draws); q's mean alone gives 2.83 A and r 0.68 (2.37 A, 0.86 without dropout)
    assert recovered["median_rmsd_A"] < 0.4 * recovered["baseline_median_rmsd_A"]
    assert recovered["distance_correlation"] > 0.9


def test_segments_follow_the_domains(recovered: dict) -> None:
    # The six initial equal segments score F1 0.70 (NMP 30-59) and 0.59 (LID 122-159). The learned NMP segment tends
    # to take residues 60-72 along: in this trajectory they move 3-6 A with the NMP domain (a hinge), which the
    # textbook domain boundaries count as CORE.
    assert recovered["nmp_f1"] > 0.72 and recovered["lid_f1"] > 0.75


def test_decoding_is_deterministic(recovered: dict) -> None:
    np.testing.assert_array_equal(recovered["decoded_again"], recovered["predicted"])
