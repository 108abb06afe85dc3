"""Checkpoints: everything needed to continue a run exactly (model, optimiser, epoch, step, random states).

Written atomically at the end of every epoch (RUN/checkpoints/epoch_NNNN.pt, and last.pt), so a crash or a kill
leaves the last complete epoch intact and `--resume` continues from it with the same results as an uninterrupted run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path
from cryoflex.run_dir import RunDir

CHECKPOINT_FORMAT = 1


def checkpoint_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def random_states() -> dict[str, Any]:
    """The states of every random generator training draws from."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write epoch_NNNN.pt and last.pt atomically; returns the epoch file."""
    run = RunDir(run_dir)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    epoch_path = run.checkpoint(state["epoch"])
    for path in (epoch_path, run.last_checkpoint):
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    return epoch_path


def find_checkpoint(run_dir: Path, epoch: int | None = None) -> Path:
    """The checkpoint of `epoch` (1-based, completed epochs), or the last one."""
    directory = RunDir(run_dir).checkpoints
    path = RunDir(run_dir).checkpoint(epoch)
    if not path.is_file():
        available = sorted(p.name for p in directory.glob("epoch_*.pt")) if directory.is_dir() else []
        raise CryoflexInputError(
            path, "no such checkpoint",
            f"available: {', '.join(available)}" if available else "train first (cryoflex train), or check RUN",
        )  # fmt: skip
    return path


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CryoflexInputError(path, f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}",
                                 "use the cryoflex version that wrote it")
    return state
