"""Structures out of a trained run: PC traversals (multi-model PDB + ChimeraX script), density maps, the
segmentation (figure, B-factor-coloured structure, table of contiguous segments) and per-segment motions.

Every structure is decoded with the posterior-mean segmentation (sample_segmentation=False), so the same latent
always gives the same structure. Segment ids are 1..M (argmax of G + 1); a residue in no segmented part (all-zero
row of G, it never moves) gets id 0. Structures and maps are in the model frame, so the maps superpose the PDBs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoflex.analysis.latent import CSV_FLOAT_FORMAT, LatentEmbedding, new_figure, save_figure, traversal_latents
from cryoflex.analysis.predict import decode_latents
from cryoflex.imaging.volume import gaussian_volume, write_volume_mrc
from cryoflex.io.atomic import write_text_atomic
from cryoflex.io.structure import Structure, write_structure
from cryoflex.model.cryosphere import CryoSphere

# ChimeraX colour names for segments 1, 2, ...; segment 0 (no part) is grey.
_SEGMENT_COLOURS = (
    "cornflowerblue", "orange", "mediumseagreen", "crimson", "mediumpurple", "sienna", "hotpink", "gold",
    "turquoise", "olivedrab", "slateblue", "salmon",
)  # fmt: skip
_UNASSIGNED_COLOUR = "gray"
_TRACE_STICK_RADIUS_A = 0.8
_PAUSE_FRAMES = 5
_PLAYBACK_LOOPS = 1000


def _assignment(G: np.ndarray | torch.Tensor) -> np.ndarray:
    array = G.detach().cpu().numpy() if isinstance(G, torch.Tensor) else np.asarray(G)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"G must have shape (n_residues, n_segments), got {array.shape}")
    return array


def segment_ids(G: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n_residues,) int: argmax of G + 1, or 0 for residues in no segmented part (all-zero row)."""
    array = _assignment(G)
    return np.where(array.max(axis=1) > 0, array.argmax(axis=1) + 1, 0).astype(np.int64)


@torch.no_grad()
def model_assignment(model: CryoSphere) -> np.ndarray:
    """The posterior-mean segmentation G (n_residues, M) of the model."""
    return model.segmentation(False).float().cpu().numpy()


def _decode(model: CryoSphere, latents: np.ndarray) -> np.ndarray:
    return np.concatenate(list(decode_latents(model, np.asarray(latents, dtype=np.float32))))


def chimerax_traversal_script(pdb_name: str, n_frames: int, segment_ids_present: Sequence[int] | np.ndarray) -> str:
    """A .cxc that opens the multi-model PDB as one trajectory, colours segments by B-factor, and plays it."""
    lines = [
        f"# cryoflex traversal: {n_frames} structures; B-factor = segment id (0: residue in no segment).",
        "# Open in a fresh ChimeraX session (the trajectory becomes model #1): open this_file.cxc",
        f"open {pdb_name} coordsets true",
        "hide #1 cartoons",
        "show #1 atoms",
        "style #1 stick",
        f"size #1 stickRadius {_TRACE_STICK_RADIUS_A}",
    ]
    for segment in sorted(set(int(s) for s in segment_ids_present)):
        colour = _UNASSIGNED_COLOUR if segment == 0 else _SEGMENT_COLOURS[(segment - 1) % len(_SEGMENT_COLOURS)]
        lines.append(f"color #1@@bfactor={segment} {colour}")
    lines += ["view #1", f"coordset #1 1,{n_frames} pauseFrames {_PAUSE_FRAMES} loop {_PLAYBACK_LOOPS} bounce true"]
    return "\n".join(lines) + "\n"


def write_traversals(
    model: CryoSphere,
    structure: Structure,
    embedding: LatentEmbedding,
    out_dir: Path,
    *,
    n_components: int = 2,
    n_points: int = 10,
) -> list[Path]:
    """traversal_pcK.pdb (n_points models, B-factor = segment id) and traversal_pcK.cxc for K = 1..n_components
    (at most the embedding's number of components), from the 5th to the 95th percentile of PC K."""
    out_dir = Path(out_dir)
    ids = segment_ids(model_assignment(model))
    paths = []
    for component in range(1, min(n_components, embedding.n_components) + 1):
        coords_A = _decode(model, traversal_latents(embedding, component, n_points))
        pdb_path = out_dir / f"traversal_pc{component}.pdb"
        write_structure(pdb_path, structure.with_coords(coords_A), b_factors=ids.astype(np.float64))
        script_path = out_dir / f"traversal_pc{component}.cxc"
        write_text_atomic(script_path, chimerax_traversal_script(pdb_path.name, n_points, ids))
        paths += [pdb_path, script_path]
    return paths


def write_volumes(
    model: CryoSphere,
    latents: np.ndarray,
    names: Sequence[str],
    out_dir: Path,
    *,
    box_size_px: int,
    voxel_size_A: float,
    sigma_A: float,
) -> list[Path]:
    """NAME.mrc for each latent (e.g. traversal points, k-means centres): the decoded structure's Gaussian density as
    the model renders it (CryoSphere.decode_with_density), centred so that it superposes the decoded PDB in
    ChimeraX."""
    latents = np.asarray(latents, dtype=np.float32)
    if latents.ndim != 2 or len(names) != latents.shape[0]:
        raise ValueError(f"need one name per latent, got {len(names)} names for latents of shape {latents.shape}")
    bad = [name for name in names if not name or Path(name).name != name]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"volume names must be distinct plain file names, got {list(names)}")
    out_dir = Path(out_dir)
    amplitudes = model.density_amplitudes_e.detach().cpu().numpy()
    paths = []
    density_A = np.concatenate(list(decode_latents(model, latents, density=True)))
    for name, centres_A in zip(names, density_A, strict=True):
        volume = gaussian_volume(centres_A.astype(np.float64), amplitudes, box_size_px, voxel_size_A, sigma_A)
        path = out_dir / f"{name}.mrc"
        write_volume_mrc(path, volume, voxel_size_A)
        paths.append(path)
    return paths


def segmentation_figure(
    G: np.ndarray | torch.Tensor, residue_numbers: np.ndarray, chain_ids: np.ndarray, path: Path
) -> Path:
    """Segment probability vs residue index, one line per segment, chain boundaries marked and labelled."""
    array = _assignment(G)
    chain_ids = np.asarray(chain_ids, dtype=str)
    numbers = np.asarray(residue_numbers)
    figure = new_figure(max(6.0, min(16.0, array.shape[0] / 40)), 3.5)
    axes = figure.add_subplot()
    index = np.arange(array.shape[0])
    for segment in range(array.shape[1]):
        colour = _SEGMENT_COLOURS[segment % len(_SEGMENT_COLOURS)]
        axes.plot(index, array[:, segment], color=colour, linewidth=1.2, label=f"segment {segment + 1}")
    starts = [0] + [i for i in range(1, len(chain_ids)) if chain_ids[i] != chain_ids[i - 1]]
    for start in starts:
        if start > 0:
            axes.axvline(start - 0.5, color="black", linestyle="--", linewidth=0.8)
        axes.text(start, 1.04, f"chain {chain_ids[start]} ({numbers[start]})", fontsize=8, va="bottom")
    axes.set(xlabel="residue index (file order)", ylabel="segment probability", ylim=(-0.02, 1.12),
             xlim=(-0.5, array.shape[0] - 0.5))
    axes.legend(fontsize=7, loc="center right", ncols=1 + array.shape[1] // 8)
    return save_figure(figure, path)


def write_segmented_structure(structure: Structure, G: np.ndarray | torch.Tensor, path: Path) -> Path:
    """The structure with segment ids (1..M, 0 = no segment) in the B-factor column."""
    ids = segment_ids(G)
    if ids.shape[0] != structure.n_residues:
        raise ValueError(f"G has {ids.shape[0]} rows but the structure {structure.n_residues} residues")
    write_structure(path, structure, b_factors=ids.astype(np.float64))
    return Path(path)


@dataclass(frozen=True)
class SegmentRun:
    """A run of consecutive residues of one chain with the same segment id (0-based, inclusive indices)."""

    segment: int
    chain: str
    first_residue: int
    last_residue: int
    first_index: int
    last_index: int
    n_residues: int


def segment_table(G: np.ndarray | torch.Tensor, structure: Structure) -> list[SegmentRun]:
    """Contiguous runs of the argmax segment, split at chain boundaries, in file order: every residue in one."""
    ids = segment_ids(G)
    if ids.shape[0] != structure.n_residues:
        raise ValueError(f"G has {ids.shape[0]} rows but the structure {structure.n_residues} residues")
    chains = structure.chain_ids
    breaks = np.flatnonzero((ids[1:] != ids[:-1]) | (chains[1:] != chains[:-1])) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [ids.shape[0]]])
    numbers = structure.residue_numbers
    return [
        SegmentRun(int(ids[a]), str(chains[a]), int(numbers[a]), int(numbers[b - 1]), int(a), int(b - 1), int(b - a))
        for a, b in zip(starts, stops, strict=True)
    ]


def write_segment_table(rows: Sequence[SegmentRun], path: Path) -> Path:
    """segments.csv: one line per run (segment, chain, first/last residue number and index, residue count)."""
    table = pd.DataFrame([astuple(row) for row in rows], columns=[f.name for f in fields(SegmentRun)])
    write_text_atomic(path, table.to_csv(index=False, lineterminator="\n"))
    return Path(path)


@dataclass(frozen=True)
class SegmentMotions:
    """Per particle and segment: rotation angle (degrees) and translation length (A) from the decoder."""

    angle_deg: np.ndarray  # (n, M)
    translation_A: np.ndarray  # (n, M)


@torch.no_grad()
def segment_motions(model: CryoSphere, latents: np.ndarray, *, batch_size: int = 256) -> SegmentMotions:
    """Rotation angle = |rotation vector| in degrees and translation magnitude in A, per particle and segment.

    The decoder runs in float32 here (no bf16 autocast), whatever precision training used.
    """
    model.eval()
    device = model.nominal_coords_A.device
    latents = np.asarray(latents, dtype=np.float32)
    angles, lengths = [], []
    for start in range(0, latents.shape[0], batch_size):
        chunk = torch.as_tensor(latents[start : start + batch_size], device=device)
        rotation_vectors, translations_A = model.decoder(chunk)
        angles.append(torch.rad2deg(torch.linalg.vector_norm(rotation_vectors.float(), dim=-1)).cpu().numpy())
        lengths.append(torch.linalg.vector_norm(translations_A.float(), dim=-1).cpu().numpy())
    return SegmentMotions(np.concatenate(angles), np.concatenate(lengths))


def segment_motions_table(motions: SegmentMotions, names: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Long format, particle order then segment (1-based): particle, segment, angle_deg, translation_A."""
    n, n_segments = motions.angle_deg.shape
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} particles")
    return pd.DataFrame({
        "particle": np.repeat(np.asarray(names, dtype=str), n_segments),
        "segment": np.tile(np.arange(1, n_segments + 1), n),
        "angle_deg": motions.angle_deg.reshape(-1),
        "translation_A": motions.translation_A.reshape(-1),
    })  # fmt: skip


def segment_motions_figure(motions: SegmentMotions, path: Path) -> Path:
    """Box plots per segment of the rotation angle and the translation magnitude over the particles."""
    n_segments = motions.angle_deg.shape[1]
    figure = new_figure(max(6.0, 0.6 * n_segments + 3.0), 3.5)
    labels = [str(s) for s in range(1, n_segments + 1)]
    for k, (values, ylabel) in enumerate(((motions.angle_deg, "rotation angle (deg)"),
                                          (motions.translation_A, "translation (A)"))):
        axes = figure.add_subplot(1, 2, k + 1)
        axes.boxplot(values, showfliers=False)
        axes.set_xticks(np.arange(1, n_segments + 1), labels)
        axes.set(xlabel="segment", ylabel=ylabel)
    figure.suptitle("Per-segment rigid motions over the particles")
    return save_figure(figure, path)


MOTIONS_CAPTION = (
    "Rigid motion of each segment over the particles, relative to the nominal structure: rotation angle (degrees, "
    "left) and translation length (A, right); boxes span the quartiles, whiskers 1.5 interquartile ranges"
)


def write_segment_motions(motions: SegmentMotions, names: Sequence[str] | np.ndarray, out_dir: Path) -> list[Path]:
    """segment_motions.csv and segment_motions.png."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "segment_motions.csv"
    table = segment_motions_table(motions, names)
    write_text_atomic(csv_path, table.to_csv(index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    return [csv_path, segment_motions_figure(motions, out_dir / "segment_motions.png")]
