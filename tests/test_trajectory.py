"""MD trajectories (PSF + DCD) read as structure ensembles, consistent with the PDB reader."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import read_structure
from cryoflex.io.trajectory import (
    atomic_numbers_from_masses,
    chain_ids_from_topology,
    make_whole,
    periodic_box,
    read_trajectory,
)


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


ORTHORHOMBIC_BOX = np.array([62.0, 58.0, 60.0, 90.0, 90.0, 90.0])
TRICLINIC_BOX = np.array([62.0, 66.0, 70.0, 80.0, 85.0, 75.0])


def _write_wrapped_trajectory(data_dir, path, box, n_frames=4):
    """AdK frames moved across the box faces and wrapped into the unit cell (as GROMACS writes them), with or
    without the unit cell in the file; returns the C-alpha positions before wrapping."""
    import MDAnalysis as mda
    from MDAnalysis.lib.distances import apply_PBC

    universe = mda.Universe(str(data_dir / "adk.psf"), str(data_dir / "adk_dims.dcd"))
    calphas = universe.select_atoms("name CA")
    originals = []
    with warnings.catch_warnings(), mda.Writer(str(path), n_atoms=universe.atoms.n_atoms) as writer:
        warnings.simplefilter("ignore")  # DCD: "zeroed unitcell will be written" for frames without a cell
        for timestep in universe.trajectory[:n_frames]:
            originals.append(calphas.positions.astype(np.float64))
            cell = TRICLINIC_BOX if box is None else box
            universe.atoms.positions = apply_PBC(universe.atoms.positions + np.float32(55.0), cell)
            timestep.dimensions = box
            writer.write(universe.atoms)
    return np.stack(originals)


def _raw_calphas(data_dir, path):
    """The C-alpha positions of every frame of a trajectory, as the file holds them."""
    import MDAnalysis as mda

    calphas = mda.Universe(str(data_dir / "adk.psf"), str(path)).select_atoms("name CA")
    return np.stack([calphas.positions.astype(np.float64) for _ in calphas.universe.trajectory])


def _radius_of_gyration_A(coords_A):
    return float(np.sqrt(((coords_A - coords_A.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _max_step_A(coords_A):
    return float(np.linalg.norm(np.diff(coords_A, axis=-2), axis=-1).max())


@pytest.mark.parametrize("box", [ORTHORHOMBIC_BOX, TRICLINIC_BOX], ids=["orthorhombic", "triclinic"])
def test_molecule_split_across_the_periodic_box_is_made_whole(data_dir, tmp_path, box):
    path = tmp_path / "wrapped.dcd"
    originals = _write_wrapped_trajectory(data_dir, path, box)
    assert _max_step_A(_raw_calphas(data_dir, path)) > 40  # the file holds the molecule split across the box

    ensemble = read_trajectory(data_dir / "adk.psf", path)

    assert _max_step_A(ensemble.coords_A) < 4.5
    for frame, original in zip(ensemble.coords_A, originals, strict=True):
        assert _radius_of_gyration_A(frame) == pytest.approx(_radius_of_gyration_A(original), abs=1e-3)
        assert _radius_of_gyration_A(frame) == pytest.approx(16.4, abs=0.2)
        np.testing.assert_allclose(frame - frame.mean(axis=0), original - original.mean(axis=0), atol=1e-3)


def test_wrapped_trajectory_without_unit_cell_warns_loudly(data_dir, tmp_path, caplog):
    path = tmp_path / "wrapped_no_cell.dcd"
    _write_wrapped_trajectory(data_dir, path, None, n_frames=2)
    with caplog.at_level("WARNING", logger="cryoflex.io"):
        ensemble = read_trajectory(data_dir / "adk.psf", path)
    assert _max_step_A(ensemble.coords_A) > 10  # nothing to unwrap with: used as it is, but not silently
    assert "split across the periodic box" in caplog.text and "no unit cell" in caplog.text
    assert "chain A" in caplog.text  # the chain-break warning names the residues


def test_chains_are_made_whole_and_placed_together(data_dir):
    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=50)
    original = ensemble.coords_A[0]
    chain_ids = np.array(["A"] * 120 + ["B"] * 94)
    from MDAnalysis.lib.distances import apply_PBC
    from MDAnalysis.lib.mdamath import triclinic_vectors

    wrapped = apply_PBC((original + 25.0).astype(np.float32), TRICLINIC_BOX).astype(np.float64)
    wrapped[120:] += triclinic_vectors(TRICLINIC_BOX)[0]  # chain B in the next cell: one box vector away from A
    whole = make_whole(wrapped, chain_ids, TRICLINIC_BOX)
    assert _max_step_A(whole[:120]) < 4.5 and _max_step_A(whole[120:]) < 4.5
    np.testing.assert_allclose(whole - whole.mean(axis=0), original - original.mean(axis=0), atol=1e-3)
    centroid = whole.mean(axis=0)
    np.testing.assert_allclose(apply_PBC(centroid[None].astype(np.float32), TRICLINIC_BOX)[0], centroid, atol=1e-3)


def test_frames_without_unit_cell_are_unchanged(data_dir, caplog):
    with caplog.at_level("WARNING", logger="cryoflex.io"):
        ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd")
    assert _max_step_A(ensemble.coords_A) < 4.5
    assert "chain break" not in caplog.text
    assert periodic_box(None) is None and periodic_box(np.zeros(6)) is None


def test_chains_are_segments_and_residue_number_restarts():
    segids = ["4AKE"] * 3 + ["SYSTEM"] * 4 + ["4AKE"]
    resids = np.array([1, 2, 3, 1, 2, 1, 2, 5])  # a .gro file: two chains in one segment, numbering restarts
    assert chain_ids_from_topology(segids, resids).tolist() == ["A", "A", "A", "B", "B", "C", "C", "D"]


def test_every_chain_of_a_large_complex_keeps_its_own_id(tmp_path: Path) -> None:
    """80 segments (a ribosome's chains): 80 distinct ids, A-Z, a-z, 0-9, then two characters, written to a PDB file
    and read back unchanged."""
    from cryoflex.io.structure import Structure, write_structure

    segids = [f"S{k:03d}" for k in range(80) for _ in range(2)]
    resids = np.tile([1, 2], 80)
    ids = chain_ids_from_topology(segids, resids)
    assert len(set(ids)) == 80 and ids[0] == "A" and ids[2 * 26] == "a" and ids[2 * 62] == "AA"
    coords_A = np.stack([np.arange(160) * 3.8, np.zeros(160), np.zeros(160)], axis=-1)[None]
    structure = Structure(
        coords_A=coords_A, chain_ids=ids, residue_numbers=resids, insertion_codes=[""] * 160,
        residue_names=["ALA"] * 160, atom_names=["CA"] * 160, amplitudes_e=[33.0] * 160,
    )  # fmt: skip
    write_structure(tmp_path / "complex.pdb", structure)
    assert read_structure(tmp_path / "complex.pdb").chain_ids.tolist() == ids.tolist()
