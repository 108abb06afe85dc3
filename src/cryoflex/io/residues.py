"""Residue groups written as text: "A" (all of chain A) or "A:122-159" (chain A, residue numbers 122 to 159).

One parser for every option that names residues (segmented parts of `cryoflex train`, distance groups of
`cryoflex eval`); callers put the reason into their own error with the option's name.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from cryoflex.io.structure import Structure

logger = logging.getLogger(__name__)

_GROUP_PATTERN = re.compile(r"^(?P<chain>[^:]+)(?::(?P<first>-?\d+)-(?P<last>-?\d+))?$")


def select_residues(spec: str, structure: Structure, *, warn: bool = True) -> np.ndarray:
    """0-based positions (file order) of the residues of group `spec`; ValueError with the reason when it is bad.

    Residue numbers are the author numbers of the file, inclusive at both ends; the range is not checked against
    gaps, so "A:1-120" on a chain numbered from 3 selects residues 3..120. A range reaching past its chain warns
    (unless `warn` is false: a caller that parses the same group again).
    """
    match = _GROUP_PATTERN.match(spec.strip())
    if match is None:
        raise ValueError(f"{spec.strip()!r} is not CHAIN or CHAIN:FIRST-LAST (e.g. A:122-159)")
    chain_ids = np.asarray(structure.chain_ids)
    selected = chain_ids == match["chain"]
    if not selected.any():
        raise ValueError(f"no chain {match['chain']!r}; chains are {sorted(set(chain_ids.tolist()))}")
    if match["first"] is not None:
        numbers = np.asarray(structure.residue_numbers)
        first, last = int(match["first"]), int(match["last"])
        in_chain = numbers[selected]
        selected &= (numbers >= first) & (numbers <= last)
        past_chain = first < in_chain.min() or last > in_chain.max()
        if warn and selected.any() and past_chain:  # none selected: the error below
            logger.warning(
                "%r reaches past chain %s's residues %d-%d: it selects the residues of the chain within it",
                spec.strip(), match["chain"], in_chain.min(), in_chain.max(),
            )  # fmt: skip
    indices = np.flatnonzero(selected)
    if indices.size == 0:
        raise ValueError(f"{spec.strip()!r} selects no residue; check the residue numbers of the structure")
    return indices
