"""The layout of a run directory, in one place: what `cryoflex train` writes and analyze, eval and reconstruct read.

RUN/config.yaml             the full training configuration
RUN/checkpoints/            epoch_NNNN.pt after every epoch, last.pt (the newest) and best.pt (best validation score)
RUN/metrics.jsonl           loss terms every few steps and per epoch
RUN/tensorboard/            the same scalars and figures for TensorBoard
RUN/cache/                  the preprocessed (downsampled) image cache
RUN/analysis/, RUN/eval/, RUN/reconstruct/   default outputs of analyze, eval and reconstruct
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int | None = None) -> Path:
        """The checkpoint after `epoch` (1-based, completed epochs), or last.pt when epoch is None."""
        return self.checkpoints / ("last.pt" if epoch is None else f"epoch_{epoch:04d}.pt")

    def epoch_checkpoints(self) -> list[Path]:
        """The epoch_NNNN.pt checkpoints present, oldest first."""
        return sorted(self.checkpoints.glob("epoch_*.pt")) if self.checkpoints.is_dir() else []

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint(None)

    @property
    def best_checkpoint(self) -> Path:
        """The checkpoint of the epoch with the best validation score so far (train.loop.validation_score;
        absent without a validation share)."""
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def reconstruct(self) -> Path:
        return self.root / "reconstruct"
