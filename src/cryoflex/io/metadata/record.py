"""The particle record every reader fills and every writer takes, and the checks the readers share.

Conventions (docs/conventions.md, pinned by tests/test_metadata.py): rotations R map centred model coordinates
to x' = R x, projected along z; shifts_A are RELION origins (ox, oy) in Angstrom, observed(x) =
centred_projection(x + origin); angles in degrees. Optional CTF fields (phase shift, B-factor, scale) default to
0, 0, 1; every value read is checked finite.
Sections of docs/conventions.md: "Rotations and projection", "Origins (particle shifts)", "Pixel size",
"Image references", "Missing CTF values", "cryoSPARC poses and shifts", "cryoDRGN files".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from cryoflex.errors import CryoflexInputError

logger = logging.getLogger(__name__)

FORMATS = ("relion3.0", "relion3.1", "relion5", "cryosparc", "cryodrgn")
# Per-particle CTF fields every file must give; the optional ones default to no phase shift, no B-factor, scale 1.
_REQUIRED_CTF = (
    "defocus_u_A",
    "defocus_v_A",
    "defocus_angle_deg",
    "voltage_kV",
    "cs_mm",
    "amplitude_contrast",
)
_OPTIONAL_CTF_DEFAULTS = {"phase_shift_deg": 0.0, "bfactor_A2": 0.0, "scale": 1.0}
# How far two files of the same particles may disagree on a particle's defocus: CTF refinement moves it by tens to
# hundreds of A, while another dataset's particles under the same names differ by thousands (cryoflex simulate draws
# defocus over a range of 15,000 A by default)
SAME_PARTICLE_DEFOCUS_A = 500.0


def defocus_disagrees(first_A: np.ndarray, second_A: np.ndarray) -> np.ndarray | None:
    """Where two defocus columns of the same-named particles are more than SAME_PARTICLE_DEFOCUS_A apart, when most
    of them are (the files describe other particles); None when they describe the same ones."""
    differ = np.abs(np.asarray(first_A) - np.asarray(second_A)) > SAME_PARTICLE_DEFOCUS_A
    return differ if 2 * differ.sum() > differ.size else None


@dataclass(frozen=True, eq=False)
class CTFParameters:
    """Per-particle CTF parameters, each (N,) float64, in RELION units (Angstrom, degrees, kV, mm, A^2)."""

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _as_vector(getattr(self, f.name), np.float64, f.name))
        if len({getattr(self, f.name).size for f in fields(self)}) != 1:
            raise ValueError("all CTF parameter arrays must have the same length")

    @property
    def n_particles(self) -> int:
        return int(self.defocus_u_A.size)

    def subset(self, indices: np.ndarray) -> CTFParameters:
        """The CTF parameters of the particles at `indices` (0-based positions), in that order."""
        return CTFParameters(**{f.name: getattr(self, f.name)[indices] for f in fields(self)})


@dataclass(frozen=True, eq=False)
class ParticleMetadata:
    """Everything cryoflex needs to know about each particle, whatever file it came from."""

    source_path: Path
    format: str
    names: np.ndarray
    pixel_size_A: np.ndarray
    box_size_px: int | None
    optics_group: np.ndarray
    rotations: np.ndarray | None
    shifts_A: np.ndarray | None
    ctf: CTFParameters | None
    image_paths: np.ndarray | None
    image_indices: np.ndarray | None
    particles_table: pd.DataFrame | None
    optics_table: pd.DataFrame | None
    # (n,) 1 or 2: the refinement's gold-standard half of each particle (RELION rlnRandomSubset, cryoSPARC
    # alignments3D/split + 1); None when the file has none
    half_sets: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        names = np.asarray(self.names, dtype=str)
        n = names.size
        set_ = object.__setattr__
        set_(self, "source_path", Path(self.source_path))
        set_(self, "names", _as_vector(names, str, "names"))
        set_(self, "pixel_size_A", _as_vector(self.pixel_size_A, np.float64, "pixel_size_A", n))
        set_(self, "optics_group", _as_vector(self.optics_group, np.int64, "optics_group", n))
        set_(self, "box_size_px", None if self.box_size_px is None else int(self.box_size_px))
        if self.rotations is not None:
            set_(self, "rotations", _as_array(self.rotations, (n, 3, 3), "rotations"))
        if self.shifts_A is not None:
            set_(self, "shifts_A", _as_array(self.shifts_A, (n, 2), "shifts_A"))
        if (self.image_paths is None) != (self.image_indices is None):
            raise ValueError("image_paths and image_indices must be given together")
        if self.image_paths is not None:
            set_(self, "image_paths", _as_vector(self.image_paths, str, "image_paths", n))
            set_(self, "image_indices", _as_vector(self.image_indices, np.int64, "image_indices", n))
        if self.half_sets is not None:
            set_(self, "half_sets", _as_vector(self.half_sets, np.int64, "half_sets", n))
        if self.ctf is not None and self.ctf.n_particles != n:
            raise ValueError(f"ctf has {self.ctf.n_particles} particles but names has {n}")
        if self.particles_table is not None and len(self.particles_table) != n:
            raise ValueError(f"particles_table has {len(self.particles_table)} rows but names has {n}")
        if not pd.Index(names).is_unique:
            raise ValueError("particle names must be unique")

    @property
    def n_particles(self) -> int:
        return int(self.names.size)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ParticleMetadata:
        """The particles at `indices` (distinct 0-based positions or a boolean mask), in order."""
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (self.n_particles,):
                raise ValueError(f"boolean mask has shape {index.shape}, expected ({self.n_particles},)")
            index = np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)

        def take(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        table = self.particles_table
        return replace(
            self,
            names=self.names[index],
            pixel_size_A=self.pixel_size_A[index],
            optics_group=self.optics_group[index],
            rotations=take(self.rotations),
            shifts_A=take(self.shifts_A),
            ctf=None if self.ctf is None else self.ctf.subset(index),
            image_paths=take(self.image_paths),
            image_indices=take(self.image_indices),
            half_sets=take(self.half_sets),
            particles_table=None if table is None else table.iloc[index].reset_index(drop=True),
        )


def _as_vector(values: Any, dtype: Any, name: str, n: int | None = None) -> np.ndarray:
    """`values` as a contiguous 1-D array of `dtype`, checked to hold `n` entries when n is given."""
    array = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    if array.ndim != 1 or (n is not None and array.size != n):
        raise ValueError(f"{name} must have shape ({n if n is not None else 'N'},), got {array.shape}")
    return array


def _as_array(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


@dataclass(frozen=True)
class _Overrides:
    """Values the caller supplies for what a file may not state; contradicting the file is an error."""

    box_size_px: int | None
    box_source: str
    pixel_size_A: float | None
    amplitude_contrast: float | None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CryoflexInputError(path, "file not found" if not path.exists() else "not a file", fix="check the path")


def _settle_box(path: Path, field: str, stated: Sequence[tuple[str, int | None]]) -> int | None:
    """The one box size every source that states one agrees on (None if none does)."""
    known = [(source, int(box)) for source, box in stated if box is not None]
    for source, box in known:
        if box <= 0:
            raise CryoflexInputError(
                path, f"{source} gives box size {box} px", fix="give a positive box size", field=field
            )
    for source, box in known[1:]:
        if box != known[0][1]:
            raise CryoflexInputError(
                path,
                f"{known[0][0]} says the box is {known[0][1]} px but {source} says {box} px",
                fix="give a box size that matches the particle images",
                field=field,
            )
    return known[0][1] if known else None


# The command-line option that gives each overridable value, the values it may take, and the advice when it is not one
_OVERRIDE_OPTIONS = {"pixel_size_A": "--pixel-size-A", "amplitude_contrast": "--amplitude-contrast"}
_OVERRIDE_VALID = {
    "pixel_size_A": (lambda value: value > 0, "give the pixel size in A, a positive number"),
    "amplitude_contrast": (lambda value: 0 <= value <= 1, "give a fraction from 0 to 1, e.g. 0.1"),
}


def _fill(
    path: Path, field: str, from_file: np.ndarray | None, override: float | None, n: int, *, setting: str
) -> np.ndarray | None:
    """A per-particle value from the file, else the caller's override (`setting`, a field of _Overrides); the two must
    agree when both exist."""
    if from_file is None and override is not None:
        valid, fix = _OVERRIDE_VALID[setting]
        if not (math.isfinite(override) and valid(override)):
            option = _OVERRIDE_OPTIONS[setting]
            raise CryoflexInputError(None, f"{option} {override:g}", fix=fix, field=option)
    if from_file is None:
        return None if override is None else np.full(n, float(override))
    if override is not None and not np.allclose(from_file, override, rtol=1e-6, atol=0.0):
        raise CryoflexInputError(
            path,
            f"the file gives {field} {np.unique(from_file)[:5].tolist()} but {override} was passed",
            fix=f"leave out {_OVERRIDE_OPTIONS[setting]}, or correct the file",
            field=field,
        )
    return from_file


def _half_sets(path: Path, field: str, values: np.ndarray | None) -> np.ndarray | None:
    """A refinement's half sets (1 or 2 per particle) from `field`, or None: absent, or holding other values (then
    with a warning, and reconstruction draws its own halves)."""
    if values is None:
        return None
    if not np.isin(values, (1, 2)).all():
        logger.warning("%s: %s holds values other than 1 and 2; its half sets are not used", path, field)
        return None
    return np.asarray(values, dtype=np.int64)


# Where a per-particle value of `field` at a particle row comes from, and how to correct it there: the row itself in
# most files; a STAR file's optics values come from the particle's optics group (relion._StarTables.locate)
Locate = Callable[[str, int], tuple[str, str]]


def particle_row(field: str, row: int) -> tuple[str, str]:
    """The Locate of a value held by each particle's own row."""
    return f"at particle row {row + 1}", "correct or remove that particle"


def _check_values(
    path: Path, field: str, values: np.ndarray, ok: np.ndarray, requirement: str, locate: Locate = particle_row
) -> None:
    """Raise naming the field and where the first particle's value that breaks `requirement` comes from."""
    if not ok.all():
        row = int(np.argmin(ok))
        where, fix = locate(field, row)
        raise CryoflexInputError(
            path, f"{field} is {values[row]:g} {where}; it must be {requirement}", fix=fix, field=field
        )


def _first_bad_row(
    path: Path, field: str, where: str, raw: Any, row: int, *, text_table: bool = False
) -> CryoflexInputError:
    """The error for the first row whose `field` is not a finite number. text_table: a STAR table, where a value that
    reads as NaN is also what a row with too few values gives."""
    if text_table and (raw is None or (isinstance(raw, float) and math.isnan(raw))):
        problem = (f"{field} in {where} has no number at row {row + 1}: it reads as NaN, written so or because the "
                   "row holds fewer values than the table has columns (a file cut short, or a '#' or an unquoted space "
                   "inside a value)")  # fmt: skip
    else:
        problem = f"{field} in {where} is '{raw}' at row {row + 1}: every metadata value must be a finite number"
    return CryoflexInputError(
        path, problem,
        fix="repair or remove that row (e.g. with relion_star_handler or pandas) and read the file again",
        field=field,
    )  # fmt: skip


def _assemble_ctf(
    path: Path,
    values: Mapping[str, np.ndarray | None],
    sources: Mapping[str, str],
    n: int,
    fix: str,
    locate: Locate = particle_row,
) -> CTFParameters:
    """CTF parameters from the fields found; missing optional fields get 0 / 0 / 1, missing required raise."""
    missing = [sources[name] for name in _REQUIRED_CTF if values.get(name) is None]
    if missing:
        if missing == [sources["amplitude_contrast"]]:  # RELION 3.0 files: the only field they may lack
            fix += "; or pass the amplitude contrast that was used (--amplitude-contrast 0.1 if it was 0.1)"
        raise CryoflexInputError(
            path,
            f"missing CTF field(s) {', '.join(missing)}: cryoflex needs every particle's CTF",
            fix=fix,
            field=", ".join(missing),
        )
    complete: dict[str, np.ndarray] = {}
    for name in _REQUIRED_CTF:
        complete[name] = np.asarray(values[name])
    for name, default in _OPTIONAL_CTF_DEFAULTS.items():
        value = values.get(name)
        complete[name] = np.full(n, default) if value is None else value
    ctf = CTFParameters(**complete)
    for name in ("defocus_u_A", "defocus_v_A"):  # RELION's and cryoSPARC's defocus is positive for underfocus
        defocus = getattr(ctf, name)
        _check_values(
            path, sources[name], defocus, defocus >= 0, "0 or more (Angstrom, positive for underfocus)", locate
        )
    _check_values(path, sources["voltage_kV"], ctf.voltage_kV, ctf.voltage_kV > 0, "positive (kV)", locate)
    contrast = ctf.amplitude_contrast
    ok = (contrast >= 0) & (contrast <= 1)
    _check_values(path, sources["amplitude_contrast"], contrast, ok, "between 0 and 1", locate)
    return ctf


def _checked_pixel_size(
    path: Path, field: str, pixel_size_A: np.ndarray | None, fix: str, locate: Locate = particle_row
) -> np.ndarray:
    if pixel_size_A is None:
        raise CryoflexInputError(path, "the file states no pixel size", fix=fix, field=field)
    _check_values(path, field, pixel_size_A, pixel_size_A > 0, "positive (Angstrom)", locate)
    return pixel_size_A


_T = TypeVar("_T")


def _required(metadata: ParticleMetadata, value: _T | None, field: str, problem: str, fix: str) -> _T:
    """`value`, or an error naming the record's source file when the record lacks it."""
    if value is None:
        raise CryoflexInputError(metadata.source_path, problem, fix=fix, field=field)
    return value
