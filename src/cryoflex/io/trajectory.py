"""MD trajectories (any topology + trajectory pair MDAnalysis reads, e.g. CHARMM PSF + DCD) as a structure ensemble.

MDAnalysis is an optional dependency (`pip install cryoflex[md]`). One pseudo-atom per residue, as in io/structure.py:
C-alpha for amino acids, C1' for nucleotides; residue amplitude = electrons of its heavy atoms, with each atom's element
taken from its mass (topologies such as PSF carry masses but no elements).

Periodic boxes: MD engines write molecules wrapped into the unit cell, split across its faces (GROMACS, NAMD). When a
frame has unit-cell dimensions, each chain is made whole by continuity along the chain: every residue is placed at the
minimum image of its step from the previous residue (steps are ~3.8 A, far below half a box). The other chains are
then placed at the minimum image of their centroid from the first chain's centroid, and the whole molecule is moved by
a box vector so that its centroid lies in the unit cell. Limitation: a complex whose chain centroids lie more than half
a box apart along some axis is assembled wrongly (the chains stay whole); such systems should be made whole with the
MD package (e.g. `gmx trjconv -pbc mol`) first. Chains: see chain_ids_from_topology. Chain breaks are logged (see
io/structure.py); after unwrapping, steps over 10 A, impossible in an MD system, are logged as a likely split molecule.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import Structure, chain_id_sequence, warn_chain_gaps

logger = logging.getLogger(__name__)

# (mass in Da, atomic number) of the heavy elements found in biomolecules; an atom takes the element of nearest mass.
_HEAVY_ELEMENTS = np.array(
    [(12.011, 6), (14.007, 7), (15.999, 8), (30.974, 15), (32.06, 16), (24.305, 12), (78.971, 34)]
)
_HYDROGEN_MAX_MASS_DA = 4.5  # H and D (hydrogen mass repartitioning can give ~3 Da)
_SPLIT_STEP_A = 10.0  # a step between consecutive residues of an MD chain this long means a molecule split by the box


def atomic_numbers_from_masses(masses_Da: np.ndarray) -> np.ndarray:
    """Atomic number of each atom from its mass: 1 for hydrogen (<= 4.5 Da), else the heavy element of nearest mass."""
    masses_Da = np.asarray(masses_Da, dtype=np.float64)
    nearest = np.abs(masses_Da[:, None] - _HEAVY_ELEMENTS[None, :, 0]).argmin(axis=1)
    return np.where(masses_Da <= _HYDROGEN_MAX_MASS_DA, 1, _HEAVY_ELEMENTS[nearest, 1]).astype(np.int64)


def chain_ids_from_topology(segids: list[str], resids: np.ndarray) -> np.ndarray:
    """Chain ids (A, B, ...; structure.chain_id_sequence) in order of appearance: one per MD segment such as '4AKE',
    and a new one where residue numbers restart inside a segment (GROMACS .gro files put every chain in one segment)."""
    pieces = [0]
    for i in range(1, len(segids)):
        restart = segids[i] == segids[i - 1] and resids[i] <= resids[i - 1]
        pieces.append(pieces[-1] + 1 if restart else pieces[-1])
    keys = list(zip(segids, pieces, strict=True))
    names = chain_id_sequence()
    order: dict[tuple[str, int], str] = {}
    for key in keys:
        if key not in order:
            order[key] = next(names)
    return np.array([order[key] for key in keys])


def periodic_box(dimensions: np.ndarray | None) -> np.ndarray | None:
    """A frame's unit cell [a, b, c (A), alpha, beta, gamma (deg)], or None if it has none (or a zero one)."""
    if dimensions is None:
        return None
    box = np.asarray(dimensions, dtype=np.float64)
    return box if box.shape == (6,) and np.isfinite(box).all() and (box > 0).all() else None


def make_whole(positions_A: np.ndarray, chain_ids: np.ndarray, box: np.ndarray) -> np.ndarray:
    """One frame's pseudo-atoms (n, 3) made whole under a periodic box (see the module docstring for the method)."""
    from MDAnalysis.lib.distances import apply_PBC, minimize_vectors

    whole = np.asarray(positions_A, dtype=np.float64).copy()
    chains = [np.flatnonzero(chain_ids == chain) for chain in dict.fromkeys(chain_ids.tolist())]
    for index in (chain for chain in chains if len(chain) > 1):
        steps = minimize_vectors(np.diff(whole[index], axis=0), box)
        whole[index[1:]] = whole[index[0]] + np.cumsum(steps, axis=0)
    first_centroid = whole[chains[0]].mean(axis=0)
    for index in chains[1:]:
        offset = whole[index].mean(axis=0) - first_centroid
        whole[index] += minimize_vectors(offset[None], box)[0] - offset
    centroid = whole.mean(axis=0)
    return whole + (apply_PBC(centroid[None], box)[0] - centroid)


def _warn_split_molecule(structure: Structure, source: str | Path, n_made_whole: int) -> None:
    """Chain breaks by name; steps over 10 A loudly, since an MD system has no missing residues."""
    split = [gap for gap in warn_chain_gaps(structure, source) if gap.distance_A > _SPLIT_STEP_A]
    if not split:
        return
    largest = max(split, key=lambda gap: gap.distance_A)
    cause = (
        "the trajectory has no unit cell to make it whole with"
        if n_made_whole == 0
        else "making it whole by continuity along the chains did not join it"
    )
    logger.warning(
        "%s: %d step(s) between consecutive residues longer than %.0f A (largest: %s): the molecule looks split "
        "across the periodic box and %s. The frames are used as they are; make the molecule whole first "
        "(e.g. gmx trjconv -pbc mol, or MDAnalysis transformations.unwrap) if this is not intended",
        source, len(split), _SPLIT_STEP_A, largest, cause,
    )  # fmt: skip


def read_trajectory(topology_path: str | Path, trajectory_path: str | Path, *, stride: int = 1) -> Structure:
    """Every `stride`-th frame of a trajectory as a multi-model Structure (coordinates in A, as in the trajectory)."""
    # MDAnalysis logs its own notes (netCDF4 missing, attributes guessed) that say nothing about the user's files
    logging.getLogger("MDAnalysis").setLevel(logging.ERROR)
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

    chain_ids = chain_ids_from_topology([str(s) for s in residues.segids], residues.resids)
    frames = []
    n_made_whole = 0
    for timestep in universe.trajectory[::stride]:
        positions_A = pseudo_atoms.positions.astype(np.float64)
        box = periodic_box(timestep.dimensions)
        if box is not None:
            positions_A = make_whole(positions_A, chain_ids, box)
            n_made_whole += 1
        frames.append(positions_A)
    logger.info("read %d frames x %d residues from %s", len(frames), len(residues), trajectory_path)
    if n_made_whole:
        logger.info("made the molecule whole under the periodic box in %d of %d frames", n_made_whole, len(frames))
    structure = Structure(
        coords_A=np.stack(frames),
        chain_ids=chain_ids,
        residue_numbers=residues.resids.astype(np.int64),
        insertion_codes=np.array([""] * len(residues)),
        residue_names=np.array([str(n) for n in residues.resnames]),
        atom_names=np.array([str(n) for n in pseudo_atoms.names]),
        amplitudes_e=amplitudes_e,
        source_path=str(trajectory_path),
    )
    _warn_split_molecule(structure, trajectory_path, n_made_whole)
    return structure
