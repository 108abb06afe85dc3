"""From a TrainConfig to the objects a run needs: particles, the nominal structure in the particles' frame, the model.

check_inputs reads and checks every input before a run writes anything; particle_dataset is the one dataset set-up
(training and analysis); analysis rebuilds the same model from a run's saved configuration with build_model;
validation_mask is the fixed per-particle validation split, build_scheduler the learning-rate schedule.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cryoflex.config import TrainConfig
from cryoflex.data.dataset import ImageNormalisation, ParticleDataset
from cryoflex.data.downsample import downsampled_pixel_size_A
from cryoflex.data.placement import box_centre_from_map_A, map_extent_A, place_structure_A
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.formation import ImageFormation
from cryoflex.imaging.noise import n_shells
from cryoflex.io.metadata import ParticleMetadata, read_metadata
from cryoflex.io.particles import open_particle_images
from cryoflex.io.structure import Structure, read_structure
from cryoflex.model.cryosphere import LIKELIHOOD_CONSTANTS, CryoSphere
from cryoflex.model.networks import Decoder, Encoder, encoder_box_px
from cryoflex.model.segmentation import Segmentation, SegmentedPart, parse_parts
from cryoflex.run_dir import RunDir

logger = logging.getLogger(__name__)
_MAP_EXTENT_TOLERANCE = 0.02  # a consensus map spanning the particles' box within 2% was reconstructed in it
_MAP_PLACEMENT_FIX = (
    "give the consensus map reconstructed from these particles (RELION Refine3D or cryoSPARC refinement, the "
    "particles' box) that the structure was fitted into, or --box-centre-A X Y Z, or --centre-structure"
)


@dataclass
class CheckedInputs:
    """Inputs read and checked before anything is written (metadata, stacks, structure, parts)."""

    metadata: ParticleMetadata
    structure: Structure  # first model, coordinates in the particles' frame (A, origin at the box centre)
    validation: np.ndarray  # (n,) bool: the particles held out for validation (validation_mask)


@dataclass
class RunInputs:
    metadata: ParticleMetadata
    structure: Structure  # first model, coordinates in the particles' frame (A, origin at the box centre)
    dataset: ParticleDataset
    validation: np.ndarray  # (n,) bool: the particles held out for validation, never trained on


def read_particles(config: TrainConfig) -> ParticleMetadata:
    """The particle metadata the config names (with the cryoDRGN CTF file and image stack when given)."""
    return read_metadata(
        config.particles,
        ctf_path=config.ctf,
        stack_path=config.stack,
        amplitude_contrast=config.amplitude_contrast,
        duplicate_images=config.duplicate_images,
    )


def placed_structure(config: TrainConfig, box_size_A: float) -> Structure:
    """The nominal structure's first model, moved into the particles' frame as the config says."""
    path = Path(config.structure)
    structure = read_structure(path)
    if structure.n_models > 1:
        logger.info("%s has %d models: the first is the nominal structure", path, structure.n_models)
        structure = structure.model(0)
    box_centre_A = None
    map_spans_box = True
    if config.consensus_map is not None:
        box_centre_A = box_centre_from_map_A(Path(config.consensus_map))
        logger.info("box centre from %s: (%.1f, %.1f, %.1f) A", config.consensus_map, *box_centre_A)
        extent_A = map_extent_A(Path(config.consensus_map))
        extent = " x ".join(f"{value:.1f}" for value in extent_A)
        map_spans_box = bool(np.allclose(extent_A, box_size_A, rtol=_MAP_EXTENT_TOLERANCE))
    elif config.box_centre_A is not None:
        box_centre_A = np.asarray(config.box_centre_A, dtype=np.float64)
    try:
        coords_A = place_structure_A(
            structure.coords_A[0], structure_path=path, box_size_A=box_size_A, box_centre_A=box_centre_A,
            centre_on_centroid=config.centre_structure,
        )  # fmt: skip
    except CryoflexInputError as error:
        if config.consensus_map is None:
            raise
        # the map is the likelier culprit when its grid does not span the particles' box
        problem = f"placed by this map's centre voxel, {error.problem}" if map_spans_box else (
            f"the map spans {extent} A but the particles' box {box_size_A:.1f} A, so its centre voxel is not the "
            f"particles' box centre; placed by it, {error.problem}"
        )  # fmt: skip
        map_path = config.consensus_map
        raise CryoflexInputError(map_path, problem, fix=_MAP_PLACEMENT_FIX, field="--consensus-map") from None
    if not map_spans_box:  # placed, but perhaps wrongly (a failed placement says this in its error)
        logger.warning(
            "%s spans %s A, the particles' box %.1f A: its centre voxel is the particles' box centre only if it "
            "was cut or padded symmetrically from a map of that box", config.consensus_map, extent, box_size_A,
        )  # fmt: skip
    return structure.with_coords(coords_A[None], translated=True)



# The automatic segment count (config segments 0). On the AdK benchmark 40 segments were 0.04-0.09 A better than 20
# at SNR 0.1 and 0.01, level at 0.003 and 0.09 A worse at 0.001 over two seeds (docs/low_snr.md, "The model's
# reach"). Measured
# as the nominal structure's signal energy in an image over the noise variance per pixel (NominalFit.snr times the
# pixels), those images read about 220, 24, 7 and 2.4 at 32 px: 40 segments from IMAGE_SNR_FOR_MORE_SEGMENTS on.
FEWER_SEGMENTS, MORE_SEGMENTS = 20, 40
IMAGE_SNR_FOR_MORE_SEGMENTS = 10.0
MIN_RESIDUES_PER_AUTOMATIC_SEGMENT = 5  # a small structure gets fewer: n_residues // 5 at most


def automatic_segments(image_snr: float, n_residues: int) -> int:
    """The segment count for segments 0: more where the images hold enough signal to place them (image_snr: the
    signal energy in an image over the noise variance per pixel), never shorter than a few residues each."""
    count = MORE_SEGMENTS if image_snr >= IMAGE_SNR_FOR_MORE_SEGMENTS else FEWER_SEGMENTS
    return max(1, min(count, n_residues // MIN_RESIDUES_PER_AUTOMATIC_SEGMENT))


def resolved_segments(config: TrainConfig, n_residues: int, image_snr: float) -> TrainConfig:
    """The config with segments 0 (automatic) replaced by automatic_segments' count; otherwise unchanged."""
    return replace(config, segments=automatic_segments(image_snr, n_residues)) if config.segments == 0 else config


def segmented_parts(config: TrainConfig, structure: Structure, *, warn: bool = False) -> list[SegmentedPart]:
    """The parts to segment; refuses more segments than residues in a part (and with warn, warns above a third or of
    a residue range past its chain: the input checks warn, the model's construction parses the same parts again)."""
    if config.segments == 0 and not config.parts:
        raise ValueError("segments 0 (automatic) is resolved when training starts (resolved_segments)")
    try:
        parts = parse_parts(config.parts, structure, config.segments, warn=warn)
    except ValueError as error:
        fix = "write each part as CHAIN:SEGMENTS or CHAIN:FIRST-LAST:SEGMENTS, e.g. --parts A:1-120:3 B:4"
        raise CryoflexInputError(config.structure, str(error), fix, field="parts") from None
    field = "parts" if config.parts else "segments"
    for part in parts:
        n_residues = len(part.residue_indices)
        where = f"part {part.label}" if config.parts else "the structure"
        if part.n_segments > n_residues:
            raise CryoflexInputError(
                config.structure, f"{part.n_segments} segments for {where}, which has only {n_residues} residues",
                f"use at most {n_residues} segments (a few per domain is typical)", field=field,
            )  # fmt: skip
        if warn and part.n_segments > n_residues / 3:
            logger.warning(
                "%d segments for %s of %d residues: more than a third of its residues; segments this short are "
                "rarely meaningful and make every step slower", part.n_segments, where, n_residues,
            )  # fmt: skip
    return parts


def check_inputs(config: TrainConfig) -> CheckedInputs:
    """Read and check every input before any work or output: particles, stacks, structure placement, parts, split.

    The image stacks are opened (they exist and agree on the box) but not read; nothing is written.
    """
    metadata = read_particles(config)
    stack = open_particle_images(metadata, None if config.datadir is None else Path(config.datadir))
    box_size_px = stack.box_size_px
    stack.close()
    pixel_size_A = float(metadata.pixel_size_A[0])  # the dataset checks that all particles share it
    structure = placed_structure(config, box_size_px * pixel_size_A)
    segmented_parts(resolved_segments(config, structure.n_residues, math.inf), structure, warn=True)
    if config.downsample is not None and config.downsample < box_size_px:
        pixel_size_A = downsampled_pixel_size_A(pixel_size_A, box_size_px, config.downsample)
    if config.sigma_A < 0.5 * pixel_size_A:
        logger.warning(
            "sigma_A %.2f A is under half the pixel size %.2f A: Gaussians are under-sampled; raise sigma_A",
            config.sigma_A, pixel_size_A,
        )  # fmt: skip
    validation = validation_mask(metadata.names, config.validation_fraction)
    if validation.all():
        raise CryoflexInputError(
            config.particles, f"validation_fraction {config.validation_fraction} holds out all {len(validation)} "
            "particles: none is left to train on", "lower the validation fraction, or give more particles",
            field="validation_fraction",
        )  # fmt: skip
    return CheckedInputs(metadata, structure, validation)


def particle_dataset(
    config: TrainConfig, metadata: ParticleMetadata, run: RunDir, *,
    normalisation: ImageNormalisation | None = None, progress: bool = False,
) -> ParticleDataset:  # fmt: skip
    """The run's dataset (training and analysis alike), with its image cache under RUN/cache when the config says so."""
    return ParticleDataset(
        metadata,
        box_size_px=config.downsample,
        datadir=None if config.datadir is None else Path(config.datadir),
        cache_dir=run.cache if config.cache else None,
        invert_contrast=config.invert_contrast,
        normalisation=normalisation,
        progress=progress,
    )


def prepare_inputs(config: TrainConfig, run_dir: Path, *, progress: bool) -> RunInputs:
    """Check the inputs, then build the dataset (with its on-disk cache under RUN/cache)."""
    checked = check_inputs(config)
    dataset = particle_dataset(config, checked.metadata, RunDir(run_dir), progress=progress)
    return RunInputs(checked.metadata, checked.structure, dataset, checked.validation)


def build_model(
    config: TrainConfig,
    structure: Structure,
    box_size_px: int,
    pixel_size_A: float,
    optics_groups: Sequence[int] | np.ndarray = (1,),
) -> CryoSphere:
    """The cryoSPHERE model for this structure and image geometry (parameters initialised from torch's RNG), with a
    noise spectrum for each of the particles' optics groups (noise_model shells)."""
    segmentation = Segmentation(structure.n_residues, segmented_parts(config, structure), tau=config.tau)
    encoder = Encoder(
        box_size_px, config.latent_dim, config.encoder_hidden, encoder_box_px(box_size_px, config.encoder_downsample),
        config.encoder_dropout,
    )  # fmt: skip
    decoder = Decoder(
        config.latent_dim, segmentation.n_segments, config.decoder_hidden, config.translation_scale_A
    )
    offsets_A, shares = density_gaussians(structure, config.density)
    model = CryoSphere(
        torch.as_tensor(structure.coords_A[0], dtype=torch.float32),
        torch.as_tensor(structure.amplitudes_e, dtype=torch.float32),
        segmentation,
        encoder,
        decoder,
        ImageFormation(
            box_size_px, pixel_size_A, config.sigma_A, band_limited=config.rendering == "band_limited"
        ),
        torch.as_tensor(offsets_A, dtype=torch.float32),
        torch.as_tensor(shares, dtype=torch.float32),
        noise_shells=n_shells(box_size_px) if config.likelihood == "gaussian" and config.noise_model == "shells" else 0,
        optics_groups=[int(g) for g in np.unique(optics_groups)],  # one entry per group, not per particle
    )
    model.log_sigma_A.requires_grad_(config.learn_sigma)
    for name in LIKELIHOOD_CONSTANTS:  # the correlation loss never uses them: DDP would wait for their gradients
        getattr(model, name).requires_grad_(config.likelihood == "gaussian")
    model.sample_segmentation = config.sample_segmentation
    model.sleep_phase = config.sleep_phase
    return model


def density_gaussians(structure: Structure, density: str) -> tuple[np.ndarray, np.ndarray]:
    """Each residue's Gaussians for config `density` (DENSITIES), from the structure's first model: their offsets
    from the pseudo-atom (n, P, 3) in A and their shares of the residue's electrons (n, P). backbone_side_chain gives
    two only where some residue has a side chain or base in the file; otherwise one at each residue's centroid (on
    the pseudo-atom where the file has nothing else)."""
    n = structure.n_residues
    offsets_A, shares, centroids_A = structure.density_offsets_A, structure.density_shares, structure.centroid_offsets_A
    if density == "pseudo_atom" or offsets_A is None or shares is None or centroids_A is None:
        return np.zeros((n, 1, 3)), np.ones((n, 1))
    if density == "backbone_side_chain" and shares[:, 1].any():
        return offsets_A[0], shares
    return centroids_A[0][:, None], np.ones((n, 1))


def prepare_model(config: TrainConfig, inputs: RunInputs, device: torch.device) -> CryoSphere:
    """The seeded model for a training run, on `device`, with the run's precision and compilation settings."""
    torch.manual_seed(config.seed)
    dataset = inputs.dataset
    model = build_model(
        config, inputs.structure, dataset.box_size_px, dataset.pixel_size_A, dataset.metadata.optics_group
    ).to(device)
    model.network_bf16 = use_bf16_networks(config, device)
    model.formation.tf32_products = use_tf32_projections(config, device)
    if config.compile:
        if device.type == "cpu":
            logger.warning(
                "compile: the compiled deformation moves every residue with every segment; on a CPU the default, "
                "which moves each segment's residues only, measured 1.6-2.1x faster per step: compile is for GPUs"
            )
        model.compile_deformation()  # compiled on the first step
    return model


def build_optimizer(config: TrainConfig, model: CryoSphere) -> torch.optim.Optimizer:
    """Adam with the networks at learning_rate, and the segmentation mixture, (with the Gaussian likelihood) its
    noise variance and image scale, and the learned width, a few parameters on a unit scale, at
    segmentation_learning_rate.

    The fused implementation (CPU and CUDA) updates all parameters in one kernel (4x faster than the default here).
    """
    scalars = list(model.segmentation.parameters())
    if config.likelihood == "gaussian":  # unused otherwise; runs from before it existed resume with their groups
        scalars += [getattr(model, name) for name in LIKELIHOOD_CONSTANTS]
    if model.log_sigma_A.requires_grad:  # a fixed width, or a run from before it was learned, has no state for it
        scalars.append(model.log_sigma_A)
    constants = ("segmentation.", "log_sigma_A", *LIKELIHOOD_CONSTANTS)
    networks = [p for name, p in model.named_parameters() if not name.startswith(constants)]
    return torch.optim.Adam([
        {"params": networks, "lr": config.learning_rate},
        {"params": scalars, "lr": config.segmentation_learning_rate},
    ], fused=True)  # fmt: skip


# The cosine schedule ends at this share of the configured learning rates.
COSINE_FINAL_SHARE = 0.1


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule, stepped once per optimiser step: constant, or a cosine over all configured steps.

    Per step, so the rate falls smoothly within long epochs; cosine reaches COSINE_FINAL_SHARE of the configured rates
    after the last step of the last epoch. Its state (the step count) is checkpointed, so a resume continues it exactly.
    """
    total_steps = max(1, config.epochs * steps_per_epoch)

    def constant(step: int) -> float:
        return 1.0

    def cosine(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return COSINE_FINAL_SHARE + (1 - COSINE_FINAL_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine if config.lr_schedule == "cosine" else constant)


def validation_mask(names: np.ndarray, fraction: float) -> np.ndarray:
    """Which particles are held out for validation: a stable hash of each name, mapped to [0, 1), below `fraction`.

    Fixed per particle: the same whatever the order, the subset, the batch size, the process or the Python session
    (BLAKE2b of the name, not Python's salted hash()).
    """
    if fraction <= 0:
        return np.zeros(len(names), dtype=bool)
    digests = [hashlib.blake2b(str(name).encode(), digest_size=8).digest() for name in names]
    positions = np.array([int.from_bytes(digest, "big") / 2**64 for digest in digests], dtype=np.float64)
    return positions < fraction


def use_bf16_networks(config: TrainConfig, device: torch.device) -> bool:
    """Whether the encoder and decoder run under bf16 autocast: asked for, or automatic on CUDA."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def use_tf32_projections(config: TrainConfig, device: torch.device) -> bool:
    """Whether the projections' batched products run on TF32 tensor cores: on CUDA, unless precision is fp32."""
    return device.type == "cuda" and config.precision != "fp32"
