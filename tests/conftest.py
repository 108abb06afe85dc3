"""Shared fixtures: the test data folder (see tests/data/SOURCES.md)."""

from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real files copied from the shared data pack."""
    return DATA_DIR
