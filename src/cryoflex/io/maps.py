"""3-D density maps in MRC format: atomic writing with voxel size and origin, and permissive reading.

Arrays are (Z, Y, X). The origin is the position in Angstrom of voxel (0, 0, 0), stored in the header's
origin field (x, y, z) with NXSTART/NYSTART/NZSTART = 0, which is how ChimeraX places a map in model
coordinates.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path

_AXIS_X, _AXIS_Y, _AXIS_Z = 1, 2, 3
_ANISOTROPY_TOLERANCE = 1e-4
# the fix line of errors about a map file
MAP_FIX = "give the MRC map as RELION, cryoSPARC or ChimeraX wrote it (copy it again if a transfer was cut short)"


def write_mrc(
    path: str | Path,
    data: np.ndarray,
    voxel_size_A: float,
    origin_A: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Write a (Z, Y, X) map as float32 MRC atomically; origin_A = (x, y, z) of voxel (0, 0, 0) in A."""
    volume = np.asarray(data, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"a map must be 3-D (Z, Y, X), got shape {volume.shape}")
    if not voxel_size_A > 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size_A}")
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.set_volume()
        mrc.voxel_size = float(voxel_size_A)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
        mrc.header.origin = tuple(float(v) for v in origin_A)


def _axis_order(path: Path, header: np.recarray) -> tuple[int, int, int]:
    """Axis labels (1=X, 2=Y, 3=Z) of the data's (section, row, column) axes, from MAPS/MAPR/MAPC."""
    labels = (int(header.maps), int(header.mapr), int(header.mapc))
    if sorted(labels) != [_AXIS_X, _AXIS_Y, _AXIS_Z]:
        raise CryoflexInputError(
            path, f"MAPC/MAPR/MAPS = {labels[::-1]} is not a permutation of 1, 2, 3", fix=MAP_FIX, field="MAPC"
        )
    return labels


def _origin_A(
    header: np.recarray, labels: tuple[int, int, int], voxel_xyz_A: np.ndarray
) -> tuple[float, ...]:
    """Origin (x, y, z) in A: header origin if set, else N*START times the voxel size, as ChimeraX does."""
    origin = np.array([header.origin.x, header.origin.y, header.origin.z], dtype=np.float64)
    if np.any(origin != 0):
        return tuple(float(v) for v in origin)
    starts_by_data_axis = (int(header.nzstart), int(header.nystart), int(header.nxstart))
    start_xyz = np.zeros(3)
    for label, start in zip(labels, starts_by_data_axis, strict=True):
        start_xyz[label - 1] = start
    return tuple(float(v) for v in start_xyz * voxel_xyz_A)


def read_mrc(path: str | Path) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    """Read a map as (data float32 (Z, Y, X), voxel_size_A, origin_A (x, y, z)); tolerates sloppy headers."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="mrcfile")
            with mrcfile.open(path, permissive=True) as mrc:
                header = mrc.header.copy()
                voxel_xyz_A = np.array(
                    [mrc.voxel_size.x, mrc.voxel_size.y, mrc.voxel_size.z], dtype=np.float64
                )
                raw = None if mrc.data is None else np.array(mrc.data, dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise CryoflexInputError(path, f"not a readable MRC map ({err})", fix=MAP_FIX) from err
    if raw is None or raw.ndim != 3 or raw.size == 0:
        shape = None if raw is None else raw.shape
        raise CryoflexInputError(path, f"no non-empty 3-D data block could be read (data shape {shape})", fix=MAP_FIX)
    labels = _axis_order(path, header)
    data = np.ascontiguousarray(
        np.transpose(raw, [labels.index(axis) for axis in (_AXIS_Z, _AXIS_Y, _AXIS_X)])
    )
    if np.any(voxel_xyz_A <= 0):
        raise CryoflexInputError(
            path,
            "header has no voxel size (cell dimensions are 0)",
            fix="set the voxel size in the map header",
        )
    if np.ptp(voxel_xyz_A) > _ANISOTROPY_TOLERANCE * voxel_xyz_A.max():
        raise CryoflexInputError(
            path, f"voxels are not cubic ({tuple(voxel_xyz_A)} A)", fix="resample the map to cubic voxels"
        )
    origin_A = _origin_A(header, labels, voxel_xyz_A)
    return data, float(voxel_xyz_A[0]), (origin_A[0], origin_A[1], origin_A[2])
