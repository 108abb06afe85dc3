"""Exports for `cryoflex analyze`: every particle's structure and its uncertainty, and particle subsets.

Per-particle structures (posterior means) and their spreads are streamed chunk by chunk into .npy files on disk, so
a run of any size needs only one chunk of memory. Subsets keep every original column of the input (RELION STAR
columns via write_relion_star; cryoSPARC rows copied verbatim from the input .cs), so RELION or cryoSPARC can pick
the particles up directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.analysis.latent import CSV_FLOAT_FORMAT
from cryoflex.analysis.predict import LatentPosterior, posterior_structures
from cryoflex.errors import CryoflexInputError
from cryoflex.io.atomic import atomic_path, reserve_space, write_text_atomic
from cryoflex.io.metadata import ParticleMetadata, write_cryosparc_subset, write_relion_star
from cryoflex.io.structure import Structure, write_structure
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.progress import Progress

logger = logging.getLogger(__name__)

PER_PARTICLE_NAME = "per_particle_coords.npy"
PER_PARTICLE_SPREAD_NAME = "per_particle_spread_A.npy"
UNCERTAINTY_CSV_NAME = "per_particle_uncertainty.csv"


def _checked_posterior(posterior: LatentPosterior) -> LatentPosterior:
    shape = np.shape(posterior.mean)
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"latents must have shape (n_particles, latent_dim) with n_particles >= 1, got {shape}")
    if np.shape(posterior.std) != shape:
        raise ValueError(f"latent stds must have the shape of the means {shape}, got {np.shape(posterior.std)}")
    return posterior


def export_per_particle(
    model: CryoSphere,
    posterior: LatentPosterior,
    out_path: str | Path,
    *,
    samples: int = DEFAULT_POSTERIOR_SAMPLES,
    seed: int = 0,
    spread_path: str | Path | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Write every particle's posterior-mean structure, float32 (n_particles, n_residues, 3) in A, model frame, input
    order, and (with spread_path) its per-residue spread, float32 (n_particles, n_residues) in A; returns each
    particle's expected RMSD from its structure under the posterior, float32 (n_particles,) in A.

    Decoded chunk by chunk into memory-mapped .npy files under temporary names, renamed when complete, so memory
    stays at one chunk and a killed run leaves no partial file under a final name.
    """
    posterior = _checked_posterior(posterior)
    n_particles, n_residues = posterior.mean.shape[0], int(model.nominal_coords_A.shape[0])
    chunks = posterior_structures(model, posterior, samples=samples, seed=seed, batch_size=chunk_size)
    expected_rmsd_A = np.empty(n_particles, np.float32)
    with ExitStack() as stack:
        coords_tmp = stack.enter_context(atomic_path(Path(out_path)))
        coords = open_memmap(coords_tmp, mode="w+", dtype=np.float32, shape=(n_particles, n_residues, 3))
        reserve_space(coords_tmp)
        spread = None
        if spread_path is not None:
            spread_tmp = stack.enter_context(atomic_path(Path(spread_path)))
            spread = open_memmap(spread_tmp, mode="w+", dtype=np.float32, shape=(n_particles, n_residues))
            reserve_space(spread_tmp)
        start = 0
        with Progress(n_particles, "per-particle structures", unit="particle", enabled=progress) as bar:
            for chunk in chunks:
                stop = start + len(chunk.coords_A)
                coords[start:stop] = chunk.coords_A
                if spread is not None:
                    spread[start:stop] = chunk.spread_A
                expected_rmsd_A[start:stop] = chunk.expected_rmsd_A
                start = stop
                bar.update(len(chunk.coords_A))
        coords.flush()
        del coords  # unmap before the rename
        if spread is not None:
            spread.flush()
            del spread
    return expected_rmsd_A


def expected_rmsds_A(
    model: CryoSphere, posterior: LatentPosterior, *, samples: int = DEFAULT_POSTERIOR_SAMPLES, seed: int = 0,
    chunk_size: int = 1024, progress: bool = False,
) -> np.ndarray:  # fmt: skip
    """Each particle's expected RMSD from its structure under the posterior, A, float32 (n_particles,); nothing
    written."""
    posterior = _checked_posterior(posterior)
    chunks = posterior_structures(model, posterior, samples=samples, seed=seed, batch_size=chunk_size)
    out = []
    with Progress(len(posterior.mean), "posterior uncertainty", unit="particle", enabled=progress) as bar:
        for chunk in chunks:
            out.append(chunk.expected_rmsd_A)
            bar.update(len(out[-1]))
    return np.concatenate(out)


def write_uncertainty_table(
    expected_rmsd_A: np.ndarray, names: Sequence[str] | np.ndarray, out_path: str | Path
) -> Path:
    """CSV keyed by particle name: the expected RMSD of its structure (A) and its rank (1 = smallest, most certain;
    ties in particle order)."""
    expected = np.asarray(expected_rmsd_A)
    rank = np.empty(len(expected), np.int64)
    rank[np.argsort(expected, kind="stable")] = np.arange(1, len(expected) + 1)
    table = pd.DataFrame({"particle": np.asarray(names, dtype=str), "expected_rmsd_A": expected, "rank": rank})
    out_path = Path(out_path)
    write_text_atomic(out_path, table.to_csv(index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    return out_path


def export_structures_cif(
    model: CryoSphere,
    posterior: LatentPosterior,
    indices: Sequence[int] | np.ndarray,
    nominal: Structure,
    out_path: str | Path,
    *,
    samples: int = DEFAULT_POSTERIOR_SAMPLES,
    seed: int = 0,
) -> Path:
    """Write the posterior-mean structures of the particles at `indices` as one multi-model mmCIF (model k =
    indices[k]), the same as their rows of export_per_particle with the same samples and seed."""
    posterior = _checked_posterior(posterior)
    index = _checked_indices(indices, posterior.mean.shape[0])
    chosen = posterior.subset(index)
    chunks = posterior_structures(model, chosen, samples=samples, seed=seed, positions=index)
    coords_A = np.concatenate([chunk.coords_A for chunk in chunks])
    write_structure(out_path, nominal.with_coords(coords_A))
    return Path(out_path)


# ------------------------------------------------------------ selections


def _checked_indices(indices: Sequence[int] | np.ndarray, n_particles: int) -> np.ndarray:
    """Distinct 0-based positions within range, as int64, in the given order; at least one."""
    index = np.asarray(indices).reshape(-1)
    if index.size == 0:
        raise CryoflexInputError(None, "the selection holds no particles", fix="widen the selection")
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {index.dtype}")
    index = index.astype(np.int64)
    if index.min() < 0 or index.max() >= n_particles:
        raise ValueError(f"indices must lie in 0..{n_particles - 1}, got {index.min()}..{index.max()}")
    if not pd.Index(index).is_unique:
        raise ValueError("indices must be distinct")
    return index


def select_by_clusters(labels: np.ndarray, clusters: Sequence[int]) -> np.ndarray:
    """Positions (ascending) of the particles whose k-means label is one of `clusters`."""
    labels = np.asarray(labels)
    missing = sorted(set(int(c) for c in clusters) - set(np.unique(labels).tolist()))
    if missing or not len(clusters):
        raise CryoflexInputError(
            None,
            f"cluster(s) {missing} hold no particles" if missing else "no cluster was chosen",
            fix=f"choose among clusters {np.unique(labels).tolist()}",
            field="clusters",
        )
    return np.flatnonzero(np.isin(labels, np.asarray(clusters)))


def select_by_region(pca_xy: np.ndarray, x_range: tuple[float, float], y_range: tuple[float, float]) -> np.ndarray:
    """Positions (ascending) of the particles inside the closed box x_range x y_range of a 2-D embedding."""
    points = np.asarray(pca_xy, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"pca_xy must have shape (n_particles, 2), got {points.shape}")
    for name, (low, high) in (("x_range", x_range), ("y_range", y_range)):
        if not low <= high:
            raise CryoflexInputError(None, f"{name} {low}..{high} is empty", fix="give low <= high", field=name)
    inside = (
        (points[:, 0] >= x_range[0]) & (points[:, 0] <= x_range[1])
        & (points[:, 1] >= y_range[0]) & (points[:, 1] <= y_range[1])
    )  # fmt: skip
    return np.flatnonzero(inside)


def select_by_names(names: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """Positions of the particles named `wanted` (e.g. rlnImageName or cryoSPARC uid), in the order given."""
    positions = pd.Index(np.asarray(names, dtype=str)).get_indexer(np.asarray(wanted, dtype=str))
    if (positions < 0).any():
        unknown = [str(w) for w, p in zip(wanted, positions, strict=True) if p < 0]
        raise CryoflexInputError(
            None,
            f"{len(unknown)} particle name(s) are not in the input, e.g. {unknown[:3]}",
            fix="use names exactly as the particle file writes them (rlnImageName, or the cryoSPARC uid)",
            field="names",
        )
    return positions.astype(np.int64)


# ------------------------------------------------------------ subsets


def write_subset(metadata: ParticleMetadata, indices: Sequence[int] | np.ndarray, out_stem: str | Path) -> list[Path]:
    """Write the particles at `indices` as OUT_STEM.star (RELION 3.1, all original columns) and, when the input
    was a cryoSPARC .cs, OUT_STEM.cs (the input's rows verbatim); returns the files written."""
    index = _checked_indices(indices, metadata.n_particles)
    out_stem = Path(out_stem)
    star_path = out_stem.with_name(out_stem.name + ".star")
    write_relion_star(star_path, metadata.subset(index))
    written = [star_path]
    if metadata.format == "cryosparc":
        cs_path = out_stem.with_name(out_stem.name + ".cs")
        write_cryosparc_subset(cs_path, metadata, index)
        written.append(cs_path)
    else:
        logger.info("the input is %s, not a cryoSPARC .cs: no .cs subset written", metadata.format)
    return written


__all__ = [
    "PER_PARTICLE_NAME",
    "PER_PARTICLE_SPREAD_NAME",
    "UNCERTAINTY_CSV_NAME",
    "export_per_particle",
    "export_structures_cif",
    "expected_rmsds_A",
    "select_by_clusters",
    "select_by_names",
    "select_by_region",
    "write_subset",
    "write_uncertainty_table",
]
