"""`cryoflex reconstruct` end to end: density maps of particle groups from the particle images themselves.

Every map `cryoflex analyze` writes is rendered from the model; these maps come from the data (direct Fourier
inversion of the images with their poses and CTF, cryoflex.imaging.backprojection), so they can confirm or refute
what the model learned. Groups: the consensus (all particles), the k-means clusters of `cryoflex analyze`, equal-count
bins along a principal component, or particle subsets given as star/.cs files.

Gold standard: one seeded random half split of the run's particles (RUN/reconstruct/half_split.npy, reused while it
matches the particle count), two half-maps per group, their FSC, the resolution at FSC 0.143, the full map (halves
summed, Wiener-regularised from the FSC) and that map low-pass filtered at the 0.143 resolution.

Model-bias check: each group's structure map (the mean Gaussian map of the structures decoded for its particles, at
their posterior latents from `cryoflex analyze` when it has run, else at the encoder's means; at the reconstruction's
voxel size and box) is compared by FSC with every group's reconstructed map. When each map
agrees best with its own group's structures, the learned motion is supported by the data.

Output layout under OUT (default RUN/reconstruct):
  NAME.mrc, NAME_filtered.mrc, NAME_half_a.mrc, NAME_half_b.mrc   per group, placed like analyze's maps
  NAME.pdb, NAME_structures.mrc     the structure decoded at the group's mean latent; the group's structure map
  fsc.csv, fsc.json, fsc.png        half-map FSC of every group, resolutions at 0.5 and 0.143
  model_bias.csv, .json, .png       FSC of every group's map against every group's structure map
  reconstruct.cxc, report.html      ChimeraX script opening every map with its structure; one offline page
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryoflex.analysis import report
from cryoflex.analysis.fsc import FSC_THRESHOLDS, fourier_shell_correlation, resolution_at
from cryoflex.analysis.latent import (
    CSV_FLOAT_FORMAT,
    SOURCE_NAME,
    cluster_colours,
    labels_fingerprint,
    new_figure,
    read_source,
    save_figure,
)
from cryoflex.analysis.metrics import json_number
from cryoflex.analysis.predict import decode_latents, latent_means
from cryoflex.analysis.run import TrainedRun
from cryoflex.data.dataset import ParticleDataset
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.backprojection import FourierAccumulator, lowpass, wiener_from_fsc
from cryoflex.imaging.volume import gaussian_volume, write_volume_mrc
from cryoflex.io.atomic import save_npy_atomic, write_text_atomic
from cryoflex.io.metadata import ParticleMetadata, read_metadata
from cryoflex.io.metadata.record import SAME_PARTICLE_DEFOCUS_A, defocus_disagrees
from cryoflex.io.particles import stack_key
from cryoflex.io.structure import write_structure
from cryoflex.progress import Progress

logger = logging.getLogger(__name__)

CONSENSUS = "consensus"
HALF_SPLIT_NAME = "half_split.npy"
MIN_PARTICLES_PER_HALF = 10
_LISTED = 5  # skipped groups a warning names (then how many more)
_STRUCTURES_PER_RENDER = 32  # decoded structures rendered as one set of pseudo-atoms (bounds the Gaussian tables)
_CHIMERAX_COLOURS = (
    "cornflowerblue", "orange", "mediumseagreen", "crimson", "mediumpurple", "sienna", "hotpink", "gold",
    "turquoise", "olivedrab", "slateblue", "salmon",
)  # fmt: skip


@dataclass
class GroupMaps:
    """One group's reconstruction: half-maps, full map (raw and filtered), and their half-map FSC."""

    name: str
    particle_indices: np.ndarray  # (n,) int64 positions in the run's particle file
    half_a: torch.Tensor  # (D, D, D) [z, y, x], on the CPU
    half_b: torch.Tensor
    full: torch.Tensor
    full_filtered: torch.Tensor
    frequency_per_A: np.ndarray  # (D//2 + 1,)
    fsc: np.ndarray  # (D//2 + 1,) FSC between the half-maps
    resolution_A: float  # at FSC 0.143 (inf when it is below 0.143 from the start)


@dataclass
class ReconstructOptions:
    clusters: bool = False  # the k-means clusters of cryoflex analyze (also the default when they exist)
    pc: int | None = None  # 1-based principal component to bin along
    bins: int = 5
    subsets: list[Path] = field(default_factory=list)  # star/.cs files of particle subsets
    consensus_only: bool = False  # --all
    analysis_dir: Path | None = None  # default RUN/analysis
    box_size_px: int | None = None  # default: the run's training box
    padding: int = 2
    batch_size: int = 256
    seed: int = 0
    progress: bool = True
    memory_budget_bytes: int = 8 << 30
    max_structures: int = 500  # decoded structures averaged per group for its structure map
    deformed: bool = False


# ------------------------------------------------------------ half split


def half_split(n_particles: int, seed: int) -> np.ndarray:
    """(n,) bool, True = half A: a seeded random half (ceil(n / 2) particles) of the particles."""
    order = np.random.default_rng(seed).permutation(n_particles)
    in_half_a = np.zeros(n_particles, dtype=bool)
    in_half_a[order[: (n_particles + 1) // 2]] = True
    return in_half_a


def stored_half_split(path: Path, n_particles: int, seed: int) -> np.ndarray:
    """The half split stored at `path` when it holds one for n_particles, else a new seeded one, saved there.

    Keeping the stored split keeps every later map's halves independent of the earlier ones' (gold standard).
    """
    path = Path(path)
    if path.is_file():
        stored = np.load(path, allow_pickle=False)
        if stored.dtype == bool and stored.shape == (n_particles,):
            if not np.array_equal(stored, half_split(n_particles, seed)):
                logger.warning("%s was drawn with another seed; keeping it (delete it to draw a new split)", path)
            return stored
        logger.warning("%s holds a split of %d particles, not %d: drawing a new one", path, stored.size, n_particles)
    in_half_a = half_split(n_particles, seed)
    save_npy_atomic(path, in_half_a)
    return in_half_a


def reconstruction_halves(metadata: ParticleMetadata, path: Path, seed: int) -> np.ndarray:
    """(n,) bool, True = half A: the refinement's own half sets when the particle file has both (rlnRandomSubset 1,
    alignments3D/split 0), else stored_half_split's. The poses of each refinement half were aligned to that half's
    reference, so a half map mixing both would share their alignment bias and overstate the FSC (gold standard)."""
    halves = metadata.half_sets
    if halves is not None and np.isin((1, 2), halves).all():
        in_half_a = halves == 1
        logger.info("half maps from the refinement's half sets (%d and %d particles), as its poses were aligned",
                    int(in_half_a.sum()), int((~in_half_a).sum()))  # fmt: skip
        if not (path.is_file() and np.array_equal(np.load(path, allow_pickle=False), in_half_a)):
            save_npy_atomic(path, in_half_a)
        return in_half_a
    if halves is not None:
        logger.warning("every particle is in refinement half %d: drawing random halves instead", int(halves[0]))
    return stored_half_split(path, metadata.n_particles, seed)


# ------------------------------------------------------------ groups


def _analysis_array(analysis_dir: Path, name: str, run: TrainedRun) -> np.ndarray:
    """latent/NAME.npy of a `cryoflex analyze` output, checked to hold one row per particle of the run and to come
    from the model loaded here (check_analysis_source)."""
    path = Path(analysis_dir) / "latent" / f"{name}.npy"
    if not path.is_file():
        raise CryoflexInputError(
            path, "not found: the groups asked for need the latent analysis of this run",
            fix="run `cryoflex analyze RUN` first (or give its --out with --analysis)",
        )  # fmt: skip
    check_analysis_source(analysis_dir, run)
    array = np.load(path, allow_pickle=False)
    n_particles = run.dataset.metadata.n_particles
    if array.shape[0] != n_particles:
        raise CryoflexInputError(
            path, f"holds {array.shape[0]} particles but the run has {n_particles}",
            fix="rerun `cryoflex analyze RUN` on this run",
        )  # fmt: skip
    return array


def check_analysis_source(analysis_dir: Path, run: TrainedRun) -> None:
    """Refuse an analysis whose latents came from another model than the one loaded (another epoch, best.pt against
    the last, or a run trained again into the same folder): its clusters and latents would mean nothing to this
    model. An analysis that did not record its model (before latent/source.json) is used with a warning."""
    latent_dir = Path(analysis_dir) / "latent"
    source = read_source(latent_dir)
    if source is None:
        _warn_unrecorded_source(latent_dir.resolve(), run.epoch)
        return
    if source.get("model_fingerprint") != run.fingerprint:
        epoch = source.get("epoch")
        raise CryoflexInputError(
            latent_dir / SOURCE_NAME,
            f"the analysis was made with the model after epoch {epoch}, another model state than the one loaded "
            f"here (epoch {run.epoch}, fingerprint {run.fingerprint})",
            fix=f"reconstruct with the analysis's checkpoint (--epoch {epoch}, or --checkpoint best if it used "
            "best.pt), or rerun `cryoflex analyze RUN` with this one",
            field="model_fingerprint",
        )  # fmt: skip


@functools.cache
def _warn_unrecorded_source(latent_dir: Path, epoch: int) -> None:
    """The warning for an analysis without source.json, once per folder: reconstruct reads up to three of its files."""
    logger.warning("%s has no %s: cannot check that its latents came from the model loaded here (epoch %d); "
                   "rerun `cryoflex analyze RUN` to record it", latent_dir, SOURCE_NAME, epoch)  # fmt: skip


def is_cluster_group(name: str) -> bool:
    """Whether a group is one of cluster_groups' (cluster_01, ...)."""
    return name.startswith("cluster_")


def clusters_fingerprint(analysis_dir: Path) -> str | None:
    """latent.labels_fingerprint of an analysis's k-means labels (latent/kmeans_labels.npy), None without them."""
    path = Path(analysis_dir) / "latent" / "kmeans_labels.npy"
    return labels_fingerprint(np.load(path, allow_pickle=False)) if path.is_file() else None


def cluster_groups(labels: np.ndarray) -> dict[str, np.ndarray]:
    """cluster_01, cluster_02, ... (numbered from 1, as analyze numbers them) -> positions of their particles."""
    labels = np.asarray(labels, dtype=np.int64)
    return {f"cluster_{k + 1:02d}": np.flatnonzero(labels == k) for k in range(int(labels.max()) + 1)}


def pc_bin_groups(pca: np.ndarray, component: int, n_bins: int) -> dict[str, np.ndarray]:
    """pcK_bin01 .. pcK_binB: equal-count bins of the particles along principal component K (1-based), low to high."""
    pca = np.asarray(pca)
    if not 1 <= component <= pca.shape[1]:
        raise CryoflexInputError(
            None, f"no PC{component}: the analysis has {pca.shape[1]} principal components",
            fix=f"choose --pc among 1..{pca.shape[1]}", field="--pc",
        )  # fmt: skip
    if n_bins < 2:
        problem = "one bin holds every particle, and its map is the consensus map" if n_bins == 1 else f"{n_bins} bins"
        raise CryoflexInputError(None, problem, fix="give --bins 2 or more (--all for the consensus alone)",
                                 field="--bins")  # fmt: skip
    order = np.argsort(pca[:, component - 1], kind="stable")
    return {f"pc{component}_bin{k + 1:02d}": np.sort(chunk) for k, chunk in enumerate(np.array_split(order, n_bins))}


def subset_group(path: Path, metadata: ParticleMetadata, pixel_size_A: float) -> np.ndarray:
    """Positions (ascending) of the run's particles that a star/.cs subset lists: by name (rlnImageName, or uid), else
    by image (stack and index, and the pose among rows that share an image: symmetry-expanded particles), so that a
    STAR subset of a cryoSPARC, cryoDRGN or expanded run finds its particles too."""
    subset = read_metadata(path, duplicate_images="distinct")
    positions = pd.Index(np.asarray(metadata.names, dtype=str)).get_indexer(subset.names)
    if (positions < 0).any() and subset.image_paths is not None and metadata.image_paths is not None:
        positions = _positions_by_image(subset, metadata)
    unknown = subset.names[positions < 0]
    if unknown.size:
        raise CryoflexInputError(
            path, f"{unknown.size} of its {subset.n_particles} particles are not in the run, e.g. "
            f"{', '.join(unknown[:3].tolist())}",
            fix="give a subset of the particles this run was trained on (e.g. from `cryoflex analyze --subset-...`)",
            field="rlnImageName",
        )  # fmt: skip
    if np.unique(positions).size != positions.size:
        raise CryoflexInputError(path, "lists some of the run's particles twice", fix="list each particle once",
                                 field="rlnImageName")  # fmt: skip
    if subset.ctf is not None and metadata.ctf is not None:
        differ = defocus_disagrees(subset.ctf.defocus_u_A, metadata.ctf.defocus_u_A[positions])
        if differ is not None:
            first = int(np.argmax(differ))
            mine_A, runs_A = subset.ctf.defocus_u_A[first], metadata.ctf.defocus_u_A[positions[first]]
            raise CryoflexInputError(
                path, f"the defocus of {int(differ.sum())} of its {differ.size} particles is more than "
                f"{SAME_PARTICLE_DEFOCUS_A:g} A from the run's particles of the same names (e.g. "
                f"{subset.names[first]}: {mine_A:.1f} A, the run's {runs_A:.1f} A): it lists another dataset's "
                "particles", fix="give a subset of the particles this run was trained on", field="rlnDefocusU",
            )  # fmt: skip
    if not np.allclose(subset.pixel_size_A, pixel_size_A, rtol=1e-4):
        raise CryoflexInputError(
            path, f"pixel size {float(subset.pixel_size_A[0]):g} A does not match the run's {pixel_size_A:g} A",
            fix="give a subset of the run's own particle file", field="rlnImagePixelSize",
        )  # fmt: skip
    logger.info("subset %s: %d particles, all found in the run's %d", path, positions.size, metadata.n_particles)
    return np.sort(positions).astype(np.int64)


def _positions_by_image(subset: ParticleMetadata, metadata: ParticleMetadata) -> np.ndarray:
    """Each subset row's position in the run by its image (normalised stack path, index; -1 if none); among run rows
    that share the image, the one whose rotation matches (to 1e-3), as symmetry expansion repeats images."""

    def keys(record: ParticleMetadata) -> list[tuple[str, int]]:
        assert record.image_paths is not None and record.image_indices is not None
        return [(stack_key(p), int(k)) for p, k in zip(record.image_paths, record.image_indices, strict=True)]

    run_keys, subset_keys = keys(metadata), keys(subset)
    rows_of: dict[tuple[str, int], list[int]] = {}
    for row, key in enumerate(run_keys):
        rows_of.setdefault(key, []).append(row)
    positions = np.full(subset.n_particles, -1, dtype=np.int64)
    for k, key in enumerate(subset_keys):
        rows = rows_of.get(key, [])
        if len(rows) > 1 and metadata.rotations is not None and subset.rotations is not None:
            distances = np.abs(metadata.rotations[rows] - subset.rotations[k]).max(axis=(1, 2))
            rows = [rows[int(np.argmin(distances))]] if distances.min() < 1e-3 else []
        if len(rows) == 1:
            positions[k] = rows[0]
    return positions


def particle_latents(
    run: TrainedRun, analysis_dir: Path, batch_size: int, *, progress: bool = False
) -> np.ndarray:
    """Each particle's latent for the model-bias check: the posterior latents `cryoflex analyze` wrote
    (latent/latents.npy, those its clusters and PCA come from), else the means of q(z | image), a rougher guide: the
    encoder's mean says less about an image than the importance-weighted draws do (docs/low_snr.md)."""
    n = run.dataset.metadata.n_particles
    if (Path(analysis_dir) / "latent" / "latents.npy").is_file():
        latents = _analysis_array(analysis_dir, "latents", run)
        if latents.ndim != 2 or latents.shape[1] != run.model.encoder.latent_dim:
            raise CryoflexInputError(
                Path(analysis_dir) / "latent" / "latents.npy",
                f"latents of shape {latents.shape}, not ({n}, {run.model.encoder.latent_dim}) as the run's",
                fix="rerun `cryoflex analyze RUN` on this run",
            )  # fmt: skip
        logger.info("the model-bias check decodes the posterior latents of %s", analysis_dir)
        return latents.astype(np.float32)
    logger.info("encoding %d particles for the structures of the model-bias check (no latents of `cryoflex analyze` "
                "at %s: the encoder's means)", n, analysis_dir)  # fmt: skip
    return latent_means(run.model, run.dataset, batch_size=batch_size, progress=progress)


def select_groups(run: TrainedRun, options: ReconstructOptions) -> dict[str, np.ndarray]:
    """The groups to reconstruct (name -> ascending particle positions): always the consensus first, then the
    clusters, PC bins or subsets asked for (by default the k-means clusters when `cryoflex analyze` has run)."""
    metadata = run.dataset.metadata
    n = metadata.n_particles
    analysis_dir = options.analysis_dir or run.paths.analysis
    groups = {CONSENSUS: np.arange(n, dtype=np.int64)}
    if options.consensus_only:
        return groups
    if options.pc is not None:
        groups.update(pc_bin_groups(_analysis_array(analysis_dir, "pca", run), options.pc, options.bins))
    if options.subsets:
        for path in options.subsets:
            name = Path(path).stem
            if name in groups:
                raise CryoflexInputError(path, f"a second group named {name!r}", fix="rename one of the files")
            groups[name] = subset_group(Path(path), metadata, run.dataset.original_pixel_size_A)
    if options.clusters:
        groups.update(cluster_groups(_analysis_array(analysis_dir, "kmeans_labels", run)))
    elif options.pc is None and not options.subsets:
        labels_path = Path(analysis_dir) / "latent" / "kmeans_labels.npy"
        if labels_path.is_file():
            groups.update(cluster_groups(_analysis_array(analysis_dir, "kmeans_labels", run)))
        else:
            logger.info("no k-means labels at %s: consensus only (run `cryoflex analyze RUN` for cluster maps)",
                        labels_path)  # fmt: skip
    return groups


def check_groups(
    groups: dict[str, np.ndarray],
    in_half_a: np.ndarray,
    source: Path | None,
    *,
    required: Collection[str],
    min_per_half: int = MIN_PARTICLES_PER_HALF,
) -> dict[str, np.ndarray]:
    """The groups that can be reconstructed, before any work: each needs min_per_half particles in both halves.

    A required group (the consensus, a subset file the user gave) that cannot is an error; a cluster or PC bin that
    cannot is skipped with a warning, so one small cluster does not stop the others' maps.
    """
    usable: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for name, indices in groups.items():
        n_a = int(in_half_a[indices].sum())
        n_b = indices.size - n_a
        if min(n_a, n_b) >= min_per_half:
            usable[name] = indices
            continue
        if name in required:
            problem = (
                "holds no particles" if indices.size == 0
                else f"has {n_a} and {n_b} particles in its two halves; a half-map needs at least {min_per_half}"
            )  # fmt: skip
            raise CryoflexInputError(source, f"group {name} {problem}",
                                     fix="give more particles (a larger subset)")  # fmt: skip
        skipped.append(f"{name} ({n_a} + {n_b})")
    if skipped:
        logger.warning(
            "%d of %d groups have fewer than %d particles in a half and are skipped: %s. Fewer --bins, or fewer "
            "clusters in cryoflex analyze --clusters, give larger groups", len(skipped),
            len(set(groups) - set(required)), min_per_half,
            ", ".join(skipped[:_LISTED]) + (f" and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""),
        )  # fmt: skip
    return usable


# ------------------------------------------------------------ reconstruction


def accumulator_bytes(box_size_px: int, padding: int) -> int:
    """Memory of one half accumulator: its padded half-spectrum grid, float32 (N, N, N//2 + 1, 3), N = padding * D."""
    n = padding * box_size_px
    return 12 * n * n * (n // 2 + 1)


def maps_per_pass(box_size_px: int, padding: int, memory_budget_bytes: int) -> int:
    """How many maps, each two half accumulators, fit in memory_budget_bytes together (at least one)."""
    return max(1, memory_budget_bytes // (2 * accumulator_bytes(box_size_px, padding)))


def group_passes(names: Sequence[str], box_size_px: int, padding: int, memory_budget_bytes: int) -> list[list[str]]:
    """The groups split into passes whose two half accumulators each fit in memory_budget_bytes together."""
    per_pass = maps_per_pass(box_size_px, padding, memory_budget_bytes)
    return [list(names[start : start + per_pass]) for start in range(0, len(names), per_pass)]


def half_map_fsc(half_a: torch.Tensor, half_b: torch.Tensor, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """The FSC between two half maps: (frequencies per A, values), one per shell."""
    return fourier_shell_correlation(half_a.cpu().numpy(), half_b.cpu().numpy(), pixel_size_A)


def group_maps(
    name: str, particle_indices: np.ndarray, half_a: torch.Tensor, half_b: torch.Tensor, full: torch.Tensor,
    pixel_size_A: float, fsc_curve: tuple[np.ndarray, np.ndarray] | None = None,
) -> GroupMaps:  # fmt: skip
    """GroupMaps from half maps and the full map: the halves' FSC (fsc_curve, if already computed), the resolution at
    0.143 and the full map low-passed there (at most to the box)."""
    frequency_per_A, fsc = fsc_curve if fsc_curve is not None else half_map_fsc(half_a, half_b, pixel_size_A)
    resolution_A = resolution_at(frequency_per_A, fsc, 0.143)
    box_A = full.shape[0] * pixel_size_A
    filtered = lowpass(full, pixel_size_A, min(resolution_A, box_A)).float().cpu()
    return GroupMaps(name, particle_indices, half_a, half_b, full, filtered, frequency_per_A, fsc, resolution_A)


def _finish_group(name: str, indices: np.ndarray, half_a: FourierAccumulator, half_b: FourierAccumulator,
                  pixel_size_A: float) -> GroupMaps:  # fmt: skip
    """Half-maps, their FSC and resolution, the Wiener-regularised full map and its filtered copy."""
    map_a, map_b = half_a.volume().float().cpu(), half_b.volume().float().cpu()
    fsc_curve = half_map_fsc(map_a, map_b, pixel_size_A)
    half_a.add(half_b)
    full = half_a.volume(wiener_from_fsc(fsc_curve[1])).float().cpu()
    return group_maps(name, indices, map_a, map_b, full, pixel_size_A, fsc_curve)


def reconstruct_groups(
    dataset: ParticleDataset,
    groups: dict[str, np.ndarray],
    in_half_a: np.ndarray,
    *,
    padding: int = 2,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    memory_budget_bytes: int = 8 << 30,
) -> dict[str, GroupMaps]:
    """Half-maps and full maps of every group, reading each particle once per pass and inserting it into the half
    accumulator of every group that holds it (one pass unless the groups' accumulators exceed the budget)."""
    box_size_px, pixel_size_A = dataset.box_size_px, dataset.pixel_size_A
    in_half_a = np.asarray(in_half_a, dtype=bool)
    passes = group_passes(list(groups), box_size_px, padding, memory_budget_bytes)
    if len(passes) > 1:
        logger.info("%d groups of %d px accumulators exceed the memory budget of %.1f GiB: %d passes over the data",
                    len(groups), box_size_px, memory_budget_bytes / 2**30, len(passes))  # fmt: skip
    results: dict[str, GroupMaps] = {}
    for number, names in enumerate(passes, start=1):
        members = {name: np.zeros(dataset.n, dtype=bool) for name in names}
        for name in names:
            members[name][groups[name]] = True
        halves = {
            name: (FourierAccumulator(box_size_px, pixel_size_A, padding=padding, device=device),
                   FourierAccumulator(box_size_px, pixel_size_A, padding=padding, device=device))
            for name in names
        }  # fmt: skip
        needed = np.flatnonzero(np.logical_or.reduce(list(members.values())))
        label = "backprojection" if len(passes) == 1 else f"backprojection, pass {number}/{len(passes)}"
        with Progress(needed.size, label, unit="img", enabled=progress) as bar:
            for start in range(0, needed.size, batch_size):
                positions = needed[start : start + batch_size]
                batch = dataset.__getitems__(positions.tolist()).to(device)
                for name in names:
                    inside = members[name][positions]
                    for accumulator, rows in zip(
                        halves[name], (inside & in_half_a[positions], inside & ~in_half_a[positions]), strict=True
                    ):
                        if rows.any():
                            chosen = torch.from_numpy(np.flatnonzero(rows)).to(device)
                            accumulator.insert(batch.images[chosen], batch.poses[chosen], batch.ctf[chosen])
                bar.update(positions.size)
        for name in names:
            results[name] = _finish_group(name, groups[name], *halves.pop(name), pixel_size_A)
    return {name: results[name] for name in groups}


# ------------------------------------------------------------ model-bias check


@torch.no_grad()
def structure_map(run: TrainedRun, latents: np.ndarray, box_size_px: int, voxel_size_A: float) -> torch.Tensor:
    """(D, D, D) mean Gaussian map of the structures decoded from `latents`: the model's Gaussians, amplitudes and
    width, the density the model renders.

    A map of Gaussians is linear in them, so each chunk of structures is rendered as one set of pseudo-atoms.
    """
    device = run.device
    amplitudes = run.model.density_amplitudes_e.to(device)
    sigma_A = float(run.model.sigma_A.detach())
    total = torch.zeros((box_size_px,) * 3, dtype=torch.float32, device=device)
    for chunk in decode_latents(run.model, latents, batch_size=_STRUCTURES_PER_RENDER, density=True):
        coords_A = torch.as_tensor(chunk, device=device).reshape(-1, 3)
        total += gaussian_volume(coords_A, amplitudes.repeat(len(chunk)), box_size_px, voxel_size_A,
                                 sigma_A)  # fmt: skip
    return (total / max(len(latents), 1)).cpu()


def _mean_fsc(frequency_per_A: np.ndarray, fsc: np.ndarray, limit_A: float) -> float:
    """Mean FSC over the shells from the first non-zero frequency up to 1 / limit_A (at least one shell)."""
    shells = (frequency_per_A > 0) & (frequency_per_A <= 1.0 / limit_A)
    shells[1] = True
    return float(np.mean(fsc[shells]))


@dataclass
class ModelBias:
    """FSC of every group's reconstructed map (rows) against every group's structure map (columns)."""

    groups: list[str]
    mean_fsc: np.ndarray  # (G, G): mean FSC up to limit_A
    resolution_05_A: np.ndarray  # (G, G): resolution at FSC 0.5
    limit_A: float  # the consensus' 0.143 resolution (the shells the mean runs over)

    @property
    def own_best(self) -> list[str]:
        """The groups whose map agrees best (highest mean FSC) with their own structures."""
        return [name for i, name in enumerate(self.groups) if np.argmax(self.mean_fsc[i]) == i]


def model_bias(maps: dict[str, GroupMaps], structure_maps: dict[str, torch.Tensor], voxel_size_A: float) -> ModelBias:
    """The model-bias table: FSC of each reconstructed full map against each structure map."""
    names = list(maps)
    first = maps[names[0]]
    limit_A = maps[CONSENSUS].resolution_A if CONSENSUS in maps else first.resolution_A
    limit_A = min(limit_A, first.full.shape[0] * voxel_size_A)
    mean = np.zeros((len(names), len(names)))
    resolution = np.zeros_like(mean)
    for i, row in enumerate(names):
        for j, column in enumerate(names):
            frequency, fsc = fourier_shell_correlation(maps[row].full.numpy(), structure_maps[column].numpy(),
                                                       voxel_size_A)  # fmt: skip
            mean[i, j] = _mean_fsc(frequency, fsc, limit_A)
            resolution[i, j] = resolution_at(frequency, fsc, 0.5)
    return ModelBias(names, mean, resolution, limit_A)


# ------------------------------------------------------------ outputs


def fsc_rows(maps: dict[str, GroupMaps]) -> list[dict[str, Any]]:
    """One summary row per group: particles, halves, resolutions at 0.5 and 0.143."""
    return [
        {
            "group": name, "particles": int(group.particle_indices.size),
            "resolution_0.5_A": json_number(resolution_at(group.frequency_per_A, group.fsc, 0.5)),
            "resolution_0.143_A": json_number(group.resolution_A),
        }
        for name, group in maps.items()
    ]  # fmt: skip


def write_fsc(maps: dict[str, GroupMaps], in_half_a: np.ndarray, voxel_size_A: float, out_dir: Path,
              provenance: dict[str, Any] | None = None) -> list[Path]:  # fmt: skip
    """fsc.csv (group, shell, frequency, FSC), fsc.json (the same with resolutions and half sizes, and `provenance`:
    what the groups came from, report.reconstruction_content) and fsc.png."""
    frames = [
        pd.DataFrame({"group": name, "shell": np.arange(group.fsc.size), "frequency_per_A": group.frequency_per_A,
                      "fsc": group.fsc})
        for name, group in maps.items()
    ]  # fmt: skip
    csv_path = out_dir / report.RECONSTRUCT_FSC_CSV
    write_text_atomic(csv_path, pd.concat(frames).to_csv(index=False, float_format=CSV_FLOAT_FORMAT,
                                                         lineterminator="\n"))  # fmt: skip
    summary = {row["group"]: row for row in fsc_rows(maps)}
    document = {
        **(provenance or {}),
        "voxel_size_A": voxel_size_A,
        "box_size_px": int(next(iter(maps.values())).full.shape[0]),
        "groups": [
            {
                **summary[name],
                "half_a": int(in_half_a[group.particle_indices].sum()),
                "half_b": int((~in_half_a[group.particle_indices]).sum()),
                "frequency_per_A": group.frequency_per_A.tolist(),
                "fsc": group.fsc.tolist(),
            }
            for name, group in maps.items()
        ],
    }
    json_path = out_dir / report.RECONSTRUCT_FSC_JSON
    write_text_atomic(json_path, json.dumps(document, indent=1) + "\n")
    return [csv_path, json_path, fsc_figure(maps, out_dir / report.RECONSTRUCT_FSC_PNG)]


def _resolution_text(value: float) -> str:
    return f"{value:.1f} A" if math.isfinite(value) else "none"


def fsc_figure(maps: dict[str, GroupMaps], path: Path) -> Path:
    """Half-map FSC of every group against frequency, thresholds 0.5 and 0.143 dashed, resolutions in the legend."""
    figure = new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    colours = cluster_colours(len(maps))
    for colour, (name, group) in zip(colours, maps.items(), strict=True):
        at_half = resolution_at(group.frequency_per_A, group.fsc, 0.5)
        label = f"{name}: {_resolution_text(group.resolution_A)} at 0.143, {_resolution_text(at_half)} at 0.5"
        axes.plot(group.frequency_per_A, group.fsc, color=colour, linewidth=1.4, label=label)
    for threshold in FSC_THRESHOLDS:
        axes.axhline(threshold, color="0.4", linestyle="--", linewidth=0.8)
    axes.set(xlabel="spatial frequency (1/A)", ylabel="FSC between half-maps", ylim=(-0.1, 1.02),
             title="Gold-standard FSC (dashed: 0.5 and 0.143)")  # fmt: skip
    axes.legend(fontsize=7, loc="lower left")
    return save_figure(figure, path)


def write_model_bias(bias: ModelBias, out_dir: Path) -> list[Path]:
    """model_bias.csv (rows: map group, columns: structure group, mean FSC), .json (both tables), .png (heatmap)."""
    table = pd.DataFrame(bias.mean_fsc, index=pd.Index(bias.groups, name="map"), columns=bias.groups)
    csv_path = out_dir / report.RECONSTRUCT_BIAS_CSV
    write_text_atomic(csv_path, table.to_csv(float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    document = {
        "groups": bias.groups,
        "limit_A": json_number(bias.limit_A),
        "mean_fsc": bias.mean_fsc.tolist(),
        "resolution_0.5_A": [[json_number(v) for v in row] for row in bias.resolution_05_A],
        "own_structures_best": bias.own_best,
        "summary": model_bias_summary(bias),
    }
    json_path = out_dir / report.RECONSTRUCT_BIAS_JSON
    write_text_atomic(json_path, json.dumps(document, indent=1) + "\n")
    return [csv_path, json_path, model_bias_figure(bias, out_dir / report.RECONSTRUCT_BIAS_PNG)]


def model_bias_summary(bias: ModelBias) -> str:
    """One line: for which groups the map agrees best with the group's own structures. The consensus is not judged:
    its structures are every particle's, so its map says nothing about the motion."""
    judged = [name for name in bias.groups if name != CONSENSUS]
    best = [name for name in bias.own_best if name != CONSENSUS]
    if len(bias.groups) < 2 or not judged:
        return "one group only: nothing to compare"
    if len(best) == len(judged):
        return f"supported by the data: every group's map agrees best with its own structures ({', '.join(best)})"
    others = [name for name in judged if name not in best]
    return (f"supported by the data for {', '.join(best) or 'no group'}; not for {', '.join(others)} (their maps "
            f"agree better with another group's structures)")  # fmt: skip


def model_bias_figure(bias: ModelBias, path: Path) -> Path:
    """Heatmap of the mean FSC, reconstructed map (rows) against structure map (columns), values written in."""
    size = len(bias.groups)
    figure = new_figure(max(4.5, 0.9 * size + 2.5), max(3.5, 0.7 * size + 1.8))
    axes = figure.add_subplot()
    image = axes.imshow(bias.mean_fsc, cmap="viridis")
    for i in range(size):
        for j in range(size):
            axes.text(j, i, f"{bias.mean_fsc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if bias.mean_fsc[i, j] < bias.mean_fsc.mean() else "black",
                      fontweight="bold" if np.argmax(bias.mean_fsc[i]) == j else "normal")  # fmt: skip
    axes.set_xticks(np.arange(size), bias.groups, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(np.arange(size), bias.groups, fontsize=8)
    axes.set(xlabel="structure map of group", ylabel="reconstructed map of group",
             title=f"Mean FSC up to {_resolution_text(bias.limit_A)} (bold: best per row)")  # fmt: skip
    figure.colorbar(image, ax=axes, label="mean FSC")
    return save_figure(figure, path)


def chimerax_script(names: Sequence[str]) -> str:
    """A .cxc that opens each group's filtered map (transparent surface) and its structure, coloured per group."""
    lines = ["# cryoflex reconstruct: each group's filtered map and the structure decoded at its mean latent.",
             "# Open in a fresh ChimeraX session: open reconstruct.cxc"]  # fmt: skip
    for k, name in enumerate(names):
        colour = _CHIMERAX_COLOURS[k % len(_CHIMERAX_COLOURS)]
        map_model, structure_model = 2 * k + 1, 2 * k + 2
        lines += [
            f"open {name}_filtered.mrc",
            f"volume #{map_model} color {colour} transparency 0.5",
            f"open {name}.pdb",
            f"hide #{structure_model} cartoons",
            f"show #{structure_model} atoms",
            f"style #{structure_model} stick",
            f"color #{structure_model} {colour}",
        ]
    lines.append("view")
    return "\n".join(lines) + "\n"


def write_group_maps(group: GroupMaps, voxel_size_A: float, out_dir: Path) -> list[Path]:
    """NAME.mrc, NAME_filtered.mrc, NAME_half_a.mrc, NAME_half_b.mrc, centred like analyze's maps."""
    volumes = {"": group.full, "_filtered": group.full_filtered, "_half_a": group.half_a, "_half_b": group.half_b}
    paths = []
    for suffix, volume in volumes.items():
        path = out_dir / f"{group.name}{suffix}.mrc"
        write_volume_mrc(path, volume, voxel_size_A)
        paths.append(path)
    return paths


# ------------------------------------------------------------ the command


def reconstruction_dataset(run: TrainedRun, box_size_px: int | None) -> ParticleDataset:
    """The run's dataset (its cache), or the original stacks Fourier-cropped to another box."""
    dataset = run.dataset
    if box_size_px is None or box_size_px == dataset.box_size_px:
        return dataset
    if not 2 <= box_size_px <= dataset.original_box_size_px or box_size_px % 2:
        raise CryoflexInputError(
            dataset.metadata.source_path,
            f"--box-size-px {box_size_px} does not match the particles: the stacks are "
            f"{dataset.original_box_size_px} px, and a box must be even and at most that",
            fix=f"give an even --box-size-px up to {dataset.original_box_size_px}", field="--box-size-px",
        )  # fmt: skip
    config = run.config
    return ParticleDataset(
        dataset.metadata, box_size_px=box_size_px, datadir=None if config.datadir is None else Path(config.datadir),
        invert_contrast=config.invert_contrast, normalisation=dataset.normalisation,
    )  # fmt: skip


def _json_ready(value: Any) -> Any:
    """Nested dicts and lists with every non-finite float as None (JSON has no infinity)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, float | np.floating):
        return json_number(float(value))
    return value


def _deformed(run: TrainedRun, dataset: ParticleDataset, consensus: GroupMaps, in_half_a: np.ndarray,
              options: ReconstructOptions, out_dir: Path, latents: np.ndarray) -> list[Path]:  # fmt: skip
    """The motion-corrected consensus (analysis/deformed.py) with each particle's motions decoded from its row of
    `latents`, its maps and its comparison with the plain consensus."""
    from cryoflex.analysis.deformed import compare_deformed, deformed_reconstruction

    deformed = deformed_reconstruction(run, consensus.particle_indices, in_half_a, padding=options.padding,
                                       batch_size=options.batch_size, device=run.device, progress=options.progress,
                                       dataset=dataset, latents=latents)  # fmt: skip
    deformed.name = f"{CONSENSUS}_deformed"
    paths = write_group_maps(deformed, dataset.pixel_size_A, out_dir)
    path = out_dir / report.RECONSTRUCT_DEFORMED_JSON
    write_text_atomic(path, json.dumps(_json_ready(compare_deformed(consensus, deformed, run)), indent=1) + "\n")
    return [*paths, path]


def reconstruct_run(run: TrainedRun, out_dir: Path, options: ReconstructOptions) -> Path:
    """Every output of `cryoflex reconstruct` under out_dir; returns the path of its report.html."""
    out_dir = Path(out_dir)
    for flag, value in (("--padding", options.padding), ("--batch-size", options.batch_size),
                        ("--max-structures", options.max_structures)):  # fmt: skip
        if value < 1:
            raise CryoflexInputError(None, f"{flag} {value}", fix=f"give {flag} 1 or more", field=flag)
    groups = select_groups(run, options)
    source = run.dataset.metadata.source_path
    in_half_a = reconstruction_halves(run.dataset.metadata, run.paths.reconstruct / HALF_SPLIT_NAME, options.seed)
    asked = len(groups) - 1
    groups = check_groups(groups, in_half_a, source,
                          required={CONSENSUS, *(Path(path).stem for path in options.subsets)})  # fmt: skip
    if asked and len(groups) == 1 and (options.pc is not None or options.clusters):
        raise CryoflexInputError(
            source, f"none of the {asked} groups asked for has {MIN_PARTICLES_PER_HALF} particles in each half",
            fix="fewer --bins, or fewer clusters (cryoflex analyze --clusters); --all for the consensus alone",
        )  # fmt: skip
    dataset = reconstruction_dataset(run, options.box_size_px)
    box_size_px, voxel_size_A = dataset.box_size_px, dataset.pixel_size_A
    map_bytes = 2 * accumulator_bytes(box_size_px, options.padding)
    if map_bytes > options.memory_budget_bytes:
        raise CryoflexInputError(
            None, f"--padding {options.padding} at {box_size_px} px needs {map_bytes / 2**30:,.1f} GB for one map's "
            f"two half accumulators, above --memory-gb {options.memory_budget_bytes / 2**30:g}",
            fix="give --padding 2 (the default), a smaller --box-size-px, or a larger --memory-gb", field="--padding",
        )  # fmt: skip
    logger.info("reconstructing %d group(s) at %d px, %.3g A/px: %s", len(groups), box_size_px, voxel_size_A,
                ", ".join(f"{name} ({indices.size})" for name, indices in groups.items()))  # fmt: skip
    maps = reconstruct_groups(dataset, groups, in_half_a, padding=options.padding, batch_size=options.batch_size,
                              device=run.device, progress=options.progress,
                              memory_budget_bytes=options.memory_budget_bytes)  # fmt: skip
    files: list[Path] = []
    for group in maps.values():
        files += write_group_maps(group, voxel_size_A, out_dir)
    analysis_dir = options.analysis_dir or run.paths.analysis
    provenance = {
        "epoch": run.epoch, "model_fingerprint": run.fingerprint, "deformed": options.deformed,
        "clusters_fingerprint": clusters_fingerprint(analysis_dir) if any(map(is_cluster_group, groups)) else None,
    }  # fmt: skip
    files += write_fsc(maps, in_half_a, voxel_size_A, out_dir, provenance)

    latents = particle_latents(run, analysis_dir, options.batch_size, progress=options.progress)
    rng = np.random.default_rng(options.seed)
    structure_maps = {}
    for name, indices in groups.items():
        sample = np.sort(rng.choice(indices, size=min(indices.size, options.max_structures), replace=False))
        structure_maps[name] = structure_map(run, latents[sample], box_size_px, voxel_size_A)
        write_volume_mrc(out_dir / f"{name}_structures.mrc", structure_maps[name], voxel_size_A)
        centre = next(decode_latents(run.model, latents[indices].mean(axis=0, keepdims=True)))
        write_structure(out_dir / f"{name}.pdb", run.structure.with_coords(centre[0]))
        files += [out_dir / f"{name}_structures.mrc", out_dir / f"{name}.pdb"]
    bias = model_bias(maps, structure_maps, voxel_size_A)
    files += write_model_bias(bias, out_dir)
    logger.info("model-bias check: %s", model_bias_summary(bias))
    script = out_dir / "reconstruct.cxc"
    write_text_atomic(script, chimerax_script(list(maps)))
    files.append(script)
    if options.deformed:
        files += _deformed(run, dataset, maps[CONSENSUS], in_half_a, options, out_dir, latents)

    sections, tables = report.reconstruction_content(out_dir, run.fingerprint)
    return report.write_report(
        out_dir / "report.html", title=f"cryoflex reconstruction of {run.run_dir.name} (epoch {run.epoch})",
        sections=sections, config=run.config.to_dict(), tables=tables, files=files,
    )  # fmt: skip
