"""Optimal rigid superposition (Kabsch) of corresponding point sets, the one implementation (roma's)."""

from __future__ import annotations

import numpy as np
import roma
import torch


def superpose_A(mobile_A: np.ndarray, target_A: np.ndarray) -> np.ndarray:
    """mobile moved by the proper rotation and translation that best fit it onto target (least squares).

    Shapes (..., n, 3), broadcast together; float64 arithmetic. The rotation is never a reflection, so a mirror
    image is fitted as well as a rotation can, not mirrored back.
    """
    mobile, target = torch.broadcast_tensors(
        torch.from_numpy(np.array(mobile_A, dtype=np.float64)), torch.from_numpy(np.array(target_A, dtype=np.float64))
    )
    rotation, translation = roma.rigid_points_registration(mobile, target)
    return (mobile @ rotation.transpose(-1, -2) + translation[..., None, :]).numpy()
