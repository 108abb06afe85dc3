"""One batch of particles as the dataset yields it and the model consumes it: images, poses, CTF and indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryoflex.imaging.batches import CTFBatch, PoseBatch


@dataclass(frozen=True)
class ParticleBatch:
    """B particles: images (B, D, D) float32 (normalised), their poses and CTF, indices (B,) int64 into the dataset,
    and optics groups (B,) int64, the metadata's numbers (rlnOpticsGroup; each has its own noise spectrum)."""

    images: torch.Tensor
    poses: PoseBatch
    ctf: CTFBatch
    indices: torch.Tensor
    optics_groups: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int | slice | torch.Tensor | np.ndarray) -> ParticleBatch:
        """The particles at `index` (kept as a batch: an integer index is taken as [index])."""
        rows = [index] if isinstance(index, int) else index
        return ParticleBatch(
            self.images[rows], self.poses[index], self.ctf[index], self.indices[rows], self.optics_groups[rows]
        )

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> ParticleBatch:
        return ParticleBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.poses.to(device, non_blocking=non_blocking),
            self.ctf.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            self.optics_groups.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> ParticleBatch:
        """Page-locked copy (the DataLoader calls this with pin_memory=True)."""
        return ParticleBatch(self.images.pin_memory(), self.poses.pin_memory(), self.ctf.pin_memory(),
                             self.indices.pin_memory(), self.optics_groups.pin_memory())  # fmt: skip
