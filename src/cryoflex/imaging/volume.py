"""Structure -> 3-D density map: the same Gaussian pseudo-atoms as the projector, sampled on an N^3 grid.

The map is indexed [z, y, x]; voxel (k, i, j) sits at ((j - N//2) a, (i - N//2) a, (k - N//2) a) in the
centred model frame and holds V(r) = sum_a A_a exp(-|r - x_a|^2 / (2 sigma^2)) at its centre. The Gaussian
is separable, so the map is built from three (n, N) exp tables, one z slab at a time (memory n * slab * N).

MRC output puts the map where the structure is: the header origin (x, y, z) is the position in A of voxel
(0, 0, 0), -(N//2) * a on each axis. ChimeraX (map_data/mrc/mrc_format.py) places an MRC2014 map by its
header origin whenever that is non-zero, and uses NXSTART/NYSTART/NZSTART * voxel size only when it is zero;
cryoflex.io.maps.write_mrc sets the origin and writes N*START = 0, so both readings agree (also for N = 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import overload

import numpy as np
import torch

from cryoflex.errors import CryoflexInputError
from cryoflex.io.maps import write_mrc

_SLAB_ELEMENTS = 1 << 25  # upper bound on n * slab * N elements held at once


def map_box_px(box_A: float, voxel_A: float, *, max_box_px: int, bytes_per_voxel: int, maps: str) -> int:
    """The even number of voxels a side that spans box_A at voxel_A; refuses more than max_box_px, which would not
    fit in memory, with the smallest --voxel-size-A that fits (`maps`: what the maps are, for the message)."""
    box_px = int(math.ceil(box_A / voxel_A / 2) * 2)
    if box_px > max_box_px:
        smallest_A = math.ceil(box_A / max_box_px * 1000) / 1000  # rounded up: the advice itself must fit
        raise CryoflexInputError(
            None, f"voxels of {voxel_A:g} A give {maps} of {box_px}^3 voxels "
            f"({box_px**3 * bytes_per_voxel / 2**30:,.1f} GB each) for the {box_A:g} A box",
            fix=f"give --voxel-size-A {smallest_A:g} or more (at most {max_box_px} voxels a side)",
            field="--voxel-size-A",
        )  # fmt: skip
    return box_px


def _axis_table(centres_A: torch.Tensor, grid_A: torch.Tensor, sigma_A: float) -> torch.Tensor:
    """exp(-(c - g)^2 / (2 sigma^2)) for centres (n,) and grid (N,) -> (n, N)."""
    return torch.exp((centres_A[:, None] - grid_A).square() * (-0.5 / sigma_A**2))


def _gaussian_volume_torch(
    coords_A: torch.Tensor, amplitudes: torch.Tensor, box_size_px: int, voxel_size_A: float, sigma_A: float
) -> torch.Tensor:
    """Torch body of gaussian_volume: (N, N, N) on the device and dtype of coords_A."""
    grid_A = (
        torch.arange(box_size_px, device=coords_A.device, dtype=coords_A.dtype) - box_size_px // 2
    ) * voxel_size_A
    table_x, table_y, table_z = (_axis_table(coords_A[:, axis], grid_A, sigma_A) for axis in range(3))
    table_z = table_z * amplitudes.to(coords_A.dtype)[:, None]
    n = coords_A.shape[0]
    slab = max(1, _SLAB_ELEMENTS // max(1, n * box_size_px))
    slabs = [
        torch.einsum("az,ay,ax->zyx", table_z[:, start : start + slab], table_y, table_x)
        for start in range(0, box_size_px, slab)
    ]
    return torch.cat(slabs, dim=0)


@overload
def gaussian_volume(
    coords_A: torch.Tensor,
    amplitudes: np.ndarray | torch.Tensor,
    box_size_px: int,
    voxel_size_A: float,
    sigma_A: float = ...,
) -> torch.Tensor: ...


@overload
def gaussian_volume(
    coords_A: np.ndarray,
    amplitudes: np.ndarray | torch.Tensor,
    box_size_px: int,
    voxel_size_A: float,
    sigma_A: float = ...,
) -> np.ndarray: ...


def gaussian_volume(
    coords_A: np.ndarray | torch.Tensor,
    amplitudes: np.ndarray | torch.Tensor,
    box_size_px: int,
    voxel_size_A: float,
    sigma_A: float = 2.0,
) -> np.ndarray | torch.Tensor:
    """Density of Gaussians at coords_A (n, 3) with amplitudes (n,) on an N^3 grid indexed [z, y, x].

    Returns a torch tensor (device and dtype of coords_A) for tensor input, else a float64 numpy array.
    """
    if coords_A.ndim != 2 or coords_A.shape[1] != 3:
        raise ValueError(f"coords_A must have shape (n, 3), got {tuple(coords_A.shape)}")
    if tuple(amplitudes.shape) != (coords_A.shape[0],):
        raise ValueError(f"amplitudes must have shape ({coords_A.shape[0]},), got {tuple(amplitudes.shape)}")
    if box_size_px < 1 or not voxel_size_A > 0 or not sigma_A > 0:
        raise ValueError(
            "need box_size_px >= 1, voxel_size_A > 0, sigma_A > 0; "
            f"got {box_size_px}, {voxel_size_A}, {sigma_A}"
        )
    if isinstance(coords_A, torch.Tensor):
        amplitudes_t = torch.as_tensor(amplitudes, device=coords_A.device)
        return _gaussian_volume_torch(coords_A, amplitudes_t, box_size_px, voxel_size_A, sigma_A)
    coords_t = torch.as_tensor(np.asarray(coords_A, dtype=np.float64))
    amplitudes_t = torch.as_tensor(np.asarray(amplitudes, dtype=np.float64))
    with torch.no_grad():
        return _gaussian_volume_torch(coords_t, amplitudes_t, box_size_px, voxel_size_A, sigma_A).numpy()


def volume_origin_A(box_size_px: int, voxel_size_A: float) -> tuple[float, float, float]:
    """(x, y, z) in A of voxel (0, 0, 0) of a centred N^3 map: -(N//2) * voxel size on each axis."""
    corner_A = -(box_size_px // 2) * float(voxel_size_A)
    return (corner_A, corner_A, corner_A)


def write_volume_mrc(path: str | Path, volume: np.ndarray | torch.Tensor, voxel_size_A: float) -> None:
    """Write a centred cubic map (N, N, N) [z, y, x] as MRC, placed to superpose on the centred model."""
    data = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise ValueError(f"a centred map must be cubic (N, N, N), got shape {data.shape}")
    write_mrc(path, data, voxel_size_A, origin_A=volume_origin_A(data.shape[0], voxel_size_A))
