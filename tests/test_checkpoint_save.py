"""Saving checkpoints on a full disk: a clear error, the last checkpoint intact, no temporary left behind."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from cryoflex.cli import info as info_command
from cryoflex.cli import main
from cryoflex.errors import CryoflexOutputError
from cryoflex.run_dir import RunDir
from cryoflex.train.checkpoint import load_checkpoint, save_checkpoint


def _state(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "step": 10 * epoch, "model": {"weight": torch.full((8,), float(epoch))}}


def _failing_save(failure: BaseException, fail_on_call: int) -> Any:
    """A torch.save that writes part of the file and then fails on call number `fail_on_call` (1-based)."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            f.write(b"PK\x03\x04 partial checkpoint")
            raise failure
        real_save(obj, f, *args, **kwargs)

    return save


def test_disk_full_says_so_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _state(1))
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device"), 1))

    with pytest.raises(CryoflexOutputError) as caught:
        save_checkpoint(tmp_path, _state(2))

    message = str(caught.value)
    directory = RunDir(tmp_path).checkpoints
    assert "the disk is full" in message
    assert f"bytes) free in {directory}" in message
    assert f"the last checkpoint, {directory / 'last.pt'}, is intact" in message
    assert "epoch_0002.pt" in message
    monkeypatch.undo()
    assert load_checkpoint(directory / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_0001.pt", "last.pt"]  # no temporary, no epoch 2


def test_torch_stream_failure_on_last_pt_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, _state(1))
    failure = RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", _failing_save(failure, 2))  # the epoch file is written, last.pt fails

    with pytest.raises(CryoflexOutputError) as caught:
        save_checkpoint(tmp_path, _state(2))

    message = str(caught.value)
    assert "could not write the checkpoint: the write failed (basic_ios::clear: iostream error)" in message
    assert "last.pt, is intact" in message
    monkeypatch.undo()
    directory = RunDir(tmp_path).checkpoints
    assert load_checkpoint(directory / "last.pt")["epoch"] == 1
    assert load_checkpoint(directory / "epoch_0002.pt")["epoch"] == 2
    assert not list(directory.glob(".*"))


def test_cli_prints_output_errors_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def disk_full(args: argparse.Namespace) -> int:
        raise CryoflexOutputError(tmp_path / "x", "the disk is full: 0 bytes free", "free space there")

    monkeypatch.setattr(info_command, "run", disk_full)
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "the disk is full" in err and "Traceback" not in err
