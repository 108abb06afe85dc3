"""Atomic structures (PDB, mmCIF) as one pseudo-atom per polymer residue, read and written with gemmi.

Every amino acid becomes its C-alpha and every nucleotide its C1' atom; waters, ligands and ions are dropped.
All chains are kept, with their ids and residue numbers. A multi-model file is an ensemble: one coordinate set
per model, same residues in each. Alternate locations: gemmi keeps the first conformer (by PDB convention the
highest-occupancy one, A).

Residue amplitude = electrons of the residue's heavy (non-hydrogen) atoms, i.e. the sum of their atomic
numbers Z (glycine: N + CA + C + O = 7 + 6 + 6 + 8 = 27). At the low resolution a C-alpha Gaussian models, a
residue scatters in proportion to its electron count, so heavier residues weigh more; the overall scale does
not matter because the loss is a correlation. Hydrogens are left out because X-ray/EM models include them
inconsistently.

Elements: CHARMM-style PDB files leave the element column blank and left-align atom names, so gemmi guesses
the element from the first two letters of the name (CA -> calcium, HG1 -> mercury, CD -> cadmium, NE -> neon).
After reading, a guessed element cannot be told from a written one, but such guesses are never elements of a
biopolymer: any atom of a polymer residue whose element is not one of H, C, N, O, S, P, Se or a halogen gets
its element from its name as the PDB convention does for protein and nucleic-acid atoms (first letter after
leading digits: C, N, O, S, P or H).

Residue names: whatever gemmi's table knows as an amino acid (MSE and other modified ones included) or a
nucleotide, plus the force-field names it does not know: CHARMM/AMBER histidines HSD HSE HSP HID HIE HIP,
AMBER CYX CYM ASH GLH LYN, CHARMM nucleotides ADE CYT GUA THY URA and AMBER terminal nucleotides (DA5, RU3,
A5, ...).

Chains with a blank id (CHARMM files keep the segment in columns 73-76 instead) are named A, B, ... by
segment, in order of appearance, skipping ids already in use, so that the structure can be written as mmCIF
and selected in ChimeraX."""

from __future__ import annotations

import gzip
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gemmi
import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path

logger = logging.getLogger(__name__)

AMINO_ACID_ATOM = "CA"
NUCLEOTIDE_ATOM = "C1'"
_SKIPPED_SHOWN = 5  # residues named in the warning about residues skipped for lacking their CA / C1' atom
_NUCLEOTIDE_ATOM_OLD_NAME = "C1*"  # PDB format version 2 and some old programs
_FORCE_FIELD_AMINO_ACIDS = frozenset(
    {"HSD", "HSE", "HSP", "HID", "HIE", "HIP", "CYX", "CYM", "ASH", "GLH", "LYN"}
)
_FORCE_FIELD_NUCLEOTIDES = frozenset(
    {"ADE", "CYT", "GUA", "THY", "URA"}
    | {f"{sugar}{base}{end}" for sugar in ("D", "R") for base in "ACGTU" for end in ("", "5", "3")}
    | {f"{base}{end}" for base in "ACGU" for end in ("5", "3")}
)
_POLYMER_ELEMENTS = frozenset({"H", "D", "C", "N", "O", "S", "P", "Se", "F", "Cl", "Br", "I"})
_NAME_ELEMENTS = "CNOSPH"
_PDB_SUFFIXES = {".pdb", ".ent"}
_MMCIF_SUFFIXES = {".cif", ".mmcif"}
_CHAIN_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SNIFF_BYTES = 4096  # a NUL byte among the first 4 KiB marks a binary file
_GZIP_MAGIC = b"\x1f\x8b"  # gemmi reads gzipped PDB/mmCIF files
# Longest distance between the pseudo-atoms of consecutive residues bonded in a chain: C-alphas are 3.8 A apart
# (2.9 A for a cis peptide), C1' atoms of stacked nucleotides ~5.5 A and of fully stretched ones under ~9 A.
MAX_AMINO_ACID_STEP_A = 4.5
MAX_NUCLEOTIDE_STEP_A = 9.0
_GAPS_LISTED = 10
# A residue's heavy atoms in two groups, each of whose electron centroids can carry a Gaussian (docs/conventions.md,
# "Density"): the backbone (amino acids: N CA C O and the C-terminal oxygens; nucleotides: the phosphate and the
# sugar) and the rest (the side chain or the base). Old nucleotide names with * are read as '.
DENSITY_GROUPS = ("backbone", "side chain")
_BACKBONE_ATOMS = frozenset(
    {"N", "CA", "C", "O", "OXT", "OT1", "OT2", "OC1", "OC2"}  # the last four: CHARMM / GROMACS C-terminal oxygens
    | {"P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P", "O5'", "C5'", "C4'", "O4'", "C3'", "O3'", "C2'", "O2'", "C1'"}
)


@dataclass(frozen=True)
class Structure:
    """Pseudo-atom model: one CA/C1' per residue, coordinates for each model of an ensemble, in Angstrom."""

    coords_A: np.ndarray  # (n_models, n_residues, 3) float64
    chain_ids: np.ndarray  # (n_residues,) str
    residue_numbers: np.ndarray  # (n_residues,) int
    insertion_codes: np.ndarray  # (n_residues,) str, '' if none
    residue_names: np.ndarray  # (n_residues,) str
    atom_names: np.ndarray  # (n_residues,) str: 'CA' or "C1'"
    amplitudes_e: np.ndarray  # (n_residues,) float64: electrons of the residue's heavy atoms
    source_path: str | None = None
    # Where each residue's electrons are (docs/conventions.md, "Density"), for its two groups of heavy atoms
    # (DENSITY_GROUPS: the backbone, and the side chain or base); both None when unknown (trajectories, structures
    # built in code). (n_models, n_residues, 2, 3) float64: from the pseudo-atom to each group's electron-weighted
    # centroid, 0 for an empty group and where the file has the pseudo-atom only.
    density_offsets_A: np.ndarray | None = None
    # (n_residues, 2) float64: each group's share of the residue's heavy-atom electrons (1, 0 for a pseudo-atom alone)
    density_shares: np.ndarray | None = None

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords_A, dtype=np.float64)
        if coords.ndim != 3 or coords.shape[2] != 3 or coords.shape[0] < 1 or coords.shape[1] < 1:
            raise ValueError(f"coords_A must have shape (n_models, n_residues, 3), not {coords.shape}")
        if not np.isfinite(coords).all():
            raise ValueError("coords_A holds NaN or infinite values")
        object.__setattr__(self, "coords_A", coords)
        n_residues = coords.shape[1]
        for name, dtype in (("chain_ids", str), ("residue_numbers", np.int64), ("insertion_codes", str),
                            ("residue_names", str), ("atom_names", str), ("amplitudes_e", np.float64)):
            values = np.asarray(getattr(self, name), dtype=dtype)
            if values.shape != (n_residues,):
                raise ValueError(f"{name} must have shape ({n_residues},), got {values.shape}")
            object.__setattr__(self, name, values)
        if (self.density_offsets_A is None) != (self.density_shares is None):
            raise ValueError("density_offsets_A and density_shares are given together or not at all")
        if self.density_offsets_A is not None:
            groups = len(DENSITY_GROUPS)
            offsets = np.asarray(self.density_offsets_A, dtype=np.float64)
            shape = (*coords.shape[:2], groups, 3)
            if offsets.shape != shape or not np.isfinite(offsets).all():
                raise ValueError(f"density_offsets_A must be finite with shape {shape}, not {offsets.shape}")
            shares = np.asarray(self.density_shares, dtype=np.float64)
            if shares.shape != (n_residues, groups) or (shares < 0).any() or not np.allclose(shares.sum(1), 1.0):
                raise ValueError(f"density_shares must be ({n_residues}, {groups}) non-negative shares summing to 1")
            object.__setattr__(self, "density_offsets_A", offsets)
            object.__setattr__(self, "density_shares", shares)

    @property
    def n_models(self) -> int:
        return self.coords_A.shape[0]

    @property
    def n_residues(self) -> int:
        return self.coords_A.shape[1]

    @property
    def centroid_offsets_A(self) -> np.ndarray | None:
        """(n_models, n_residues, 3): from each pseudo-atom to its residue's heavy-atom electron centroid (None when
        unknown)."""
        if self.density_offsets_A is None or self.density_shares is None:
            return None
        return np.einsum("mngk,ng->mnk", self.density_offsets_A, self.density_shares)

    def chains(self) -> list[tuple[str, int]]:
        """(chain id, residue count) for each chain, in order of first appearance in the file."""
        return list(Counter(self.chain_ids.tolist()).items())

    def model(self, index: int) -> Structure:
        """The structure with only model `index` (negative indices count from the end)."""
        if not -self.n_models <= index < self.n_models:
            raise IndexError(f"model {index} out of range for {self.n_models} models")
        position = index % self.n_models
        offsets = None if self.density_offsets_A is None else self.density_offsets_A[position:position + 1]
        return replace(self, coords_A=self.coords_A[position:position + 1], density_offsets_A=offsets)

    def with_coords(self, coords_A: np.ndarray, *, translated: bool = False) -> Structure:
        """Same residues, new coordinates: (n_models, n_residues, 3), or (n_residues, 3) for one model.

        The density offsets are kept only for a translation of the same models (`translated`): any other move would
        turn the residues' centroids away from where the offsets point.
        """
        coords = np.asarray(coords_A, dtype=np.float64)
        coords = coords[None] if coords.ndim == 2 else coords
        if translated and coords.shape == self.coords_A.shape:
            return replace(self, coords_A=coords)
        return replace(self, coords_A=coords, density_offsets_A=None, density_shares=None)


@dataclass(frozen=True)
class _Selected:
    """One polymer residue of one model and its pseudo-atom."""

    chain_id: str
    segment: str
    residue: gemmi.Residue
    number: int  # the residue's sequence number (gemmi leaves it None when the column is blank)
    atom: gemmi.Atom

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.chain_id, self.number, self.residue.seqid.icode.strip(), self.residue.name)


def residue_kind(name: str) -> str | None:
    """'amino acid', 'nucleotide' or None (water, ligand, ion, unknown) for a residue name."""
    if name in _FORCE_FIELD_AMINO_ACIDS:
        return "amino acid"
    if name in _FORCE_FIELD_NUCLEOTIDES:
        return "nucleotide"
    info = gemmi.find_tabulated_residue(name)
    if info is not None and info.is_amino_acid():
        return "amino acid"
    if info is not None and info.is_nucleic_acid():
        return "nucleotide"
    return None


def atomic_number(atom: gemmi.Atom) -> int:
    """Atomic number of a polymer-residue atom, from its name where gemmi's element is a mis-guess."""
    if atom.element.name in _POLYMER_ELEMENTS:
        return atom.element.atomic_number
    letter = atom.name.lstrip("0123456789")[:1].upper()
    return gemmi.Element(letter).atomic_number if letter and letter in _NAME_ELEMENTS else 0


# Heavy-atom electrons of amino acids inside a chain (no OXT), for C-alpha-only files such as the ones cryoflex
# writes: from the residues' heavy-atom formulas (GLY = C2 N O = 27).
_CHAIN_AMINO_ACID_ELECTRONS = {
    "GLY": 27, "ALA": 33, "SER": 41, "CYS": 49, "VAL": 45, "THR": 47, "PRO": 45, "LEU": 51, "ILE": 51,
    "ASN": 54, "ASP": 55, "GLN": 60, "LYS": 58, "GLU": 61, "MET": 61, "HIS": 65, "PHE": 69, "ARG": 72,
    "TYR": 77, "TRP": 88, "MSE": 79, "HSD": 65, "HSE": 65, "HSP": 65, "HID": 65, "HIE": 65, "HIP": 65,
    "CYX": 49, "CYM": 49, "ASH": 55, "GLH": 61, "LYN": 58,
}  # fmt: skip


def residue_electrons(residue: gemmi.Residue) -> int:
    """Electrons of the residue's heavy atoms: sum of Z over its non-hydrogen atoms.

    A known amino acid present as its C-alpha alone (a C-alpha model) gets its full residue's count from a table,
    so a structure written by cryoflex reads back with the amplitudes it was written from.
    """
    heavy = [atom for atom in residue if not atom.is_hydrogen()]
    if len(heavy) == 1 and heavy[0].name == AMINO_ACID_ATOM and residue.name in _CHAIN_AMINO_ACID_ELECTRONS:
        return _CHAIN_AMINO_ACID_ELECTRONS[residue.name]
    numbers = [atomic_number(atom) for atom in residue]
    unknown = [atom.name for atom, z in zip(residue, numbers, strict=True) if z == 0]
    if unknown:
        logger.warning("residue %s %s: no element for atoms %s; they add no electrons", residue.name,
                       residue.seqid, ", ".join(unknown))
    return sum(z for z in numbers if z > 1)


def density_groups(residue: gemmi.Residue, pseudo_atom: gemmi.Atom) -> tuple[list[list[float]], list[float]]:
    """For the residue's two groups of heavy atoms (DENSITY_GROUPS): the offsets (A) from the pseudo-atom to each
    group's centroid weighted by the atoms' electrons, and each group's share of the electrons. A residue given by its
    pseudo-atom alone (or without known elements) gets offsets of exactly 0 and shares (1, 0)."""
    sums = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    electrons = [0, 0]
    for atom in residue:
        z = atomic_number(atom)
        if atom.is_hydrogen() or z <= 1:
            continue
        group = 0 if atom.name.replace("*", "'") in _BACKBONE_ATOMS else 1
        relative = atom.pos - pseudo_atom.pos
        electrons[group] += z
        for axis in range(3):
            sums[group][axis] += relative[axis] * z
    total = sum(electrons)
    if total == 0:
        return [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [1.0, 0.0]
    offsets = [[value / count if count else 0.0 for value in sums[group]] for group, count in enumerate(electrons)]
    return offsets, [count / total for count in electrons]


def _pseudo_atom(residue: gemmi.Residue, kind: str) -> gemmi.Atom | None:
    """The residue's CA (amino acid) or C1' (nucleotide) atom, or None if it has none."""
    names = (AMINO_ACID_ATOM,) if kind == "amino acid" else (NUCLEOTIDE_ATOM, _NUCLEOTIDE_ATOM_OLD_NAME)
    for name in names:
        atom = residue.find_atom(name, "*")
        if atom is not None:
            return atom
    return None


def _select_residues(model: gemmi.Model, path: Path) -> tuple[list[_Selected], Counter[str], list[str]]:
    """The model's polymer residues with their pseudo-atom, a count of the other residues, and the polymer residues
    skipped for lacking their pseudo-atom ("chain 'A' ALA 5 (no CA)")."""
    selected: list[_Selected] = []
    others: Counter[str] = Counter()
    skipped: list[str] = []
    for chain in model:
        for residue in chain:
            kind = residue_kind(residue.name)
            if kind is None:
                others[residue.name] += 1
                continue
            atom = _pseudo_atom(residue, kind)
            if atom is None:
                wanted = AMINO_ACID_ATOM if kind == "amino acid" else NUCLEOTIDE_ATOM
                others[f"{residue.name} without {wanted}"] += 1
                skipped.append(f"chain '{chain.name}' {residue.name} {residue.seqid} (no {wanted})")
                continue
            if residue.seqid.num is None:
                raise CryoflexInputError(path, f"chain '{chain.name}' residue {residue.name} has no residue number",
                                         "give every residue a number (PDB columns 23-26, mmCIF auth_seq_id)")
            selected.append(_Selected(chain.name.strip(), residue.segment.strip(), residue, residue.seqid.num, atom))
    return selected, others, skipped


def _describe_others(others: Counter[str]) -> str:
    """'HOH x 120, ATP x 2' for the most common residue names."""
    return ", ".join(f"{name} x {count}" for name, count in others.most_common(8))


def chain_id_sequence() -> Iterator[str]:
    """Chain ids to hand out in order: A-Z, a-z, 0-9, then two characters (AA, AB, ...), which PDB files still hold
    (columns 21-22) and mmCIF any."""
    yield from _CHAIN_LETTERS
    yield from (first + second for first in _CHAIN_LETTERS for second in _CHAIN_LETTERS)


def _name_blank_chains(selected: list[_Selected]) -> list[str]:
    """Chain ids of the residues; blank ones become unused ids, one per segment in order of appearance."""
    used = {s.chain_id for s in selected if s.chain_id}
    free = iter(name for name in chain_id_sequence() if name not in used)
    by_segment: dict[str, str] = {}
    for s in selected:
        if not s.chain_id and s.segment not in by_segment:
            by_segment[s.segment] = next(free)
            logger.info("blank chain id (segment '%s') named '%s'", s.segment, by_segment[s.segment])
    return [s.chain_id or by_segment[s.segment] for s in selected]


def _read_gemmi(path: Path) -> gemmi.Structure:
    """Parse a PDB or mmCIF file (format detected from its content); errors become CryoflexInputError."""
    if not path.is_file():
        raise CryoflexInputError(path, "file not found", "check the path")
    fix = "give a PDB or mmCIF coordinate file (check that the download or the program that wrote it finished)"
    if path.stat().st_size == 0:
        raise CryoflexInputError(path, "the file is empty (0 bytes), not a PDB or mmCIF structure", fix)
    with path.open("rb") as handle:
        start = handle.read(_SNIFF_BYTES)
    if b"\0" in start and not start.startswith(_GZIP_MAGIC):
        raise CryoflexInputError(path, "binary content: not a PDB or mmCIF text file", fix)
    try:
        structure = gemmi.read_structure(str(path), format=gemmi.CoorFormat.Detect)
    except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise CryoflexInputError(path, f"could not parse it as PDB or mmCIF: {error}", fix) from error
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise CryoflexInputError(path, "no atom records found: not a PDB or mmCIF structure, or one without atoms",
                                 fix)
    if structure.input_format == gemmi.CoorFormat.Pdb:
        _check_pdb_coordinates(path, start.startswith(_GZIP_MAGIC))
    _check_finite_positions(path, structure)
    structure.remove_alternative_conformations()
    return structure


def _check_pdb_coordinates(path: Path, gzipped: bool) -> None:
    """Refuse ATOM/HETATM records whose x, y, z columns (31-54) are not numbers: gemmi reads those as 0."""
    with (gzip.open(path, "rt", errors="replace") if gzipped else path.open(errors="replace")) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.startswith(("ATOM  ", "HETATM")):
                continue
            for axis, (first, last) in zip("xyz", ((30, 38), (38, 46), (46, 54)), strict=True):
                text = line[first:last]
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise CryoflexInputError(
                        path, f"line {number}: the {axis} coordinate (columns {first + 1}-{last}) is '{text.strip()}'",
                        fix="repair that atom's coordinates (PDB columns 31-54 hold x, y, z in A) or write the "
                        "structure again from the program that made it", field=f"ATOM {axis}",
                    )  # fmt: skip


def _check_finite_positions(path: Path, structure: gemmi.Structure) -> None:
    """Refuse atoms without a finite position (an mmCIF Cartn_x of '?' or text reads as NaN), naming the first."""
    for model in structure:
        for chain in model:
            for residue in chain:
                for atom in residue:
                    if not all(math.isfinite(value) for value in atom.pos.tolist()):
                        raise CryoflexInputError(
                            path, f"chain '{chain.name}' residue {residue.name} {residue.seqid} atom {atom.name} has "
                            f"no numeric position ({atom.pos.tolist()})",
                            fix="repair that atom's coordinates (mmCIF _atom_site.Cartn_x/y/z, PDB columns 31-54)",
                            field="Cartn_x/y/z",
                        )  # fmt: skip


def read_structure(path: str | Path) -> Structure:
    """Read a PDB or mmCIF file as one CA/C1' pseudo-atom per residue; several models give an ensemble."""
    path = Path(path)
    gemmi_structure = _read_gemmi(path)
    first, others, skipped = _select_residues(gemmi_structure[0], path)
    if not first:
        found = _describe_others(others)
        raise CryoflexInputError(path, f"no amino-acid (CA) or nucleotide (C1') residue found; only {found}",
                                 "give a protein or nucleic-acid structure")
    if skipped:  # one line, however many: a file of backbone-less residues must not bury the log
        shown = ", ".join(skipped[:_SKIPPED_SHOWN]) + (f" and {len(skipped) - _SKIPPED_SHOWN} more"
                                                        if len(skipped) > _SKIPPED_SHOWN else "")  # fmt: skip
        logger.warning("%s: %d residue(s) skipped for lacking the atom that places them: %s", path, len(skipped), shown)
    first_keys = [s.key for s in first]
    coords = [[s.atom.pos.tolist() for s in first]]
    groups = [density_groups(s.residue, s.atom) for s in first]
    offsets = [[offset for offset, _ in groups]]
    shares = [share for _, share in groups]  # the first model's: the amplitudes are the first model's too
    for model in list(gemmi_structure)[1:]:
        selected, _, _ = _select_residues(model, path)
        keys = [s.key for s in selected]
        if keys != first_keys:
            difference = next((f"{a} vs {b}" for a, b in zip(first_keys, keys, strict=False) if a != b),
                              f"{len(keys)} vs {len(first_keys)} residues")
            problem = f"model {model.num} has other residues than the first model ({difference})"
            raise CryoflexInputError(path, problem, "give models that all have the same residues")
        coords.append([s.atom.pos.tolist() for s in selected])
        offsets.append([density_groups(s.residue, s.atom)[0] for s in selected])
    kinds = [residue_kind(s.residue.name) for s in first]
    logger.info("read %d models x %d residues from %s", len(coords), len(first), path)
    structure = Structure(
        coords_A=np.array(coords, dtype=np.float64),
        chain_ids=np.array(_name_blank_chains(first)),
        residue_numbers=np.array([s.number for s in first], dtype=np.int64),
        insertion_codes=np.array([s.residue.seqid.icode.strip() for s in first]),
        residue_names=np.array([s.residue.name for s in first]),
        atom_names=np.array([AMINO_ACID_ATOM if kind == "amino acid" else NUCLEOTIDE_ATOM for kind in kinds]),
        amplitudes_e=np.array([residue_electrons(s.residue) for s in first], dtype=np.float64),
        source_path=str(path),
        density_offsets_A=np.array(offsets, dtype=np.float64),
        density_shares=np.array(shares, dtype=np.float64),
    )
    warn_chain_gaps(structure, path)
    return structure


@dataclass(frozen=True)
class ChainGap:
    """Two consecutive residues of a chain farther apart than a bonded step spans (a chain break), in some model."""

    chain_id: str
    before: str  # 'LYS 12'
    after: str  # 'GLY 17'
    distance_A: float  # largest over the models
    n_models: int  # models in which the step is too long

    def __str__(self) -> str:
        return f"chain {self.chain_id} {self.before} -> {self.after} {self.distance_A:.1f} A"


def _residue_label(structure: Structure, i: int) -> str:
    return f"{structure.residue_names[i]} {structure.residue_numbers[i]}{structure.insertion_codes[i]}"


def chain_gaps(structure: Structure) -> list[ChainGap]:
    """Consecutive residues of one chain farther apart than 4.5 A (C-alphas) or 9 A (C1') in any model."""
    steps_A = np.linalg.norm(np.diff(structure.coords_A, axis=1), axis=2)  # (n_models, n_residues - 1)
    nucleotide = structure.atom_names != AMINO_ACID_ATOM
    limit_A = np.where(nucleotide[1:] | nucleotide[:-1], MAX_NUCLEOTIDE_STEP_A, MAX_AMINO_ACID_STEP_A)
    same_chain = structure.chain_ids[1:] == structure.chain_ids[:-1]
    too_long = (steps_A > limit_A) & same_chain
    return [
        ChainGap(str(structure.chain_ids[i]), _residue_label(structure, i), _residue_label(structure, i + 1),
                 float(steps_A[:, i].max()), int(too_long[:, i].sum()))
        for i in np.flatnonzero(too_long.any(axis=0)).tolist()
    ]  # fmt: skip


def warn_chain_gaps(structure: Structure, source: str | Path) -> list[ChainGap]:
    """Log a warning naming the chain breaks of a structure or trajectory (kept as they are); returns them."""
    gaps = chain_gaps(structure)
    if gaps:
        listed = "; ".join(str(gap) for gap in gaps[:_GAPS_LISTED])
        more = f"; and {len(gaps) - _GAPS_LISTED} more" if len(gaps) > _GAPS_LISTED else ""
        models = f" (in up to {max(gap.n_models for gap in gaps)} of {structure.n_models} models)"
        logger.warning(
            "%s: %d chain break(s), consecutive residues farther apart than a bonded step (%.1f A between "
            "C-alphas, %.1f A between C1')%s: %s%s. They are kept as they are: if residues are missing, the model "
            "treats the pieces as one chain", source, len(gaps), MAX_AMINO_ACID_STEP_A, MAX_NUCLEOTIDE_STEP_A,
            models if structure.n_models > 1 else "", listed, more,
        )  # fmt: skip
    return gaps


def _chain_runs(chain_ids: np.ndarray) -> list[tuple[str, int, int]]:
    """(chain id, start, stop) for each run of consecutive residues with the same chain id."""
    starts = [0] + [i for i in range(1, len(chain_ids)) if chain_ids[i] != chain_ids[i - 1]]
    stops = starts[1:] + [len(chain_ids)]
    return [(str(chain_ids[start]), start, stop) for start, stop in zip(starts, stops, strict=True)]


def to_gemmi(structure: Structure, b_factors: np.ndarray | None = None) -> gemmi.Structure:
    """A pseudo-atom-only gemmi Structure (models 1..n, element C), with entities and label_seq_id set."""
    n_residues = structure.n_residues
    b_values = np.zeros(n_residues) if b_factors is None else np.asarray(b_factors, dtype=np.float64)
    if b_values.shape != (n_residues,) or not np.isfinite(b_values).all():
        raise ValueError(f"b_factors must be {n_residues} finite values, got shape {b_values.shape}")
    result = gemmi.Structure()
    result.spacegroup_hm = "P 1"
    carbon = gemmi.Element("C")
    runs = _chain_runs(structure.chain_ids)
    for model_index in range(structure.n_models):
        model = gemmi.Model(model_index + 1)
        for chain_id, start, stop in runs:
            chain = gemmi.Chain(chain_id)
            for i in range(start, stop):
                residue = gemmi.Residue()
                residue.name = str(structure.residue_names[i])
                icode = structure.insertion_codes[i] or " "
                residue.seqid = gemmi.SeqId(int(structure.residue_numbers[i]), icode)
                residue.entity_type = gemmi.EntityType.Polymer
                residue.het_flag = "A"
                atom = gemmi.Atom()
                atom.name = str(structure.atom_names[i])
                atom.element = carbon
                atom.pos = gemmi.Position(*structure.coords_A[model_index, i])
                atom.occ = 1.0
                atom.b_iso = float(b_values[i])
                residue.add_atom(atom)
                chain.add_residue(residue)
            model.add_chain(chain)
        result.add_model(model)
    result.setup_entities()
    for entity in result.entities:
        subchain = result[0].get_subchain(entity.subchains[0])
        entity.full_sequence = [residue.name for residue in subchain]
    result.assign_label_seq_id()
    result.assign_serial_numbers()
    return result


def write_structure(path: str | Path, structure: Structure, b_factors: np.ndarray | None = None) -> None:
    """Write a CA/C1'-only PDB (.pdb) or mmCIF (.cif, .mmcif) file, one MODEL per model, atomically.

    b_factors (n_residues,) fill the B-factor column (e.g. segment ids to colour by in ChimeraX), else 0.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _PDB_SUFFIXES | _MMCIF_SUFFIXES:
        raise CryoflexInputError(path, f"unknown structure file extension '{suffix}'", "use .pdb or .cif")
    gemmi_structure = to_gemmi(structure, b_factors)
    if suffix in _PDB_SUFFIXES:
        try:
            text = gemmi_structure.make_pdb_string()
        except RuntimeError as error:  # e.g. chain ids longer than 2 characters
            problem = f"cannot be written as PDB: {error}"
            raise CryoflexInputError(path, problem, "write .cif instead") from error
    else:
        text = gemmi_structure.make_mmcif_document().as_string()
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def structure_summary(structure: Structure) -> dict[str, Any]:
    """Counts for `cryoflex info`: models, residues, amino acids, nucleotides, each chain's residue range, and how far
    the residues' heavy-atom centroids lie from their pseudo-atoms on average (0: the file has pseudo-atoms only)."""
    chains = []
    for chain_id, count in structure.chains():
        numbers = structure.residue_numbers[structure.chain_ids == chain_id]
        chains.append({"chain_id": chain_id, "n_residues": count, "first_residue": int(numbers[0]),
                       "last_residue": int(numbers[-1])})
    n_amino_acids = int((structure.atom_names == AMINO_ACID_ATOM).sum())
    return {
        "n_models": structure.n_models,
        "n_residues": structure.n_residues,
        "n_amino_acids": n_amino_acids,
        "n_nucleotides": structure.n_residues - n_amino_acids,
        "chains": chains,
        "density_offset_mean_A": (None if structure.centroid_offsets_A is None
                                  else round(float(np.linalg.norm(structure.centroid_offsets_A[0], axis=1).mean()), 2)),
    }  # fmt: skip
