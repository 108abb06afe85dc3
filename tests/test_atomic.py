"""Atomic writes: outputs get the mode a plain write gives, stale temporaries of killed writers are removed."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cryoflex.errors import CryoflexOutputError
from cryoflex.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from cryoflex.io.maps import write_mrc
from cryoflex.io.metadata import read_metadata, write_relion_star
from cryoflex.io.particles import StackWriter, write_stack
from cryoflex.io.structure import read_structure, write_structure
from cryoflex.train.checkpoint import save_checkpoint

DATA = Path(__file__).parent / "data"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run the test under umask 022 (the usual default), restoring the previous umask afterwards."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_npy(path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.arange(4.0))
    return path


def _write_stream(path: Path) -> Path:
    with StackWriter(path, 2, 4, 1.0) as writer:
        writer.write(0, np.zeros((2, 4, 4), dtype=np.float32))
    return path


WRITERS: dict[str, Callable[[Path], Path]] = {
    "text": lambda d: (write_text_atomic(d / "config.yaml", "a: 1\n"), d / "config.yaml")[1],
    "npy": lambda d: _write_npy(d / "latent.npy"),
    "checkpoint": lambda d: save_checkpoint(d, {"epoch": 1, "model": {"w": torch.zeros(3)}}),
    "map": lambda d: (write_mrc(d / "map.mrc", np.zeros((4, 4, 4)), 1.0), d / "map.mrc")[1],
    "stack": lambda d: (write_stack(d / "s.mrcs", np.zeros((2, 4, 4)), 1.0), d / "s.mrcs")[1],
    "stream": lambda d: _write_stream(d / "stream.mrcs"),
    "star": lambda d: (write_relion_star(d / "p.star", read_metadata(DATA / "relion31.star")), d / "p.star")[1],
    "pdb": lambda d: (write_structure(d / "m.pdb", read_structure(DATA / "adk_open.pdb")), d / "m.pdb")[1],
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_outputs_get_the_mode_of_a_plain_write(kind: str, tmp_path: Path, umask_022: None) -> None:
    written = WRITERS[kind](tmp_path)
    assert written.is_file()
    assert _mode(written) == 0o644  # 0666 & ~022, readable by colleagues, not 0600
    assert not list(tmp_path.rglob("*.tmp"))


def test_mode_follows_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        write_text_atomic(tmp_path / "shared.txt", "x")
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "shared.txt") == 0o664
    assert _mode(tmp_path / "private.txt") == 0o600


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "cache.npy"
    dead = _dead_pid()
    stale = tmp_path / f".cache.npy.{dead}.0a1b2c3d.tmp"
    fresh_dead = tmp_path / f".cache.npy.{dead}.99999999.tmp"  # written after this process started: keep
    alive = tmp_path / f".cache.npy.{os.getppid()}.0a1b2c3e.tmp"  # creator still running: keep
    other_target = tmp_path / f".cache.npy.old.{dead}.0a1b2c3f.tmp"  # belongs to 'cache.npy.old': keep
    for path in (stale, fresh_dead, alive, other_target):
        path.write_bytes(b"partial")
    one_day_ago = os.path.getmtime(stale) - 86400
    for path in (stale, alive, other_target):
        os.utime(path, (one_day_ago, one_day_ago))

    write_text_atomic(target, "done")

    assert target.read_text() == "done"
    assert not stale.exists()
    assert fresh_dead.exists() and alive.exists() and other_target.exists()
    assert remove_stale_temporaries(target) == []


def test_temporary_names_are_recognisable(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "out.star") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".out.star.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("x")


def test_disk_full_is_a_clear_error_and_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.npy"
    target.write_text("previous")

    with pytest.raises(CryoflexOutputError) as caught, atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    message = str(caught.value)
    assert "the disk is full" in message and "bytes) free in" in message and str(tmp_path) in message
    assert "the previous cache.npy is intact" in message
    assert target.read_text() == "previous"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="posix_fallocate is not available on this system")
def test_memory_mapped_outputs_reserve_their_space_so_a_full_disk_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a memory map, a full disk would be a SIGBUS at some later write; reserved blocks make it an error now."""
    with StackWriter(tmp_path / "stack.mrcs", 64, 32, 1.0) as writer:
        reserved = next(tmp_path.glob(".stack.mrcs.*.tmp")).stat()
        writer.write(0, np.zeros((64, 32, 32), np.float32))
    assert reserved.st_blocks * 512 >= reserved.st_size >= 64 * 32 * 32 * 4  # allocated, not sparse

    def full_disk(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(CryoflexOutputError, match="the disk is full"), StackWriter(tmp_path / "b.mrcs", 4, 8, 1.0):
        pass
    assert not list(tmp_path.glob("*.tmp"))


def test_a_file_reaches_the_disk_before_it_takes_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file is fsynced while the target does not exist yet, then the folder after the rename: a crash of
    the machine cannot leave the name on an empty file."""
    target = tmp_path / "out" / "result.json"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{descriptor}"), target.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_text_atomic(target, "{}\n")
    (first, existed), (folder, after) = synced
    assert Path(first).parent == target.parent and Path(first) != target and not existed
    assert Path(folder) == target.parent and after
