"""cryoSPARC particle tables (.cs, a numpy structured array): read, and subsets written row for row.

Poses come from alignments3D (else alignments_class_0) as rotation vectors, shifts in pixels; CTF angles are in
radians; a leading '>' on blob/path marks imported stacks and is dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoflex.errors import CryoflexInputError, numpy_load_problem
from cryoflex.geometry.rotations import cryosparc_rotvec_to_matrix
from cryoflex.io.atomic import save_npy_atomic
from cryoflex.io.metadata.record import (
    ParticleMetadata,
    _assemble_ctf,
    _checked_pixel_size,
    _fill,
    _first_bad_row,
    _half_sets,
    _Overrides,
    _settle_box,
)

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
# Where a cryoSPARC .cs keeps what training needs, to name the missing field in errors.
TRAINING_FIELD_NAMES = {"rotations": "alignments3D/pose", "shifts_A": "alignments3D/shift", "ctf": "ctf/*"}


# ------------------------------------------------------------ reading


def _load_cs(path: Path) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise CryoflexInputError(
            path,
            f"not a readable cryoSPARC .cs file ({numpy_load_problem(error)})",
            fix="give the particles .cs file of a cryoSPARC job",
        ) from error
    if not isinstance(table, np.ndarray) or table.dtype.names is None or table.ndim != 1:
        raise CryoflexInputError(
            path,
            "not a cryoSPARC particle table (expected a numpy structured array)",
            fix="give the particles .cs file of a cryoSPARC job",
        )
    if table.size == 0:
        raise CryoflexInputError(path, "the particle table is empty", fix="give a .cs file that holds particles")
    return table


def _field_names(table: np.ndarray) -> tuple[str, ...]:
    """The field names of a structured array (none for a plain one)."""
    return table.dtype.names or ()


def _cs_field(path: Path, table: np.ndarray, name: str) -> np.ndarray | None:
    """A numeric .cs field as float64 (None if absent), checked finite, naming the first bad row."""
    if name not in _field_names(table):
        return None
    values = np.asarray(table[name], dtype=np.float64)
    finite = np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise _first_bad_row(path, name, "the .cs table", values[row], row)
    return values


def _cs_names(table: np.ndarray) -> np.ndarray:
    """Particle names: the uids as strings, else the row numbers (0-based)."""
    return table["uid"].astype(str) if "uid" in _field_names(table) else np.arange(len(table)).astype(str)


def _cs_image_refs(path: Path, table: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """blob/path (bytes; a leading '>' marks imported paths and is dropped) and blob/idx (0-based)."""
    names = _field_names(table)
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
    return _settle_box(path, "blob/shape", [("blob/shape", from_file), (overrides.box_source, overrides.box_size_px)])


def _cs_half_sets(path: Path, table: np.ndarray, prefix: str | None) -> np.ndarray | None:
    """A 3-D refinement's half sets: alignments3D/split (0 or 1) as 1 or 2, RELION's numbering."""
    split = _cs_field(path, table, "alignments3D/split") if prefix == "alignments3D" else None
    return _half_sets(path, "alignments3D/split", None if split is None else split + 1)


def read_cs(path: Path, overrides: _Overrides) -> ParticleMetadata:
    """A cryoSPARC particle table: poses from alignments3D (else alignments_class_0), shifts in pixels.

    Names are the uids; exposure group g becomes optics group g + 1 (RELION groups count from 1).
    """
    table = _load_cs(path)
    n = len(table)
    field_names = set(_field_names(table))
    blob_pixel = _cs_field(path, table, "blob/psize_A")
    prefix = next((p for p in ("alignments3D", "alignments_class_0") if f"{p}/pose" in field_names), None)
    alignment_pixel = None if prefix is None else _cs_field(path, table, f"{prefix}/psize_A")
    pixel = _fill(
        path,
        "blob/psize_A",
        blob_pixel if blob_pixel is not None else alignment_pixel,
        overrides.pixel_size_A,
        n,
        setting="pixel_size_A",
    )
    pixel_fix = "use the particles .cs of a cryoSPARC job (its blob/psize_A is the pixel size)"
    pixel = _checked_pixel_size(path, "blob/psize_A", pixel, pixel_fix)
    rotations = shifts_A = None
    if prefix is not None:
        rotations = cryosparc_rotvec_to_matrix(np.asarray(_cs_field(path, table, f"{prefix}/pose")))
        shift_px = _cs_field(path, table, f"{prefix}/shift")
        if shift_px is not None:
            shifts_A = shift_px * (alignment_pixel if alignment_pixel is not None else pixel)[:, None]
    values = {name: _cs_field(path, table, field) for name, field in _CS_CTF_FIELDS.items()}
    for name in _CS_RADIAN_FIELDS:
        radians = values[name]
        if radians is not None:
            values[name] = np.degrees(radians)
    values["amplitude_contrast"] = _fill(
        path, "ctf/amp_contrast", values["amplitude_contrast"], overrides.amplitude_contrast, n,
        setting="amplitude_contrast",
    )
    fix = (
        "cryoSPARC keeps CTF and image fields in the job's passthrough .cs file; export the particles "
        "from cryoSPARC (or use the job's exported particles .cs) so that one file holds ctf/, blob/ "
        "and alignments3D/"
    )
    ctf = _assemble_ctf(path, values, _CS_CTF_FIELDS, n, fix)
    image_paths, image_indices = _cs_image_refs(path, table)
    groups = _cs_field(path, table, "ctf/exp_group_id")
    return ParticleMetadata(
        source_path=path,
        format="cryosparc",
        names=_cs_names(table),
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
        half_sets=_cs_half_sets(path, table, prefix),
    )


# ------------------------------------------------------------ writing


def write_cryosparc_subset(path: str | Path, metadata: ParticleMetadata, indices: np.ndarray) -> None:
    """Copy rows `indices` of the record's source .cs (all fields, verbatim) into a new .cs, atomically.

    cryoSPARC keeps fields cryoflex does not read (passthroughs, per-job extras), so the subset is cut from the
    input file itself; the input must still hold the particles the record was read from.
    """
    table = _load_cs(metadata.source_path)
    if len(table) != metadata.n_particles or not np.array_equal(_cs_names(table)[indices], metadata.names[indices]):
        raise CryoflexInputError(
            metadata.source_path,
            "the .cs file no longer holds the particles the run was trained on",
            fix="restore the particle file the run was trained on",
            field="uid",
        )
    save_npy_atomic(path, table[indices])
