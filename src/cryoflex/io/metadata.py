"""Particle metadata: RELION 3.0/3.1/5 STAR, cryoSPARC .cs and cryoDRGN .pkl -> one ParticleMetadata record.

Conventions (docs/conventions.md): rotations R map centred model coordinates to x' = R x, projected along z; shifts_A
are RELION origins (ox, oy) in Angstrom, observed(x) = centred_projection(x + origin); angles in degrees.
cryoDRGN poses.pkl stores t = origin_px / D with the same sign (checked against its golden pose.star.pkl
and pose.cs.pkl). Optional CTF fields (phase shift, B-factor, scale) default to 0, 0, 1; every value read
is checked to be finite. Sections of docs/conventions.md: "Rotations and projection", "Origins (particle shifts)",
"Pixel size", "Image references", "Missing CTF values", "cryoSPARC poses and shifts", "cryoDRGN files".
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import starfile

from cryoflex.errors import CryoflexInputError
from cryoflex.geometry.rotations import (
    cryosparc_rotvec_to_matrix,
    matrix_to_relion_euler,
    relion_euler_to_matrix,
)
from cryoflex.io.atomic import atomic_path
from cryoflex.io.particles import ParticleStack

FORMATS = ("relion3.0", "relion3.1", "relion5", "cryosparc", "cryodrgn")
RELION_WRITE_VERSION = 30001

_REQUIRED_CTF = (
    "defocus_u_A",
    "defocus_v_A",
    "defocus_angle_deg",
    "voltage_kV",
    "cs_mm",
    "amplitude_contrast",
)
_OPTIONAL_CTF_DEFAULTS = {"phase_shift_deg": 0.0, "bfactor_A2": 0.0, "scale": 1.0}
_STAR_CTF_COLUMNS = {
    "defocus_u_A": "rlnDefocusU",
    "defocus_v_A": "rlnDefocusV",
    "defocus_angle_deg": "rlnDefocusAngle",
    "voltage_kV": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift_deg": "rlnPhaseShift",
    "bfactor_A2": "rlnCtfBfactor",
    "scale": "rlnCtfScalefactor",
}
_CS_CTF_FIELDS = {
    "defocus_u_A": "ctf/df1_A",
    "defocus_v_A": "ctf/df2_A",
    "defocus_angle_deg": "ctf/df_angle_rad",
    "voltage_kV": "ctf/accel_kv",
    "cs_mm": "ctf/cs_mm",
    "amplitude_contrast": "ctf/amp_contrast",
    "phase_shift_deg": "ctf/phase_shift_rad",
    "bfactor_A2": "ctf/bfactor",
    "scale": "ctf/scale",
}
_CS_RADIAN_FIELDS = ("defocus_angle_deg", "phase_shift_deg")
# cryoDRGN ctf.pkl columns, in order.
_CRYODRGN_CTF_COLUMNS = ("D", "Apix", "dfU", "dfV", "dfAng", "kV", "Cs", "w", "phase")
_CRYODRGN_CTF_SOURCES = {
    "defocus_u_A": "dfU",
    "defocus_v_A": "dfV",
    "defocus_angle_deg": "dfAng",
    "voltage_kV": "kV",
    "cs_mm": "Cs",
    "amplitude_contrast": "w",
    "phase_shift_deg": "phase",
    "bfactor_A2": "bfactor",
    "scale": "scale",
}
_ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_OPTICS_KEY_COLUMNS = ("rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# Particle columns the RELION writer derives from the record (or moves to data_optics), never copies.
_DERIVED_PARTICLE_COLUMNS = frozenset(
    {
        "rlnImageName",
        "rlnOpticsGroup",
        "rlnOriginX",
        "rlnOriginY",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnImageSize",
        "rlnImageDimensionality",
        "rlnDetectorPixelSize",
        "rlnMagnification",
        *_ANGLE_COLUMNS,
        *_STAR_CTF_COLUMNS.values(),
        *_OPTICS_KEY_COLUMNS,
    }
)
_VERSION_COMMENT = re.compile(rb"^#\s*version\s+(\d+)", re.MULTILINE)
_PARTICLE_STAR_HINT = (
    "give a RELION particle STAR file (e.g. Refine3D/jobNNN/run_data.star or Extract/jobNNN/particles.star): "
    "a table with rlnImageName ('k@stack.mrcs'), rlnDefocusU/V/Angle and poses, and data_optics (3.1+)"
)


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

    def __post_init__(self) -> None:
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


# ------------------------------------------------------------ reading


def read_metadata(
    path: str | Path,
    *,
    ctf_path: str | Path | None = None,
    stack_path: str | Path | None = None,
    box_size_px: int | None = None,
    pixel_size_A: float | None = None,
    amplitude_contrast: float | None = None,
) -> ParticleMetadata:
    """Read particle metadata (.star, .cs, or cryoDRGN .pkl) into one record; CryoflexInputError on bad input.

    ctf_path: the cryoDRGN ctf.pkl that goes with a poses .pkl. stack_path: the particles are images 0..N-1 of
    this stack (cryoDRGN's convention; replaces image references in the file). box_size_px, pixel_size_A,
    amplitude_contrast: for files that do not state them (e.g. RELION 3.0 files without rlnAmplitudeContrast;
    cryoDRGN assumes 0.1 there). A value that contradicts the file raises.
    """
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if ctf_path is not None and suffix != ".pkl":
        raise CryoflexInputError(
            ctf_path,
            "a separate CTF file only goes with a cryoDRGN poses .pkl; .star and .cs files hold their CTF",
            fix="leave out the CTF file",
            field="ctf_path",
        )
    stack = None if stack_path is None else _open_stack(Path(stack_path))
    box_source = "box_size_px"
    if stack is not None:
        box_size_px = _settle_box(path, "box size", [("box_size_px", box_size_px), (stack[0], stack[2])])
        box_source = stack[0]
    overrides = _Overrides(box_size_px, box_source, pixel_size_A, amplitude_contrast)
    if suffix == ".star":
        metadata = _read_star(path, overrides)
    elif suffix == ".cs":
        metadata = _read_cryosparc(path, overrides)
    elif suffix == ".pkl":
        metadata = _read_cryodrgn(path, None if ctf_path is None else Path(ctf_path), overrides)
    else:
        raise CryoflexInputError(
            path,
            f"unknown particle metadata type '{suffix}'",
            fix="give a RELION .star, a cryoSPARC .cs or a cryoDRGN poses .pkl",
        )
    return metadata if stack is None else _attach_stack(metadata, stack)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CryoflexInputError(
            path, "file not found" if not path.exists() else "not a file", fix="check the path"
        )


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
            field="stack_path",
        )
    return replace(metadata, image_paths=np.full(n, stack_file), image_indices=np.arange(n))


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


def _fill(
    path: Path, field: str, from_file: np.ndarray | None, override: float | None, n: int
) -> np.ndarray | None:
    """A per-particle value from the file, else the caller's override; the two must agree when both exist."""
    if from_file is None:
        return None if override is None else np.full(n, float(override))
    if override is not None and not np.allclose(from_file, override, rtol=1e-6, atol=0.0):
        raise CryoflexInputError(
            path,
            f"the file gives {field} {np.unique(from_file)[:5].tolist()} but {override} was passed",
            fix=f"leave out the {field} option, or correct the file",
            field=field,
        )
    return from_file


def _check_values(path: Path, field: str, values: np.ndarray, ok: np.ndarray, requirement: str) -> None:
    """Raise naming the field and first particle row whose value breaks `requirement`."""
    if not ok.all():
        row = int(np.argmin(ok))
        raise CryoflexInputError(
            path,
            f"{field} is {values[row]:g} at particle row {row + 1}; it must be {requirement}",
            fix="correct or remove that particle",
            field=field,
        )


def _first_bad_row(path: Path, field: str, where: str, raw: Any, row: int) -> CryoflexInputError:
    return CryoflexInputError(
        path,
        f"{field} in {where} is '{raw}' at row {row + 1}: every metadata value must be a finite number",
        fix="repair or remove that row (e.g. with relion_star_handler or pandas) and read the file again",
        field=field,
    )


def _assemble_ctf(
    path: Path, values: dict[str, np.ndarray | None], sources: dict[str, str], n: int, fix: str
) -> CTFParameters:
    """CTF parameters from the fields found; missing optional fields get 0 / 0 / 1, missing required raise."""
    missing = [sources[name] for name in _REQUIRED_CTF if values.get(name) is None]
    if missing:
        if sources["amplitude_contrast"] in missing:
            fix += "; or pass the amplitude contrast that was used (amplitude_contrast=0.1 if it was 0.1)"
        raise CryoflexInputError(
            path,
            f"missing CTF field(s) {', '.join(missing)}: cryoflex needs every particle's CTF",
            fix=fix,
            field=", ".join(missing),
        )
    complete = {name: values[name] for name in _REQUIRED_CTF}
    for name, default in _OPTIONAL_CTF_DEFAULTS.items():
        value = values.get(name)
        complete[name] = np.full(n, default) if value is None else value
    ctf = CTFParameters(**complete)
    _check_values(path, sources["voltage_kV"], ctf.voltage_kV, ctf.voltage_kV > 0, "positive (kV)")
    contrast = ctf.amplitude_contrast
    _check_values(
        path, sources["amplitude_contrast"], contrast, (contrast >= 0) & (contrast <= 1), "between 0 and 1"
    )
    return ctf


def _checked_pixel_size(path: Path, field: str, pixel_size_A: np.ndarray | None, fix: str) -> np.ndarray:
    if pixel_size_A is None:
        raise CryoflexInputError(path, "the file states no pixel size", fix=fix, field=field)
    _check_values(path, field, pixel_size_A, pixel_size_A > 0, "positive (Angstrom)")
    return pixel_size_A


# ------------------------------------------------------------ RELION STAR


@dataclass(frozen=True)
class _StarTables:
    """The particle table, its optics table and each particle's optics row: one place to look columns up."""

    path: Path
    particles: pd.DataFrame
    particle_block: str
    optics: pd.DataFrame | None
    optics_block: str | None
    optics_group: np.ndarray
    optics_row: np.ndarray | None

    def has(self, column: str) -> bool:
        return column in self.particles.columns or (self.optics is not None and column in self.optics.columns)

    def values(self, column: str) -> np.ndarray | None:
        """Per-particle values of a numeric column: the particle's own, else its optics group's, else None."""
        if column in self.particles.columns:
            return _finite_column(self.path, self.particles, column, self.particle_block)
        if self.optics is not None and self.optics_row is not None and column in self.optics.columns:
            return _finite_column(self.path, self.optics, column, str(self.optics_block))[self.optics_row]
        return None


def _finite_column(path: Path, table: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """A numeric column as float64; raise naming the column and the first row that is not a finite number."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argmin(finite))
        raise _first_bad_row(path, column, f"data_{block}", table[column].iloc[row], row)
    return values


def _integer_column(path: Path, table: pd.DataFrame, column: str, block: str) -> np.ndarray:
    values = _finite_column(path, table, column, block)
    integral = values == np.round(values)
    if not integral.all():
        row = int(np.argmin(integral))
        raise CryoflexInputError(
            path,
            f"{column} in data_{block} is {values[row]:g} at row {row + 1}; it must be a whole number",
            fix="repair that row",
            field=column,
        )
    return values.astype(np.int64)


def _parse_star(path: Path) -> dict[str, pd.DataFrame | dict[str, Any]]:
    try:
        return starfile.read(path, always_dict=True)
    # starfile raises many kinds of errors on malformed text; all mean the same to the user.
    except Exception as error:
        raise CryoflexInputError(
            path, f"not a readable STAR file ({type(error).__name__}: {error})", fix=_PARTICLE_STAR_HINT
        ) from error


def _star_version(path: Path) -> int | None:
    """The RELION '# version NNNNN' comment at the top of the file, if any (RELION 5 writes 50001)."""
    with path.open("rb") as handle:
        match = _VERSION_COMMENT.search(handle.read(65536))
    return None if match is None else int(match.group(1))


def _particle_block(path: Path, blocks: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    """The one table holding rlnImageName, found by its columns rather than its block name."""
    loops = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    candidates = [name for name, table in loops.items() if "rlnImageName" in table.columns]
    if len(candidates) > 1:
        listed = ", ".join(f"data_{name}" for name in candidates)
        raise CryoflexInputError(
            path,
            f"several tables hold rlnImageName ({listed}); cannot tell which are the particles",
            fix="keep one particle table in the file",
            field="rlnImageName",
        )
    if candidates:
        name = candidates[0]
        if loops[name].empty:
            raise CryoflexInputError(
                path, f"the particle table data_{name} has no rows", fix=_PARTICLE_STAR_HINT
            )
        return name, loops[name].reset_index(drop=True)
    if loops and all(table.empty for table in loops.values()):
        raise CryoflexInputError(
            path, "the file's tables have no rows: the particle table is empty", fix=_PARTICLE_STAR_HINT
        )
    if any("rlnTomoName" in table.columns for table in loops.values()):
        raise CryoflexInputError(
            path,
            "this is a RELION tomography particle file (rlnTomoName, no rlnImageName); "
            "cryoflex needs 2-D particle images",
            fix="extract 2-D particle stacks first and give their particle STAR file",
            field="rlnImageName",
        )
    found = ", ".join(f"data_{name}" for name in blocks) or "none"
    raise CryoflexInputError(
        path,
        f"not a particle STAR file: no table has an rlnImageName column (blocks found: {found})",
        fix=_PARTICLE_STAR_HINT,
        field="rlnImageName",
    )


def _optics_block(blocks: dict[str, Any], particle_block: str) -> tuple[str | None, pd.DataFrame | None]:
    """The optics table: rlnOpticsGroup plus optics columns, without rlnImageName (RELION 3.1+), else None."""
    for name, block in blocks.items():
        if name == particle_block or not isinstance(block, pd.DataFrame):
            continue
        columns = set(block.columns)
        if "rlnOpticsGroup" in columns and columns & {*_OPTICS_KEY_COLUMNS, "rlnImageSize"}:
            return name, block.reset_index(drop=True)
    return None, None


def _star_tables(
    path: Path,
    particles: pd.DataFrame,
    particle_block: str,
    optics: pd.DataFrame | None,
    optics_block: str | None,
) -> _StarTables:
    """Join each particle to its optics group (RELION 3.1+), checking every referenced group is defined."""
    n = len(particles)
    has_group = "rlnOpticsGroup" in particles.columns
    groups = (
        _integer_column(path, particles, "rlnOpticsGroup", particle_block)
        if has_group
        else np.ones(n, np.int64)
    )
    if optics is None:
        return _StarTables(path, particles, particle_block, None, None, groups, None)
    block = str(optics_block)
    defined = _integer_column(path, optics, "rlnOpticsGroup", block)
    if not pd.Index(defined).is_unique:
        raise CryoflexInputError(
            path,
            f"data_{block} defines an optics group twice ({defined.tolist()})",
            fix="give each optics group one row",
            field="rlnOpticsGroup",
        )
    if not has_group:
        if defined.size != 1:
            raise CryoflexInputError(
                path,
                f"data_{particle_block} has no rlnOpticsGroup column but data_{block} defines "
                f"{defined.size} groups",
                fix="add rlnOpticsGroup to the particle table",
                field="rlnOpticsGroup",
            )
        groups = np.full(n, defined[0])
    rows = pd.Index(defined).get_indexer(groups)
    if (rows < 0).any():
        first = int(np.argmax(rows < 0))
        raise CryoflexInputError(
            path,
            f"particle row {first + 1} refers to optics group {groups[first]}, which data_{block} "
            f"does not define (it defines {sorted(defined.tolist())})",
            fix="add that optics group to data_optics or correct the particle's rlnOpticsGroup",
            field="rlnOpticsGroup",
        )
    return _StarTables(path, particles, particle_block, optics, block, groups, rows)


def _relion_format(blocks: dict[str, Any], tables: _StarTables, version: int | None) -> str:
    """relion3.0 (one table), relion5 (version 5 comment, data_general or rlnTomo columns) or relion3.1."""
    if tables.optics is None:
        return "relion3.0"
    columns = [*tables.particles.columns, *tables.optics.columns]
    if (version or 0) >= 50000 or "general" in blocks or any(c.startswith("rlnTomo") for c in columns):
        return "relion5"
    return "relion3.1"


def _parse_image_names(names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split 'k@stack' names (k 1-based; no '@': image 1) -> (paths, 0-based index, valid)."""
    parts = np.char.partition(names, "@").reshape(-1, 3)
    has_at = parts[:, 1] == "@"
    paths = np.where(has_at, parts[:, 2], parts[:, 0])
    numbers = np.where(has_at, parts[:, 0], "1")
    valid = np.char.isdigit(numbers) & (np.char.str_len(paths) > 0)
    indices = np.where(valid, numbers, "0").astype(np.int64) - 1
    valid &= indices >= 0
    return paths, indices, valid


def _star_image_refs(path: Path, tables: _StarTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Particle names (rlnImageName, unique) and their stack paths and 0-based indices."""
    column = tables.particles["rlnImageName"]
    if column.isna().any():
        row = int(np.argmax(column.isna().to_numpy()))
        raise _first_bad_row(path, "rlnImageName", f"data_{tables.particle_block}", column.iloc[row], row)
    names = column.astype(str).to_numpy(dtype=str)
    duplicated = pd.Index(names).duplicated()
    if duplicated.any():
        row = int(np.argmax(duplicated))
        first = int(np.argmax(names == names[row]))
        raise CryoflexInputError(
            path,
            f"rlnImageName {names[row]!r} appears at rows {first + 1} and {row + 1}; each particle must "
            "name its own image (symmetry-expanded or duplicated particles are not supported)",
            fix="remove the duplicates (e.g. relion_star_handler --remove_duplicates)",
            field="rlnImageName",
        )
    paths, indices, valid = _parse_image_names(names)
    if not valid.all():
        row = int(np.argmin(valid))
        raise CryoflexInputError(
            path,
            f"rlnImageName {names[row]!r} at row {row + 1} is not 'k@stack' with a 1-based image number k",
            fix="write image names as e.g. 000001@Extract/job007/particles.mrcs",
            field="rlnImageName",
        )
    return names, paths, indices


def _star_pixel_size(tables: _StarTables, overrides: _Overrides) -> np.ndarray:
    """rlnImagePixelSize, else RELION 3.0 rlnDetectorPixelSize (um) * 1e4 / rlnMagnification, or override."""
    pixel = tables.values("rlnImagePixelSize")
    if pixel is None and tables.has("rlnDetectorPixelSize") and tables.has("rlnMagnification"):
        detector_um, magnification = tables.values("rlnDetectorPixelSize"), tables.values("rlnMagnification")
        _check_values(tables.path, "rlnMagnification", magnification, magnification > 0, "positive")
        pixel = detector_um * 1e4 / magnification
    pixel = _fill(tables.path, "rlnImagePixelSize", pixel, overrides.pixel_size_A, len(tables.particles))
    fix = (
        "RELION 3.1+ files give rlnImagePixelSize in data_optics, RELION 3.0 files rlnDetectorPixelSize and "
        "rlnMagnification; or pass the pixel size (pixel_size_A)"
    )
    return _checked_pixel_size(tables.path, "rlnImagePixelSize", pixel, fix)


def _star_box(tables: _StarTables, overrides: _Overrides) -> int | None:
    """The image size all optics groups agree on (rlnImageSize), checked against the caller's and stack's."""
    sizes = tables.values("rlnImageSize")
    from_file = None
    if sizes is not None:
        unique = np.unique(sizes)
        if unique.size > 1:
            by_group = dict(
                sorted({int(g): int(s) for g, s in zip(tables.optics_group, sizes, strict=True)}.items())
            )
            raise CryoflexInputError(
                tables.path,
                f"particles have different image sizes (optics group: rlnImageSize = {by_group}); "
                "cryoflex needs one box size",
                fix="re-extract (or rescale) all particles to one box size",
                field="rlnImageSize",
            )
        from_file = int(unique[0])
    return _settle_box(
        tables.path,
        "rlnImageSize",
        [("rlnImageSize", from_file), (overrides.box_source, overrides.box_size_px)],
    )


def _star_rotations(tables: _StarTables) -> np.ndarray | None:
    """Poses from rlnAngleRot/Tilt/Psi; None unless all three are present (2-D classes have psi only)."""
    if not all(tables.has(column) for column in _ANGLE_COLUMNS):
        return None
    rot, tilt, psi = (tables.values(column) for column in _ANGLE_COLUMNS)
    return relion_euler_to_matrix(rot, tilt, psi)


def _star_shifts(tables: _StarTables, pixel_size_A: np.ndarray) -> np.ndarray | None:
    """RELION origins in Angstrom: rlnOriginX/YAngst (3.1+) or rlnOriginX/Y in pixels (3.0), else None."""
    for x_column, y_column, scale in (
        ("rlnOriginXAngst", "rlnOriginYAngst", 1.0),
        ("rlnOriginX", "rlnOriginY", pixel_size_A),
    ):
        present = [tables.has(x_column), tables.has(y_column)]
        if all(present):
            return np.stack([tables.values(x_column), tables.values(y_column)], axis=1) * np.reshape(
                scale, (-1, 1)
            )
        if any(present):
            missing = y_column if present[0] else x_column
            raise CryoflexInputError(
                tables.path,
                f"{missing} is missing while its partner column is present",
                fix="give both origin columns or neither",
                field=missing,
            )
    return None


def _star_ctf(tables: _StarTables, overrides: _Overrides) -> CTFParameters:
    values = {name: tables.values(column) for name, column in _STAR_CTF_COLUMNS.items()}
    n = len(tables.particles)
    values["amplitude_contrast"] = _fill(
        tables.path, "rlnAmplitudeContrast", values["amplitude_contrast"], overrides.amplitude_contrast, n
    )
    fix = (
        "use the particle STAR from Extract/Refine3D, which has rlnDefocusU, rlnDefocusV, rlnDefocusAngle "
        "per particle and rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast in data_optics (3.1+) "
        "or per particle (RELION 3.0)"
    )
    return _assemble_ctf(tables.path, values, _STAR_CTF_COLUMNS, n, fix)


def _read_star(path: Path, overrides: _Overrides) -> ParticleMetadata:
    blocks = _parse_star(path)
    particle_block, particles = _particle_block(path, blocks)
    optics_block, optics = _optics_block(blocks, particle_block)
    tables = _star_tables(path, particles, particle_block, optics, optics_block)
    names, image_paths, image_indices = _star_image_refs(path, tables)
    pixel_size_A = _star_pixel_size(tables, overrides)
    return ParticleMetadata(
        source_path=path,
        format=_relion_format(blocks, tables, _star_version(path)),
        names=names,
        pixel_size_A=pixel_size_A,
        box_size_px=_star_box(tables, overrides),
        optics_group=tables.optics_group,
        rotations=_star_rotations(tables),
        shifts_A=_star_shifts(tables, pixel_size_A),
        ctf=_star_ctf(tables, overrides),
        image_paths=image_paths,
        image_indices=image_indices,
        particles_table=particles,
        optics_table=optics,
    )


# ------------------------------------------------------------ cryoSPARC


def _load_cs(path: Path) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CryoflexInputError(
            path,
            f"not a readable cryoSPARC .cs file ({error})",
            fix="give the particles .cs file of a cryoSPARC job",
        ) from error
    if not isinstance(table, np.ndarray) or table.dtype.names is None or table.ndim != 1:
        raise CryoflexInputError(
            path,
            "not a cryoSPARC particle table (expected a numpy structured array)",
            fix="give the particles .cs file of a cryoSPARC job",
        )
    if table.size == 0:
        raise CryoflexInputError(
            path, "the particle table is empty", fix="give a .cs file that holds particles"
        )
    return table


def _cs_field(path: Path, table: np.ndarray, name: str) -> np.ndarray | None:
    """A numeric .cs field as float64 (None if absent), checked finite, naming the first bad row."""
    if name not in table.dtype.names:
        return None
    values = np.asarray(table[name], dtype=np.float64)
    finite = np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise _first_bad_row(path, name, "the .cs table", values[row], row)
    return values


def _cs_image_refs(path: Path, table: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """blob/path (bytes; a leading '>' marks imported paths and is dropped) and blob/idx (0-based)."""
    names = table.dtype.names
    if "blob/path" not in names or "blob/idx" not in names:
        return None, None
    raw = table["blob/path"]
    paths = np.char.decode(raw, "utf-8") if raw.dtype.kind == "S" else raw.astype(str)
    paths = np.where(np.char.startswith(paths, ">"), np.char.lstrip(paths, ">"), paths)
    indices = _cs_field(path, table, "blob/idx")
    return paths, np.asarray(indices, dtype=np.int64)


def _cs_box(path: Path, table: np.ndarray, overrides: _Overrides) -> int | None:
    shapes = _cs_field(path, table, "blob/shape")
    from_file = None
    if shapes is not None:
        unique = np.unique(shapes.reshape(len(table), -1), axis=0)
        if unique.shape[0] != 1 or unique[0, 0] != unique[0, -1]:
            raise CryoflexInputError(
                path,
                f"particles have different or non-square image shapes {unique.astype(int).tolist()}; "
                "cryoflex needs one square box size",
                fix="re-extract all particles with one box size",
                field="blob/shape",
            )
        from_file = int(unique[0, 0])
    return _settle_box(
        path, "blob/shape", [("blob/shape", from_file), (overrides.box_source, overrides.box_size_px)]
    )


def _read_cryosparc(path: Path, overrides: _Overrides) -> ParticleMetadata:
    """A cryoSPARC particle table: poses from alignments3D (else alignments_class_0), shifts in pixels.

    Names are the uids; exposure group g becomes optics group g + 1 (RELION groups count from 1).
    """
    table = _load_cs(path)
    n = len(table)
    field_names = set(table.dtype.names)
    blob_pixel = _cs_field(path, table, "blob/psize_A")
    prefix = next((p for p in ("alignments3D", "alignments_class_0") if f"{p}/pose" in field_names), None)
    alignment_pixel = None if prefix is None else _cs_field(path, table, f"{prefix}/psize_A")
    pixel = _fill(
        path,
        "blob/psize_A",
        blob_pixel if blob_pixel is not None else alignment_pixel,
        overrides.pixel_size_A,
        n,
    )
    pixel = _checked_pixel_size(
        path, "blob/psize_A", pixel, "use a .cs file with blob/ fields or pass pixel_size_A"
    )
    rotations = shifts_A = None
    if prefix is not None:
        rotations = cryosparc_rotvec_to_matrix(_cs_field(path, table, f"{prefix}/pose"))
        shift_px = _cs_field(path, table, f"{prefix}/shift")
        if shift_px is not None:
            shifts_A = shift_px * (alignment_pixel if alignment_pixel is not None else pixel)[:, None]
    values = {name: _cs_field(path, table, field) for name, field in _CS_CTF_FIELDS.items()}
    for name in _CS_RADIAN_FIELDS:
        if values[name] is not None:
            values[name] = np.degrees(values[name])
    values["amplitude_contrast"] = _fill(
        path, "ctf/amp_contrast", values["amplitude_contrast"], overrides.amplitude_contrast, n
    )
    fix = (
        "cryoSPARC keeps CTF and image fields in the job's passthrough .cs file; export the particles "
        "from cryoSPARC (or use the job's exported particles .cs) so that one file holds ctf/, blob/ "
        "and alignments3D/"
    )
    ctf = _assemble_ctf(path, values, _CS_CTF_FIELDS, n, fix)
    image_paths, image_indices = _cs_image_refs(path, table)
    groups = _cs_field(path, table, "ctf/exp_group_id")
    uid = table["uid"].astype(str) if "uid" in field_names else np.arange(n).astype(str)
    return ParticleMetadata(
        source_path=path,
        format="cryosparc",
        names=uid,
        pixel_size_A=pixel,
        box_size_px=_cs_box(path, table, overrides),
        optics_group=np.ones(n, np.int64) if groups is None else groups.astype(np.int64) + 1,
        rotations=rotations,
        shifts_A=shifts_A,
        ctf=ctf,
        image_paths=image_paths,
        image_indices=image_indices,
        particles_table=None,
        optics_table=None,
    )


# ------------------------------------------------------------ cryoDRGN


def _load_pickle(path: Path) -> Any:
    """Unpickle a cryoDRGN file (pickle can run code: only read files you trust, as with cryoDRGN itself)."""
    _require_file(path)
    try:
        with path.open("rb") as handle:
            return pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as error:
        raise CryoflexInputError(
            path, f"not a readable cryoDRGN pickle ({error})", fix="give a cryoDRGN poses.pkl or ctf.pkl"
        ) from error


def _classify_pickle(path: Path, content: Any) -> tuple[str, tuple[np.ndarray, ...]]:
    """('poses', (R,) or (R, t)) or ('ctf', (table,)), told apart by array shapes."""
    parts = content if isinstance(content, tuple) else (content,)
    try:
        arrays = tuple(np.asarray(part, dtype=np.float64) for part in parts)
    except (TypeError, ValueError) as error:
        raise CryoflexInputError(
            path, f"not a cryoDRGN poses or CTF pickle ({error})", fix="give a cryoDRGN poses.pkl or ctf.pkl"
        ) from error
    rotation_like = bool(arrays) and arrays[0].ndim == 3 and arrays[0].shape[1:] == (3, 3)
    if rotation_like and len(arrays) == 1:
        return "poses", arrays
    if rotation_like and len(arrays) == 2 and arrays[1].shape == (arrays[0].shape[0], 2):
        return "poses", arrays
    if len(arrays) == 1 and arrays[0].ndim == 2 and arrays[0].shape[1] == len(_CRYODRGN_CTF_COLUMNS):
        return "ctf", arrays
    shapes = [a.shape for a in arrays]
    raise CryoflexInputError(
        path,
        f"not a cryoDRGN poses or CTF pickle (arrays of shapes {shapes})",
        fix="give poses.pkl (R of shape N x 3 x 3 and t of shape N x 2) and ctf.pkl (N x 9)",
    )


def _finite_array(path: Path, field: str, values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise _first_bad_row(path, field, path.name, values[row].tolist(), row)
    return values


def _checked_rotations(path: Path, rotations: np.ndarray) -> np.ndarray:
    """Rotation matrices, checked orthonormal with determinant +1 (catches arrays that are not poses)."""
    error = np.abs(rotations @ rotations.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    ok = (error < 1e-3) & (np.linalg.det(rotations) > 0)
    if not ok.all():
        row = int(np.argmin(ok))
        raise CryoflexInputError(
            path, f"R at row {row + 1} is not a rotation matrix", fix="give a cryoDRGN poses.pkl", field="R"
        )
    return rotations


def _read_cryodrgn(path: Path, ctf_path: Path | None, overrides: _Overrides) -> ParticleMetadata:
    """cryoDRGN poses.pkl (R, t = origin_px / D) and/or ctf.pkl, either given as `path`."""
    found: dict[str, tuple[Path, tuple[np.ndarray, ...]]] = {}
    for source in [path] if ctf_path is None else [path, ctf_path]:
        kind, arrays = _classify_pickle(source, _load_pickle(source))
        if kind in found:
            raise CryoflexInputError(
                source,
                f"both {found[kind][0]} and {source} are cryoDRGN {kind} files",
                fix="give one poses .pkl and one ctf .pkl",
                field="ctf_path",
            )
        found[kind] = (source, arrays)
    lengths = {str(source): arrays[0].shape[0] for source, arrays in found.values()}
    if len(set(lengths.values())) > 1:
        raise CryoflexInputError(
            path,
            f"the cryoDRGN files list different numbers of particles: {lengths}",
            fix="give the poses and CTF files of the same particles",
            field="N",
        )
    n = next(iter(lengths.values()))
    if n == 0:
        raise CryoflexInputError(path, "the file lists no particles", fix="give a non-empty cryoDRGN pickle")
    ctf = box = pixel = None
    if "ctf" in found:
        ctf_source, (table,) = found["ctf"]
        columns = {
            name: _finite_array(ctf_source, name, table[:, i]) for i, name in enumerate(_CRYODRGN_CTF_COLUMNS)
        }
        boxes = np.unique(columns["D"])
        if boxes.size > 1:
            raise CryoflexInputError(
                ctf_source,
                f"particles have different box sizes D {boxes.tolist()}",
                fix="cryoflex needs one box size",
                field="D",
            )
        box, pixel = int(boxes[0]), columns["Apix"]
        values = {
            name: columns[source] for name, source in _CRYODRGN_CTF_SOURCES.items() if source in columns
        }
        ctf = _assemble_ctf(ctf_source, values, _CRYODRGN_CTF_SOURCES, n, "give a complete cryoDRGN ctf.pkl")
    box = _settle_box(path, "D", [("ctf.pkl D", box), (overrides.box_source, overrides.box_size_px)])
    pixel = _fill(path, "Apix", pixel, overrides.pixel_size_A, n)
    pixel = _checked_pixel_size(
        path, "Apix", pixel, "pass the ctf.pkl (ctf_path) or the pixel size (pixel_size_A)"
    )
    rotations = shifts_A = None
    if "poses" in found:
        poses_source, arrays = found["poses"]
        rotations = _checked_rotations(poses_source, _finite_array(poses_source, "R", arrays[0]))
        if len(arrays) == 2:
            if box is None:
                raise CryoflexInputError(
                    poses_source,
                    "poses.pkl stores shifts as fractions of the box size, which is not known",
                    fix="pass the ctf.pkl (ctf_path), the particle stack (stack_path) or box_size_px",
                    field="t",
                )
            shifts_A = _finite_array(poses_source, "t", arrays[1]) * box * pixel[:, None]
    return ParticleMetadata(
        source_path=path,
        format="cryodrgn",
        names=np.arange(n).astype(str),
        pixel_size_A=pixel,
        box_size_px=box,
        optics_group=np.ones(n, np.int64),
        rotations=rotations,
        shifts_A=shifts_A,
        ctf=ctf,
        image_paths=None,
        image_indices=None,
        particles_table=None,
        optics_table=None,
    )


# ------------------------------------------------------------ writing


_T = TypeVar("_T")


def _required(metadata: ParticleMetadata, value: _T | None, field: str, problem: str, fix: str) -> _T:
    """`value`, or an error naming the record's source file when the record lacks it."""
    if value is None:
        raise CryoflexInputError(metadata.source_path, problem, fix=fix, field=field)
    return value


def _optics_for_writing(metadata: ParticleMetadata, ctf: CTFParameters) -> tuple[np.ndarray, pd.DataFrame]:
    """Each particle's optics group and the data_optics table; a group whose particles differ is split."""
    keys = pd.DataFrame(
        {
            "rlnOpticsGroup": metadata.optics_group,
            "rlnImagePixelSize": metadata.pixel_size_A,
            "rlnVoltage": ctf.voltage_kV,
            "rlnSphericalAberration": ctf.cs_mm,
            "rlnAmplitudeContrast": ctf.amplitude_contrast,
        }
    )
    codes = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy()
    optics = keys.drop_duplicates().reset_index(drop=True)
    original = metadata.optics_table
    if optics["rlnOpticsGroup"].is_unique:
        groups = metadata.optics_group
        if original is not None and "rlnOpticsGroup" in original.columns:
            extra = original.drop(
                columns=[
                    c
                    for c in (*_OPTICS_KEY_COLUMNS, "rlnImageSize", "rlnImageDimensionality")
                    if c in original.columns
                ]
            )
            extra = extra.assign(rlnOpticsGroup=pd.to_numeric(extra["rlnOpticsGroup"]).astype(np.int64))
            optics = optics.merge(extra, on="rlnOpticsGroup", how="left")
    else:
        groups = codes + 1
        optics["rlnOpticsGroup"] = np.arange(1, len(optics) + 1)
    default_names = pd.Series([f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    names = optics.pop("rlnOpticsGroupName") if "rlnOpticsGroupName" in optics.columns else default_names
    optics.insert(1, "rlnOpticsGroupName", names.where(names.notna(), default_names).astype(str))
    if metadata.box_size_px is not None:
        optics["rlnImageSize"] = metadata.box_size_px
    optics["rlnImageDimensionality"] = 2
    return groups, optics.sort_values("rlnOpticsGroup").reset_index(drop=True)


def _image_names_for_writing(metadata: ParticleMetadata) -> np.ndarray:
    """'k@stack' names (k 1-based); a name read from a file is kept verbatim when it names the same image."""
    paths, indices = np.asarray(metadata.image_paths), np.asarray(metadata.image_indices)
    built = np.char.add(np.char.add(np.char.zfill((indices + 1).astype(str), 6), "@"), paths)
    named_paths, named_indices, valid = _parse_image_names(metadata.names)
    same = valid & (named_paths == paths) & (named_indices == indices)
    return np.where(same, metadata.names, built)


def _particles_for_writing(
    metadata: ParticleMetadata, ctf: CTFParameters, groups: np.ndarray
) -> pd.DataFrame:
    """data_particles: the record's values plus every other column of a RELION input table."""
    ours: dict[str, np.ndarray] = {
        "rlnImageName": _image_names_for_writing(metadata),
        "rlnOpticsGroup": np.asarray(groups, dtype=np.int64),
    }
    if metadata.rotations is not None:
        angles = matrix_to_relion_euler(metadata.rotations)
        ours.update(zip(_ANGLE_COLUMNS, angles.T, strict=True))
    if metadata.shifts_A is not None:
        ours["rlnOriginXAngst"], ours["rlnOriginYAngst"] = metadata.shifts_A.T
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "phase_shift_deg", "bfactor_A2", "scale"):
        ours[_STAR_CTF_COLUMNS[name]] = getattr(ctf, name)
    table = pd.DataFrame(ours)
    original = metadata.particles_table
    if original is not None and metadata.format.startswith("relion"):
        kept = original.drop(columns=[c for c in original.columns if c in _DERIVED_PARTICLE_COLUMNS])
        table = pd.concat([table, kept.reset_index(drop=True)], axis=1)
    return table


def _with_version_comments(text: str) -> str:
    """Put RELION's '# version 30001' line before each block: RELION reads files without it as pre-3.1."""
    header = f"# version {RELION_WRITE_VERSION}\n\n"
    return re.sub(r"^(data_(?:optics|particles))$", header + r"\1", text, flags=re.MULTILINE)


def write_relion_star(path: str | Path, metadata: ParticleMetadata) -> None:
    """Write a RELION 3.1 particle STAR file (data_optics + data_particles, origins in A), atomically."""
    _required(
        metadata,
        metadata.image_paths,
        "rlnImageName",
        "the particles have no image references, which a RELION particle file needs",
        "read the metadata with the particle stack (stack_path)",
    )
    ctf = _required(
        metadata,
        metadata.ctf,
        "ctf",
        "the particles have no CTF parameters, which RELION needs",
        "read the metadata with its CTF (for cryoDRGN: ctf_path)",
    )
    groups, optics = _optics_for_writing(metadata, ctf)
    particles = _particles_for_writing(metadata, ctf, groups)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp)
        tmp.write_text(_with_version_comments(tmp.read_text()))


def _write_pickle(path: str | Path, content: Any) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        pickle.dump(content, handle, protocol=pickle.HIGHEST_PROTOCOL)


def write_cryodrgn_pkl(
    poses_path: str | Path | None, ctf_path: str | Path | None, metadata: ParticleMetadata
) -> None:
    """Write cryoDRGN poses.pkl ((R, t), t = origin_px / D; R alone without shifts) and/or ctf.pkl (N x 9)."""
    if poses_path is None and ctf_path is None:
        raise ValueError("give poses_path, ctf_path or both")
    box = _required(
        metadata,
        metadata.box_size_px,
        "box_size_px",
        "the box size is not known; cryoDRGN files need it",
        "read the metadata with the particle stack (stack_path) or box_size_px",
    )
    if poses_path is not None:
        rotations = _required(
            metadata,
            metadata.rotations,
            "rotations",
            "the particles have no poses to write",
            "use a metadata file with poses (angles)",
        )
        if metadata.shifts_A is None:
            _write_pickle(poses_path, rotations)
        else:
            _write_pickle(poses_path, (rotations, metadata.shifts_A / metadata.pixel_size_A[:, None] / box))
    if ctf_path is not None:
        ctf = _required(
            metadata,
            metadata.ctf,
            "ctf",
            "the particles have no CTF parameters to write",
            "use a metadata file with CTF parameters",
        )
        columns = [
            np.full(metadata.n_particles, float(box)),
            metadata.pixel_size_A,
            ctf.defocus_u_A,
            ctf.defocus_v_A,
            ctf.defocus_angle_deg,
            ctf.voltage_kV,
            ctf.cs_mm,
            ctf.amplitude_contrast,
            ctf.phase_shift_deg,
        ]
        _write_pickle(ctf_path, np.stack(columns, axis=1).astype(np.float32))


# ------------------------------------------------------------ summary


def _one_or_list(values: np.ndarray) -> float | list[float]:
    """A value shared by all particles as one float, else the sorted distinct values."""
    unique = np.unique(values)
    return float(unique[0]) if unique.size == 1 else [float(v) for v in unique]


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
    }
    if ctf is not None:
        defocus = np.concatenate([ctf.defocus_u_A, ctf.defocus_v_A])
        summary["defocus_range_A"] = [float(defocus.min()), float(defocus.max())]
        summary["voltage_kV"] = _one_or_list(ctf.voltage_kV)
    return summary


__all__ = [
    "FORMATS",
    "CTFParameters",
    "ParticleMetadata",
    "metadata_summary",
    "read_metadata",
    "write_cryodrgn_pkl",
    "write_relion_star",
]
