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
from cryoflex.train.checkpoint import find_checkpoint, load_checkpoint
from cryoflex.train.distributed import resolve_device
from cryoflex.train.loop import CONFIG_NAME, METRICS_NAME
from cryoflex.train.setup import build_model, placed_structure, read_particles


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
    def device(self) -> torch.device:
        return self.model.nominal_coords_A.device


def load_run(run_dir: Path, *, epoch: int | None = None, device: str = "auto") -> TrainedRun:
    """Reopen RUN at `epoch` (default: the last checkpoint); the dataset uses the run's cache when present."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise CryoflexInputError(config_path, "not a cryoflex run (no config.yaml)", "give the --out of cryoflex train")
    config = load_config(config_path)
    state = load_checkpoint(find_checkpoint(run_dir, epoch), "cpu")
    metadata = read_particles(config)
    dataset = ParticleDataset(
        metadata,
        box_size_px=config.downsample,
        datadir=None if config.datadir is None else Path(config.datadir),
        cache_dir=run_dir / "cache" if config.cache else None,
        invert_contrast=config.invert_contrast,
        normalisation=ImageNormalisation(**state["normalisation"]),
    )
    structure = placed_structure(config, dataset.box_size_px * dataset.pixel_size_A)
    model = build_model(config, structure, dataset.box_size_px, dataset.pixel_size_A)
    model.load_state_dict(state["model"])
    model = model.to(resolve_device(device)).eval()
    return TrainedRun(run_dir, config, int(state["epoch"]), model, structure, dataset, run_dir / METRICS_NAME)
