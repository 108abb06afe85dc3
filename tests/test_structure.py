"""Structure reader/writer: real PDB/mmCIF files (with the CHARMM element trap), round trips, errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import gemmi
import numpy as np
import pytest

from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import (
    MAX_AMINO_ACID_STEP_A,
    Structure,
    atomic_number,
    chain_gaps,
    read_structure,
    residue_kind,
    structure_summary,
    write_structure,
)

HISTIDINES_4AKE = [126, 134, 172]  # HIS in 4akeA_alg_fixed.pdb, HSD in the CHARMM files

DNA_AND_PROTEIN_PDB = """\
ATOM      1  P    DA B   5       1.000   2.000   3.000  1.00 10.00           P
ATOM      2  OP1  DA B   5       1.500   2.500   3.500  1.00 10.00           O
ATOM      3  C1'  DA B   5       4.000   5.000   6.000  1.00 10.00           C
ATOM      4  N9   DA B   5       4.500   5.500   6.500  1.00 10.00           N
ATOM      5  H1'  DA B   5       4.100   5.100   6.100  1.00 10.00           H
ATOM      6  N   GLY A  10A      6.000   8.000   9.000  1.00 10.00           N
ATOM      7  CA  GLY A  10A      7.000   8.000   9.000  1.00 10.00           C
ATOM      8  C   GLY A  10A      8.000   8.000   9.000  1.00 10.00           C
ATOM      9  O   GLY A  10A      8.500   8.000   9.000  1.00 10.00           O
ATOM     10  N   ALA A  11       9.000   8.000   9.000  1.00 10.00           N
HETATM   11 ZN    ZN A 101       0.000   0.000   0.000  1.00 10.00          ZN
HETATM   12  O   HOH A 201       0.000   3.000   0.000  1.00 10.00           O
"""

LIGANDS_ONLY_PDB = """\
HETATM    1 ZN    ZN A 101       0.000   0.000   0.000  1.00 10.00          ZN
HETATM    2  O   HOH A 201       0.000   3.000   0.000  1.00 10.00           O
HETATM    3  O   HOH A 202       0.000   6.000   0.000  1.00 10.00           O
"""


def heavy_electrons_from_elements(path: Path) -> float:
    """Independent total: sum of Z over the non-hydrogen atoms of a file whose element column is filled."""
    model = gemmi.read_structure(str(path))[0]
    atoms = [atom for chain in model for residue in chain for atom in residue]
    return float(sum(atom.element.atomic_number for atom in atoms if atom.element.name != "H"))


def file_ca_coords(path: Path) -> np.ndarray:
    """C-alpha coordinates parsed from the PDB text columns, without gemmi."""
    lines = [line for line in path.read_text().splitlines() if line[:4] == "ATOM" and line[12:16] == " CA "]
    return np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])] for line in lines])


def two_chain_ensemble(data_dir: Path, n_models: int) -> Structure:
    """The two chains of 1AKE, with each further model moved by a different, non-rigid displacement."""
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")
    rng = np.random.default_rng(0)
    coords = structure.coords_A[0] + rng.normal(scale=2.0, size=(n_models, structure.n_residues, 3))
    coords[0] = structure.coords_A[0]
    return structure.with_coords(coords)


@pytest.mark.parametrize("name", ["adk_open.pdb", "adk_closed.pdb"])
def test_charmm_pdb_gives_all_214_calphas_with_hsd(data_dir: Path, name: str) -> None:
    structure = read_structure(data_dir / name)
    assert structure.n_models == 1
    assert structure.chains() == [("A", 214)]  # blank chain id, segment 4AKE -> 'A'
    assert (structure.atom_names == "CA").all()
    assert structure.residue_numbers.tolist() == list(range(1, 215))
    assert structure.residue_numbers[structure.residue_names == "HSD"].tolist() == HISTIDINES_4AKE


def test_charmm_calpha_is_carbon_not_calcium(data_dir: Path) -> None:
    model = gemmi.read_structure(str(data_dir / "adk_open.pdb"))[0]
    atoms = [atom for chain in model for residue in chain for atom in residue]
    calphas = [atom for atom in atoms if atom.name == "CA"]
    assert {atom.element.name for atom in calphas} == {"Ca"}  # the trap is real: gemmi alone says calcium
    assert {atomic_number(atom) for atom in calphas} == {6}
    assert {atomic_number(atom) for atom in atoms} == {1, 6, 7, 8, 16}  # H C N O S: no Hg, Cd, Ne, Ce ...


@pytest.mark.parametrize(("charmm", "with_elements"), [("adk_open.pdb", "4akeA_alg_fixed.pdb"),
                                                       ("adk_closed.pdb", "pdb1ake.pdb")])
def test_charmm_amplitudes_equal_file_with_elements(data_dir: Path, charmm: str, with_elements: str) -> None:
    charmm_structure = read_structure(data_dir / charmm)
    reference = read_structure(data_dir / with_elements)
    np.testing.assert_array_equal(charmm_structure.amplitudes_e, reference.amplitudes_e)


def test_amplitudes_are_heavy_atom_electrons(data_dir: Path) -> None:
    structure = read_structure(data_dir / "4akeA_alg_fixed.pdb")
    assert structure.amplitudes_e.sum() == heavy_electrons_from_elements(data_dir / "4akeA_alg_fixed.pdb")
    glycine = read_structure(data_dir / "pdb1ake.pdb")
    assert glycine.residue_names[6] == "GLY"
    assert glycine.amplitudes_e[6] == 27.0  # N + CA + C + O = 7 + 6 + 6 + 8


def test_density_offsets_point_to_the_heavy_atom_electron_centroids(data_dir: Path, tmp_path: Path) -> None:
    """Against the file's text columns: the Z-weighted centroids of each residue's backbone (N CA C O OXT), of its
    other heavy atoms and of all of them, minus its C-alpha, and the groups' shares of the electrons."""
    path = data_dir / "4akeA_alg_fixed.pdb"
    electrons = {"C": 6, "N": 7, "O": 8, "S": 16}
    sums: dict[str, np.ndarray] = {}  # per residue: z x, z y, z z, z for the backbone, then the side chain
    ca: dict[str, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if line[:4] != "ATOM" or line[76:78].strip() == "H":
            continue
        key, xyz = line[21:27], np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        z = electrons[line[76:78].strip()]
        backbone = line[12:16].strip() in ("N", "CA", "C", "O", "OXT")
        sums.setdefault(key, np.zeros((2, 4)))[0 if backbone else 1] += np.r_[z * xyz, z]
        if line[12:16] == " CA ":
            ca[key] = xyz
    totals = np.array([sums[key].sum(0) for key in sums])
    centroids = np.array([totals[i, :3] / totals[i, 3] - ca[key] for i, key in enumerate(sums)])
    backbone = np.array([sums[key][0, :3] / sums[key][0, 3] - ca[key] for key in sums])
    side_chain = np.array([sums[key][1, :3] / max(sums[key][1, 3], 1) - ca[key] * (sums[key][1, 3] > 0)
                           for key in sums])  # fmt: skip
    structure = read_structure(path)
    assert structure.density_offsets_A.shape == (1, 214, 2, 3)
    np.testing.assert_allclose(structure.density_offsets_A[0, :, 0], backbone, atol=1e-9)
    np.testing.assert_allclose(structure.density_offsets_A[0, :, 1], side_chain, atol=1e-9)
    shares = np.array([sums[key][:, 3] / sums[key][:, 3].sum() for key in sums])
    np.testing.assert_allclose(structure.density_shares, shares, atol=1e-12)
    np.testing.assert_allclose(structure.centroid_offsets_A[0], centroids, atol=1e-9)
    glycines = structure.residue_names == "GLY"
    assert glycines.any() and not structure.density_offsets_A[0, glycines, 1].any()  # no side chain: share 0
    np.testing.assert_array_equal(structure.density_shares[glycines, 1], 0.0)
    assert 0.5 < np.linalg.norm(centroids, axis=1).mean() < 3.0  # side chains pull the centroid off the C-alpha
    write_structure(tmp_path / "ca.pdb", structure)
    ca_only = read_structure(tmp_path / "ca.pdb")  # C-alphas alone: everything on the pseudo-atom
    assert not ca_only.density_offsets_A.any()
    np.testing.assert_array_equal(ca_only.density_shares, np.tile([1.0, 0.0], (214, 1)))


def test_charmm_c_terminal_oxygens_belong_to_the_backbone(data_dir: Path) -> None:
    structure = read_structure(data_dir / "adk_closed.pdb")  # ends with GLY 214 and its OT1, OT2
    assert structure.residue_names[-1] == "GLY"
    assert structure.density_shares[-1, 1] == 0.0 and not structure.density_offsets_A[0, -1, 1].any()


def test_density_offsets_follow_models_and_translations_only(data_dir: Path) -> None:
    structure = read_structure(data_dir / "4akeA_alg_fixed.pdb")
    moved = structure.with_coords(structure.coords_A + 5.0, translated=True)
    np.testing.assert_array_equal(moved.density_offsets_A, structure.density_offsets_A)
    np.testing.assert_array_equal(moved.density_shares, structure.density_shares)
    turned = structure.with_coords(structure.coords_A[0][::-1].copy())
    assert turned.density_offsets_A is None and turned.density_shares is None
    assert structure.model(0).density_offsets_A.shape == (1, 214, 2, 3)


def test_duplicate_atoms_without_altloc_letter_count_once(data_dir: Path) -> None:
    # pdb1ake.pdb ARG 167 lists CD, NE, CZ, NH1, NH2 twice at occupancy 0.5 with the altloc letters stripped.
    structure = read_structure(data_dir / "pdb1ake.pdb")
    index = structure.residue_numbers.tolist().index(167)
    assert structure.residue_names[index] == "ARG"
    assert structure.amplitudes_e[index] == 6 * 6 + 4 * 7 + 8


def test_pdb1ake_calphas_equal_file_coordinates(data_dir: Path) -> None:
    structure = read_structure(data_dir / "pdb1ake.pdb")
    assert structure.chains() == [("A", 214)]
    np.testing.assert_array_equal(structure.coords_A[0], file_ca_coords(data_dir / "pdb1ake.pdb"))


def test_mmcif_gives_both_chains_without_ligands_or_water(data_dir: Path) -> None:
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")
    assert structure.chains() == [("A", 214), ("B", 214)]
    assert all(residue_kind(name) == "amino acid" for name in structure.residue_names)
    chain_a = structure.chain_ids == "A"
    chain_a_alone = read_structure(data_dir / "pdb1ake.pdb")
    np.testing.assert_array_equal(structure.amplitudes_e[chain_a], chain_a_alone.amplitudes_e)
    summary = structure_summary(structure)
    chains = [{"chain_id": c, "n_residues": 214, "first_residue": 1, "last_residue": 214} for c in "AB"]
    counts = {"n_models": 1, "n_residues": 428, "n_amino_acids": 428, "n_nucleotides": 0}
    offset_A = round(float(np.linalg.norm(structure.centroid_offsets_A[0], axis=1).mean()), 2)
    assert summary == {**counts, "chains": chains, "density_offset_mean_A": offset_A}
    assert 0.5 < offset_A < 3.0  # a full-atom file: the residues' density sits off the C-alphas


def test_format_is_detected_from_content(data_dir: Path, tmp_path: Path) -> None:
    misnamed = tmp_path / "really_mmcif.pdb"
    shutil.copy(data_dir / "mmcif_1ake_chimerax.cif", misnamed)
    assert read_structure(misnamed).chains() == [("A", 214), ("B", 214)]


@pytest.mark.parametrize("name", ["HSD", "HSE", "HSP", "HID", "HIE", "HIP", "MSE", "SEP", "HIS"])
def test_force_field_and_modified_amino_acids_are_amino_acids(name: str) -> None:
    assert residue_kind(name) == "amino acid"


@pytest.mark.parametrize(("name", "kind"), [("DA", "nucleotide"), ("U", "nucleotide"), ("HOH", None),
                                            ("ATP", None), ("ZN", None)])
def test_residue_kind_of_other_names(name: str, kind: str | None) -> None:
    assert residue_kind(name) == kind


def test_nucleotide_gives_c1_prime_and_skips_ions_and_water(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pdb"
    path.write_text(DNA_AND_PROTEIN_PDB)
    structure = read_structure(path)
    assert structure.atom_names.tolist() == ["C1'", "CA"]  # ALA 11 has no CA: skipped
    assert structure.chains() == [("B", 1), ("A", 1)]
    assert structure.insertion_codes.tolist() == ["", "A"]
    np.testing.assert_array_equal(structure.coords_A[0], [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    np.testing.assert_array_equal(structure.amplitudes_e, [15 + 8 + 6 + 7, 27])  # the H1' adds nothing
    assert structure_summary(structure)["n_nucleotides"] == 1
    # density groups, by hand: the DNA's backbone P, OP1, C1' and its base N9; the glycine's backbone is all of it
    np.testing.assert_allclose(structure.density_offsets_A[0, 0], [[-65 / 29] * 3, [0.5] * 3], atol=1e-12)
    np.testing.assert_allclose(structure.density_offsets_A[0, 1], [[11 / 27, 0, 0], [0, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(structure.density_shares, [[29 / 36, 7 / 36], [1, 0]], atol=1e-12)


def test_residue_without_calpha_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mixed.pdb"
    path.write_text(DNA_AND_PROTEIN_PDB)
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.structure"):
        read_structure(path)
    assert "ALA" in caplog.text and "(no CA)" in caplog.text


def _pdb_atom(serial: int, name: str, residue: str, number: int, x: float) -> str:
    coordinates = f"{x:8.3f}{0.0:8.3f}{0.0:8.3f}"
    return f"ATOM  {serial:>5} {name:<4} {residue} A{number:>4}    {coordinates}  1.00  0.00           {name[0]}"


def test_residues_without_calpha_give_one_warning_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Many residues without a CA: one warning naming a few, not one line each (a new user saw 214 lines)."""
    lines = [_pdb_atom(k + 1, "N", "ALA", k + 1, 3.8 * k) for k in range(40)]
    lines.append(_pdb_atom(41, "CA", "GLY", 41, 160.0))
    path = tmp_path / "backbone_less.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.structure"):
        structure = read_structure(path)
    assert structure.n_residues == 1
    skipped = [record for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1
    assert "40 residue(s)" in skipped[0].getMessage() and "and 35 more" in skipped[0].getMessage()


def test_structure_without_any_calpha_is_one_error_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "no_calpha.pdb"
    path.write_text("\n".join(_pdb_atom(k + 1, "N", "ALA", k + 1, 3.8 * k) for k in range(30)) + "\nEND\n")
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.structure"), pytest.raises(CryoflexInputError) as error:
        read_structure(path)
    assert "no amino-acid (CA)" in str(error.value) and "ALA without CA x 30" in str(error.value)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("suffix", [".pdb", ".cif", ".mmcif"])
@pytest.mark.parametrize("n_models", [1, 3])
def test_write_read_round_trip(data_dir: Path, tmp_path: Path, suffix: str, n_models: int) -> None:
    structure = two_chain_ensemble(data_dir, n_models)
    segments = (np.arange(structure.n_residues) // 50).astype(np.float64)
    path = tmp_path / f"out{suffix}"
    write_structure(path, structure, b_factors=segments)
    back = read_structure(path)
    assert back.n_models == n_models
    np.testing.assert_allclose(back.coords_A, structure.coords_A, atol=1e-3 if suffix == ".pdb" else 1e-6)
    for field in ("chain_ids", "residue_numbers", "insertion_codes", "residue_names", "atom_names"):
        np.testing.assert_array_equal(getattr(back, field), getattr(structure, field))
    gemmi_structure = gemmi.read_structure(str(path))
    for model in gemmi_structure:
        atoms = [atom for chain in model for residue in chain for atom in residue]
        assert [atom.b_iso for atom in atoms] == segments.tolist()
        assert {atom.element.name for atom in atoms} == {"C"}
    assert [model.num for model in gemmi_structure] == list(range(1, n_models + 1))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_pdb_columns_of_written_file(tmp_path: Path) -> None:
    source = tmp_path / "mixed.pdb"
    source.write_text(DNA_AND_PROTEIN_PDB)
    path = tmp_path / "out.pdb"
    write_structure(path, read_structure(source))
    atom_lines = [line for line in path.read_text().splitlines() if line.startswith("ATOM")]
    assert [line[12:16] for line in atom_lines] == [" C1'", " CA "]
    assert [line[21] for line in atom_lines] == ["B", "A"]
    assert [line[22:27] for line in atom_lines] == ["   5 ", "  10A"]
    assert [line[76:78] for line in atom_lines] == [" C", " C"]
    assert [line[60:66] for line in atom_lines] == ["  0.00", "  0.00"]


def test_multi_model_mmcif_carries_model_numbers(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ensemble.cif"
    write_structure(path, two_chain_ensemble(data_dir, 2))
    block = gemmi.cif.read(str(path)).sole_block()
    model_numbers = list(block.find_values("_atom_site.pdbx_PDB_model_num"))
    assert model_numbers == ["1"] * 428 + ["2"] * 428
    assert list(block.find_values("_atom_site.auth_asym_id"))[:428] == ["A"] * 214 + ["B"] * 214


def test_models_with_different_residues_raise_naming_the_model(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ensemble.pdb"
    write_structure(path, two_chain_ensemble(data_dir, 2))
    lines = path.read_text().splitlines()
    second_model = lines.index(next(line for line in lines if line.startswith("MODEL        2")))
    del lines[second_model + 5]  # drop one C-alpha of model 2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CryoflexInputError, match="model 2"):
        read_structure(path)


def test_ligand_only_file_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ligands.pdb"
    path.write_text(LIGANDS_ONLY_PDB)
    with pytest.raises(CryoflexInputError, match=r"no amino-acid .* found; only HOH x 2, ZN x 1") as error:
        read_structure(path)
    assert str(path) in str(error.value)


def test_residue_without_number_raises_naming_the_residue(tmp_path: Path) -> None:
    path = tmp_path / "unnumbered.pdb"
    path.write_text("ATOM      1  CA  ALA A           1.000   2.000   3.000  1.00  0.00           C\n")
    with pytest.raises(CryoflexInputError, match="chain 'A' residue ALA has no residue number") as error:
        read_structure(path)
    assert str(path) in str(error.value)


def test_missing_file_raises_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.pdb"
    with pytest.raises(CryoflexInputError, match="file not found") as error:
        read_structure(path)
    assert error.value.path == str(path)


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("empty.pdb", "hello\nworld\n", "no atom records"),
    ("broken.cif", "data_x\nloop_\n_a.b 'open\n", "could not parse"),
])
def test_unparsable_file_raises(tmp_path: Path, name: str, text: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CryoflexInputError, match=problem):
        read_structure(path)


def test_writer_rejects_unknown_extension_and_long_pdb_chain_ids(data_dir: Path, tmp_path: Path) -> None:
    structure = read_structure(data_dir / "pdb1ake.pdb")
    with pytest.raises(CryoflexInputError, match="unknown structure file extension"):
        write_structure(tmp_path / "out.xyz", structure)
    long_chains = Structure(**{**structure.__dict__, "chain_ids": np.full(214, "CHAIN")})
    with pytest.raises(CryoflexInputError, match="write .cif instead"):
        write_structure(tmp_path / "out.pdb", long_chains)
    assert not (tmp_path / "out.pdb").exists()
    write_structure(tmp_path / "out.cif", long_chains)
    assert read_structure(tmp_path / "out.cif").chains() == [("CHAIN", 214)]


def test_model_and_with_coords(data_dir: Path) -> None:
    ensemble = two_chain_ensemble(data_dir, 3)
    last = ensemble.model(-1)
    assert last.n_models == 1
    np.testing.assert_array_equal(last.coords_A[0], ensemble.coords_A[2])
    single = ensemble.with_coords(ensemble.coords_A[1])
    assert single.coords_A.shape == (1, 428, 3) and single.chains() == ensemble.chains()
    with pytest.raises(IndexError):
        ensemble.model(3)


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("coords_A", np.zeros((214, 3)), "coords_A must have shape"),
    ("coords_A", np.zeros((1, 213, 3)), r"chain_ids must have shape \(213,\)"),
    ("coords_A", np.full((1, 214, 3), np.nan), "NaN"),
    ("amplitudes_e", np.ones(5), "amplitudes_e must have shape"),
    ("chain_ids", np.array(["A"] * 215), "chain_ids must have shape"),
])
def test_structure_validates_shapes(data_dir: Path, field: str, value: np.ndarray, problem: str) -> None:
    structure = read_structure(data_dir / "pdb1ake.pdb")
    with pytest.raises(ValueError, match=problem):
        Structure(**{**structure.__dict__, field: value})


def test_b_factors_must_match_residues(data_dir: Path, tmp_path: Path) -> None:
    structure = read_structure(data_dir / "pdb1ake.pdb")
    with pytest.raises(ValueError, match="b_factors"):
        write_structure(tmp_path / "out.pdb", structure, b_factors=np.zeros(3))


def test_written_c_alpha_model_reads_back_with_residue_amplitudes(data_dir: Path, tmp_path: Path) -> None:
    """The table of in-chain residue electrons agrees with full-atom counts (the C-terminal residue adds its OXT)."""
    full = read_structure(data_dir / "adk_open.pdb")
    write_structure(tmp_path / "ca.pdb", full)
    c_alpha = read_structure(tmp_path / "ca.pdb")
    expected = full.amplitudes_e.copy()
    expected[-1] -= 8  # OXT
    np.testing.assert_array_equal(c_alpha.amplitudes_e, expected)


def _without_residues(text: str, chain: str, numbers: range) -> str:
    """PDB text without the ATOM records of residues `numbers` of `chain` (a chain break)."""
    def kept(line: str) -> bool:
        return not (line.startswith("ATOM") and line[21] == chain and int(line[22:26]) in numbers)

    return "".join(line for line in text.splitlines(keepends=True) if kept(line))


def test_chain_break_warning_names_the_residues(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gap.pdb"
    path.write_text(_without_residues((data_dir / "pdb1ake.pdb").read_text(), "A", range(20, 25)))
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.structure"):
        structure = read_structure(path)
    assert structure.n_residues == 214 - 5  # the break is kept, not refused
    gaps = chain_gaps(structure)
    assert [(gap.chain_id, gap.before, gap.after) for gap in gaps] == [("A", "PHE 19", "GLY 25")]
    assert gaps[0].distance_A > MAX_AMINO_ACID_STEP_A
    assert "1 chain break(s)" in caplog.text and "chain A PHE 19 -> GLY 25" in caplog.text
    assert str(path) in caplog.text


def test_whole_chains_give_no_chain_break_warning(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.structure"):
        structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")  # chains A and B: A -> B is no break
    assert chain_gaps(structure) == []
    assert "chain break" not in caplog.text


BAD_STRUCTURE_FILES = {
    "empty.pdb": (b"", "the file is empty"),
    "empty.cif": (b"", "the file is empty"),
    "binary.pdb": (bytes(range(256)) * 8, "binary content: not a PDB or mmCIF text file"),
    "no_calpha.pdb": (
        b"ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00  0.00           N\n"
        b"ATOM      2  C   ALA A   1       1.000   0.000   0.000  1.00  0.00           C\n",
        r"no amino-acid \(CA\) or nucleotide \(C1'\) residue found; only ALA without CA x 1",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_STRUCTURE_FILES))
def test_empty_binary_and_calpha_less_files_raise_clear_errors(tmp_path: Path, name: str) -> None:
    content, problem = BAD_STRUCTURE_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CryoflexInputError, match=problem) as error:
        read_structure(path)
    assert error.value.path == str(path) and error.value.fix


@pytest.mark.parametrize("name", sorted(BAD_STRUCTURE_FILES))
def test_info_on_bad_structure_exits_2_without_traceback(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryoflex.cli import main

    path = tmp_path / name
    path.write_bytes(BAD_STRUCTURE_FILES[name][0])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}" in err and "fix:" in err and "Traceback" not in err


def test_pdb_coordinates_that_are_not_numbers_are_refused(data_dir: Path, tmp_path: Path) -> None:
    """gemmi reads a PDB coordinate such as 'abc' as 0: cryoflex names the line and the column instead."""
    lines = (data_dir / "pdb1ake.pdb").read_text().splitlines()
    first_atom = next(k for k, line in enumerate(lines) if line.startswith("ATOM"))
    lines[first_atom] = lines[first_atom][:38] + "     abc" + lines[first_atom][46:]
    path = tmp_path / "bad_y.pdb"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CryoflexInputError) as error:
        read_structure(path)
    assert error.value.field == "ATOM y" and f"line {first_atom + 1}" in str(error.value)
    assert "'abc'" in str(error.value)


def test_mmcif_positions_that_are_not_numbers_are_refused(data_dir: Path, tmp_path: Path) -> None:
    """An mmCIF Cartn_x that is not a number reads as NaN: a clear error naming the atom, not a traceback."""
    document = gemmi.read_structure(str(data_dir / "pdb1ake.pdb"))
    document.setup_entities()
    path = tmp_path / "nan.cif"
    document.make_mmcif_document().write_file(str(path))
    text = path.read_text()
    atom = next(line for line in text.splitlines() if line.startswith("ATOM") and " CA " in line)
    fields = atom.split()
    x_column = fields.index("?", 7) + 1  # Cartn_x follows the pdbx_PDB_ins_code '?' column in gemmi's layout
    fields[x_column] = "abc"
    path.write_text(text.replace(atom, " ".join(fields), 1))
    with pytest.raises(CryoflexInputError) as error:
        read_structure(path)
    assert error.value.field == "Cartn_x/y/z" and "atom CA has no numeric position" in str(error.value)
