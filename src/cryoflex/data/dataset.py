"""Particle images with poses and CTF as a torch Dataset: downsampling, normalisation and an on-disk cache.

Images are read through open_particle_images (resolved by rlnImageName, never reordered) and Fourier-cropped
(cryoflex.data.downsample). With a cache_dir, all downsampled images are written once to one contiguous float32
.npy (n, D, D) with a JSON sidecar that says which metadata and box it was built from; later runs memory-map it,
and it stands in for stacks that are no longer on disk (a run analysed after its scratch space was cleared).
The dataset holds no open file handles in its pickled state, so DataLoader workers each open their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoflex.data.batch import ParticleBatch
from cryoflex.data.downsample import check_box_out, downsampled_pixel_size_A, fourier_crop
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.io.atomic import atomic_path, reserve_space, write_text_atomic
from cryoflex.io.metadata import ParticleMetadata, training_field_name
from cryoflex.io.particles import ParticleStack, StackNotFoundError, open_particle_images
from cryoflex.progress import Progress

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CHUNK_IMAGES = 256
PIXEL_SIZE_RTOL = 1e-4
_MIN_RELATIVE_STD = 1e-5  # std below this fraction of |mean| (or exactly 0): the images carry no signal
_REFINEMENT_FIX = (
    "run a consensus refinement first (RELION Refine3D or cryoSPARC homogeneous refinement) and give its "
    "particle file (e.g. Refine3D/jobNNN/run_data.star)"
)


@dataclass(frozen=True)
class ImageNormalisation:
    """Pixel statistics used to normalise images: (image - mean) / std."""

    mean: float
    std: float


def estimate_normalisation(
    images_source: Any, n_images: int, *, max_images: int = 1000, seed: int = 0
) -> ImageNormalisation:
    """Mean and std over all pixels of up to max_images images drawn without replacement.

    images_source[positions] must return a (k, H, W) array for an integer array of positions (a ParticleStack,
    a numpy array or memmap). Raises ValueError when the pixels are constant or not finite.
    """
    if n_images < 1 or max_images < 1:
        raise ValueError(f"need at least one image, got n_images={n_images}, max_images={max_images}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n_images, size=min(n_images, max_images), replace=False))
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, chosen.size, CHUNK_IMAGES):
        chunk = np.asarray(images_source[chosen[start : start + CHUNK_IMAGES]], dtype=np.float64)
        # Chan et al.'s pairwise update of (count, mean, sum of squared deviations): no cancellation.
        chunk_mean = float(chunk.mean())
        chunk_m2 = float(np.square(chunk - chunk_mean).sum())
        delta, total = chunk_mean - mean, count + chunk.size
        mean += delta * chunk.size / total
        m2 += chunk_m2 + delta**2 * count * chunk.size / total
        count = total
    std = float(np.sqrt(m2 / count))
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise ValueError(f"image pixels are not finite (mean {mean}, std {std}) in {chosen.size} images")
    if not std > _MIN_RELATIVE_STD * abs(mean):
        raise ValueError(
            f"image pixels are constant (mean {mean:g}, std {std:g} over {chosen.size} images): cannot normalise"
        )
    return ImageNormalisation(mean=mean, std=std)


class _DownsampledImages:
    """images[positions] -> (k, D, D) float32 numpy: read from the stack, then Fourier-cropped."""

    def __init__(self, stack: ParticleStack, box_size_px: int):
        self.stack = stack
        self.box_size_px = box_size_px

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(self.stack[np.asarray(positions)])
        return fourier_crop(images, self.box_size_px).numpy()


def _check_training_fields(metadata: ParticleMetadata) -> None:
    """Raise naming the file and field when poses or CTF are missing."""
    needs = (
        ("rotations", metadata.rotations, "has no particle orientations (angles)", _REFINEMENT_FIX),
        ("shifts_A", metadata.shifts_A, "has no particle shifts (origin offsets)", _REFINEMENT_FIX),
        (
            "ctf",
            metadata.ctf,
            "has no CTF parameters",
            "estimate the CTF (CTFFIND/Gctf/cryoSPARC patch CTF) and refine; give the refined particle file",
        ),
    )
    for what, value, problem, fix in needs:
        if value is None:
            raise CryoflexInputError(
                metadata.source_path,
                f"the particle file {problem}; training needs poses and CTF for every particle",
                fix=fix,
                field=training_field_name(metadata.format, what),
            )


def _single_pixel_size_A(metadata: ParticleMetadata) -> float:
    """The one pixel size all particles share (to PIXEL_SIZE_RTOL), else an error listing the optics groups."""
    sizes = metadata.pixel_size_A
    low, high = float(sizes.min()), float(sizes.max())
    if high - low > PIXEL_SIZE_RTOL * high:
        by_group = dict(
            sorted({int(g): float(p) for g, p in zip(metadata.optics_group, sizes, strict=True)}.items())
        )
        listed = ", ".join(f"group {g}: {p:g} A" for g, p in by_group.items())
        raise CryoflexInputError(
            metadata.source_path,
            f"particles have different pixel sizes (optics {listed}); cryoflex needs one pixel size",
            fix="rescale to one pixel size (relion_image_handler) or train on one optics group",
            field="rlnImagePixelSize",
        )
    return float(sizes[0])


def _image_refs_digest(metadata: ParticleMetadata) -> str:
    """SHA-256 of the image references in order: a subset or reordering of the same file gets another cache."""
    assert metadata.image_paths is not None and metadata.image_indices is not None, "the dataset opened these images"
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(metadata.image_indices, dtype=np.int64).tobytes())
    digest.update("\0".join(metadata.image_paths.tolist()).encode())
    return digest.hexdigest()


class ParticleDataset(torch.utils.data.Dataset):
    """Particles of the metadata as whole batches: dataset[indices] -> one ParticleBatch (dataset[i]: a batch of one).

    Images are downsampled to box_size_px (None: original box), normalised (image - mean) / std and negated when
    invert_contrast. Pixel size after downsampling: original * N / D; shifts stay in A.
    """

    def __init__(
        self,
        metadata: ParticleMetadata,
        *,
        box_size_px: int | None = None,
        datadir: Path | None = None,
        cache_dir: Path | None = None,
        invert_contrast: bool = False,
        normalisation: ImageNormalisation | None = None,
        progress: bool = False,
    ):
        _check_training_fields(metadata)
        self._metadata = metadata
        self._original_pixel_size_A = _single_pixel_size_A(metadata)
        self._stack: ParticleStack | None = None
        self._cache_path: Path | None = None
        try:
            stack = open_particle_images(metadata, None if datadir is None else Path(datadir))
            self._original_box_size_px = stack.box_size_px
        except StackNotFoundError as missing:
            stack = None
            self._use_cache_of_missing_stacks(missing, cache_dir, box_size_px)
        self._box_size_px = self._original_box_size_px if box_size_px is None else int(box_size_px)
        try:
            check_box_out(self._original_box_size_px, self._box_size_px)
        except ValueError as err:
            raise CryoflexInputError(
                metadata.source_path, str(err), fix="choose another box size", field="box_size_px"
            ) from err
        self._invert_contrast = invert_contrast
        assert metadata.rotations is not None and metadata.shifts_A is not None, "_check_training_fields passed"
        rotations, shifts_A = metadata.rotations.astype(np.float32), metadata.shifts_A.astype(np.float32)
        self._poses = PoseBatch(torch.from_numpy(rotations), torch.from_numpy(shifts_A))
        self._ctf = CTFBatch.from_record(metadata.ctf, dtype=torch.float32)
        self._optics_groups = torch.from_numpy(np.asarray(metadata.optics_group, dtype=np.int64))
        self._cache: np.ndarray | None = None
        if stack is not None and cache_dir is not None:
            self._cache_path = self._ensure_cache(stack, Path(cache_dir), progress)
            stack.close()
        elif stack is not None:
            self._stack = stack
        if normalisation is None:
            normalisation = self._estimate_normalisation()
        self._normalisation = normalisation

    # ---------------------------------------------------------------- properties

    @property
    def n(self) -> int:
        return self._metadata.n_particles

    def __len__(self) -> int:
        return self.n

    @property
    def box_size_px(self) -> int:
        """Box size after downsampling."""
        return self._box_size_px

    @property
    def pixel_size_A(self) -> float:
        """Pixel size after downsampling."""
        return downsampled_pixel_size_A(self._original_pixel_size_A, self._original_box_size_px, self._box_size_px)

    @property
    def original_box_size_px(self) -> int:
        return self._original_box_size_px

    @property
    def original_pixel_size_A(self) -> float:
        return self._original_pixel_size_A

    @property
    def normalisation(self) -> ImageNormalisation:
        return self._normalisation

    @property
    def metadata(self) -> ParticleMetadata:
        return self._metadata

    @property
    def cache_path(self) -> Path | None:
        """The .npy cache of downsampled images, or None when images are downsampled on the fly."""
        return self._cache_path

    # ---------------------------------------------------------------- items

    def _images(self) -> Any:
        """(k, D, D) reader of unnormalised downsampled images: the cache memmap, else the stack."""
        if self._cache_path is not None:
            if self._cache is None:
                self._cache = np.load(self._cache_path, mmap_mode="r")
            return self._cache
        assert self._stack is not None, "the stack is closed only when the images are cached"
        return _DownsampledImages(self._stack, self._box_size_px)

    def __getitem__(self, i: int) -> ParticleBatch:
        """Particle i as a batch of one."""
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> ParticleBatch:
        """The batch of these particles with one read of the image store (the DataLoader calls this per batch)."""
        positions = np.asarray(indices, dtype=np.int64)
        if positions.size and not (-self.n <= positions.min() and positions.max() < self.n):
            raise IndexError(f"particle index out of range for {self.n} particles")
        positions %= max(self.n, 1)
        order = np.argsort(positions, kind="stable")  # sorted reads are sequential on disk
        images = np.empty((positions.size, self._box_size_px, self._box_size_px), dtype=np.float32)
        images[order] = self._images()[positions[order]]
        scale = (-1.0 if self._invert_contrast else 1.0) / self._normalisation.std
        normalised = torch.from_numpy((images - self._normalisation.mean) * np.float32(scale))
        rows = torch.from_numpy(positions)
        return ParticleBatch(normalised, self._poses[rows], self._ctf[rows], rows, self._optics_groups[rows])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the open memmap; each worker maps the cache itself."""
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # ---------------------------------------------------------------- normalisation and cache

    def _estimate_normalisation(self) -> ImageNormalisation:
        try:
            return estimate_normalisation(self._images(), self.n)
        except ValueError as err:
            raise CryoflexInputError(
                self._metadata.source_path,
                f"{err} (images after downsampling to {self._box_size_px} px)",
                fix="check that the particle stacks hold the particle images",
                field="images",
            ) from err

    def _cache_description(self, original_box_size_px: int, box_size_px: int) -> dict[str, Any]:
        """What the cache of images at box_size_px must have been built from to be reused (also written as its JSON
        sidecar)."""
        source = self._metadata.source_path.resolve()
        stat = source.stat()
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "source_path": str(source),
            "source_size_bytes": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "image_refs_sha256": _image_refs_digest(self._metadata),
            "n_images": self.n,
            "box_size_px": box_size_px,
            "original_box_size_px": original_box_size_px,
            "original_pixel_size_A": self._original_pixel_size_A,
        }

    def _cache_prefix(self) -> str:
        """The start of the cache files' names: the particle file's stem and a key of its full path."""
        source = self._metadata.source_path
        return f"{source.stem}.{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]}."

    def _ensure_cache(self, stack: ParticleStack, cache_dir: Path, progress: bool) -> Path:
        """Path of an up-to-date .npy cache in cache_dir, building it from `stack` when missing or stale."""
        description = self._cache_description(self._original_box_size_px, self._box_size_px)
        npy_path = cache_dir / f"{self._cache_prefix()}{self._box_size_px}px.npy"
        sidecar = npy_path.with_suffix(".json")
        if _cache_is_valid(npy_path, sidecar, description):
            return npy_path
        sidecar.unlink(missing_ok=True)  # the sidecar marks a complete cache: remove it before rebuilding
        images = _DownsampledImages(stack, self._box_size_px)
        _write_cache(npy_path, self.n, self._box_size_px, images, progress)
        write_text_atomic(sidecar, json.dumps(description, indent=2) + "\n")
        return npy_path

    def _use_cache_of_missing_stacks(
        self, missing: StackNotFoundError, cache_dir: Path | None, box_size_px: int | None
    ) -> None:
        """Read the images from an up-to-date cache in cache_dir (at box_size_px, or at the stacks' own box for None)
        in place of stacks no longer on disk, with a warning; re-raise `missing` when there is none."""
        prefix = self._cache_prefix()
        sidecars = [] if cache_dir is None or not Path(cache_dir).is_dir() else sorted(Path(cache_dir).iterdir())
        for sidecar in sidecars:
            if not (sidecar.name.startswith(prefix) and sidecar.name.endswith("px.json")):
                continue
            try:
                original_box_size_px = int(json.loads(sidecar.read_text())["original_box_size_px"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            box = original_box_size_px if box_size_px is None else int(box_size_px)
            npy_path = sidecar.with_suffix(".npy")
            if npy_path.name == f"{prefix}{box}px.npy" and _cache_is_valid(
                npy_path, sidecar, self._cache_description(original_box_size_px, box)
            ):
                self._cache_path, self._original_box_size_px = npy_path, original_box_size_px
                logger.warning(
                    "%s: not found; using the run's images cached at %d px in %s instead. Training, and reconstruct "
                    "--box-size-px at another box, need the stacks (give --datadir if they moved)",
                    missing.path, box, npy_path.parent,
                )  # fmt: skip
                return
        raise missing


def _whole_batch(batch: ParticleBatch) -> ParticleBatch:
    """The DataLoader's collate step: __getitems__ already returns the whole batch."""
    return batch


def particle_loader(
    dataset: ParticleDataset, batches: Iterable[list[int]], *, num_workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding one ParticleBatch per list of indices in `batches` (read in one go, never re-stacked).

    It has its own generator: starting an iteration then never draws from torch's global generator, which samples
    the latents and segmentations, so training's random stream does not depend on how often a loader is iterated.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_whole_batch,  # type: ignore[arg-type]  # torch types it list -> batch; __getitems__ gives a batch
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


def _cache_is_valid(npy_path: Path, sidecar: Path, description: dict[str, Any]) -> bool:
    """Whether the sidecar matches `description` and the .npy holds (n, D, D) float32."""
    try:
        if json.loads(sidecar.read_text()) != description:
            return False
        cached = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    n, box = description["n_images"], description["box_size_px"]
    return cached.dtype == np.float32 and cached.shape == (n, box, box)


def _write_cache(npy_path: Path, n: int, box_size_px: int, images: _DownsampledImages, progress: bool) -> None:
    """Stream all n downsampled images in chunks into one float32 .npy (n, D, D), written atomically."""
    with atomic_path(npy_path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, box_size_px, box_size_px))
        reserve_space(tmp)
        with Progress(n, "cache images", unit="img", enabled=progress) as bar:
            for start in range(0, n, CHUNK_IMAGES):
                stop = min(n, start + CHUNK_IMAGES)
                array[start:stop] = images[np.arange(start, stop)]
                bar.update(stop - start)
        array.flush()
        del array
