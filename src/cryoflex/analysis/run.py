"""A trained run, reopened for analysis: its configuration, the model at a chosen epoch, and its particles.

Analysis reads only what a run wrote (RUN/config.yaml and RUN/checkpoints), never training internals.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryoflex.config import TrainConfig, load_run_config
from cryoflex.data.dataset import ImageNormalisation, ParticleDataset
from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import Structure
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.run_dir import RunDir
from cryoflex.train.checkpoint import (
    check_likelihood_state,
    check_optics_groups,
    check_particles,
    find_checkpoint,
    load_checkpoint,
)
from cryoflex.train.distributed import resolve_device
from cryoflex.train.setup import build_model, particle_dataset, placed_structure, read_particles

logger = logging.getLogger(__name__)

@dataclass
class TrainedRun:
    run_dir: Path
    config: TrainConfig
    epoch: int
    model: CryoSphere  # in evaluation mode, on `device`
    structure: Structure  # the nominal structure in the particles' frame (model frame)
    dataset: ParticleDataset
    metrics_path: Path

    @property
    def has_likelihood(self) -> bool:
        """Whether the model was trained with the Gaussian likelihood (so it can weigh structures against images)."""
        return self.config.likelihood == "gaussian"

    @property
    def paths(self) -> RunDir:
        """The run directory's layout (default output folders of analyze and eval)."""
        return RunDir(self.run_dir)

    @property
    def device(self) -> torch.device:
        return self.model.nominal_coords_A.device

    @functools.cached_property
    def fingerprint(self) -> str:
        """model_fingerprint of the loaded model: what outputs derived from it record (cryoflex analyze's latents)."""
        return model_fingerprint(self.model)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short SHA-256 of every parameter and buffer, by name: the same for the same checkpoint on any device, and
    different for another epoch or a run trained again into the same folder."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_checkpoint(run_dir: Path, *, epoch: int | None = None, checkpoint: str | None = None) -> Path:
    """The checkpoint to analyse: of `epoch`, or `checkpoint` "best" (best.pt), else the last one.

    The last is the default: on the AdK benchmark the validation loss at the encoder's mean latent (best.pt's criterion
    then) was lowest at epoch 3 of 20, whose structures were worse (median RMSD 1.77 vs 1.59 A at SNR 0.01 with the
    original objective; 0.99 vs 0.90 A at SNR 0.1 with the defaults). best.pt now follows the held-out evidence
    (train.loop.validation_score), which has not been measured as a default's guide at every SNR.
    """
    run = RunDir(run_dir)
    if epoch is not None:
        return find_checkpoint(run.root, epoch)
    if checkpoint == "best":
        if not run.best_checkpoint.is_file():
            raise CryoflexInputError(
                run.best_checkpoint, "no best checkpoint: the run was trained without a validation share",
                "use --checkpoint last or --epoch N",
            )  # fmt: skip
        return run.best_checkpoint
    return find_checkpoint(run.root)


def load_run(
    run_dir: Path,
    *,
    epoch: int | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    datadir: str | Path | None = None,
) -> TrainedRun:
    """Reopen RUN at `epoch` or `checkpoint` (see run_checkpoint: default the last checkpoint).

    The dataset uses the run's cache when present. datadir: where the particle stacks are now, when they moved
    since training (instead of the run's own datadir setting).
    """
    run = RunDir(run_dir)
    if Path(run_dir).is_file() and Path(run_dir).suffix == ".pt":
        raise CryoflexInputError(run_dir, "a checkpoint, not a run folder",
                                 "give the run folder (the --out of cryoflex train), and choose the checkpoint with "
                                 "--epoch N or --checkpoint best|last")  # fmt: skip
    if not run.config.is_file():
        raise CryoflexInputError(run.config, "not a cryoflex run (no config.yaml)", "give the --out of cryoflex train")
    config = load_run_config(run.config, None if datadir is None else {"datadir": str(datadir)})
    if not Path(config.particles).is_file():
        raise CryoflexInputError(
            config.particles, "the particle file this run was trained on is not there",
            f"put it back, or edit the particles: line of {run.config} to where it is now", field="particles",
        )  # fmt: skip
    path = run_checkpoint(run.root, epoch=epoch, checkpoint=checkpoint)
    state = load_checkpoint(path, "cpu")
    check_likelihood_state(path, state, config.likelihood)
    logger.info("loaded %s: the model after epoch %d", path, int(state["epoch"]))
    normalisation = ImageNormalisation(**state["normalisation"])
    dataset = particle_dataset(config, read_particles(config), run, normalisation=normalisation)
    structure = placed_structure(config, dataset.box_size_px * dataset.pixel_size_A)
    optics_groups = np.unique(dataset.metadata.optics_group)
    check_optics_groups(config.particles, state, optics_groups, resuming=False)
    check_particles(config.particles, state, dataset.metadata.names, resuming=False)
    # the groups the model learned noise spectra for (checkpoints from before: one spectrum, for every group)
    trained_groups = state["model"].get("noise_optics_groups", torch.as_tensor(optics_groups)).numpy()
    model = build_model(config, structure, dataset.box_size_px, dataset.pixel_size_A, trained_groups)
    model.load_state_dict(state["model"])
    model = model.to(resolve_device(device)).eval()
    return TrainedRun(run.root, config, int(state["epoch"]), model, structure, dataset, run.metrics)
