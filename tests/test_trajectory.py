"""MD trajectories (PSF + DCD) read as structure ensembles, consistent with the PDB reader."""

import numpy as np
import pytest

from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import read_structure
from cryoflex.io.trajectory import atomic_numbers_from_masses, read_trajectory


def test_adk_trajectory_frames_and_residues(data_dir):
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd")
    # The DCD header claims 500 frames; the file holds 98.
    assert ensemble.coords_A.shape == (98, 214, 3)
    assert set(ensemble.chain_ids) == {"A"}
    assert ensemble.residue_numbers[0] == 1 and ensemble.residue_numbers[-1] == 214


def test_trajectory_amplitudes_match_pdb_reader(data_dir):
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=50)
    structure = read_structure(data_dir / "adk_closed.pdb")
    np.testing.assert_array_equal(ensemble.amplitudes_e, structure.amplitudes_e)
    assert list(ensemble.residue_names) == list(structure.residue_names)


def test_atomic_numbers_from_masses():
    np.testing.assert_array_equal(
        atomic_numbers_from_masses(np.array([1.008, 12.011, 14.007, 15.999, 32.06, 3.0])), [1, 6, 7, 8, 16, 1]
    )


def test_missing_trajectory_names_file(data_dir, tmp_path):
    with pytest.raises(CryoflexInputError, match="nothing.dcd"):
        read_trajectory(data_dir / "adk.psf", tmp_path / "nothing.dcd")
