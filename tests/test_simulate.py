"""Simulation round trip: write a small dataset, read it back with cryoflex's readers, re-render the clean images."""

import numpy as np
import pytest
import torch

from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.formation import ImageFormation
from cryoflex.io.metadata import read_metadata
from cryoflex.io.particles import ParticleStack, open_particle_images
from cryoflex.io.trajectory import read_trajectory
from cryoflex.simulate import SimulationConfig, simulate_dataset


def _simulate(data_dir, out, seed=0):
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=20)
    config = SimulationConfig(
        n_images=24,
        box_size_px=48,
        pixel_size_A=2.5,
        snr=0.1,
        shift_std_A=3.0,
        images_per_file=10,
        batch_size=8,
        seed=seed,
        save_clean=True,
        astigmatism_max_A=300,
    )
    return simulate_dataset(ensemble, config, out, progress=False)


def tensor(values) -> torch.Tensor:
    return torch.tensor(np.array(values), dtype=torch.float64)


def test_round_trip_rerenders_clean_images(data_dir, tmp_path):
    star = _simulate(data_dir, tmp_path / "sim")
    metadata = read_metadata(star)
    truth = np.load(tmp_path / "sim" / "truth.npz")
    assert metadata.n_particles == 24
    np.testing.assert_allclose(metadata.rotations, truth["rotations"], atol=1e-5)
    clean_dir_stack = [p.replace("stacks/", "clean/") for p in metadata.image_paths]
    clean = ParticleStack(clean_dir_stack, metadata.image_indices, base_dir=star.parent)
    ctf = metadata.ctf
    ctf_batch = CTFBatch.from_values(
        tensor(ctf.defocus_u_A),
        tensor(ctf.defocus_v_A),
        tensor(ctf.defocus_angle_deg),
        tensor(ctf.voltage_kV),
        tensor(ctf.cs_mm),
        tensor(ctf.amplitude_contrast),
    )
    coords = tensor(truth["conformations_A"])[truth["conformation_index"]]
    rerendered = ImageFormation(48, 2.5, 2.0).images(
        coords,
        tensor(truth["amplitudes_e"]),
        PoseBatch(tensor(metadata.rotations), tensor(metadata.shifts_A)),
        ctf_batch,
    ).numpy()
    written = clean[np.arange(24)]
    scale = np.abs(written).max()
    assert np.abs(rerendered - written).max() < 1e-3 * scale
    noisy = open_particle_images(metadata)[np.arange(24)]
    measured_snr = written.var(axis=(1, 2)).mean() / (noisy - written).var()
    assert 0.07 < measured_snr < 0.14


def test_deterministic_for_seed(data_dir, tmp_path):
    star_a = _simulate(data_dir, tmp_path / "a")
    star_b = _simulate(data_dir, tmp_path / "b")
    star_c = _simulate(data_dir, tmp_path / "c", seed=1)
    images = [open_particle_images(read_metadata(s))[np.arange(24)] for s in (star_a, star_b, star_c)]
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.allclose(images[0], images[2])


def test_cli_simulate_from_trajectory(data_dir, tmp_path):
    """With --noise-spectrum the spectrum reaches the simulation (recorded in truth.npz)."""
    from cryoflex.cli import main

    spectrum = tmp_path / "spectrum.csv"
    spectrum.write_text("frequency_per_A,power\n0.0,5.0\n0.1,1.0\n")
    args = [
        "simulate",
        "--noise-spectrum",
        str(spectrum),
        "--topology",
        str(data_dir / "adk.psf"),
        "--trajectory",
        str(data_dir / "adk_dims.dcd"),
        "--out",
        str(tmp_path / "cli"),
        "--n-images",
        "6",
        "--box-size-px",
        "32",
        "--no-progress",
    ]
    assert main(args) == 0
    assert read_metadata(tmp_path / "cli" / "particles.star").n_particles == 6
    assert (tmp_path / "cli" / "nominal.pdb").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "cli" / "truth.npz")["noise_spectrum"], [[0.0, 5.0], [0.1, 1.0]])


def test_cli_simulate_without_ensemble_is_a_clear_error(tmp_path, capsys):
    from cryoflex.cli import main

    assert main(["simulate", "--out", str(tmp_path), "--n-images", "3"]) == 2
    assert "--structure" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "value"),
    [("n_images", 0), ("snr", -1.0), ("snr", float("nan")), ("pixel_size_A", float("inf")), ("voltage_kV", 0.0),
     ("amplitude_contrast", 2.0), ("defocus_max_A", 5000.0), ("shift_std_A", -1.0), ("batch_size", 0)],
)  # fmt: skip
def test_settings_that_would_write_nan_or_no_images_are_refused(setting: str, value: float) -> None:
    """Before, a negative or NaN SNR, a voltage of 0 or an amplitude contrast of 2 wrote NaN images and exited 0."""
    with pytest.raises(CryoflexInputError, match="--" + setting.replace("_", "-")) as refused:
        SimulationConfig(**{"n_images": 4, setting: value})
    assert refused.value.field == setting


def test_cli_simulate_refuses_to_overwrite_a_dataset_or_a_file(data_dir, tmp_path, capsys):
    from cryoflex.cli import main

    ensemble = ["--topology", str(data_dir / "adk.psf"), "--trajectory", str(data_dir / "adk_dims.dcd")]
    small = ["--n-images", "2", "--box-size-px", "16", "--no-progress"]
    assert main(["simulate", *ensemble, "--out", str(tmp_path / "sim"), *small]) == 0
    star = (tmp_path / "sim" / "particles.star").read_bytes()
    assert main(["simulate", *ensemble, "--out", str(tmp_path / "sim"), *small, "--seed", "1"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert (tmp_path / "sim" / "particles.star").read_bytes() == star
    (tmp_path / "afile").write_text("kept")
    assert main(["simulate", *ensemble, "--out", str(tmp_path / "afile"), *small]) == 2
    assert "writes a directory" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "kept"
    both = ["--structure", str(data_dir / "adk_open.pdb"), *ensemble]
    assert main(["simulate", *both, "--out", str(tmp_path / "other"), *small]) == 2
    assert "both --structure and --topology" in capsys.readouterr().err
    weights = tmp_path / "weights.txt"
    weights.write_text("abc\n")
    assert main(["simulate", *ensemble, "--weights", str(weights), "--out", str(tmp_path / "w"), *small]) == 2
    err = capsys.readouterr().err
    assert "weights.txt" in err and "Traceback" not in err
