"""The run directory's layout has one owner: RunDir."""

from __future__ import annotations

from pathlib import Path

from cryoflex.run_dir import RunDir


def test_run_dir_paths() -> None:
    run = RunDir("runs/r1")
    assert run.root == Path("runs/r1")
    assert run.config == Path("runs/r1/config.yaml")
    assert run.checkpoint(7) == Path("runs/r1/checkpoints/epoch_0007.pt")
    assert run.last_checkpoint == run.checkpoint() == Path("runs/r1/checkpoints/last.pt")
    assert run.metrics == Path("runs/r1/metrics.jsonl")
    assert (run.tensorboard.name, run.cache.name, run.analysis.name, run.eval.name, run.reconstruct.name) == (
        "tensorboard", "cache", "analysis", "eval", "reconstruct",
    )  # fmt: skip
    assert RunDir(Path("runs/r1")) == run


def test_best_checkpoint_path() -> None:
    assert RunDir("runs/r1").best_checkpoint == Path("runs/r1/checkpoints/best.pt")
