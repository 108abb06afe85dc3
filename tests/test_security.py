"""Files received from others cannot run code: cryoDRGN pickles and checkpoints admit arrays and numbers only."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import read_metadata
from cryoflex.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint


class _RunsCommand:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_the_payload_would_run_with_plain_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCommand(marker)))
    assert marker.exists()  # so the refusals below are not vacuous


@pytest.mark.parametrize("wrapped", [False, True])
def test_cryodrgn_pickle_with_code_is_refused_unrun(data_dir: Path, tmp_path: Path, wrapped: bool) -> None:
    marker = tmp_path / "ran"
    rotations = np.tile(np.eye(3), (5, 1, 1))
    content = (rotations, _RunsCommand(marker)) if wrapped else _RunsCommand(marker)
    path = tmp_path / "poses.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(CryoflexInputError, match="objects other than arrays") as error:
        read_metadata(path, ctf_path=data_dir / "ctf1.pkl")
    assert error.value.path == str(path) and "refuses to load it" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cryodrgn_pickles_of_arrays_read_in_every_protocol(data_dir: Path, tmp_path: Path, protocol: int) -> None:
    with (data_dir / "pose.star.pkl").open("rb") as handle:
        rotations, t = pickle.load(handle)
    path = tmp_path / "poses.pkl"
    path.write_bytes(pickle.dumps((rotations, t.astype(np.float32)), protocol=protocol))
    md = read_metadata(path, ctf_path=data_dir / "ctf1.pkl")
    np.testing.assert_array_equal(md.rotations, rotations)


def test_checkpoint_with_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "extra": _RunsCommand(marker)}, path)
    with pytest.raises(CryoflexInputError, match="objects other than tensors, arrays and numbers") as error:
        load_checkpoint(path)
    assert error.value.path == str(path) and "system" in str(error.value)
    assert not marker.exists()


def test_checkpoint_with_numpy_random_state_loads(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    state = {"format": CHECKPOINT_FORMAT, "random": {"numpy": np.random.get_state()}, "metrics": {"x": np.float64(2)}}
    torch.save(state, path)
    loaded = load_checkpoint(path)
    np.testing.assert_array_equal(loaded["random"]["numpy"][1], state["random"]["numpy"][1])
    assert loaded["metrics"]["x"] == 2.0


def test_damaged_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    """Garbage, an empty file, and checkpoints cut short (a copy that did not finish): torch raises RuntimeError for
    one cut in half, OSError for one cut near its start."""
    path = tmp_path / "last.pt"
    whole = tmp_path / "whole.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "weights": torch.zeros(100_000)}, whole)
    cut_short = [whole.read_bytes()[:size] for size in (whole.stat().st_size // 2, 20_000)]
    for damaged in (b"not a checkpoint", b"", *cut_short):
        path.write_bytes(damaged)
        with pytest.raises(CryoflexInputError, match="not a readable checkpoint"):
            load_checkpoint(path)
