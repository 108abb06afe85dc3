"""The training loop: epochs of (data -> forward -> loss -> backward -> step), checkpoints, logs, resume.

Loss per image (then averaged over the batch):
  (1 - correlation(predicted, observed))
  + w_latent(epoch) * KL(q(z | image) || N(0, I))
  + w_segmentation * KL(GMM posteriors || priors) / n_images   (the dataset-level KL, shared out over the images)
  + w_continuity * mean (d(i, i+1) - d_nominal(i, i+1))^2       (consecutive C-alpha of a chain)
  + w_clash * sum over non-consecutive pairs of relu(cutoff - d)^2 / n_residues   (from a neighbour list)
w_latent ramps linearly from 0 over latent_kl_warmup_epochs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cryoflex.config import TrainConfig
from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import particle_loader
from cryoflex.model.cryosphere import CryoSphere, ModelOutput
from cryoflex.model.losses import (
    ClashNeighbourList,
    clash_loss,
    consecutive_pairs,
    continuity_loss,
    correlation_loss,
    standard_normal_kl,
)
from cryoflex.train.checkpoint import (
    checkpoint_dir,
    find_checkpoint,
    load_checkpoint,
    random_states,
    restore_random_states,
    save_checkpoint,
)
from cryoflex.train.distributed import ProcessContext, epoch_batches, start_processes, stop_processes
from cryoflex.train.setup import build_optimizer, prepare_inputs, prepare_model

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
_CONTRAST_CHECK_BATCHES = 4


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last checkpoint on disk is the last good state."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    last_metrics: dict[str, float]
    model: CryoSphere


class LossTerms:
    """The loss of one batch, term by term, with the configured weights and schedules."""

    def __init__(self, config: TrainConfig, model: CryoSphere, chain_ids: Any, n_images: int):
        self.config = config
        self.n_images = n_images
        nominal = model.nominal_coords_A
        self.pairs = consecutive_pairs(chain_ids).to(nominal.device)
        if len(self.pairs):
            self.reference_A = (nominal[self.pairs[:, 0]] - nominal[self.pairs[:, 1]]).norm(dim=-1)
        else:
            self.reference_A = nominal.new_zeros(0)
        self.neighbours = ClashNeighbourList(chain_ids, cutoff_A=config.clash_cutoff_A, skin_A=config.clash_skin_A)

    def latent_kl_weight(self, epoch_progress: float) -> float:
        warmup = self.config.latent_kl_warmup_epochs
        ramp = 1.0 if warmup <= 0 else min(1.0, epoch_progress / warmup)
        return self.config.latent_kl_weight * ramp

    def __call__(
        self, output: ModelOutput, observed: torch.Tensor, epoch_progress: float, rebuild_neighbours: bool
    ) -> dict[str, torch.Tensor]:
        config = self.config
        terms = {
            "correlation": correlation_loss(output.predicted_images, observed).mean(),
            "latent_kl": standard_normal_kl(output.latent_mean, output.latent_std).mean(),
            "segmentation_kl": output.segmentation_kl / self.n_images,
        }
        total = (
            terms["correlation"]
            + self.latent_kl_weight(epoch_progress) * terms["latent_kl"]
            + config.segmentation_kl_weight * terms["segmentation_kl"]
        )
        if config.continuity_weight > 0 and len(self.pairs):
            terms["continuity"] = continuity_loss(output.coords_A, self.pairs, self.reference_A).mean()
            total = total + config.continuity_weight * terms["continuity"]
        if config.clash_weight > 0:
            if rebuild_neighbours:
                self.neighbours.update(output.coords_A.detach())
            pairs = self.neighbours.pairs.to(output.coords_A.device)
            terms["clash"] = clash_loss(output.coords_A, pairs, cutoff_A=config.clash_cutoff_A).mean()
            total = total + config.clash_weight * terms["clash"]
        terms["total"] = total
        return terms


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
    output = engine(batch)
    terms = losses(output, batch.images, epoch_progress, rebuild_neighbours)
    values = dict(zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist(), strict=True))
    if math.isfinite(values["total"]):
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
    return values, output


@torch.no_grad()
def contrast_report(model: CryoSphere, loader: DataLoader, device: torch.device) -> float:
    """Mean correlation of the nominal structure's projections with the first few batches as given (the sign to use)."""
    values = []
    for k, batch in enumerate(loader):
        if k == _CONTRAST_CHECK_BATCHES:
            break
        batch = batch.to(device, non_blocking=True)
        nominal = model.nominal_coords_A.expand(len(batch), -1, -1)
        predicted = model.render(nominal, batch.poses, batch.ctf)
        values.append(1.0 - correlation_loss(predicted, batch.images))
    return float(torch.cat(values).mean())


class _Logs:
    """Rank 0's outputs: metrics.jsonl (one line per logged step and per epoch) and TensorBoard."""

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / METRICS_NAME
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            logger.warning("tensorboard is not importable: no TensorBoard logs (metrics.jsonl is still written)")
            self.tensorboard = None

    def record(self, kind: str, epoch: int, step: int, values: dict[str, float]) -> None:
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps({"kind": kind, "epoch": epoch, "step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def figures(self, model: CryoSphere, output: ModelOutput, observed: torch.Tensor, step: int) -> None:
        if self.tensorboard is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assignment = output.assignment.detach().float().cpu().numpy()
        figure, axis = plt.subplots(figsize=(6, 2.5))
        for m in range(assignment.shape[1]):
            axis.plot(assignment[:, m], label=f"segment {m + 1}")
        axis.set_xlabel("residue (file order)")
        axis.set_ylabel("P(segment)")
        figure.tight_layout()
        self.tensorboard.add_figure("segmentation", figure, step)
        count = min(4, len(observed))

        def scaled(images: torch.Tensor) -> torch.Tensor:
            low = images.amin(dim=(1, 2), keepdim=True)
            high = images.amax(dim=(1, 2), keepdim=True)
            return ((images - low) / (high - low).clamp_min(1e-12)).unsqueeze(1)

        pairs = torch.cat([scaled(output.predicted_images[:count].detach().float()), scaled(observed[:count].float())])
        self.tensorboard.add_images("predicted (top) vs observed (bottom)", pairs.cpu(), step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool, context: ProcessContext) -> None:
    existing = checkpoint_dir(run_dir) / "last.pt"
    if existing.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoints/last.pt): "
            "pass --resume to continue it, or choose another --out"
        )
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_NAME)


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> TrainResult:
    """Train (or continue, with resume) the run in run_dir; one process, or one rank of a torchrun launch."""
    run_dir = Path(run_dir)
    context = start_processes(config.device)
    try:
        return _train(config, run_dir, resume, context)
    finally:
        stop_processes(context)


def _train(config: TrainConfig, run_dir: Path, resume: bool, context: ProcessContext) -> TrainResult:
    _prepare_run_dir(config, run_dir, resume, context)
    device = context.device
    show_progress = config.progress and context.is_main
    if context.distributed and context.is_main:
        inputs = prepare_inputs(config, run_dir, progress=show_progress)  # builds the cache once
        torch.distributed.barrier()
    else:
        if context.distributed:
            torch.distributed.barrier()
        inputs = prepare_inputs(config, run_dir, progress=show_progress)
    dataset, structure = inputs.dataset, inputs.structure

    model = prepare_model(config, inputs, device)
    optimizer = build_optimizer(config, model)
    start_epoch, step = 0, 0
    if resume:
        state = load_checkpoint(find_checkpoint(run_dir), device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        restore_random_states(state["random"])
        logger.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, step)
    engine: torch.nn.Module = model
    if context.distributed:
        engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def loader_for(epoch: int) -> DataLoader:
        """This rank's loader for `epoch` (the same batches after a resume)."""
        batches = epoch_batches(len(dataset), config.batch_size, epoch, config.seed, context.rank, context.world_size)
        return particle_loader(dataset, batches, num_workers=config.num_workers, pin_memory=device.type == "cuda")

    logs = _Logs(run_dir) if context.is_main else None
    if context.is_main:
        logger.info(
            "%d particles, box %d px at %.3f A/px, %d residues, %d segments, latent %d, device %s, %d process(es)",
            len(dataset), dataset.box_size_px, dataset.pixel_size_A, structure.n_residues,
            model.segmentation.n_segments, config.latent_dim, device, context.world_size,
        )  # fmt: skip
        if start_epoch == 0:
            _log_contrast(model, loader_for(0), device, config.invert_contrast)

    losses = LossTerms(config, model, structure.chain_ids, len(dataset))
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, config.epochs):
        engine.train()
        loader = loader_for(epoch)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress, leave=False)
        for k, batch in enumerate(bar):
            batch = batch.to(device, non_blocking=True)
            values, output = train_step(
                engine, optimizer, losses, batch, epoch + k / len(loader), k % config.neighbour_list_every_steps == 0
            )
            if not math.isfinite(values["total"]):
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}: {values}. The last good checkpoint "
                    f"in {checkpoint_dir(run_dir)} is intact; lower --learning-rate and --resume, or check the inputs"
                )
            step += 1
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            if show_progress:
                bar.set_postfix({name: f"{value:.4f}" for name, value in values.items() if name != "segmentation_kl"})
            if logs is not None and (step % 10 == 0 or k == len(loader) - 1):
                logs.record("step", epoch + 1, step, values)
        metrics = {name: value / max(len(loader), 1) for name, value in sums.items()}
        metrics["seconds"] = time.perf_counter() - started
        metrics["images_per_s"] = sum(map(len, loader.batch_sampler)) / metrics["seconds"]
        if context.is_main:
            assert logs is not None
            logs.record("epoch", epoch + 1, step, metrics)
            if config.log_images_every_epochs and (epoch + 1) % config.log_images_every_epochs == 0:
                logs.figures(model, output, batch.images, step)
            save_checkpoint(run_dir, {
                "epoch": epoch + 1, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "random": random_states(), "config": config.to_dict(), "metrics": metrics,
                "normalisation": dataclasses.asdict(dataset.normalisation),
            })  # fmt: skip
            logger.info(
                "epoch %d/%d: loss %.4f (correlation %.4f), %.0f images/s",
                epoch + 1, config.epochs, metrics["total"], metrics["correlation"], metrics["images_per_s"],
            )  # fmt: skip
    if logs is not None:
        logs.close()
    return TrainResult(run_dir, config.epochs, step, metrics, model)


def _log_contrast(model: CryoSphere, loader: DataLoader, device: torch.device, inverted: bool) -> None:
    correlation = contrast_report(model, loader, device)
    as_used = "inverted (--invert-contrast)" if inverted else "as given"
    better = "as used" if correlation >= 0 else "the opposite sign"
    logger.info(
        "contrast check: the nominal structure's projections correlate %+.4f with the first images %s, %+.4f with "
        "the opposite sign: %s fits better", correlation, as_used, -correlation, better,
    )  # fmt: skip
    if correlation < 0 and not math.isclose(correlation, 0.0):
        logger.warning(
            "the images fit the model better with the opposite contrast: %s",
            "drop --invert-contrast" if inverted else "pass --invert-contrast (RELION particles are protein-white)",
        )
