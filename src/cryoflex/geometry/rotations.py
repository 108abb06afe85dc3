"""Rotation conventions of the file formats, as matrices R with x' = R x (model frame -> projection frame).

RELION: R = (Rz(rot) Ry(tilt) Rz(psi))^T, angles in degrees; matches cryoDRGN's golden files.
cryoSPARC: R = from_rotvec(pose)^T.
See docs/conventions.md, "RELION Euler angles" and "cryoSPARC poses and shifts".
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def relion_euler_to_matrix(rot_deg: np.ndarray, tilt_deg: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """RELION Euler angles (degrees, each shape (N,)) -> rotation matrices (N, 3, 3), float64."""
    angles = np.stack([np.asarray(rot_deg), np.asarray(tilt_deg), np.asarray(psi_deg)], axis=-1).astype(np.float64)
    return np.ascontiguousarray(
        Rotation.from_euler("ZYZ", angles.reshape(-1, 3), degrees=True).as_matrix().transpose(0, 2, 1)
    )


def matrix_to_relion_euler(rotations: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) -> RELION (rot, tilt, psi) in degrees, shape (N, 3)."""
    matrices = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3).transpose(0, 2, 1)
    return Rotation.from_matrix(matrices).as_euler("ZYZ", degrees=True)


def cryosparc_rotvec_to_matrix(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC alignments3D/pose rotation vectors (N, 3) -> rotation matrices (N, 3, 3), float64."""
    rotvec = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    return np.ascontiguousarray(Rotation.from_rotvec(rotvec).as_matrix().transpose(0, 2, 1))


def uniform_random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n Haar-uniform random rotation matrices (n, 3, 3), float64, reproducible from rng."""
    return Rotation.random(n, random_state=rng).as_matrix()
