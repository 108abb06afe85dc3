"""Put the nominal structure in the particles' frame: origin at the box centre (pixel/voxel N//2), in A.

A structure fitted into a consensus map lives in that map's frame; the particles' frame has its origin at the
map's centre voxel. MRC placement follows ChimeraX (map_data/mrc/mrc_format.py), as cryoflex.io.maps does: voxel
(0, 0, 0) sits at the header origin (x, y, z) when it is non-zero, else at (NXSTART, NYSTART, NZSTART) times the
voxel size (start values are per file axis and mapped to x, y, z through MAPC/MAPR/MAPS).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.maps import MAP_FIX

CENTROID_TOLERANCE = 0.1  # centroid farther than this fraction of the box from the origin: placement is unknown
_PLACEMENT_FIX = (
    "pass the consensus map the structure was fitted into (--consensus-map MAP.mrc), or the box centre in the "
    "structure's frame (--box-centre-A X Y Z), or --centre-structure if the particles were centred on the "
    "structure's centroid"
)


def _read_header(map_path: Path) -> np.recarray:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="mrcfile")
            with mrcfile.open(map_path, header_only=True, permissive=True) as mrc:
                return mrc.header.copy()
    except (OSError, ValueError, EOFError) as err:
        raise CryoflexInputError(
            map_path, f"not a readable MRC map ({err})", fix=MAP_FIX, field="--consensus-map"
        ) from err


def _map_grid_xyz(map_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corner, voxel counts, voxel size), each (x, y, z), of a map's grid in its own frame; corner in A is where voxel
    (0, 0, 0) sits."""
    header = _read_header(map_path)
    labels = [int(header.mapc), int(header.mapr), int(header.maps)]  # x/y/z label of file axes c, r, s
    if sorted(labels) != [1, 2, 3]:
        raise CryoflexInputError(
            map_path, f"MAPC/MAPR/MAPS = {tuple(labels)} is not a permutation of 1, 2, 3", fix=MAP_FIX, field="MAPC"
        )
    counts_crs = (int(header.nx), int(header.ny), int(header.nz))
    starts_crs = (int(header.nxstart), int(header.nystart), int(header.nzstart))
    counts_xyz, starts_xyz = np.zeros(3), np.zeros(3)
    for label, count, start in zip(labels, counts_crs, starts_crs, strict=True):
        counts_xyz[label - 1], starts_xyz[label - 1] = count, start
    sampling = np.array([int(header.mx), int(header.my), int(header.mz)], dtype=np.float64)
    cell_A = np.array([header.cella.x, header.cella.y, header.cella.z], dtype=np.float64)
    if np.any(sampling <= 0) or np.any(cell_A <= 0) or np.any(counts_xyz <= 0):
        raise CryoflexInputError(
            map_path,
            "header has no voxel size (cell dimensions or sampling are 0) or an empty grid",
            fix="set the voxel size in the map header (e.g. ChimeraX: volume #1 voxelSize A; save)",
            field="voxel size",
        )
    voxel_A = cell_A / sampling
    origin_A = np.array([header.origin.x, header.origin.y, header.origin.z], dtype=np.float64)
    if not np.all(np.isfinite(origin_A)):
        raise CryoflexInputError(
            map_path, f"header origin {origin_A.tolist()} is not finite", fix=MAP_FIX, field="origin"
        )
    corner_A = origin_A if np.any(origin_A != 0) else starts_xyz * voxel_A
    return corner_A, counts_xyz, voxel_A


def box_centre_from_map_A(map_path: Path) -> np.ndarray:
    """(x, y, z) in A of a consensus map's centre voxel (index N//2 on each axis), in the structure's frame."""
    corner_A, counts_xyz, voxel_A = _map_grid_xyz(Path(map_path))
    return corner_A + (counts_xyz // 2) * voxel_A


def map_extent_A(map_path: Path) -> np.ndarray:
    """(x, y, z) in A that a map's grid spans (voxel counts times voxel size): a consensus map reconstructed from the
    particles spans their box."""
    _, counts_xyz, voxel_A = _map_grid_xyz(Path(map_path))
    return counts_xyz * voxel_A


def _centroid_A(coords_A: np.ndarray) -> np.ndarray:
    return coords_A.reshape(-1, 3).mean(axis=0)


def place_structure_A(
    coords_A: np.ndarray,
    *,
    structure_path: Path,
    box_size_A: float,
    box_centre_A: np.ndarray | None = None,
    centre_on_centroid: bool = False,
) -> np.ndarray:
    """C-alpha coordinates (..., 3) moved into the particle frame; CryoflexInputError when that is unknown or bad.

    box_centre_A: the box centre in the structure's frame (e.g. box_centre_from_map_A) is subtracted.
    centre_on_centroid: the C-alpha centroid is subtracted. Neither: kept as is, provided the centroid lies
    within CENTROID_TOLERANCE * box_size_A of the origin (else the frame is ambiguous and this raises).
    """
    if box_centre_A is not None and centre_on_centroid:
        raise ValueError("give either box_centre_A or centre_on_centroid, not both")
    coords = np.asarray(coords_A, dtype=np.float64)
    if coords.shape[-1:] != (3,) or coords.size == 0:
        raise ValueError(f"coords_A must have shape (..., 3) and hold at least one atom, got {coords.shape}")
    if box_centre_A is not None:
        centre = np.asarray(box_centre_A, dtype=np.float64).reshape(3)
        placed = coords - centre
    elif centre_on_centroid:
        placed = coords - _centroid_A(coords)
    else:
        distance_A = float(np.linalg.norm(_centroid_A(coords)))
        if distance_A > CENTROID_TOLERANCE * box_size_A:
            raise CryoflexInputError(
                structure_path,
                f"the C-alpha centroid is {distance_A:.1f} A from the origin, more than "
                f"{CENTROID_TOLERANCE:g} x the {box_size_A:g} A box: the structure is not in the particles' frame "
                "(origin at the box centre)",
                fix=_PLACEMENT_FIX,
                field="placement",
            )
        placed = coords
    outside = np.any(np.abs(placed.reshape(-1, 3)) > box_size_A / 2, axis=1)
    if outside.any():
        raise CryoflexInputError(
            structure_path,
            f"{int(outside.sum())} of {outside.size} C-alpha atoms lie outside the {box_size_A:g} A box after "
            "placement (|x|, |y| or |z| > half the box)",
            fix="use a larger box (re-extract the particles) or check the placement "
            "(--consensus-map / --box-centre-A / --centre-structure)",
            field="placement",
        )
    return placed
