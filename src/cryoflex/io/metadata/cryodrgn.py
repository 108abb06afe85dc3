"""cryoDRGN poses.pkl ((R, t) or R alone) and ctf.pkl (N x 9 table): read and written.

poses.pkl stores t = origin_px / D with RELION's sign (checked against cryoDRGN's golden pose.star.pkl and
pose.cs.pkl); ctf.pkl columns are D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase. The particles are images 0..N-1 of
a separate stack.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path
from cryoflex.io.metadata.record import (
    ParticleMetadata,
    _assemble_ctf,
    _checked_pixel_size,
    _fill,
    _first_bad_row,
    _Overrides,
    _require_file,
    _required,
    _settle_box,
)

# ctf.pkl columns, in order.
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
# The only globals a pickle of numpy arrays, numbers and containers refers to (numpy 1 and 2 module names;
# _codecs.encode carries bytes in protocol 2); the cryoDRGN reader refuses a pickle that names anything else.
_PICKLE_GLOBALS = frozenset(
    {
        *((module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        *(("builtins", name) for name in ("tuple", "list", "dict", "int", "float", "complex", "bytes", "bytearray")),
    }
)
# Where cryoDRGN files keep what training needs, to name the missing field in errors.
TRAINING_FIELD_NAMES = {"rotations": "poses.pkl rotations", "shifts_A": "poses.pkl translations", "ctf": "ctf.pkl"}


# ------------------------------------------------------------ reading


class _NotAnArray(pickle.UnpicklingError):
    """A pickle refers to something other than numpy arrays, numbers and containers."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, tuples, lists and dicts only: nothing else is built, so no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.replace("__builtin__", "builtins"), name) not in _PICKLE_GLOBALS:
            raise _NotAnArray(f"{module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> Any:
    """Unpickle a cryoDRGN file with _ArrayUnpickler; a pickle of anything but arrays is refused unread."""
    _require_file(path)
    try:
        with path.open("rb") as handle:
            return _ArrayUnpickler(handle).load()
    except _NotAnArray as error:
        raise CryoflexInputError(
            path,
            f"the pickle contains objects other than arrays (it refers to {error}); cryoflex refuses to load it, "
            "since unpickling such objects can run any code",
            fix="give the poses.pkl and ctf.pkl that cryoDRGN wrote (numpy arrays only), from a source you trust",
        ) from None
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


def read_pickles(path: Path, ctf_path: Path | None, overrides: _Overrides) -> ParticleMetadata:
    """cryoDRGN poses.pkl (R, t = origin_px / D) and/or ctf.pkl, either given as `path`."""
    found: dict[str, tuple[Path, tuple[np.ndarray, ...]]] = {}
    for source in [path] if ctf_path is None else [path, ctf_path]:
        kind, arrays = _classify_pickle(source, _load_pickle(source))
        if kind in found:
            raise CryoflexInputError(
                source,
                f"both {found[kind][0]} and {source} are cryoDRGN {kind} files",
                fix="give one poses .pkl and one ctf .pkl",
                field="--ctf",
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
        columns = {name: _finite_array(ctf_source, name, table[:, i]) for i, name in enumerate(_CRYODRGN_CTF_COLUMNS)}
        boxes = np.unique(columns["D"])
        if boxes.size > 1:
            raise CryoflexInputError(
                ctf_source,
                f"particles have different box sizes D {boxes.tolist()}",
                fix="cryoflex needs one box size",
                field="D",
            )
        box, pixel = int(boxes[0]), columns["Apix"]
        values = {name: columns[source] for name, source in _CRYODRGN_CTF_SOURCES.items() if source in columns}
        ctf = _assemble_ctf(ctf_source, values, _CRYODRGN_CTF_SOURCES, n, "give a complete cryoDRGN ctf.pkl")
    box_path = found["ctf"][0] if "ctf" in found else path  # the file that states the box (ctf.pkl), if any
    box = _settle_box(box_path, "D", [("ctf.pkl D", box), (overrides.box_source, overrides.box_size_px)])
    pixel = _fill(path, "Apix", pixel, overrides.pixel_size_A, n, setting="pixel_size_A")
    pixel = _checked_pixel_size(path, "Apix", pixel, "pass the ctf.pkl (--ctf), which holds the pixel size")
    rotations = shifts_A = None
    if "poses" in found:
        poses_source, arrays = found["poses"]
        rotations = _checked_rotations(poses_source, _finite_array(poses_source, "R", arrays[0]))
        if len(arrays) == 2:
            if box is None:
                raise CryoflexInputError(
                    poses_source,
                    "poses.pkl stores shifts as fractions of the box size, which is not known",
                    fix="pass the ctf.pkl (--ctf) or the particle stack (--stack), either of which gives the box size",
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


def _write_pickle(path: str | Path, content: Any) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        pickle.dump(content, handle, protocol=pickle.HIGHEST_PROTOCOL)


def write_cryodrgn_pkl(poses_path: str | Path | None, ctf_path: str | Path | None, metadata: ParticleMetadata) -> None:
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
