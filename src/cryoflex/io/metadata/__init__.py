"""Particle metadata: RELION 3.0/3.1/5 STAR, cryoSPARC .cs and cryoDRGN .pkl -> one ParticleMetadata record.

One module per format holds its reader, writer and field names (relion, cryosparc, cryodrgn); record holds the
record and the checks they share. This package reads any of them by suffix and summarises a record.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import cryodrgn, cryosparc, relion
from cryoflex.io.metadata.cryodrgn import write_cryodrgn_pkl
from cryoflex.io.metadata.cryosparc import write_cryosparc_subset
from cryoflex.io.metadata.record import (
    FORMATS,
    CTFParameters,
    ParticleMetadata,
    _Overrides,
    _require_file,
    _settle_box,
)
from cryoflex.io.metadata.relion import DUPLICATE_IMAGES, RELION_WRITE_VERSION, write_relion_star
from cryoflex.io.particles import ParticleStack

logger = logging.getLogger(__name__)


def read_metadata(
    path: str | Path,
    *,
    ctf_path: str | Path | None = None,
    stack_path: str | Path | None = None,
    box_size_px: int | None = None,
    pixel_size_A: float | None = None,
    amplitude_contrast: float | None = None,
    duplicate_images: str = "refuse",
) -> ParticleMetadata:
    """Read particle metadata (.star, .cs, or cryoDRGN .pkl) into one record; CryoflexInputError on bad input.

    ctf_path: the cryoDRGN ctf.pkl that goes with a poses .pkl. stack_path: the particles are images 0..N-1 of
    this stack (cryoDRGN's convention; replaces image references in the file). box_size_px, pixel_size_A,
    amplitude_contrast: for files that do not state them (e.g. RELION 3.0 files without rlnAmplitudeContrast;
    cryoDRGN assumes 0.1 there). A value that contradicts the file raises. duplicate_images: RELION rows that
    share an rlnImageName (symmetry expansion) are refused ("refuse", with the choices), read as the first row of
    each image ("first") or as distinct particles named 'rlnImageName#rowK' ("distinct").
    """
    if duplicate_images not in DUPLICATE_IMAGES:
        raise ValueError(f"duplicate_images must be one of {DUPLICATE_IMAGES}, got {duplicate_images!r}")
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if ctf_path is not None and suffix != ".pkl":
        raise CryoflexInputError(
            ctf_path,
            "a separate CTF file only goes with a cryoDRGN poses .pkl; .star and .cs files hold their CTF",
            fix="leave out the CTF file",
            field="--ctf",
        )
    stack = None if stack_path is None else _open_stack(Path(stack_path))
    box_source = "box_size_px"
    if stack is not None:
        box_size_px = _settle_box(path, "box size", [("box_size_px", box_size_px), (stack[0], stack[2])])
        box_source = stack[0]
    overrides = _Overrides(box_size_px, box_source, pixel_size_A, amplitude_contrast)
    if suffix == ".star":
        metadata = relion.read_star(path, overrides, duplicate_images)
    elif suffix == ".cs":
        metadata = cryosparc.read_cs(path, overrides)
    elif suffix == ".pkl":
        metadata = cryodrgn.read_pickles(path, None if ctf_path is None else Path(ctf_path), overrides)
    else:
        raise CryoflexInputError(
            path,
            f"unknown particle metadata type '{suffix}'",
            fix="give a RELION .star, a cryoSPARC .cs or a cryoDRGN poses .pkl",
        )
    return metadata if stack is None else _attach_stack(metadata, stack)


def training_field_name(format: str, what: str) -> str:
    """Where a file of `format` keeps `what` (rotations, shifts_A or ctf): names the missing field in errors."""
    names = {"cryosparc": cryosparc.TRAINING_FIELD_NAMES, "cryodrgn": cryodrgn.TRAINING_FIELD_NAMES}
    return names.get(format, relion.TRAINING_FIELD_NAMES)[what]


def _open_stack(stack_path: Path) -> tuple[str, int, int]:
    """(resolved path, number of images, box size) of a stack whose images are the particles in order."""
    _require_file(stack_path)
    resolved = stack_path.resolve()
    with ParticleStack.from_files([resolved]) as stack:
        return str(resolved), len(stack), stack.box_size_px


def _attach_stack(metadata: ParticleMetadata, stack: tuple[str, int, int]) -> ParticleMetadata:
    """Make particle i image i of the stack (cryoDRGN's convention), checking the counts agree."""
    stack_file, n_images, _ = stack
    n = metadata.n_particles
    if n_images != n:
        raise CryoflexInputError(
            stack_file,
            f"the stack holds {n_images} images but {metadata.source_path} lists {n} particles",
            fix="give the stack these particles were taken from (particle i must be image i)",
            field="--stack",
        )
    if metadata.image_paths is not None:  # cryoDRGN's convention, but a STAR or .cs file names its own images
        named = np.unique(metadata.image_paths)
        more = f" and {named.size - 1} more stacks" if named.size > 1 else ""
        logger.warning(
            "%s names its images (in %s%s); the --stack %s replaces them: particle i is image i of that stack",
            metadata.source_path, Path(str(named[0])).name, more, stack_file,
        )  # fmt: skip
    return replace(metadata, image_paths=np.full(n, stack_file), image_indices=np.arange(n))


# ------------------------------------------------------------ summary


def _one_or_list(values: np.ndarray) -> float | list[float]:
    """A value shared by all particles as one float, else the sorted distinct values."""
    unique = np.unique(values)
    return float(unique[0]) if unique.size == 1 else [float(v) for v in unique]


def _shared_images(metadata: ParticleMetadata) -> dict[str, int]:
    """How many rows (particles) share an image with another (symmetry expansion) and how many images they share."""
    if metadata.image_paths is None or metadata.image_indices is None:
        return {"n_rows_sharing_an_image": 0, "n_shared_images": 0}
    references = pd.MultiIndex.from_arrays([metadata.image_paths, metadata.image_indices])
    shared = references.duplicated(keep=False)
    return {"n_rows_sharing_an_image": int(shared.sum()), "n_shared_images": int(references[shared].nunique())}


def metadata_summary(metadata: ParticleMetadata) -> dict[str, Any]:
    """JSON-serialisable overview for `cryoflex info`: counts, box, pixel sizes, optics groups, CTF, poses."""
    ctf = metadata.ctf
    groups = []
    for group in np.unique(metadata.optics_group):
        members = metadata.optics_group == group
        entry: dict[str, Any] = {
            "group": int(group),
            "n_particles": int(members.sum()),
            "pixel_size_A": _one_or_list(metadata.pixel_size_A[members]),
        }
        if ctf is not None:
            entry |= {
                "voltage_kV": _one_or_list(ctf.voltage_kV[members]),
                "cs_mm": _one_or_list(ctf.cs_mm[members]),
                "amplitude_contrast": _one_or_list(ctf.amplitude_contrast[members]),
            }
        groups.append(entry)
    summary: dict[str, Any] = {
        "format": metadata.format,
        "n_particles": metadata.n_particles,
        "box_size_px": metadata.box_size_px,
        "pixel_size_A": _one_or_list(metadata.pixel_size_A),
        "n_optics_groups": len(groups),
        "optics_groups": groups,
        "has_poses": metadata.rotations is not None,
        "has_shifts": metadata.shifts_A is not None,
        "has_ctf": ctf is not None,
        "n_image_stacks": 0 if metadata.image_paths is None else int(np.unique(metadata.image_paths).size),
        **_shared_images(metadata),
    }
    if ctf is not None:
        defocus = np.concatenate([ctf.defocus_u_A, ctf.defocus_v_A])
        summary["defocus_range_A"] = [float(defocus.min()), float(defocus.max())]
        summary["voltage_kV"] = _one_or_list(ctf.voltage_kV)
    return summary


__all__ = [
    "FORMATS",
    "DUPLICATE_IMAGES",
    "RELION_WRITE_VERSION",
    "CTFParameters",
    "ParticleMetadata",
    "metadata_summary",
    "read_metadata",
    "training_field_name",
    "write_cryodrgn_pkl",
    "write_cryosparc_subset",
    "write_relion_star",
]
