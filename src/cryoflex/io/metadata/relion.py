"""RELION particle STAR files: 3.0 (one table), 3.1 and 5 (data_optics + data_particles) read, 3.1 written.

rlnImageName 'k@stack' (k 1-based) names each particle's image; origins are rlnOriginX/YAngst (3.1+) or
rlnOriginX/Y in pixels (3.0); optics values come from the particle row, else its optics group.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryoflex.errors import CryoflexInputError
from cryoflex.geometry.rotations import matrix_to_relion_euler, relion_euler_to_matrix
from cryoflex.io.atomic import atomic_path
from cryoflex.io.metadata.record import (
    CTFParameters,
    ParticleMetadata,
    _assemble_ctf,
    _check_values,
    _checked_pixel_size,
    _fill,
    _first_bad_row,
    _half_sets,
    _Overrides,
    _required,
    _settle_box,
    particle_row,
)

logger = logging.getLogger(__name__)

RELION_WRITE_VERSION = 30001
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
        "rlnRandomSubset",
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
# What to do with rows that share an rlnImageName: refuse, keep the first row of each image, keep every row.
DUPLICATE_IMAGES = ("refuse", "first", "distinct")
# Where a RELION file keeps what training needs, to name the missing field in errors.
TRAINING_FIELD_NAMES = {
    "rotations": "rlnAngleRot/rlnAngleTilt/rlnAnglePsi",
    "shifts_A": "rlnOriginXAngst/rlnOriginYAngst",
    "ctf": "rlnDefocusU/rlnDefocusV/rlnDefocusAngle",
}


# ------------------------------------------------------------ reading


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

    def locate(self, column: str, row: int) -> tuple[str, str]:
        """Where particle row `row`'s value of `column` comes from, and how to correct it there (record.Locate): the
        particle's own row, else its optics group's."""
        if column in self.particles.columns or self.optics is None or column not in self.optics.columns:
            return particle_row(column, row)
        return (f"in optics group {self.optics_group[row]} of data_{self.optics_block} (particle row {row + 1} and "
                "every particle of that group)", f"correct that value in data_{self.optics_block}")  # fmt: skip

    def present(self, column: str) -> np.ndarray:
        """values() of a column the caller has checked is present."""
        values = self.values(column)
        if values is None:
            raise KeyError(column)
        return values


def _finite_column(path: Path, table: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """A numeric column as float64; raise naming the column and the first row that is not a finite number."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argmin(finite))
        raise _first_bad_row(path, column, f"data_{block}", table[column].iloc[row], row, text_table=True)
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
            raise CryoflexInputError(path, f"the particle table data_{name} has no rows", fix=_PARTICLE_STAR_HINT)
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
    groups = _integer_column(path, particles, "rlnOpticsGroup", particle_block) if has_group else np.ones(n, np.int64)
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
                f"data_{particle_block} has no rlnOpticsGroup column but data_{block} defines {defined.size} groups",
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


def _image_names(path: Path, particles: pd.DataFrame, block: str) -> np.ndarray:
    """rlnImageName of every row as plain strings; raise naming the first empty one."""
    column = particles["rlnImageName"]
    if column.isna().any():
        row = int(np.argmax(column.isna().to_numpy()))
        raise _first_bad_row(path, "rlnImageName", f"data_{block}", column.iloc[row], row)
    return column.astype(str).to_numpy(dtype=str)


def _image_keys(names: np.ndarray) -> np.ndarray:
    """One key per image a name refers to: '000001@a.mrcs', '1@a.mrcs' and 'a.mrcs' are the same image."""
    paths, indices, valid = _parse_image_names(names)
    return np.where(valid, np.char.add(np.char.add(indices.astype(str), "@"), paths), names)


def _rows_per_image(path: Path, particles: pd.DataFrame, block: str, duplicate_images: str) -> pd.DataFrame:
    """The rows to read when several share an rlnImageName (e.g. symmetry expansion), as `duplicate_images` says:
    refuse with the choices, keep the first row of each image, or keep every row ("distinct")."""
    names = _image_names(path, particles, block)
    keys = _image_keys(names)
    shared = pd.Index(keys).duplicated(keep=False)
    if not shared.any() or duplicate_images == "distinct":
        return particles
    n_rows, n_images = int(shared.sum()), int(np.unique(keys[shared]).size)
    later = pd.Index(keys).duplicated()
    if duplicate_images == "first":
        logger.warning(
            "%s: %d rows share %d images (e.g. symmetry expansion); kept the first row of each image, dropped %d rows",
            path, n_rows, n_images, int(later.sum()),
        )  # fmt: skip
        return particles[~later].reset_index(drop=True)
    row = int(np.argmax(later))
    first = int(np.argmax(keys == keys[row]))
    if names[first] == names[row]:
        example = f"rlnImageName '{names[row]}' appears at rows {first + 1} and {row + 1}"
    else:
        example = f"rlnImageName '{names[first]}' at row {first + 1} and '{names[row]}' at row {row + 1} are one image"
    raise CryoflexInputError(
        path,
        f"{n_rows} rows share {n_images} image(s): {example} (symmetry expansion or duplicated particles give one "
        "image several rows)",
        fix="choose how to read them: --duplicate-images first keeps the first row of each image, "
        "--duplicate-images distinct treats every row as its own particle (read_metadata's duplicate_images); "
        "or remove the duplicates (relion_star_handler --remove_duplicates)",
        field="rlnImageName",
    )


def _star_image_refs(path: Path, tables: _StarTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Particle names and their stack paths and 0-based indices.

    Names are rlnImageName; rows that share an image (kept as distinct particles) get '#rowK' appended, K the
    1-based row, so that every particle has its own name.
    """
    names = _image_names(path, tables.particles, tables.particle_block)
    paths, indices, valid = _parse_image_names(names)
    if not valid.all():
        row = int(np.argmin(valid))
        raise CryoflexInputError(
            path,
            f"rlnImageName '{names[row]}' at row {row + 1} is not 'k@stack' with a 1-based image number k",
            fix="write image names as e.g. 000001@Extract/job007/particles.mrcs",
            field="rlnImageName",
        )
    shared = pd.Index(_image_keys(names)).duplicated(keep=False)
    if shared.any():
        rows = np.arange(1, names.size + 1).astype(str)
        names = np.where(shared, np.char.add(np.char.add(names, "#row"), rows), names)
    return names, paths, indices


def _star_pixel_size(tables: _StarTables, overrides: _Overrides) -> np.ndarray:
    """rlnImagePixelSize, else RELION 3.0 rlnDetectorPixelSize (um) * 1e4 / rlnMagnification, or override."""
    pixel = tables.values("rlnImagePixelSize")
    if pixel is None and tables.has("rlnDetectorPixelSize") and tables.has("rlnMagnification"):
        detector_um, magnification = tables.present("rlnDetectorPixelSize"), tables.present("rlnMagnification")
        _check_values(tables.path, "rlnMagnification", magnification, magnification > 0, "positive", tables.locate)
        pixel = detector_um * 1e4 / magnification
    pixel = _fill(
        tables.path, "rlnImagePixelSize", pixel, overrides.pixel_size_A, len(tables.particles), setting="pixel_size_A"
    )
    fix = (
        "RELION 3.1+ files give rlnImagePixelSize in data_optics, RELION 3.0 files rlnDetectorPixelSize and "
        "rlnMagnification; or pass the pixel size (--pixel-size-A)"
    )
    return _checked_pixel_size(tables.path, "rlnImagePixelSize", pixel, fix, tables.locate)


def _star_box(tables: _StarTables, overrides: _Overrides) -> int | None:
    """The image size all optics groups agree on (rlnImageSize), checked against the caller's and stack's."""
    sizes = tables.values("rlnImageSize")
    from_file = None
    if sizes is not None:
        unique = np.unique(sizes)
        if unique.size > 1:
            by_group = dict(sorted({int(g): int(s) for g, s in zip(tables.optics_group, sizes, strict=True)}.items()))
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
    rot, tilt, psi = (tables.present(column) for column in _ANGLE_COLUMNS)
    return relion_euler_to_matrix(rot, tilt, psi)


def _star_shifts(tables: _StarTables, pixel_size_A: np.ndarray) -> np.ndarray | None:
    """RELION origins in Angstrom: rlnOriginX/YAngst (3.1+) or rlnOriginX/Y in pixels (3.0), else None."""
    for x_column, y_column, scale in (
        ("rlnOriginXAngst", "rlnOriginYAngst", 1.0),
        ("rlnOriginX", "rlnOriginY", pixel_size_A),
    ):
        present = [tables.has(x_column), tables.has(y_column)]
        if all(present):
            return np.stack([tables.present(x_column), tables.present(y_column)], axis=1) * np.reshape(scale, (-1, 1))
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
        tables.path, "rlnAmplitudeContrast", values["amplitude_contrast"], overrides.amplitude_contrast, n,
        setting="amplitude_contrast",
    )
    fix = (
        "use the particle STAR from Extract/Refine3D, which has rlnDefocusU, rlnDefocusV, rlnDefocusAngle "
        "per particle and rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast in data_optics (3.1+) "
        "or per particle (RELION 3.0)"
    )
    return _assemble_ctf(tables.path, values, _STAR_CTF_COLUMNS, n, fix, tables.locate)


def read_star(path: Path, overrides: _Overrides, duplicate_images: str) -> ParticleMetadata:
    """A RELION 3.0, 3.1 or 5 particle STAR file as one record (names: rlnImageName).

    duplicate_images: what to do with rows that share an image (one of DUPLICATE_IMAGES).
    """
    blocks = _parse_star(path)
    particle_block, particles = _particle_block(path, blocks)
    particles = _rows_per_image(path, particles, particle_block, duplicate_images)
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
        half_sets=_half_sets(path, "rlnRandomSubset", tables.values("rlnRandomSubset")),
    )


# ------------------------------------------------------------ writing


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
                    c for c in (*_OPTICS_KEY_COLUMNS, "rlnImageSize", "rlnImageDimensionality") if c in original.columns
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


def _particles_for_writing(metadata: ParticleMetadata, ctf: CTFParameters, groups: np.ndarray) -> pd.DataFrame:
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
    if metadata.half_sets is not None:
        ours["rlnRandomSubset"] = metadata.half_sets
    table = pd.DataFrame(ours)
    original = metadata.particles_table
    if original is not None and metadata.format.startswith("relion"):
        kept = original.drop(columns=[c for c in original.columns if c in _DERIVED_PARTICLE_COLUMNS])
        table = pd.concat([table, kept.reset_index(drop=True)], axis=1)
    return table


def _with_version_comments(text: str) -> str:
    """Put RELION's '# version 30001' line before each block: RELION reads files without it as pre-3.1. The writer's
    own time-stamped comment is dropped, so that the same particles always give the same bytes."""
    text = re.sub(r"^# Created by the starfile Python package.*\n", "", text, flags=re.MULTILINE)
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
