"""Particle image stacks (.mrcs/.mrc): lazy memory-mapped reading over many files, and atomic writers.

Images are always addressed through (stack file, 0-based index) pairs as written in the metadata, never by
position in a file, so reordered or subset metadata reads the right images. Construction touches only the
headers of the unique stack files, so a million-image dataset opens without reading any pixels.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mrcfile
import mrcfile.utils
import numpy as np

from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path, reserve_space

DEFAULT_MAX_OPEN_FILES = 64
PARENT_LEVELS_SEARCHED = 3
_RELION_TYPE_SUFFIXES = (":mrcs", ":mrc")
_DATADIR_FIX = "pass --datadir DIR, the folder that holds the particle stacks"
_STACK_FIX = "extract the particles again or copy the stack again (a transfer may have been cut short)"


@dataclass(frozen=True)
class _StackHeader:
    """What the header of one stack file says: box size and number of images."""

    nx: int
    ny: int
    n_images: int


@contextlib.contextmanager
def _quiet_mrcfile() -> Iterator[None]:
    """Silence mrcfile's permissive-mode warnings (e.g. zeroed MAP tag): cryoflex validates shapes itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="mrcfile")
        yield


def _strip_relion_type_suffix(path: str) -> str:
    """Drop RELION's ':mrcs' / ':mrc' file-type hint from a stack name."""
    for suffix in _RELION_TYPE_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _candidate_paths(written: str, base_dir: Path, datadir: Path | None) -> list[tuple[Path, bool]]:
    """The places a stack named `written` may be, in the order they are tried, without duplicates; each with whether
    it matches the file name alone (the written folders dropped)."""
    path = Path(_strip_relion_type_suffix(written))
    candidates: list[tuple[Path, bool]] = []
    if path.is_absolute():
        candidates.append((path, False))
    if datadir is not None:
        candidates += [(datadir / path, False), (datadir / path.name, True)]
    candidates.append((base_dir / path, False))
    candidates += [(parent / path, False) for parent in base_dir.parents[:PARENT_LEVELS_SEARCHED]]
    candidates.append((base_dir / path.name, True))
    first_flag: dict[Path, bool] = {}
    for candidate, by_name in candidates:
        first_flag.setdefault(candidate, by_name)
    return list(first_flag.items())


class StackNotFoundError(CryoflexInputError):
    """A particle stack that the metadata names is not on disk (a run's image cache can stand in for analysis)."""


def _resolve(written: str, base_dir: Path, datadir: Path | None) -> tuple[Path, bool]:
    """The first existing candidate of _candidate_paths, and whether it matched by file name alone."""
    candidates = _candidate_paths(written, base_dir, datadir)
    for candidate, by_name in candidates:
        if candidate.is_file():
            return candidate, by_name
    tried = "\n    ".join(str(c) for c, _ in candidates)
    raise StackNotFoundError(
        written,
        f"particle stack not found (relative paths resolved against {base_dir}); tried:\n    {tried}",
        fix=_DATADIR_FIX,
    )


def resolve_stack_path(written: str, base_dir: Path, datadir: Path | None = None) -> Path:
    """Find the stack a metadata file names; RELION names are relative to the project, not the star file."""
    return _resolve(written, base_dir, datadir)[0]


def stack_key(written: str) -> str:
    """A written stack name without RELION's type hint, normalised ('./a/../b.mrcs' and 'b.mrcs' are one stack)."""
    return os.path.normpath(_strip_relion_type_suffix(written))


def _check_one_file_per_stack(written: Sequence[str], resolved: Sequence[tuple[Path, bool]]) -> None:
    """Refuse two stacks of different folders that were found as one file by their shared name (e.g. mic_001.mrcs of
    two extraction jobs, with --datadir pointing at one of them): the other's particles would read its images."""
    first_of: dict[Path, tuple[str, bool]] = {}
    for name, (path, by_name) in zip(written, resolved, strict=True):
        other, other_by_name = first_of.setdefault(path.resolve(), (name, by_name))
        if (by_name or other_by_name) and stack_key(other) != stack_key(name):
            raise CryoflexInputError(
                path,
                f"found for two different stacks by their shared file name: {other} and {name}",
                fix="give --datadir the folder their written paths are relative to (so each keeps its sub-folder), "
                "or leave --datadir out if the written paths are right",
                field="rlnImageName",
            )


def _read_stack_header(path: Path) -> _StackHeader:
    """Read one stack's header (no pixels); check the file is long enough for the images it declares."""
    try:
        with _quiet_mrcfile(), mrcfile.open(path, header_only=True, permissive=True) as mrc:
            header = mrc.header
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
            data_offset = int(header.nbytes) + int(header.nsymbt)
            dtype = mrcfile.utils.data_dtype_from_header(header)
    except (OSError, ValueError, EOFError) as err:
        raise CryoflexInputError(path, f"not a readable MRC particle stack ({err})", fix=_STACK_FIX) from err
    if min(nx, ny, nz) <= 0:
        raise CryoflexInputError(
            path, f"MRC header declares an empty or invalid shape nx={nx} ny={ny} nz={nz}", fix=_STACK_FIX
        )
    if dtype.kind not in "iuf":
        raise CryoflexInputError(path, f"MRC data type {dtype} is not a real-valued image type", fix=_STACK_FIX)
    expected_bytes = data_offset + nx * ny * nz * dtype.itemsize
    actual_bytes = path.stat().st_size
    if actual_bytes < expected_bytes:
        raise CryoflexInputError(
            path,
            f"file is truncated: its header declares {nz} images of {nx}x{ny} ({expected_bytes} bytes) "
            f"but the file has {actual_bytes} bytes",
            fix="re-extract or re-copy the particle stack",
        )
    return _StackHeader(nx=nx, ny=ny, n_images=nz)


def _check_boxes(paths: Sequence[Path], headers: Sequence[_StackHeader]) -> int:
    """Return the common square box size of all stacks, or raise naming the first stack that disagrees."""
    first_path, first = paths[0], headers[0]
    if first.nx != first.ny:
        raise CryoflexInputError(
            first_path, f"images are not square ({first.nx}x{first.ny} pixels)", fix="extract square particle boxes"
        )
    for path, header in zip(paths[1:], headers[1:], strict=True):
        if (header.nx, header.ny) != (first.nx, first.ny):
            raise CryoflexInputError(
                path,
                f"images are {header.nx}x{header.ny} pixels but {first_path} has {first.nx}x{first.ny}; "
                "all particles of a dataset must share one box size",
                fix="re-extract the particles with one box size",
            )
    return first.nx


def _check_indices(
    indices: np.ndarray, file_ids: np.ndarray, paths: Sequence[Path], headers: Sequence[_StackHeader]
) -> None:
    """Raise for the first particle whose image index lies outside its stack."""
    counts = np.array([h.n_images for h in headers], dtype=np.int64)
    bad = np.flatnonzero((indices < 0) | (indices >= counts[file_ids]))
    if bad.size == 0:
        return
    particle = int(bad[0])
    stack = paths[file_ids[particle]]
    raise CryoflexInputError(
        stack,
        f"particle {particle} (0-based row of the metadata) refers to image {int(indices[particle]) + 1} "
        f"(1-based, as in rlnImageName) but the stack holds {int(counts[file_ids[particle]])} images "
        f"({bad.size} out-of-range particle(s) in all)",
        fix="check that the metadata file belongs to these stacks",
    )


def _factorize(image_paths: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Map each path to the id of its unique stack, using 4 bytes per particle (no hash table per row)."""
    ids: dict[str, int] = {}
    codes = np.fromiter(
        (ids.setdefault(str(p), len(ids)) for p in image_paths), dtype=np.int32, count=len(image_paths)
    )
    return codes, list(ids)


class ParticleStack:
    """Lazy view of particle images spread over many MRC stacks, read through a bounded memory-map cache."""

    def __init__(
        self,
        image_paths: Sequence[str],
        image_indices: Sequence[int] | np.ndarray,
        *,
        base_dir: Path,
        datadir: Path | None = None,
        max_open_files: int = DEFAULT_MAX_OPEN_FILES,
    ):
        if len(image_paths) != len(image_indices):
            raise ValueError(f"{len(image_paths)} image paths but {len(image_indices)} image indices")
        if len(image_paths) == 0:
            raise CryoflexInputError(
                base_dir, "the metadata lists no particle images", fix="give a particle file with rows"
            )
        if max_open_files < 1:
            raise ValueError("max_open_files must be at least 1")
        self._file_ids, unique_written = _factorize(image_paths)
        base_dir = Path(base_dir)
        datadir = None if datadir is None else Path(datadir)
        resolved = [_resolve(w, base_dir, datadir) for w in unique_written]
        _check_one_file_per_stack(unique_written, resolved)
        self._paths = [path for path, _ in resolved]
        headers = [_read_stack_header(p) for p in self._paths]
        self._box_size_px = _check_boxes(self._paths, headers)
        self._indices = np.asarray(image_indices, dtype=np.int64)
        _check_indices(self._indices, self._file_ids, self._paths, headers)
        self._max_open_files = max_open_files
        self._open_maps: OrderedDict[int, Any] = OrderedDict()

    @classmethod
    def from_files(
        cls, stack_paths: Sequence[str | Path], *, max_open_files: int = DEFAULT_MAX_OPEN_FILES
    ) -> ParticleStack:
        """Every image of each stack, in file order: for inputs that name stacks but not single images."""
        paths = [str(p) for p in stack_paths]
        if not paths:
            raise ValueError("no stack files given")
        counts = [count_images(p) for p in paths]
        image_paths = [p for p, n in zip(paths, counts, strict=True) for _ in range(n)]
        image_indices = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        return cls(image_paths, image_indices, base_dir=Path.cwd(), max_open_files=max_open_files)

    def __len__(self) -> int:
        return int(self._indices.size)

    @property
    def box_size_px(self) -> int:
        """Side length N of the square images, in pixels."""
        return self._box_size_px

    @property
    def stack_paths(self) -> list[Path]:
        """The resolved stack files, one per unique stack name in the metadata."""
        return list(self._paths)

    @property
    def n_open_files(self) -> int:
        """How many stack files are memory-mapped right now (at most max_open_files)."""
        return len(self._open_maps)

    def __getitem__(self, key: int | np.integer | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        """Images as float32: (N, N) for an integer, (k, N, N) for a slice or an array of integers."""
        if isinstance(key, (int, np.integer)):
            return self._read(self._positions(np.array([key])))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        return self._read(self._positions(np.asarray(key)))

    def _positions(self, key: np.ndarray) -> np.ndarray:
        """Validate integer particle positions and wrap negative ones, like numpy does."""
        if key.size and key.dtype.kind not in "iu":
            raise TypeError(f"particle indices must be integers, got {key.dtype}")
        positions = key.astype(np.int64).reshape(-1)
        n = len(self)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        return np.where(positions < 0, positions + n, positions)

    def _read(self, positions: np.ndarray) -> np.ndarray:
        """Read the images at `positions`, one pass per stack file with indices sorted for locality."""
        n = self._box_size_px
        out = np.empty((positions.size, n, n), dtype=np.float32)
        if positions.size == 0:
            return out
        file_ids = self._file_ids[positions]
        indices = self._indices[positions]
        order = np.lexsort((indices, file_ids))
        boundaries = np.flatnonzero(np.diff(file_ids[order])) + 1
        for group in np.split(order, boundaries):
            out[group] = self._images_of(int(file_ids[group[0]]))[indices[group]]
        return out

    def _images_of(self, file_id: int) -> np.ndarray:
        """The memory-mapped (n_images, N, N) array of one stack; opens it, evicting the oldest if needed."""
        mrc = self._open_maps.get(file_id)
        if mrc is None:
            if len(self._open_maps) >= self._max_open_files:
                _, oldest = self._open_maps.popitem(last=False)
                oldest.close()
            with _quiet_mrcfile():
                mrc = mrcfile.mmap(self._paths[file_id], mode="r", permissive=True)
            if mrc.data is None:
                mrc.close()
                raise CryoflexInputError(
                    self._paths[file_id], "MRC data block could not be memory-mapped", fix=_STACK_FIX
                )
            self._open_maps[file_id] = mrc
        else:
            self._open_maps.move_to_end(file_id)
        data = mrc.data
        return data[np.newaxis] if data.ndim == 2 else data

    def close(self) -> None:
        """Close every open memory map; later reads reopen files as needed."""
        while self._open_maps:
            _, mrc = self._open_maps.popitem()
            mrc.close()

    def __enter__(self) -> ParticleStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open memory maps, so DataLoader workers (spawn) each open their own."""
        state = self.__dict__.copy()
        state["_open_maps"] = OrderedDict()
        return state


def open_particle_images(metadata: Any, datadir: Path | None = None) -> ParticleStack:
    """Open the images a metadata record (ParticleMetadata or alike) names, relative to its source file."""
    source = Path(metadata.source_path)
    if metadata.image_paths is None:
        raise CryoflexInputError(
            source,
            "the metadata file references no images",
            fix="pass the image stack with --stack STACK.mrcs (or use a metadata file that names the images)",
        )
    stack = ParticleStack(
        metadata.image_paths, metadata.image_indices, base_dir=source.parent, datadir=datadir
    )
    expected_box = getattr(metadata, "box_size_px", None)
    if expected_box is not None and int(expected_box) != stack.box_size_px:
        raise CryoflexInputError(
            source,
            f"the metadata says images are {int(expected_box)} px but the stacks hold "
            f"{stack.box_size_px}x{stack.box_size_px} px images",
            fix="check that the metadata file belongs to these stacks",
            field="box size",
        )
    return stack


def _as_image_stack(images: np.ndarray) -> np.ndarray:
    """Check `images` is a (k, N, N) stack and return it as float32."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"images must have shape (k, N, N), got {array.shape}")
    return array


def write_stack(path: str | Path, images: np.ndarray, pixel_size_A: float) -> None:
    """Write a (k, N, N) float32 .mrcs image stack atomically, with its pixel size in the header."""
    array = _as_image_stack(images)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(array)
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size_A


class StackWriter:
    """Stream a large .mrcs stack to disk chunk by chunk; the file appears, complete, only on a clean close.

    Usage: with StackWriter(path, n, box, apix) as writer: writer.write(start, images) for every chunk.
    """

    def __init__(self, path: str | Path, n_images: int, box_size_px: int, pixel_size_A: float):
        if n_images < 1 or box_size_px < 1:
            raise ValueError(
                f"need at least one image and one pixel, got {n_images} images of {box_size_px} px"
            )
        self.path = Path(path)
        self.n_images = int(n_images)
        self.box_size_px = int(box_size_px)
        self.pixel_size_A = float(pixel_size_A)
        self._written = np.zeros(self.n_images, dtype=bool)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._mrc: Any = None
        self._resources: contextlib.ExitStack | None = None

    def __enter__(self) -> StackWriter:
        shape = (self.n_images, self.box_size_px, self.box_size_px)
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            self._mrc = stack.enter_context(mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2, overwrite=True))
            reserve_space(tmp)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size_A
            self._resources = stack.pop_all()
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Write images[0..k) to positions start..start+k of the stack."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write called outside its `with` block")
        chunk = _as_image_stack(images)
        stop = start + chunk.shape[0]
        if chunk.shape[1] != self.box_size_px:
            raise ValueError(f"images are {chunk.shape[1]} px but the stack is {self.box_size_px} px")
        if start < 0 or stop > self.n_images:
            raise IndexError(f"images {start}..{stop} do not fit a stack of {self.n_images}")
        self._mrc.data[start:stop] = chunk
        self._written[start:stop] = True
        if chunk.size:
            self._sum += float(chunk.sum(dtype=np.float64))
            self._sum_sq += float(np.square(chunk, dtype=np.float64).sum())
            self._min = min(self._min, float(chunk.min()))
            self._max = max(self._max, float(chunk.max()))

    def _finish_header(self) -> None:
        """Check every image was written and store the running statistics in the header."""
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise RuntimeError(
                f"{missing.size} of {self.n_images} images were never written (first: {missing[0]})"
            )
        count = self._written.size * self.box_size_px**2
        mean = self._sum / count
        header = self._mrc.header
        header.dmin, header.dmax, header.dmean = self._min, self._max, mean
        header.rms = np.sqrt(max(self._sum_sq / count - mean**2, 0.0))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        resources, self._resources = self._resources, None
        if resources is None:
            raise RuntimeError("StackWriter exited without being entered")
        try:
            if exc_type is None:
                try:
                    self._finish_header()
                except BaseException as err:
                    resources.__exit__(type(err), err, err.__traceback__)
                    raise
            resources.__exit__(exc_type, exc, tb)
        finally:
            self._mrc = None


def count_images(path: str | Path) -> int:
    """Number of images in one stack file (a 2-D .mrc counts as one), from its header only."""
    return _read_stack_header(Path(path)).n_images


__all__ = [
    "ParticleStack",
    "StackWriter",
    "count_images",
    "open_particle_images",
    "resolve_stack_path",
    "stack_key",
    "write_stack",
]
