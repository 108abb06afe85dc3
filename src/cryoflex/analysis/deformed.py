"""Deformed backprojection: one map of the nominal conformation from all particles, each particle's motion undone.

The model moves segment m of particle p rigidly, x -> R_m (x - c_m) + c_m + t_m (cryoflex.model.deformation, exact for
a one-hot assignment G: the other segments' rotations then have angle 0). Seen at the particle's pose (R, origin o),
segment m is the *nominal* segment seen at rotation R R_m, displaced in 3-D by d_m = R (c_m - R_m c_m + t_m). With
RELION's origin, observed(x) = centred_projection(x + o) (docs/conventions.md, "Origins (particle shifts)"), a
projected point at q appears at q - o, so the displacement's in-plane part (d_x, d_y) is an origin of o - (d_x, d_y);
its z part does not change a projection. So every image is inserted once per segment, into that segment's own Fourier
accumulator, at the composed pose (R R_m, o - d_m[:2]) (multi-body reconstruction): there segment m is sharp, the
other segments are inconsistent and average out. A last, static body is the plain consensus (the image at its own
pose): it holds the residues in no segment (they never move) and the solvent. With a soft G a residue shared by two
segments does not move rigidly (it turns by G_im of each segment's angle); the bodies treat every segment as rigid,
and the weights below blend them where G is soft.

The body maps are combined in real space, V(r) = sum_b w_b(r) V_b(r), with smooth weights from the soft assignment
of the nominal residues near r: w_m(r) = sum_i G_im g_i(r) / (sum_i g_i(r) + floor), g_i a Gaussian about residue i,
and the static body gets the rest (the residues' unassigned share plus the floor), so the weights sum to 1 everywhere
and voxels far from every residue take the plain consensus. Each body's full map is regularised from its own half-map
FSC (as a plain group map; the static body is then exactly the plain consensus), and half maps are combined like the
full maps; their FSC is measured over the whole map and inside each segment (the segment's weight as a soft mask),
and compared with the plain consensus under the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryoflex.analysis.fsc import resolution_at
from cryoflex.analysis.reconstruct import GroupMaps, group_maps, half_map_fsc, maps_per_pass
from cryoflex.analysis.run import TrainedRun
from cryoflex.data.dataset import ParticleDataset
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.backprojection import FourierAccumulator, wiener_from_fsc
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.model.deformation import rotation_matrices, segment_centres_A
from cryoflex.progress import Progress

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


class DeformedAccumulators:
    """Two half-map Fourier accumulators per body: segments 0..M-1 (images at their composed poses) and body M, the
    plain consensus (images at their own poses); `bodies` limits them to some (passes over the data bound the memory:
    2 accumulators of the engine's padded grid per body)."""

    def __init__(
        self, box_size_px: int, pixel_size_A: float, n_segments: int, *, bodies: Sequence[int] | None = None,
        padding: int = 2, device: torch.device | str = "cpu",
    ):  # fmt: skip
        self.box_size_px = box_size_px
        self.pixel_size_A = pixel_size_A
        self.n_segments = n_segments
        self.bodies = list(range(n_segments + 1)) if bodies is None else list(bodies)
        if not self.bodies or not all(0 <= body <= n_segments for body in self.bodies):
            raise ValueError(f"bodies must be among 0..{n_segments} (the last one the plain consensus), got {bodies}")
        self.halves = {
            body: tuple(FourierAccumulator(box_size_px, pixel_size_A, padding=padding, device=device) for _ in "ab")
            for body in self.bodies
        }
        self._n_images = [0, 0]

    @property
    def n_images(self) -> tuple[int, int]:
        """Images inserted into half A and half B."""
        return self._n_images[0], self._n_images[1]

    def insert(
        self, images: torch.Tensor, poses: PoseBatch, ctf: CTFBatch | None, motions: RigidMotions,
        in_half_a: torch.Tensor,
    ) -> None:  # fmt: skip
        """Insert images (B, D, D) once per body, into the half given by in_half_a (B,) bool."""
        if motions.n_segments != self.n_segments or len(motions) != len(images):
            raise ValueError(
                f"motions for {len(motions)} images and {motions.n_segments} segments, "
                f"expected {len(images)} and {self.n_segments}"
            )
        for half, rows in enumerate((in_half_a, ~in_half_a)):
            if not bool(rows.any()):
                continue
            chosen_poses, chosen_motions = poses[rows], motions[rows]
            chosen_images, chosen_ctf = images[rows], None if ctf is None else ctf[rows]
            for body in self.bodies:
                static = body == self.n_segments
                pose = chosen_poses if static else segment_poses(chosen_poses, chosen_motions, body)
                self.halves[body][half].insert(chosen_images, pose, chosen_ctf)
            self._n_images[half] += len(chosen_images)

    def finish(self) -> dict[int, BodyMaps]:
        """Each body's half maps (the engine's default regularisation) and full map (regularised from its own
        half-map FSC, as a plain group map), on the CPU; the accumulators are released one body at a time."""
        finished = {}
        for body in self.bodies:
            half_a, half_b = self.halves.pop(body)
            map_a, map_b = half_a.volume().float().cpu(), half_b.volume().float().cpu()
            _, fsc = half_map_fsc(map_a, map_b, self.pixel_size_A)
            half_a.add(half_b)
            del half_b
            finished[body] = BodyMaps(map_a, map_b, half_a.volume(wiener_from_fsc(fsc)).float().cpu())
        return finished


@dataclass
class BodyMaps:
    """One body's maps (D, D, D) on the CPU."""

    half_a: torch.Tensor
    half_b: torch.Tensor
    full: torch.Tensor


@dataclass
class DeformedMaps:
    """The motion-corrected map and, from the same accumulators, the plain consensus (the static body)."""

    deformed: GroupMaps
    plain: GroupMaps
    weights: torch.Tensor  # (M + 1, D, D, D), the body weights used


def deformed_maps(
    bodies: dict[int, BodyMaps], weights: torch.Tensor, particle_indices: np.ndarray, pixel_size_A: float
) -> DeformedMaps:
    """Bodies 0..M combined voxel by voxel with `weights` (half maps and full map); the FSC of the combined halves
    gives the deformed map's resolution and its low-pass filter. The plain consensus is body M alone."""
    if sorted(bodies) != list(range(weights.shape[0])):
        raise ValueError(f"need maps of bodies 0..{weights.shape[0] - 1}, got {sorted(bodies)}")
    ordered = [bodies[body] for body in range(weights.shape[0])]
    halves = combine_bodies(torch.stack([torch.stack([b.half_a, b.half_b]) for b in ordered]), weights)
    full = combine_bodies(torch.stack([b.full for b in ordered]), weights)
    static = ordered[-1]
    return DeformedMaps(
        group_maps("deformed", particle_indices, halves[0], halves[1], full, pixel_size_A),
        group_maps("consensus", particle_indices, static.half_a, static.half_b, static.full, pixel_size_A),
        weights,
    )


def combine_bodies(body_maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b w_b(r) V_b(r): body maps (M + 1, ..., D, D, D) weighted voxel by voxel -> (..., D, D, D)."""
    weights = weights.to(body_maps.device, body_maps.dtype)
    extra = body_maps.ndim - weights.ndim
    return (body_maps * weights.reshape(weights.shape[:1] + (1,) * extra + weights.shape[1:])).sum(0)


@torch.no_grad()
def model_body_weights(model: CryoSphere, box_size_px: int, voxel_size_A: float) -> torch.Tensor:
    """body_weights of the model's nominal structure and posterior-mean segmentation, on the CPU."""
    return body_weights(model.nominal_coords_A.cpu(), model.segmentation(False).cpu(), box_size_px, voxel_size_A)


def body_passes(n_bodies: int, box_size_px: int, padding: int, memory_budget_bytes: int) -> list[list[int]]:
    """Bodies 0..n-1 split into passes whose accumulators (two per body) fit in memory_budget_bytes together."""
    per_pass = maps_per_pass(box_size_px, padding, memory_budget_bytes)
    return [list(range(start, min(start + per_pass, n_bodies))) for start in range(0, n_bodies, per_pass)]


@torch.no_grad()
def deformed_reconstruction(
    run: TrainedRun, particle_indices: np.ndarray, in_half_a: np.ndarray, *, padding: int, batch_size: int,
    device: torch.device | str, progress: bool, dataset: ParticleDataset | None = None,
    memory_budget_bytes: int = 8 << 30, latents: np.ndarray | None = None,
) -> GroupMaps:  # fmt: skip
    """The motion-corrected map of the nominal conformation from these particles (dataset indices), halves from
    in_half_a (one bool per particle of the run). Each particle's segment motions are decoded from its row of
    `latents` (one per particle of the run, e.g. analyze's posterior latents), by default from the mean of q(z | image)
    on the run's own images (evaluation mode); `dataset` (default: the run's) gives the images to reconstruct from,
    e.g. the same particles at another box size. Streams the images once, or once per pass when the 2 (M + 1)
    accumulators exceed the memory budget (the motions are decoded in the first pass and kept)."""
    model = run.model.eval()
    source = run.dataset if dataset is None else dataset
    if len(source) != len(run.dataset):
        raise ValueError(f"the reconstruction dataset has {len(source)} particles, the run {len(run.dataset)}")
    indices = np.asarray(particle_indices, dtype=np.int64)
    halves = np.asarray(in_half_a, dtype=bool)
    if halves.shape != (len(run.dataset),):
        raise ValueError(f"in_half_a must have one value per particle ({len(run.dataset)}), got shape {halves.shape}")
    counts = int(halves[indices].sum()), int((~halves[indices]).sum())
    if min(counts) < 1:
        raise CryoflexInputError(
            run.run_dir, f"deformed backprojection needs particles in both halves, got {counts[0]} and {counts[1]}",
            fix="reconstruct from more particles", field="particles",
        )  # fmt: skip
    box_size_px, pixel_size_A, n_segments = source.box_size_px, source.pixel_size_A, model.segmentation.n_segments
    passes = body_passes(n_segments + 1, box_size_px, padding, memory_budget_bytes)
    chunks = [indices[start : start + batch_size].tolist() for start in range(0, len(indices), batch_size)]
    decoded: list[RigidMotions] = []
    bodies: dict[int, BodyMaps] = {}
    for number, group in enumerate(passes, start=1):
        accumulators = DeformedAccumulators(
            box_size_px, pixel_size_A, n_segments, bodies=group, padding=padding, device=device
        )
        label = "deformed backprojection" + ("" if len(passes) == 1 else f", pass {number}/{len(passes)}")
        with Progress(len(indices), label, unit="img", enabled=progress) as bar:
            for k, chunk in enumerate(chunks):
                batch = source.__getitems__(chunk)
                if number == 1:
                    if latents is None:
                        encoded = batch if source is run.dataset else run.dataset.__getitems__(chunk)
                        chunk_latents, _ = model.encoder(encoded.images.to(run.device))
                    else:
                        chunk_latents = torch.as_tensor(latents[chunk], device=run.device)
                    decoded.append(decoded_motions(model, chunk_latents.float()).to("cpu"))
                half = torch.as_tensor(halves[chunk], device=device)
                accumulators.insert(
                    batch.images.to(device), batch.poses.to(device), batch.ctf.to(device), decoded[k].to(device), half
                )
                bar.update(len(chunk))
        bodies.update(accumulators.finish())
    weights = model_body_weights(model, box_size_px, pixel_size_A)
    return deformed_maps(bodies, weights, indices, pixel_size_A).deformed


def masked_fsc(maps: GroupMaps, mask: torch.Tensor | None, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray, float]:
    """FSC of a group's half maps, both multiplied by `mask` (None: unmasked), and its 0.143 resolution."""
    half_a, half_b = maps.half_a.cpu(), maps.half_b.cpu()
    if mask is not None:
        half_a, half_b = half_a * mask.cpu(), half_b * mask.cpu()
    frequency_per_A, fsc = half_map_fsc(half_a, half_b, pixel_size_A)
    return frequency_per_A, fsc, resolution_at(frequency_per_A, fsc, 0.143)


def compare_fsc(plain: GroupMaps, deformed: GroupMaps, weights: torch.Tensor, pixel_size_A: float) -> dict[str, Any]:
    """Half-map FSC of the plain and deformed maps over the whole map and inside each segment (its body weight as a
    soft mask): resolutions at 0.143 in A and the curves, as JSON-ready lists."""
    regions: dict[str, torch.Tensor | None] = {"global": None}
    regions.update({f"segment_{m + 1}": weights[m] for m in range(weights.shape[0] - 1)})
    table: dict[str, Any] = {}
    for region, mask in regions.items():
        frequency_per_A, plain_fsc, plain_A = masked_fsc(plain, mask, pixel_size_A)
        _, deformed_fsc, deformed_A = masked_fsc(deformed, mask, pixel_size_A)
        table[region] = {
            "plain_resolution_A": plain_A,
            "deformed_resolution_A": deformed_A,
            "frequency_per_A": frequency_per_A.tolist(),
            "plain_fsc": plain_fsc.tolist(),
            "deformed_fsc": deformed_fsc.tolist(),
        }
    return table


def compare_deformed(plain: GroupMaps, deformed: GroupMaps, run: TrainedRun) -> dict[str, Any]:
    """compare_fsc with the run's body weights on the maps' grid: global and per-segment (segment_1..M) half-map FSC
    resolutions and curves, plain vs deformed."""
    if plain.half_a.shape != deformed.half_a.shape:
        raise ValueError(f"maps of different grids: {tuple(plain.half_a.shape)} and {tuple(deformed.half_a.shape)}")
    box_size_px = plain.half_a.shape[0]
    voxel_size_A = 1.0 / (box_size_px * float(plain.frequency_per_A[1]))  # shell 1 is at 1 / (D a)
    return compare_fsc(plain, deformed, model_body_weights(run.model, box_size_px, voxel_size_A), voxel_size_A)
