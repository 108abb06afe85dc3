"""Deformed backprojection: one map of the nominal conformation from all particles, each particle's motion undone.

The model moves segment m of particle p rigidly, x -> R_m (x - c_m) + c_m + t_m (cryoflex.model.deformation, exact for
a one-hot assignment G: the other segments' rotations then have angle 0). Seen at the particle's pose (R, origin o),
segment m is the *nominal* segment seen at rotation R R_m, displaced in 3-D by d_m = R (c_m - R_m c_m + t_m). With
RELION's origin, observed(x) = centred_projection(x + o) (docs/conventions.md, "Origins"), a projected point at q
appears at q - o, so the displacement's in-plane part (d_x, d_y) is an origin of o - (d_x, d_y); its z part does not
change a projection. So every image is inserted once per segment, into that segment's own Fourier accumulator, at
the composed pose (R R_m, o - d_m[:2]) (multi-body reconstruction): there segment m is sharp, the other segments are
inconsistent and average out. A last, static body is the plain consensus (the image at its own pose): it holds the
residues in no segment (they never move) and the solvent.

The body maps are combined in real space, V(r) = sum_b w_b(r) V_b(r), with smooth weights from the soft assignment
of the nominal residues near r: w_m(r) = sum_i G_im g_i(r) / (sum_i g_i(r) + floor), g_i a Gaussian about residue i,
and the static body gets the rest (the residues' unassigned share plus the floor), so the weights sum to 1 everywhere
and voxels far from every residue take the plain consensus. Half maps are combined the same way; their FSC is
measured over the whole map and inside each segment (the segment's weight as a soft mask), and compared with the
plain consensus under the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryoflex.imaging.batches import PoseBatch
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.model.deformation import rotation_matrices, segment_centres_A

WEIGHT_SIGMA_A = 4.0  # width of the Gaussian that spreads each residue's assignment over nearby voxels
WEIGHT_FLOOR = 0.05  # kernel mass below which a voxel falls back to the plain consensus (about 10 A from one residue)


@dataclass(frozen=True)
class RigidMotions:
    """Per particle and segment, the rigid motion x -> R (x - c) + c + t the deformation applies (one-hot G)."""

    rotations: torch.Tensor  # (B, M, 3, 3)
    translations_A: torch.Tensor  # (B, M, 3)
    centres_A: torch.Tensor  # (M, 3), the G-weighted centres of the nominal structure

    @property
    def n_segments(self) -> int:
        return int(self.centres_A.shape[0])

    def __len__(self) -> int:
        return len(self.rotations)

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice) -> RigidMotions:
        """The particles at `index` (the centres are shared)."""
        return RigidMotions(self.rotations[index], self.translations_A[index], self.centres_A)

    def to(self, device: torch.device | str | None = None, *, dtype: torch.dtype | None = None) -> RigidMotions:
        return RigidMotions(
            self.rotations.to(device=device, dtype=dtype),
            self.translations_A.to(device=device, dtype=dtype),
            self.centres_A.to(device=device, dtype=dtype),
        )

    @classmethod
    def from_vectors(
        cls, rotation_vectors: torch.Tensor, translations_A: torch.Tensor, centres_A: torch.Tensor
    ) -> RigidMotions:
        """From the decoder's outputs: rotation vectors (B, M, 3) in radians and translations (B, M, 3) in A."""
        return cls(rotation_matrices(rotation_vectors), translations_A, centres_A)

    def displacements_A(self) -> torch.Tensor:
        """(B, M, 3): where each segment's nominal origin goes, c - R c + t (the motion is x -> R x + this)."""
        moved_centres = torch.einsum("bmij,mj->bmi", self.rotations, self.centres_A)
        return self.centres_A - moved_centres + self.translations_A


@torch.no_grad()
def decoded_motions(model: CryoSphere, latents: torch.Tensor) -> RigidMotions:
    """The rigid motions the model decodes from latents (B, L): decoder in float32, posterior-mean segmentation."""
    assignment = model.segmentation(False).float()
    rotation_vectors, translations_A = model.decoder(latents.float())
    centres_A = segment_centres_A(model.nominal_coords_A.float(), assignment)
    return RigidMotions.from_vectors(rotation_vectors.float(), translations_A.float(), centres_A)


def segment_poses(poses: PoseBatch, motions: RigidMotions, segment: int) -> PoseBatch:
    """The poses at which segment `segment` of each particle is its nominal segment: rotation R R_m and the RELION
    origin o - (R d_m)[x, y], d_m the segment's displacement (module docstring)."""
    rotations = poses.rotations @ motions.rotations[:, segment]
    shift_A = torch.einsum("bij,bj->bi", poses.rotations, motions.displacements_A()[:, segment])
    return PoseBatch(rotations, poses.shifts_A - shift_A[:, :2])


def body_weights(
    coords_A: torch.Tensor,
    assignment: torch.Tensor,
    box_size_px: int,
    voxel_size_A: float,
    *,
    sigma_A: float = WEIGHT_SIGMA_A,
    floor: float = WEIGHT_FLOOR,
) -> torch.Tensor:
    """(M + 1, D, D, D) weights on the map grid, summing to 1 at every voxel: segments 0..M-1, then the static body.

    Segment m's weight is the G[:, m]-weighted Gaussian density of the nominal residues over their total density plus
    `floor`; the static body (the plain consensus) takes what is left, so it wins far from every residue.
    """
    coords = coords_A.detach().double()
    shares = assignment.detach().double().clamp(0.0, 1.0)
    static_share = (1.0 - shares.sum(1)).clamp_min(0.0)
    densities = [
        gaussian_volume(coords, column, box_size_px, voxel_size_A, sigma_A)
        for column in torch.cat([shares, static_share[:, None]], dim=1).unbind(1)
    ]
    stacked = torch.stack(densities)
    total = stacked.sum(0) + floor
    stacked[-1] += floor
    return (stacked / total).float()
