"""A trained run, reopened for analysis: its configuration, the model at a chosen epoch, and its particles.

Analysis reads only what a run wrote (RUN/config.yaml and RUN/checkpoints), never training internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cryoflex.config import TrainConfig, load_config
from cryoflex.data.dataset import ImageNormalisation, ParticleDataset
from cryoflex.errors import CryoflexInputError
from cryoflex.io.structure import Structure
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.run_dir import RunDir
from cryoflex.train.checkpoint import find_checkpoint, load_checkpoint
from cryoflex.train.distributed import resolve_device
from cryoflex.train.setup import build_model, particle_dataset, placed_structure, read_particles


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
    def paths(self) -> RunDir:
        """The run directory's layout (default output folders of analyze and eval)."""
        return RunDir(self.run_dir)

    @property
    def device(self) -> torch.device:
        return self.model.nominal_coords_A.device


def load_run(run_dir: Path, *, epoch: int | None = None, device: str = "auto") -> TrainedRun:
    """Reopen RUN at `epoch` (default: the last checkpoint); the dataset uses the run's cache when present."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise CryoflexInputError(run.config, "not a cryoflex run (no config.yaml)", "give the --out of cryoflex train")
    config = load_config(run.config)
    state = load_checkpoint(find_checkpoint(run.root, epoch), "cpu")
    normalisation = ImageNormalisation(**state["normalisation"])
    dataset = particle_dataset(config, read_particles(config), run, normalisation=normalisation)
    structure = placed_structure(config, dataset.box_size_px * dataset.pixel_size_A)
    model = build_model(config, structure, dataset.box_size_px, dataset.pixel_size_A)
    model.load_state_dict(state["model"])
    model = model.to(resolve_device(device)).eval()
    return TrainedRun(run.root, config, int(state["epoch"]), model, structure, dataset, run.metrics)
