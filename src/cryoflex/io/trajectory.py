"""MD trajectories (any topology + trajectory pair MDAnalysis reads, e.g. CHARMM PSF + DCD) as a structure ensemble.

MDAnalysis is an optional dependency (`pip install cryoflex[md]`). One pseudo-atom per residue, as in io/structure.py:
C-alpha for amino acids, C1' for nucleotides; residue amplitude = electrons of its heavy atoms, with each atom's element
taken from its mass (topologies such as PSF carry masses but no elements).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import Structure

logger = logging.getLogger(__name__)

# (mass in Da, atomic number) of the heavy elements found in biomolecules; an atom takes the element of nearest mass.
_HEAVY_ELEMENTS = np.array(
    [(12.011, 6), (14.007, 7), (15.999, 8), (30.974, 15), (32.06, 16), (24.305, 12), (78.971, 34)]
)
_HYDROGEN_MAX_MASS_DA = 4.5  # H and D (hydrogen mass repartitioning can give ~3 Da)


def atomic_numbers_from_masses(masses_Da: np.ndarray) -> np.ndarray:
    """Atomic number of each atom from its mass: 1 for hydrogen (<= 4.5 Da), else the heavy element of nearest mass."""
    masses_Da = np.asarray(masses_Da, dtype=np.float64)
    nearest = np.abs(masses_Da[:, None] - _HEAVY_ELEMENTS[None, :, 0]).argmin(axis=1)
    return np.where(masses_Da <= _HYDROGEN_MAX_MASS_DA, 1, _HEAVY_ELEMENTS[nearest, 1]).astype(np.int64)


def _chain_ids_from_segments(segids: list[str]) -> np.ndarray:
    """One-letter chain ids (A, B, ...) for MD segment names such as '4AKE', in order of appearance (PDB holds one)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    order: dict[str, str] = {}
    for segid in segids:
        if segid not in order:
            order[segid] = letters[len(order) % len(letters)]
    return np.array([order[s] for s in segids])


def read_trajectory(topology_path: str | Path, trajectory_path: str | Path, *, stride: int = 1) -> Structure:
    """Every `stride`-th frame of a trajectory as a multi-model Structure (coordinates in A, as in the trajectory)."""
    try:
        import MDAnalysis as mda
    except ImportError as error:
        raise CryoflexInputError(
            trajectory_path,
            "reading MD trajectories needs MDAnalysis",
            "pip install 'cryoflex[md]' (or pip install MDAnalysis)",
        ) from error
    for path in (topology_path, trajectory_path):
        if not Path(path).exists():
            raise CryoflexInputError(path, "file not found", "check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            universe = mda.Universe(str(topology_path), str(trajectory_path))
    except Exception as error:  # MDAnalysis raises many types for unreadable files
        raise CryoflexInputError(
            trajectory_path,
            f"MDAnalysis could not read it with topology {topology_path}: {error}",
            "check that the topology matches the trajectory (same atoms, same order)",
        ) from error

    pseudo_atoms = universe.select_atoms("(protein and name CA) or (nucleic and name C1')")
    if len(pseudo_atoms) == 0:
        raise CryoflexInputError(
            topology_path,
            "no protein C-alpha or nucleotide C1' atom found",
            "give the topology of a protein or nucleic-acid system",
        )
    residues = pseudo_atoms.residues
    if len(residues) != len(pseudo_atoms):
        raise CryoflexInputError(
            topology_path, "some residues have more than one CA/C1' atom", "remove alternate copies from the topology"
        )
    atomic_numbers = atomic_numbers_from_masses(universe.atoms.masses)
    amplitudes_e = np.array(
        [atomic_numbers[r.atoms.ix][atomic_numbers[r.atoms.ix] > 1].sum() for r in residues], dtype=np.float64
    )

    frames = [pseudo_atoms.positions.astype(np.float64) for _ in universe.trajectory[::stride]]
    logger.info("read %d frames x %d residues from %s", len(frames), len(residues), trajectory_path)
    chain_ids = _chain_ids_from_segments([str(s) for s in residues.segids])
    return Structure(
        coords_A=np.stack(frames),
        chain_ids=chain_ids,
        residue_numbers=residues.resids.astype(np.int64),
        insertion_codes=np.array([""] * len(residues)),
        residue_names=np.array([str(n) for n in residues.resnames]),
        atom_names=np.array([str(n) for n in pseudo_atoms.names]),
        amplitudes_e=amplitudes_e,
        source_path=str(trajectory_path),
    )
