"""Atomic file writes: a crash or kill never leaves a half-written output in place of a good one.

The temporary file is `.{name}.{pid}.{token}.tmp` beside the target, created with mode 0666 so that the umask gives it
(and so the renamed output) the mode a plain write would give. A write that starts removes the temporaries of the same
target left by writers that were killed: those whose creator process is gone and that are older than this process.
A write that fails for lack of space raises CryoflexOutputError saying so, where, and how much space is left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cryoflex.errors import CryoflexOutputError

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PROCESS_START_S = time.time()  # set at import: earlier than any write this process starts


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    """Names of the temporaries of `target`, with the creator's pid as group 1."""
    return re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.tmp")


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of `target` left by dead writers (creator gone, file older than this process)."""
    pattern = _temporary_pattern(target)
    removed = []
    for candidate in target.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match is None or int(match.group(1)) in (0, os.getpid()) or _process_alive(int(match.group(1))):
            continue
        try:
            if candidate.stat().st_mtime < _PROCESS_START_S:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # removed meanwhile by another writer
            continue
    return removed


def _create_temporary(target: Path) -> Path:
    """A new empty temporary beside `target`, mode 0666 less the umask (as a plain open() would create it)."""
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def describe_write_failure(error: BaseException, directory: Path) -> str:
    """The cause of a failed write ('the disk is full', ...) and the bytes free in `directory`."""
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC:
        cause = "the disk is full"
    elif code == errno.EDQUOT:
        cause = "the disk quota is exceeded"
    else:
        cause = f"the write failed ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    try:
        free_bytes = shutil.disk_usage(directory).free
        free = f"{free_bytes / 1e9:.2f} GB ({free_bytes:,} bytes) free in {directory}"
    except OSError:
        free = f"free space in {directory} unknown"
    return f"{cause}: {free}"


def _flush_to_disk(path: Path) -> None:
    """fsync a file before it is renamed into place, and its folder after: without it a machine that crashes (not
    only the process) can leave the new name pointing at an empty or partial file. A folder some filesystems cannot
    sync is left as it is."""
    is_dir = path.is_dir()
    try:
        descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = _create_temporary(target)
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, target)
        _flush_to_disk(target.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno not in _DISK_FULL_ERRNOS:
            raise
        kept = f"the previous {target.name} is intact" if target.exists() else f"no {target.name} was written"
        raise CryoflexOutputError(
            target, describe_write_failure(error, target.parent), f"free space there and run again ({kept})"
        ) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reserve_space(path: Path) -> None:
    """Allocate the blocks of a file just sized for a memory map: a full disk is then an OSError (ENOSPC) here, which
    atomic_path reports, rather than a SIGBUS at some later write through the map."""
    if hasattr(os, "posix_fallocate"):  # not on macOS: there the map's first write to a missing block fails instead
        with path.open("r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """np.save atomically, without pickles (through a file object, so no '.npy' is appended to the temporary name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return Path(path)
