"""Residue groups ("A", "A:122-159"): the one parser behind train's segmented parts and eval's distance groups."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cryoflex.io.residues import select_residues
from cryoflex.io.structure import read_structure
from cryoflex.model.segmentation import parse_parts


def test_groups_select_by_chain_and_author_numbers(data_dir: Path) -> None:
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")  # chains A and B, 214 residues each
    np.testing.assert_array_equal(select_residues("A:122-159", structure), np.arange(121, 159))
    np.testing.assert_array_equal(select_residues(" B ", structure), np.arange(214, 428))
    np.testing.assert_array_equal(select_residues("B:-5-3", structure), np.arange(214, 217))
    for spec, message in (("A:159", "not CHAIN or CHAIN:FIRST-LAST"), ("C", r"no chain 'C'; chains are \['A', 'B'\]"),
                          ("A:300-310", "selects no residue"), ("", "not CHAIN")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            select_residues(spec, structure)


def test_segmented_parts_use_the_same_groups(data_dir: Path) -> None:
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")
    parts = parse_parts(["A:122-159:2", "B:4"], structure, default_segments=5)
    np.testing.assert_array_equal(parts[0].residue_indices, select_residues("A:122-159", structure))
    np.testing.assert_array_equal(parts[1].residue_indices, select_residues("B", structure))
    with pytest.raises(ValueError, match=r"segment part 'A:300-310:2': 'A:300-310' selects no residue"):
        parse_parts(["A:300-310:2"], structure, default_segments=5)


def test_a_range_past_the_chain_selects_what_is_there_and_says_so(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    structure = read_structure(data_dir / "mmcif_1ake_chimerax.cif")
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.residues"):
        np.testing.assert_array_equal(select_residues("A:122-500", structure), np.arange(121, 214))
    assert "'A:122-500' reaches past chain A's residues 1-214" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cryoflex.io.residues"):
        select_residues("A:122-159", structure)
    assert not caplog.records
