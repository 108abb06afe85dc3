"""Latent space of a trained run: PCA, k-means, optional UMAP, their files and plots, and PC traversals.

Everything is deterministic: PCA is an exact SVD (sklearn, sign-fixed), k-means and UMAP take a fixed seed, and
k-means clusters are renumbered by decreasing size (ties: earliest first member), so that the same latents always
give byte-identical files. Figures are drawn on matplotlib Figure objects with the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from cryoflex.io.atomic import atomic_path, save_npy_atomic, write_text_atomic

CSV_FLOAT_FORMAT = "%.9g"  # round-trips float32 exactly
SOURCE_NAME = "source.json"  # which model the latents came from: read back by cryoflex reconstruct
_KMEANS_N_INIT = 10
PNG_DPI = 120
_PNG_METADATA = {"Software": None}  # no library version in the file: same figure, same bytes


@dataclass(frozen=True)
class LatentEmbedding:
    """Latents (n, L) with their PCA (K = min(n, L) components), k-means clustering and optional UMAP."""

    latents: np.ndarray  # (n, L) as given
    pca: np.ndarray  # (n, K) float64 coordinates on the principal axes
    explained_variance_ratio: np.ndarray  # (K,)
    principal_axes: np.ndarray  # (K, L) unit rows; latent = latent_mean + pca @ principal_axes
    latent_mean: np.ndarray  # (L,) float64
    kmeans_labels: np.ndarray  # (n,) int64, 0-based, cluster 0 is the largest
    kmeans_centres: np.ndarray  # (k, L) float64, in latent space
    umap: np.ndarray | None = None  # (n, 2) float32

    @property
    def latent_dim(self) -> int:
        return self.latents.shape[1]

    @property
    def n_components(self) -> int:
        return self.pca.shape[1]


def _check_latents(latents: np.ndarray) -> np.ndarray:
    array = np.asarray(latents)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(f"latents must have shape (n >= 2, L >= 1), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("latents hold NaN or infinite values")
    return array


def _principal_components(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pca coordinates, explained variance ratio, axes, mean) by exact SVD; L = 1 gives the centred latent."""
    values = latents.astype(np.float64)
    pca = PCA(n_components=min(values.shape), svd_solver="full").fit(values)
    coordinates = (values - pca.mean_) @ pca.components_.T
    total = values.var(axis=0, ddof=1).sum()
    ratio = pca.explained_variance_ / total if total > 0 else np.zeros_like(pca.explained_variance_)
    return coordinates, ratio, pca.components_.astype(np.float64), pca.mean_.astype(np.float64)


def sklearn_seed(seed: int) -> int:
    """A seed scikit-learn (and umap-learn) take, from 0 to 2^32 - 1: cryoflex's own seeds go up to 2^63 - 1
    (config.check_seed), so a larger one is hashed into that range (numpy's SeedSequence); a smaller one is kept."""
    return seed if seed < 2**32 else int(np.random.SeedSequence(seed).generate_state(1)[0])


def _ordered_kmeans(latents: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and centres, clusters renumbered by decreasing size then first member."""
    values = latents.astype(np.float64)
    k = min(n_clusters, len(np.unique(values, axis=0)))
    fitted = KMeans(n_clusters=k, n_init=_KMEANS_N_INIT, random_state=sklearn_seed(seed)).fit(values)
    labels = fitted.labels_.astype(np.int64)
    sizes = np.bincount(labels, minlength=k)
    first_member = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
    order = np.lexsort((first_member, -sizes))  # new cluster j is old cluster order[j]
    new_of_old = np.empty(k, dtype=np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old[labels], fitted.cluster_centers_[order].astype(np.float64)


def _umap_2d(latents: np.ndarray, seed: int) -> np.ndarray:
    """2-D UMAP of the latents (umap-learn, an optional dependency)."""
    try:
        import umap
    except ImportError as error:
        raise ImportError("UMAP needs the optional package umap-learn: pip install umap-learn") from error
    n_neighbors = max(2, min(15, latents.shape[0] - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=sklearn_seed(seed))
    return reducer.fit_transform(latents.astype(np.float32)).astype(np.float32)


def embed(latents: np.ndarray, *, n_clusters: int = 6, seed: int = 0, umap: bool = False) -> LatentEmbedding:
    """PCA, k-means (in latent space, fixed seed; k at most the number of distinct latents) and optionally UMAP
    of per-particle latents (n, L)."""
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    values = _check_latents(latents)
    coordinates, ratio, axes, mean = _principal_components(values)
    labels, centres = _ordered_kmeans(values, n_clusters, seed)
    return LatentEmbedding(
        latents=values,
        pca=coordinates,
        explained_variance_ratio=ratio,
        principal_axes=axes,
        latent_mean=mean,
        kmeans_labels=labels,
        kmeans_centres=centres,
        umap=_umap_2d(values, seed) if umap else None,
    )


def traversal_latents(
    embedding: LatentEmbedding, component: int, n_points: int = 10, low_pct: float = 5.0, high_pct: float = 95.0
) -> np.ndarray:
    """(n_points, L) latents along principal component `component` (1-based, as in pc1), from its low_pct to
    its high_pct percentile over the particles, all other components at 0 (the latent mean)."""
    if not 1 <= component <= embedding.n_components:
        raise ValueError(f"component must be in 1..{embedding.n_components}, got {component}")
    if n_points < 1 or not 0 <= low_pct <= high_pct <= 100:
        raise ValueError(f"need n_points >= 1 and 0 <= low_pct <= high_pct <= 100, got {n_points}, "
                         f"{low_pct}, {high_pct}")
    low, high = np.percentile(embedding.pca[:, component - 1], [low_pct, high_pct])
    steps = np.linspace(low, high, n_points)
    return embedding.latent_mean + steps[:, None] * embedding.principal_axes[component - 1]


def embedding_table(embedding: LatentEmbedding, names: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """One row per particle: particle name, z1..zL, pc1[, pc2], cluster (1-based)[, umap1, umap2]."""
    if len(names) != embedding.latents.shape[0]:
        raise ValueError(f"{len(names)} names for {embedding.latents.shape[0]} latents")
    columns: dict[str, np.ndarray] = {"particle": np.asarray(names, dtype=str)}
    for j in range(embedding.latent_dim):
        columns[f"z{j + 1}"] = embedding.latents[:, j]
    for j in range(min(2, embedding.n_components)):
        columns[f"pc{j + 1}"] = embedding.pca[:, j]
    columns["cluster"] = embedding.kmeans_labels + 1
    if embedding.umap is not None:
        columns["umap1"], columns["umap2"] = embedding.umap[:, 0], embedding.umap[:, 1]
    return pd.DataFrame(columns)


def save_embedding(embedding: LatentEmbedding, names: Sequence[str] | np.ndarray, out_dir: Path) -> list[Path]:
    """latents.npy, pca.npy, kmeans_labels.npy, kmeans_centres.npy, [umap.npy], latent_embedding.csv."""
    out_dir = Path(out_dir)
    table = embedding_table(embedding, names)
    arrays = {
        "latents": embedding.latents,
        "pca": embedding.pca,
        "kmeans_labels": embedding.kmeans_labels,
        "kmeans_centres": embedding.kmeans_centres,
    }
    if embedding.umap is not None:
        arrays["umap"] = embedding.umap
    paths = [save_npy_atomic(out_dir / f"{name}.npy", array) for name, array in arrays.items()]
    csv_path = out_dir / "latent_embedding.csv"
    write_text_atomic(csv_path, table.to_csv(index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    return [*paths, csv_path]


def labels_fingerprint(labels: np.ndarray) -> str:
    """SHA-256 of k-means labels: which clustering a reconstruction's cluster maps are of."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def write_source(out_dir: Path, epoch: int, model_fingerprint: str) -> Path:
    """latent/source.json: the epoch and model (analysis.run.model_fingerprint) whose posteriors gave these latents,
    so that a later command decoding them with a model can check it is the same one."""
    path = Path(out_dir) / SOURCE_NAME
    write_text_atomic(path, json.dumps({"epoch": epoch, "model_fingerprint": model_fingerprint}, indent=2) + "\n")
    return path


def read_source(out_dir: Path) -> dict | None:
    """What write_source recorded in out_dir, or None (an analysis from before it was recorded)."""
    path = Path(out_dir) / SOURCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure with constrained layout (no clipped labels), outside pyplot's global state."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def save_figure(figure: Figure, path: Path) -> Path:
    """Render a figure to PNG with the Agg canvas and write it atomically."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PNG_DPI, metadata=_PNG_METADATA)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def cluster_colours(n_clusters: int) -> np.ndarray:
    """(k, 4) RGBA colours, one per cluster (tab10, cycled)."""
    return colormaps["tab10"](np.arange(n_clusters) % 10)


def _pc_axes(embedding: LatentEmbedding) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """x, y (None when there is a single component) and their axis labels with explained variance."""
    ratio = embedding.explained_variance_ratio
    x_label = f"PC1 ({100 * ratio[0]:.1f}% variance)"
    if embedding.n_components == 1:
        return embedding.pca[:, 0], None, x_label, "particles"
    return embedding.pca[:, 0], embedding.pca[:, 1], x_label, f"PC2 ({100 * ratio[1]:.1f}% variance)"


def plot_pca_density(embedding: LatentEmbedding, path: Path) -> Path:
    """Hexbin density of PC1 vs PC2 (a histogram of PC1 when L = 1)."""
    x, y, x_label, y_label = _pc_axes(embedding)
    figure = new_figure(5.5, 4.5)
    axes = figure.add_subplot()
    if y is None:
        axes.hist(x, bins=50, color="0.3")
    else:
        cells = axes.hexbin(x, y, gridsize=40, mincnt=1, cmap="viridis", bins="log")
        figure.colorbar(cells, ax=axes, label="particles per cell (log scale)")
    axes.set(xlabel=x_label, ylabel=y_label, title="Latent space: PCA density")
    return save_figure(figure, path)


def _scatter_clusters(axes: Axes, x: np.ndarray, y: np.ndarray, labels: np.ndarray,
                      centres_xy: np.ndarray | None) -> None:
    """Points coloured by cluster, centres (when given) as labelled crosses."""
    colours = cluster_colours(int(labels.max()) + 1)
    for cluster, colour in enumerate(colours):
        members = labels == cluster
        axes.scatter(x[members], y[members], s=4, color=colour, alpha=0.6, linewidths=0, label=f"{cluster + 1}")
    if centres_xy is not None:
        axes.scatter(centres_xy[:, 0], centres_xy[:, 1], marker="X", s=90, c=colours, edgecolors="black")
        for cluster, (cx, cy) in enumerate(centres_xy):
            axes.annotate(str(cluster + 1), (cx, cy), textcoords="offset points", xytext=(6, 6), fontsize=9)
    axes.legend(title="cluster", markerscale=3, fontsize=8, loc="upper right")


def plot_pca_clusters(embedding: LatentEmbedding, path: Path) -> Path:
    """PC1 vs PC2 coloured by k-means cluster, centres marked (PC1 histograms per cluster when L = 1)."""
    x, y, x_label, y_label = _pc_axes(embedding)
    labels = embedding.kmeans_labels
    figure = new_figure(5.5, 4.5)
    axes = figure.add_subplot()
    if y is None:
        colours = cluster_colours(int(labels.max()) + 1)
        groups = [x[labels == c] for c in range(len(colours))]
        cluster_names = [str(c + 1) for c in range(len(colours))]
        axes.hist(groups, bins=50, stacked=True, color=colours.tolist(), label=cluster_names)
        axes.legend(title="cluster", fontsize=8, loc="upper right")
    else:
        centres = (embedding.kmeans_centres - embedding.latent_mean) @ embedding.principal_axes[:2].T
        _scatter_clusters(axes, x, y, labels, centres)
    axes.set(xlabel=x_label, ylabel=y_label, title="Latent space: k-means clusters")
    return save_figure(figure, path)


def plot_explained_variance(embedding: LatentEmbedding, path: Path) -> Path:
    """Bar chart of the explained variance ratio of each principal component."""
    ratio = embedding.explained_variance_ratio
    figure = new_figure(5.0, 3.5)
    axes = figure.add_subplot()
    positions = np.arange(1, ratio.size + 1)
    axes.bar(positions, 100 * ratio, color="tab:blue")
    axes.set_xticks(positions, [f"PC{p}" for p in positions])
    axes.set(ylabel="explained variance (%)", title="PCA of the particle latents")
    return save_figure(figure, path)


def plot_umap_clusters(embedding: LatentEmbedding, path: Path) -> Path:
    """UMAP 2-D coloured by k-means cluster."""
    if embedding.umap is None:
        raise ValueError("this embedding has no UMAP; call embed(..., umap=True)")
    figure = new_figure(5.5, 4.5)
    axes = figure.add_subplot()
    _scatter_clusters(axes, embedding.umap[:, 0], embedding.umap[:, 1], embedding.kmeans_labels, None)
    axes.set(xlabel="UMAP 1", ylabel="UMAP 2", title="Latent space: UMAP, k-means clusters")
    return save_figure(figure, path)


# Report captions of the figures of plot_embedding, by file stem.
FIGURE_CAPTIONS = {
    "pca_density": "Density of the particles' latent means on the first two principal components (log colour "
    "scale; a histogram of PC1 when the latent space has one dimension)",
    "pca_clusters": "The particles on PC1 and PC2 coloured by k-means cluster (clustered in the full latent space); "
    "crosses mark the cluster centres, numbered as in the Clusters table and latent_embedding.csv",
    "explained_variance": "Share of the variance of the latent means along each principal component",
    "umap_clusters": "UMAP of the latent means, coloured by k-means cluster",
}


def plot_embedding(embedding: LatentEmbedding, out_dir: Path) -> list[Path]:
    """All latent-space figures: pca_density.png, pca_clusters.png, explained_variance.png[, umap_clusters.png]."""
    out_dir = Path(out_dir)
    paths = [
        plot_pca_density(embedding, out_dir / "pca_density.png"),
        plot_pca_clusters(embedding, out_dir / "pca_clusters.png"),
        plot_explained_variance(embedding, out_dir / "explained_variance.png"),
    ]
    if embedding.umap is not None:
        paths.append(plot_umap_clusters(embedding, out_dir / "umap_clusters.png"))
    return paths
