"""Figures for the report: particle images beside the model's predictions, C-alpha traces coloured by segment, and
the distribution of per-particle uncertainty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.collections import LineCollection

from cryoflex.analysis.latent import new_figure, save_figure
from cryoflex.analysis.run import TrainedRun

_SEGMENT_COLOURS = ("#6495ed", "#ffa500", "#3cb371", "#dc143c", "#9370db", "#a0522d", "#ff69b4", "#ffd700",
                    "#40e0d0", "#6b8e23", "#6a5acd", "#fa8072")  # fmt: skip
_VIEWS = (("x", "y", 0, 1), ("x", "z", 0, 2))


def segment_colour(segment_id: int) -> str:
    """Colour of segment 1, 2, ... (0 = in no segmented part: grey); the same palette as the ChimeraX scripts."""
    return "#808080" if segment_id == 0 else _SEGMENT_COLOURS[(segment_id - 1) % len(_SEGMENT_COLOURS)]


@torch.no_grad()
def particle_images_figure(run: TrainedRun, path: Path, n_images: int = 6) -> Path:
    """The first particles (normalised, as the model sees them) above the model's predicted images at their poses."""
    count = min(n_images, len(run.dataset))
    batch = run.dataset.__getitems__(list(range(count))).to(run.device)
    predicted = run.model(batch).predicted_images().float().cpu().numpy()
    observed = batch.images.float().cpu().numpy()
    figure = new_figure(1.6 * count, 3.4)
    for k in range(count):
        for row, (images, label) in enumerate(((observed, "particle"), (predicted, "prediction"))):
            axes = figure.add_subplot(2, count, row * count + k + 1)
            axes.imshow(images[k], cmap="gray", origin="lower")
            axes.set_xticks([])
            axes.set_yticks([])
            if k == 0:
                axes.set_ylabel(label)
    figure.suptitle("particles (top) and the model's predictions at their poses, with CTF (bottom)")
    return save_figure(figure, path)


def _trace(axes, coords_A: np.ndarray, segment_ids: np.ndarray, chain_ids: np.ndarray, i: int, j: int, **style) -> None:
    """A C-alpha trace on axes i, j: one line piece per consecutive pair of the same chain, coloured by segment,
    drawn as a single LineCollection (one artist, however many residues)."""
    bonded = np.flatnonzero(chain_ids[:-1] == chain_ids[1:])
    pieces = np.stack([coords_A[bonded][:, [i, j]], coords_A[bonded + 1][:, [i, j]]], axis=1)
    colours = [segment_colour(int(segment_ids[a])) for a in bonded]
    axes.add_collection(LineCollection(list(pieces), colors=colours, **style))
    axes.autoscale_view()


def segments_on_structure_figure(
    coords_A: np.ndarray, segment_ids: np.ndarray, chain_ids: np.ndarray, path: Path
) -> Path:
    """The nominal C-alpha trace seen down z and down y, coloured by learned segment."""
    figure = new_figure(8.0, 4.0)
    for k, (x_name, y_name, i, j) in enumerate(_VIEWS):
        axes = figure.add_subplot(1, 2, k + 1)
        _trace(axes, coords_A, segment_ids, chain_ids, i, j, linewidths=2.0)
        axes.set_aspect("equal")
        axes.set_xlabel(f"{x_name} (A)")
        axes.set_ylabel(f"{y_name} (A)")
    present = sorted(set(int(s) for s in segment_ids))
    handles = [figure.axes[0].plot([], [], color=segment_colour(s), label=f"segment {s}")[0] for s in present]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(present), 4), frameon=False, fontsize="small")
    return save_figure(figure, path)


def traversal_figure(
    frames_A: np.ndarray, segment_ids: np.ndarray, chain_ids: np.ndarray, component: int, path: Path
) -> Path:
    """First (faint) and last (solid) structures of the traversal along PC `component` superposed, two views,
    coloured by segment."""
    figure = new_figure(8.0, 4.0)
    for k, (x_name, y_name, i, j) in enumerate(_VIEWS):
        axes = figure.add_subplot(1, 2, k + 1)
        _trace(axes, frames_A[0], segment_ids, chain_ids, i, j, linewidths=1.5, alpha=0.35)
        _trace(axes, frames_A[-1], segment_ids, chain_ids, i, j, linewidths=2.0)
        axes.set_aspect("equal")
        axes.set_xlabel(f"{x_name} (A)")
        axes.set_ylabel(f"{y_name} (A)")
    figure.suptitle(f"PC{component} traversal: 5th percentile of PC{component} (faint) and 95th percentile (solid)")
    return save_figure(figure, path)


def uncertainty_histogram_figure(expected_rmsd_A: np.ndarray, population_A: float, path: Path) -> Path:
    """Histogram of the particles' expected RMSD under the posterior (A), its median and the population's marked
    (predict.population_expected_rmsd_A: a particle whose image says nothing)."""
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    axes.hist(expected_rmsd_A, bins=min(50, max(10, len(expected_rmsd_A) // 20)), color="tab:blue")
    median_A = float(np.median(expected_rmsd_A))
    axes.axvline(median_A, color="black", ls="--", lw=1, label=f"median {median_A:.2f} A")
    axes.axvline(population_A, color="tab:red", ls=":", lw=1.5, label=f"population {population_A:.2f} A")
    axes.set_xlabel("expected RMSD of the particle's structure under its posterior (A)")
    axes.set_ylabel("particles")
    axes.legend()
    return save_figure(figure, path)


# Optics groups drawn one by one in the noise spectrum figure; more are summarised by their median and range.
_MAX_SPECTRA_DRAWN = 8


def noise_spectrum_figure(run: TrainedRun, path: Path) -> Path | None:
    """The learned noise variance per Fourier shell against spatial frequency, one curve per optics group (noise_model
    shells; None for white noise, whose spectrum is one number)."""
    log_variances = run.model.log_noise_variance.detach().double().cpu()
    if log_variances.dim() == 0:
        return None
    variances = log_variances.reshape(-1, log_variances.shape[-1])[:, 1:].exp().numpy()  # (G, S - 1)
    groups = run.model.noise_optics_groups.tolist()
    box_size_px, pixel_size_A = run.model.formation.box_size_px, run.model.formation.pixel_size_A
    frequency_per_A = np.arange(1, variances.shape[1] + 1) / (box_size_px * pixel_size_A)
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    if len(groups) == 1:
        axes.semilogy(frequency_per_A, variances[0], "o-", ms=3, color="tab:blue")
    elif len(groups) <= _MAX_SPECTRA_DRAWN:
        for group, spectrum in zip(groups, variances, strict=True):
            axes.semilogy(frequency_per_A, spectrum, "o-", ms=3, label=f"optics group {group}")
    else:
        axes.fill_between(frequency_per_A, variances.min(0), variances.max(0), color="tab:blue", alpha=0.3,
                          label=f"range over {len(groups)} optics groups")  # fmt: skip
        axes.semilogy(frequency_per_A, np.median(variances, 0), "o-", ms=3, color="tab:blue", label="median")
    axes.axvline(1 / (2 * pixel_size_A), color="grey", ls=":", lw=1, label=f"Nyquist ({2 * pixel_size_A:.1f} A)")
    axes.set_xlabel("spatial frequency (1/A)")
    axes.set_ylabel("noise variance per pixel (normalised images)")
    axes.legend()
    return save_figure(figure, path)
