"""The training loop: epochs of (data -> forward -> loss -> backward -> step), validation, checkpoints, resume, stops.

A fixed share of the particles (validation_mask, by name) is never trained on: after every epoch rank 0 computes the
loss terms on it (val_<term>), keeps the best epoch as RUN/checkpoints/best.pt and, with early_stopping_patience,
stops when it has not improved for that many epochs.

The objective is in train/objective.py, the records and progress display in train/logs.py, the run directory's
layout in cryoflex/run_dir.py. Every input is read and checked before the run directory is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cryoflex.config import TrainConfig
from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import particle_loader
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.noise import n_shells, shell_counts, shell_sums
from cryoflex.model.cryosphere import CryoSphere, ModelOutput
from cryoflex.model.losses import correlation_loss
from cryoflex.run_dir import RunDir
from cryoflex.threads import configure_threads, flush_denormals
from cryoflex.train.checkpoint import (
    check_likelihood_state,
    check_optics_groups,
    check_particles,
    find_checkpoint,
    load_checkpoint,
    particle_record,
    random_states,
    restore_random_states,
    save_checkpoint,
)
from cryoflex.train.distributed import (
    ProcessContext,
    seed_epoch,
    start_processes,
    stop_processes,
    training_batches,
)
from cryoflex.train.logs import EpochProgress, RunLogs, format_terms, format_validation
from cryoflex.train.objective import LossTerms, prior_log_evidence
from cryoflex.train.setup import (
    FEWER_SEGMENTS,
    IMAGE_SNR_FOR_MORE_SEGMENTS,
    MIN_RESIDUES_PER_AUTOMATIC_SEGMENT,
    MORE_SEGMENTS,
    RunInputs,
    automatic_segments,
    build_optimizer,
    build_scheduler,
    check_inputs,
    particle_dataset,
    prepare_model,
    resolved_segments,
)

logger = logging.getLogger(__name__)

_NOMINAL_FIT_BATCHES = 4  # the contrast check and the likelihood's start
# Fewer particles than this: training runs, with a warning that the result says little.
FEW_PARTICLES = 1000


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last checkpoint on disk is the last good state."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    last_metrics: dict[str, float]  # empty when no epoch was run (a finished run resumed)
    model: CryoSphere
    stopped_early: bool = False  # early stopping ended the run (now, or before this resume)


@dataclass
class ValidationRecord:
    """The lowest validation score so far (validation_score), its epoch, and the epochs since; checkpointed, so early
    stopping resumes."""

    best_total: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def update(self, total: float, epoch: int) -> bool:
        """Record the validation score after `epoch` (1-based); returns whether it is the best so far."""
        if total < self.best_total:
            self.best_total, self.best_epoch, self.epochs_without_improvement = total, epoch, 0
            return True
        self.epochs_without_improvement += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether early stopping (patience > 0) ends the run: `patience` epochs in a row without an improvement."""
        return patience > 0 and self.epochs_without_improvement >= patience


def train_step(
    engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: LossTerms,
    batch: ParticleBatch,
    epoch_progress: float,
    rebuild_neighbours: bool,
) -> tuple[dict[str, float], ModelOutput]:
    """One optimisation step on a batch already on the device; returns the loss terms (one device sync).

    A non-finite loss returns before the backward pass, so the parameters are left untouched.
    """
    output = engine(batch, losses.config.draws_per_image)
    terms = losses(output, batch.images, epoch_progress, rebuild_neighbours)
    values = dict(zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist(), strict=True))
    if math.isfinite(values["total"]):
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
    return values, output


@torch.no_grad()
def validation_terms(
    model: CryoSphere, losses: LossTerms, loader: DataLoader, device: torch.device, epoch_progress: float
) -> dict[str, float]:
    """The loss terms on the validation particles (mean over particles) as val_<term>: posterior means, no gradient;
    with the Gaussian likelihood also val_log_evidence, their mean log evidence (prior_log_evidence), nats per image.

    The model runs in evaluation mode (z and the segmentation at their posterior means, nothing sampled). The evidence's
    prior draws come from their own generator, seeded alike every epoch, so no training random stream moves and every
    epoch scores the same draws. The clash neighbour list is rebuilt on every validation batch, so the clash term is
    exact for those structures; training rebuilds the list at the start of each epoch, so this leaves training
    unchanged.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    generator = torch.Generator().manual_seed(losses.config.seed) if losses.config.likelihood == "gaussian" else None
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        terms = losses(model(batch), batch.images, epoch_progress, True)
        if generator is not None:
            terms["log_evidence"] = prior_log_evidence(model, batch, generator).mean()
        for name, value in zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist(), strict=True):
            sums[name] = sums.get(name, 0.0) + value * len(batch)
        count += len(batch)
    model.train(was_training)
    return {f"val_{name}": value / count for name, value in sums.items()}


def validation_score(metrics: dict[str, float]) -> float:
    """What best.pt and early stopping minimise: minus the held-out log evidence where there is one (it scores the
    model alone), else the validation total (the original objective: the loss at the encoder's mean latent)."""
    return -metrics["val_log_evidence"] if "val_log_evidence" in metrics else metrics["val_total"]


# How long the other ranks wait for rank 0's validation and checkpoint after each epoch.
RANK0_DECISION_TIMEOUT = datetime.timedelta(hours=12)


def _rank0_decides(decision: bool, context: ProcessContext, epoch: int) -> bool:
    """Rank 0's decision after `epoch` on every rank; the other ranks wait here while rank 0 validates and writes the
    checkpoint."""
    return _from_rank0("1" if decision else "0", context, f"epoch{epoch}") == "1"


def _from_rank0(value: str, context: ProcessContext, name: str) -> str:
    """Rank 0's `value` on every rank (each `name` once per run), waiting up to RANK0_DECISION_TIMEOUT for it.

    Passed through the process group's key-value store, not a broadcast: a gloo collective's worker thread can release
    its Python tensor after the main thread has moved on, and if that is at interpreter exit the process aborts
    ("terminate called without an active exception"), failing a finished run."""
    if not context.distributed:
        return value
    store = torch.distributed.distributed_c10d._get_default_store()
    key = f"cryoflex/rank0_decides/{name}"
    if context.is_main:
        store.set(key, value)
    else:  # rank 0 may validate a large held-out share for longer than the process group's timeout (NCCL: 10 min)
        store.wait([key], RANK0_DECISION_TIMEOUT)
    return store.get(key).decode()


def _choose_segments(config: TrainConfig, fit: NominalFit, n_residues: int, box_size_px: int, run: RunDir,
                     context: ProcessContext) -> TrainConfig:  # fmt: skip
    """For segments 0: the config with rank 0's automatic count (automatic_segments), saved in the run's config."""
    image_snr = fit.snr * box_size_px**2
    count = int(_from_rank0(str(automatic_segments(image_snr, n_residues)), context, "segments"))
    config = dataclasses.replace(config, segments=count)
    if context.is_main:
        config.save(run.config)
        logger.info(
            "segments: %d (segments 0, automatic). The nominal structure's signal energy in an image is about %.3g "
            "times the noise variance per pixel: %d segments from %g on, else %d, at most one per %d residues "
            "(docs/low_snr.md, \"The model's reach\"); --segments sets the count", count, image_snr, MORE_SEGMENTS,
            IMAGE_SNR_FOR_MORE_SEGMENTS, FEWER_SEGMENTS, MIN_RESIDUES_PER_AUTOMATIC_SEGMENT,
        )  # fmt: skip
    return config


@dataclass(frozen=True)
class NominalFit:
    """How the nominal structure's projections fit a few images: their correlation with each image (the contrast
    check) and, over all of them, the least-squares image scale and the noise variance left about that fit (where
    the Gaussian likelihood's two constants start)."""

    correlations: np.ndarray  # (images,)
    image_scale: float
    noise_variance: float  # per pixel
    shell_noise_variances: np.ndarray  # (S,) per pixel, in each Fourier shell (cryoflex.imaging.noise; shell 0 unused)
    # (G, S) the same for each optics group of the model (noise_optics_groups); a group none of the images belong to
    # has the pooled spectrum above
    group_shell_noise_variances: np.ndarray
    images_per_group: np.ndarray  # (G,)
    # the fitted projections' variance over the noise's, per pixel at the training box: the images' SNR as simulate
    # defines it, if the particles were all in the nominal conformation (otherwise a little lower than theirs)
    snr: float


# The image scale starts at least at this share of the scale that would give the projections the images' power:
# for data without signal (or the wrong contrast), where the least-squares scale is 0 or below.
_MIN_START_SCALE_SHARE = 0.01


def density_description(model: CryoSphere, density: str) -> str:
    """One log line on where each residue's Gaussians are rendered (config density)."""
    if model.renders_pseudo_atoms:
        if density == "pseudo_atom":
            return "each residue is rendered at its pseudo-atom (density: pseudo_atom)"
        return ("each residue is rendered at its pseudo-atom: the structure file has no other atoms "
                "(a full-atom model, e.g. AlphaFold's, renders side chains where they are)")
    # how far the electrons sit from the pseudo-atoms on average
    distance_A = float((model.density_offsets_A.norm(dim=-1) * model.density_shares).sum(1).mean())
    if model.density_offsets_A.shape[1] == 1:
        why = "; no residue has side-chain atoms in the structure file" if density == "backbone_side_chain" else ""
        return (f"each residue is rendered at its heavy atoms' electron centroid, {distance_A:.2f} A from its "
                f"pseudo-atom on average (density: {density}{why})")
    return (f"each residue is rendered as two Gaussians, at the electron centroids of its backbone and of its side "
            f"chain or base, {distance_A:.2f} A from its pseudo-atom on average, weighted by their electrons "
            f"(density: {density})")


@torch.no_grad()
def nominal_fit(model: CryoSphere, loader: DataLoader, device: torch.device) -> NominalFit:
    """The nominal structure's projections against every image of `loader`, as the images are used (NominalFit)."""
    correlations, inner, predicted_power, observed_power, pixels = [], 0.0, 0.0, 0.0, 0
    uncentred_power = 0.0  # of the projections before each image's mean is taken off
    box_size_px = model.formation.box_size_px
    groups = model.noise_optics_groups
    # per optics group: observed, cross and predicted power in each shell
    shells = torch.zeros(len(groups), 3, n_shells(box_size_px), dtype=torch.float64, device=device)
    images_per_group = torch.zeros(len(groups), dtype=torch.float64, device=device)
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        nominal = model.nominal_density_A.expand(len(batch), -1, -1)
        predicted_images = model.render(nominal, batch.poses, batch.ctf).double()
        spectra = torch.fft.rfft2(batch.images.double()), torch.fft.rfft2(predicted_images)
        rows = model.noise_group_rows(batch.optics_groups)
        for group in rows.unique().tolist():
            members = rows == group
            images_per_group[group] += members.sum()
            for row, (a, b) in enumerate([(0, 0), (0, 1), (1, 1)]):
                products = spectra[a][members] * spectra[b][members].conj()
                shells[group, row] += shell_sums(products.real / box_size_px**2)
        predicted = predicted_images.flatten(1)
        observed = batch.images.flatten(1).double()
        uncentred_power += float(predicted.square().sum())
        correlations.append(1.0 - correlation_loss(predicted, observed))
        predicted = predicted - predicted.mean(1, keepdim=True)
        observed = observed - observed.mean(1, keepdim=True)
        inner += float((predicted * observed).sum())
        predicted_power += float(predicted.square().sum())
        observed_power += float(observed.square().sum())
        pixels += observed.numel()
    if not predicted_power > 1e-12 * uncentred_power:  # a constant image, or none: no signal to fit
        raise CryoflexInputError(
            None, f"the nominal structure's projections are blank at the Gaussian width {float(model.sigma_A):g} A in "
            f"a box of {box_size_px} px: the model would see no signal", "use a width well inside the box, e.g. 2 A",
            field="sigma_A",
        )  # fmt: skip
    floor = _MIN_START_SCALE_SHARE * math.sqrt(observed_power / predicted_power)
    scale = max(inner / predicted_power, floor)
    residual_power = observed_power - 2 * scale * inner + scale**2 * predicted_power
    # noise-free images that the nominal structure fits exactly would leave none: start at a millionth of their power
    noise_variance = max(residual_power, 1e-6 * observed_power) / pixels

    def spectrum(sums: torch.Tensor, images: float) -> torch.Tensor:
        """(3, S) observed, cross and predicted power of `images` images -> (S,) residual variance per shell."""
        residual = (sums[0] - 2 * scale * sums[1] + scale**2 * sums[2]).clamp_min(1e-6 * sums[0])
        frequencies = shell_counts(box_size_px, device) * images  # the frequencies times the images
        return torch.where(frequencies > 0, residual / frequencies.clamp_min(1), noise_variance)

    pooled = spectrum(shells.sum(0), float(images_per_group.sum()))
    per_group = torch.stack([
        spectrum(sums, float(images)) if images > 0 else pooled
        for sums, images in zip(shells, images_per_group, strict=True)
    ])  # fmt: skip
    return NominalFit(
        torch.cat(correlations).float().cpu().numpy(), scale, noise_variance, pooled.cpu().numpy(),
        per_group.cpu().numpy(), images_per_group.cpu().numpy().astype(np.int64),
        snr=scale**2 * predicted_power / pixels / noise_variance,
    )  # fmt: skip


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> TrainResult:
    """Train (or continue, with resume) the run in run_dir; one process, or one rank of a torchrun launch."""
    flush_denormals()  # before reading the images starts torch's threads, so that they inherit it
    context = start_processes(config.device)
    try:
        with contextlib.ExitStack() as closing:  # closes the logs also when training raises, keeping what they hold
            result = _train(config, RunDir(run_dir), resume, context, closing)
    except BaseException:
        stop_processes(context, finished=False)
        raise
    stop_processes(context, finished=True)
    return result


def _prepare_inputs(config: TrainConfig, run: RunDir, context: ProcessContext, *, resuming: bool) -> RunInputs:
    """Check every input, then (rank 0) create the run directory and save the config of a new run, then build the
    dataset. Nothing is written before the inputs pass their checks; rank 0 builds the image cache once for all ranks.
    A resumed run's config is saved once it is known to train on (a resume with no epochs left changes nothing).
    """
    checked = check_inputs(config)
    if context.is_main:
        created = not run.root.exists()
        run.root.mkdir(parents=True, exist_ok=True)
        if not resuming:
            config.save(run.config)
        try:
            dataset = particle_dataset(config, checked.metadata, run, progress=config.progress)
        except CryoflexInputError:  # the images' own checks (poses, box): leave no half-made run to resume
            if created:
                shutil.rmtree(run.root)
            elif not resuming:
                run.config.unlink(missing_ok=True)
            raise
    if context.distributed:
        torch.distributed.barrier()
    if not context.is_main:
        dataset = particle_dataset(config, checked.metadata, run)
    return RunInputs(checked.metadata, checked.structure, dataset, checked.validation)


def _train(
    config: TrainConfig, run: RunDir, resume: bool, context: ProcessContext, closing: contextlib.ExitStack
) -> TrainResult:
    if run.last_checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{run.root} already holds a run (checkpoints/last.pt): "
            "pass --resume to continue it, or choose another --out"
        )
    checkpoint = find_checkpoint(run.root) if resume else None  # a missing checkpoint is reported before any work
    inputs = _prepare_inputs(config, run, context, resuming=checkpoint is not None)
    device = context.device
    # torchrun sets LOCAL_WORLD_SIZE: the processes that share this host's CPUs
    threads = configure_threads(
        config.threads, device, processes_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    )
    dataset, structure = inputs.dataset, inputs.structure
    train_indices = np.flatnonzero(~inputs.validation)
    validation_indices = np.flatnonzero(inputs.validation)
    model = prepare_model(resolved_segments(config, structure.n_residues, math.inf), inputs, device)
    fit = None
    if checkpoint is None:  # every rank fits the same training images; DDP then starts all from rank 0's parameters
        first_batches = training_batches(train_indices, config.batch_size, 0, config.seed)[:_NOMINAL_FIT_BATCHES]
        fit = nominal_fit(model, particle_loader(dataset, first_batches), device)
        if config.segments == 0:
            config = _choose_segments(config, fit, structure.n_residues, model.formation.box_size_px, run, context)
            model = prepare_model(config, inputs, device)  # seeded as if the count had been given
    state = None if checkpoint is None else load_checkpoint(checkpoint, device)
    if state is not None and "log_sigma_A" not in state["model"]:
        model.log_sigma_A.requires_grad_(False)  # a run from before the width was learned goes on as it began
    optimizer = build_optimizer(config, model)
    steps_per_epoch = len(
        training_batches(train_indices, config.batch_size, 0, config.seed, context.rank, context.world_size)
    )
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    patience = config.early_stopping_patience
    record = ValidationRecord()
    start_epoch, step = 0, 0
    if checkpoint is not None and state is not None:
        check_likelihood_state(checkpoint, state, config.likelihood)
        check_optics_groups(config.particles, state, dataset.metadata.optics_group, resuming=True)
        if context.is_main:
            check_particles(config.particles, state, dataset.metadata.names, resuming=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints from before schedules had a constant rate: nothing to restore
            scheduler.load_state_dict(state["scheduler"])
        record = ValidationRecord(**state.get("validation", {}))
        start_epoch, step = state["epoch"], state["step"]
        restore_random_states(state["random"], device)
        if record.exhausted(patience):
            logger.info(
                "%s stopped early after epoch %d: no better validation score for %d epochs since epoch %d meets "
                "early_stopping_patience %d; nothing to train. To go on, resume with a larger "
                "--early-stopping-patience (0 never stops)", run.root, start_epoch,
                record.epochs_without_improvement, record.best_epoch, patience,
            )  # fmt: skip
            return TrainResult(run.root, start_epoch, step, {}, model, stopped_early=True)
        if start_epoch >= config.epochs:
            logger.debug("%s is already at %d epochs: nothing to train", run.root, start_epoch)  # the CLI says so
            return TrainResult(run.root, start_epoch, step, {}, model)
        logger.info("resuming %s after epoch %d (step %d)", run.root, start_epoch, step)
        if context.is_main:
            config.save(run.config)  # the epochs (and any other setting that may change) it now trains to
    if fit is not None:
        with torch.no_grad():
            model.log_image_scale.fill_(math.log(fit.image_scale))
            if model.log_noise_variance.dim() == 0:
                model.log_noise_variance.fill_(math.log(fit.noise_variance))
            else:
                model.log_noise_variance.copy_(torch.as_tensor(np.log(fit.group_shell_noise_variances)))
    engine: torch.nn.Module = model
    if context.distributed:
        engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    logs = closing.enter_context(RunLogs(run, resume_step=step)) if context.is_main else None
    particles_trained_on = particle_record(dataset.metadata.names)
    validation_loader = None
    if context.is_main:
        logger.info(
            "%d particles, box %d px at %.3f A/px (the encoder reads %d px), %d residues, %d segments, latent %d, "
            "device %s, %d process(es)",
            len(dataset), dataset.box_size_px, dataset.pixel_size_A, model.encoder.input_box_px, structure.n_residues,
            model.segmentation.n_segments, config.latent_dim, device, context.world_size,
        )  # fmt: skip
        logger.info("%s", density_description(model, config.density))
        if len(train_indices) < FEW_PARTICLES:
            held_out = f" ({len(validation_indices)} more held out for validation)" if len(validation_indices) else ""
            logger.warning(
                "training on only %d particles%s: under %d, the segments and motions mostly fit noise; use the full "
                "particle set for results%s", len(train_indices), held_out, FEW_PARTICLES,
                ", and a smaller validation_fraction" if len(validation_indices) > len(train_indices) else "",
            )  # fmt: skip
        if len(validation_indices):
            logger.info(
                "%d particles train, %d (validation_fraction %g, fixed by particle name) are held out for validation",
                len(train_indices), len(validation_indices), config.validation_fraction,
            )  # fmt: skip
            validation_batches = [
                validation_indices[k : k + config.batch_size].tolist()
                for k in range(0, len(validation_indices), config.batch_size)
            ]
            validation_loader = particle_loader(dataset, validation_batches)
        elif config.validation_fraction > 0:
            logger.warning(
                "no particle fell in the validation share (validation_fraction %g of %d particles): no validation "
                "loss, best checkpoint or early stopping", config.validation_fraction, len(dataset),
            )  # fmt: skip
        if fit is not None:
            _log_contrast(fit.correlations, config.invert_contrast)
            if config.likelihood == "gaussian":
                logger.info(
                    "likelihood starts at the nominal structure's fit to %d images: image scale %.4g, noise variance "
                    "%.4g per pixel; signal-to-noise ratio about %.2g per pixel at %d px (docs/low_snr.md: at 0.001 "
                    "an image holds a fraction of a nat about its particle's conformation)", len(fit.correlations),
                    fit.image_scale, fit.noise_variance, fit.snr, model.formation.box_size_px,
                )  # fmt: skip
                if config.noise_model == "shells":
                    variances = fit.shell_noise_variances
                    nyquist = model.formation.box_size_px // 2
                    logger.info(
                        "noise variance per Fourier shell (noise_model shells), from the same fit: %.4g at the lowest "
                        "frequency, %.4g at half Nyquist, %.4g at Nyquist (white noise: all equal)",
                        variances[1], variances[max(1, nyquist // 2)], variances[nyquist],
                    )  # fmt: skip
                    if len(fit.images_per_group) > 1:
                        _log_group_spectra(fit, model.noise_optics_groups.tolist(), nyquist)
                    empty = empty_noise_shells(variances)
                    if empty:
                        resolution_A = model.formation.box_size_px * model.formation.pixel_size_A / empty[0]
                        logger.warning(
                            "the images hold next to no noise in %d Fourier shell(s) from %.1f A on: were they "
                            "zero-padded or low-pass filtered? A noise variance learned there can shrink without "
                            "bound; train with --noise-model white, or --downsample to a box whose Nyquist frequency "
                            "is within what the images hold", len(empty), resolution_A,
                        )  # fmt: skip

    losses = LossTerms(config, model, structure.chain_ids, len(train_indices))
    metrics: dict[str, float] = {}
    epochs_done, stopped_early = start_epoch, False
    for epoch in range(start_epoch, config.epochs):
        engine.train()
        seed_epoch(config.seed, epoch, context.rank)
        # this rank's batches of the epoch (training particles only): the same after a resume
        batches = training_batches(
            train_indices, config.batch_size, epoch, config.seed, context.rank, context.world_size
        )
        loader = particle_loader(dataset, batches, num_workers=config.num_workers, pin_memory=device.type == "cuda")
        sums: dict[str, float] = {}
        started = time.perf_counter()
        description = f"epoch {epoch + 1}/{config.epochs}"
        with EpochProgress(description, len(loader), enabled=config.progress and context.is_main) as progress:
            for k, batch in enumerate(loader if threads is None else threads.wrap(loader)):
                batch = batch.to(device, non_blocking=True)
                values, output = train_step(
                    engine, optimizer, losses, batch, epoch + k / len(loader),
                    k % config.neighbour_list_every_steps == 0,
                )  # fmt: skip
                if not math.isfinite(values["total"]):
                    kept = run.epoch_checkpoints()
                    where = f"the last good checkpoint, {kept[-1]}, is intact" if kept else "no epoch was finished"
                    raise TrainingDiverged(
                        f"non-finite loss at epoch {epoch + 1}, step {step + 1}: {values}; {where}. A resumed run "
                        "keeps its learning rates: start a new run (another --out) with a lower --learning-rate, or "
                        "check the inputs"
                    )
                scheduler.step()
                step += 1
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                progress.update(values)
                if logs is not None and (step % 10 == 0 or k == len(loader) - 1):
                    logs.record("step", epoch + 1, step, values)
        metrics = {name: value / max(len(loader), 1) for name, value in sums.items()}
        metrics["seconds"] = time.perf_counter() - started
        metrics["images_per_s"] = sum(map(len, batches)) / metrics["seconds"]
        metrics["learning_rate"] = optimizer.param_groups[0]["lr"]  # the networks' rate for the next step
        metrics["threads"] = torch.get_num_threads()
        epochs_done = epoch + 1
        if context.is_main:
            assert logs is not None
            improved = False
            if validation_loader is not None:
                # at the final loss weights, so that every epoch's total is the same objective
                metrics.update(validation_terms(model, losses, validation_loader, device, float(config.epochs)))
                improved = record.update(validation_score(metrics), epoch + 1)
            logs.record("epoch", epoch + 1, step, metrics)
            if config.log_images_every_epochs and (epoch + 1) % config.log_images_every_epochs == 0:
                logs.figures(model, output, batch.images, step)
            save_checkpoint(run.root, {
                "epoch": epoch + 1, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "validation": dataclasses.asdict(record),
                "random": random_states(device), "config": config.to_dict(), "metrics": metrics,
                "normalisation": dataclasses.asdict(dataset.normalisation),
                "particles": particles_trained_on,
            }, best=improved)  # fmt: skip
            logger.info(
                "epoch %d/%d: %s%s, %.0f images/s (%d CPU threads)", epoch + 1, config.epochs, format_terms(metrics),
                format_validation(metrics, improved), metrics["images_per_s"], metrics["threads"],
            )  # fmt: skip
        if _rank0_decides(record.exhausted(patience), context, epoch + 1):
            if context.is_main:
                logger.info(
                    "stopping early after epoch %d: no better validation score for %d epochs (early_stopping_patience "
                    "%d); the best, score %.4f at epoch %d, is %s", epoch + 1, record.epochs_without_improvement,
                    patience, record.best_total, record.best_epoch, run.best_checkpoint,
                )  # fmt: skip
            stopped_early = True
            break
    if logs is not None:
        logs.close()
    return TrainResult(run.root, epochs_done, step, metrics, model, stopped_early)


def contrast_verdict(correlations: np.ndarray, inverted: bool) -> tuple[str, bool]:
    """The contrast check's line, and whether the opposite sign fits significantly better (then warn).

    The opposite sign correlates exactly -mean, so the difference is 2 mean with standard error 2 SE (SE over the
    images): it counts as significant beyond two standard errors.
    """
    n = len(correlations)
    mean = float(np.mean(correlations))
    error = float(np.std(correlations, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    significant = abs(mean) > 2 * error
    if not significant:
        verdict = "the difference is not significant (under two standard errors): these images cannot tell the sign"
    else:
        verdict = "as used fits better" if mean > 0 else "the opposite sign fits better"
    as_used = "inverted (--invert-contrast)" if inverted else "as given"
    line = (
        f"contrast check: the nominal structure's projections correlate {mean:+.4f} (standard error {error:.4f} over "
        f"{n} images) with the first images {as_used}, {-mean:+.4f} with the opposite sign: {verdict}"
    )
    return line, significant and mean < 0


# A shell within Nyquist whose residual power is under this share of the median shell's holds next to no noise.
_EMPTY_SHELL_SHARE = 1e-3


def empty_noise_shells(shell_noise_variances: np.ndarray) -> list[int]:
    """Shells 1..S-1 whose starting noise variance is under _EMPTY_SHELL_SHARE of the median: frequencies where the
    images hold next to nothing (zero-padded or low-pass filtered stacks), where a variance learned per shell can
    shrink without bound as the model's images are made to vanish there too."""
    variances = np.asarray(shell_noise_variances[1:], dtype=np.float64)
    floor = _EMPTY_SHELL_SHARE * float(np.median(variances))
    return [int(shell) + 1 for shell in np.flatnonzero(variances < floor)]


def _log_group_spectra(fit: NominalFit, optics_groups: list[int], nyquist: int) -> None:
    """One line per optics group: where its noise spectrum starts (each group learns its own)."""
    logger.info("one noise spectrum per optics group (%d groups), each learned; they start at:", len(optics_groups))
    for group, images, variances in zip(
        optics_groups, fit.images_per_group, fit.group_shell_noise_variances, strict=True
    ):
        start = f"its fit to {images} images" if images else "the pooled fit (none of its images among them)"
        logger.info(
            "  optics group %d: %.4g at the lowest frequency, %.4g at half Nyquist, %.4g at Nyquist, from %s",
            group, variances[1], variances[max(1, nyquist // 2)], variances[nyquist], start,
        )  # fmt: skip


def _log_contrast(correlations: np.ndarray, inverted: bool) -> None:
    line, opposite_better = contrast_verdict(correlations, inverted)
    logger.info("%s", line)
    if opposite_better:
        logger.warning(
            "the images fit the model better with the opposite contrast: %s",
            "drop --invert-contrast" if inverted else "pass --invert-contrast (RELION particles are protein-white)",
        )
