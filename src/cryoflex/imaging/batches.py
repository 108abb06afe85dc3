"""Typed batches of the physics' inputs: per-particle CTF parameters and poses, as tensors with named fields.

They live in imaging (not data) because the image formation consumes them and imaging imports nothing above it;
the dataset builds them from the metadata record, the model and the simulator pass them to the formation unchanged.
Every field has the same leading batch shape, so a batch can be indexed, sliced and moved as one object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

Scalar = float | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class CTFBatch:
    """CTF parameters of B particles, each a (B,) tensor (or any one shape P), fields and units as CTFParameters."""

    defocus_u_A: torch.Tensor
    defocus_v_A: torch.Tensor
    defocus_angle_deg: torch.Tensor
    voltage_kV: torch.Tensor
    cs_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_deg: torch.Tensor
    bfactor_A2: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_values(
        cls,
        defocus_u_A: Scalar,
        defocus_v_A: Scalar,
        defocus_angle_deg: Scalar,
        voltage_kV: Scalar,
        cs_mm: Scalar,
        amplitude_contrast: Scalar,
        phase_shift_deg: Scalar = 0.0,
        bfactor_A2: Scalar = 0.0,
        scale: Scalar = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> CTFBatch:
        """A batch from floats, arrays or tensors, broadcast to one shape.

        dtype defaults to that of a floating-point defocus_u_A tensor, else torch's default dtype; device to that
        of the first tensor given, else the CPU.
        """
        values: tuple[Scalar, ...] = (defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm,
                                      amplitude_contrast, phase_shift_deg, bfactor_A2, scale)
        if dtype is None:
            if isinstance(defocus_u_A, torch.Tensor) and defocus_u_A.is_floating_point():
                dtype = defocus_u_A.dtype
            else:
                dtype = torch.get_default_dtype()
        if device is None:
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
        tensors = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=dtype, device=device) for v in values))
        return cls(*tensors)

    @classmethod
    def from_record(cls, record: Any, *, dtype: torch.dtype = torch.float32) -> CTFBatch:
        """All particles of a CTFParameters record (or any object with the same field names) as (N,) tensors."""
        return cls(**{f.name: torch.from_numpy(np.array(getattr(record, f.name))).to(dtype) for f in fields(cls)})

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray) -> CTFBatch:
        """The particles at `index` (kept as a batch: an integer index is taken as [index])."""
        rows = [index] if isinstance(index, int) else index
        return CTFBatch(*(getattr(self, f.name)[rows] for f in fields(self)))

    def to(
        self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> CTFBatch:
        moved = (getattr(self, f.name).to(device=device, dtype=dtype, non_blocking=non_blocking) for f in fields(self))
        return CTFBatch(*moved)

    def pin_memory(self) -> CTFBatch:
        """Page-locked copy (the DataLoader calls this with pin_memory=True)."""
        return CTFBatch(*(getattr(self, f.name).pin_memory() for f in fields(self)))


@dataclass(frozen=True)
class PoseBatch:
    """Poses of B particles: rotations (B, 3, 3), x' = R x; shifts_A (B, 2) = RELION (originX, originY) in A."""

    rotations: torch.Tensor
    shifts_A: torch.Tensor

    def __len__(self) -> int:
        return len(self.rotations)

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray) -> PoseBatch:
        """The particles at `index` (kept as a batch: an integer index is taken as [index])."""
        rows = [index] if isinstance(index, int) else index
        return PoseBatch(self.rotations[rows], self.shifts_A[rows])

    def to(
        self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> PoseBatch:
        return PoseBatch(
            self.rotations.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.shifts_A.to(device=device, dtype=dtype, non_blocking=non_blocking),
        )

    def pin_memory(self) -> PoseBatch:
        """Page-locked copy (the DataLoader calls this with pin_memory=True)."""
        return PoseBatch(self.rotations.pin_memory(), self.shifts_A.pin_memory())
