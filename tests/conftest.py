"""Shared fixtures: the test data folder (see tests/data/SOURCES.md); a fixed CPU thread count for every test."""

import os
from pathlib import Path

import pytest

# Training chooses its thread count by timing unless told (cryoflex.threads); results can differ in the last bits
# between thread counts, so tests that compare runs bit for bit need one fixed count. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# cryoflex's commands flush subnormal floats to zero before any torch work (cryoflex.threads.flush_denormals); the tests
# compute with the same arithmetic, whichever test happens to start a command first.
from cryoflex.threads import flush_denormals  # noqa: E402  (imports torch, after OMP_NUM_THREADS)

flush_denormals()

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real files copied from the shared data pack."""
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_adk_dataset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory written by simulate: 40 images, 32 px at 4 A/px, of 10 AdK trajectory frames.

    Shared read-only by the training and analysis tests (runs write into their own directories).
    """
    from cryoflex.io.trajectory import read_trajectory
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    out = tmp_path_factory.mktemp("tiny_adk")
    config = SimulationConfig(n_images=40, box_size_px=32, pixel_size_A=4.0, sigma_A=4.0, snr=1.0, seed=3)
    simulate_dataset(ensemble, config, out, progress=False)
    return out
