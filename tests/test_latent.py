"""Latent-space analysis: PCA, k-means, files, plots, traversals; determinism and the L = 1 case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryoflex.analysis.latent import embed, plot_embedding, save_embedding, sklearn_seed, traversal_latents


def _three_blobs(n_per_blob: int = 30, seed: int = 1) -> np.ndarray:
    """(3 n, 3) float32 latents in three well-separated blobs of unequal spread along the axes."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    points = np.concatenate([c + rng.normal(0, [0.3, 0.2, 0.1], (n_per_blob, 3)) for c in centres])
    return points.astype(np.float32)


def test_pca_and_kmeans_recover_the_structure() -> None:
    latents = _three_blobs()
    embedding = embed(latents, n_clusters=3, seed=0)
    centred = latents.astype(np.float64) - latents.mean(0)
    np.testing.assert_allclose(embedding.latent_mean, latents.mean(0), atol=1e-6)
    np.testing.assert_allclose(embedding.pca @ embedding.principal_axes, centred, atol=1e-6)  # all K = L axes
    np.testing.assert_allclose(embedding.principal_axes @ embedding.principal_axes.T, np.eye(3), atol=1e-10)
    assert embedding.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(embedding.explained_variance_ratio) <= 0)
    # every blob is one cluster, and the centres are the blob means
    blobs = np.repeat(np.arange(3), 30)
    for blob in range(3):
        assert len(set(embedding.kmeans_labels[blobs == blob])) == 1
    for cluster in range(3):
        members = latents[embedding.kmeans_labels == cluster]
        np.testing.assert_allclose(embedding.kmeans_centres[cluster], members.mean(0), atol=1e-5)


def test_any_seed_cryoflex_takes_reaches_k_means() -> None:
    """scikit-learn takes seeds below 2^32 only; cryoflex's go to 2^63 - 1 (config.check_seed): those are hashed into
    its range, the same each time, and the smaller ones are passed as they are."""
    latents = _three_blobs()
    large = [embed(latents, n_clusters=3, seed=2**63 - 1).kmeans_labels for _ in range(2)]
    np.testing.assert_array_equal(*large)
    assert sklearn_seed(2**63 - 1) < 2**32 and sklearn_seed(2**32 - 1) == 2**32 - 1


def test_clusters_are_numbered_by_decreasing_size() -> None:
    rng = np.random.default_rng(0)
    sizes = [5, 40, 15]
    latents = np.concatenate([rng.normal(10 * k, 0.1, (size, 2)) for k, size in enumerate(sizes)])
    embedding = embed(latents, n_clusters=3)
    assert np.bincount(embedding.kmeans_labels).tolist() == [40, 15, 5]


def test_saved_files_are_complete_and_byte_identical(tmp_path: Path) -> None:
    latents = _three_blobs()
    names = [f"{k + 1:06d}@particles.mrcs" for k in range(len(latents))]
    first = save_embedding(embed(latents, seed=0), names, tmp_path / "a")
    second = save_embedding(embed(latents, seed=0), names, tmp_path / "b")
    assert [p.name for p in first] == ["latents.npy", "pca.npy", "kmeans_labels.npy", "kmeans_centres.npy",
                                       "latent_embedding.csv"]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    table = pd.read_csv(tmp_path / "a" / "latent_embedding.csv")
    assert list(table.columns) == ["particle", "z1", "z2", "z3", "pc1", "pc2", "cluster"]
    assert table["particle"].tolist() == names
    np.testing.assert_array_equal(table[["z1", "z2", "z3"]].to_numpy(np.float32), latents)  # exact round trip
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "latents.npy"), latents)
    labels = np.load(tmp_path / "a" / "kmeans_labels.npy")
    np.testing.assert_array_equal(table["cluster"].to_numpy(), labels + 1)
    assert np.load(tmp_path / "a" / "kmeans_centres.npy").shape == (6, 3)
    assert not list((tmp_path / "a").glob(".*.tmp"))


def test_plots_are_png_and_deterministic(tmp_path: Path) -> None:
    embedding = embed(_three_blobs(), n_clusters=3)
    first = plot_embedding(embedding, tmp_path / "a")
    second = plot_embedding(embedding, tmp_path / "b")
    assert [p.name for p in first] == ["pca_density.png", "pca_clusters.png", "explained_variance.png"]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert a.read_bytes() == b.read_bytes(), a.name


def test_traversal_spans_the_percentiles_of_one_component() -> None:
    latents = _three_blobs()
    embedding = embed(latents, n_clusters=3)
    points = traversal_latents(embedding, 2, n_points=7, low_pct=5, high_pct=95)
    assert points.shape == (7, 3)
    coordinates = (points - embedding.latent_mean) @ embedding.principal_axes.T
    np.testing.assert_allclose(coordinates[:, [0, 2]], 0, atol=1e-9)  # other components at the mean
    low, high = np.percentile(embedding.pca[:, 1], [5, 95])
    np.testing.assert_allclose(coordinates[[0, -1], 1], [low, high], atol=1e-9)
    assert np.all(np.diff(coordinates[:, 1]) > 0)
    with pytest.raises(ValueError, match="component"):
        traversal_latents(embedding, 0)


def test_middle_of_a_symmetric_traversal_is_the_latent_mean() -> None:
    half = np.random.default_rng(2).normal(0, 1, (20, 3))
    latents = np.concatenate([half, -half]) + np.array([1.0, -2.0, 0.5])  # symmetric about its mean
    embedding = embed(latents, n_clusters=2)
    for component in (1, 2, 3):
        points = traversal_latents(embedding, component, n_points=5)
        np.testing.assert_allclose(points[2], latents.mean(0), atol=1e-9)
        assert not np.allclose(points[0], latents.mean(0))


def test_one_dimensional_latent(tmp_path: Path) -> None:
    latents = np.random.default_rng(3).normal(0, 1, (50, 1)).astype(np.float32)
    embedding = embed(latents, n_clusters=3)
    assert embedding.pca.shape == (50, 1) and embedding.principal_axes.shape == (1, 1)
    np.testing.assert_allclose(embedding.pca[:, 0], latents[:, 0] - latents[:, 0].astype(np.float64).mean(),
                               atol=1e-6)
    assert embedding.explained_variance_ratio.tolist() == pytest.approx([1.0])
    save_embedding(embedding, [str(k) for k in range(50)], tmp_path)
    assert list(pd.read_csv(tmp_path / "latent_embedding.csv").columns) == ["particle", "z1", "pc1", "cluster"]
    assert all(p.stat().st_size > 1000 for p in plot_embedding(embedding, tmp_path))
    points = traversal_latents(embedding, 1, n_points=3, low_pct=0, high_pct=100)
    np.testing.assert_allclose(points[[0, -1], 0], [latents.min(), latents.max()], atol=1e-6)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        embed(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN"):
        embed(np.array([[0.0], [np.nan]]))


def test_umap_missing_or_present(tmp_path: Path) -> None:
    latents = _three_blobs()
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install umap-learn"):
            embed(latents, umap=True)
        pytest.skip("umap-learn is not installed (optional dependency)")
    embedding = embed(latents, n_clusters=3, umap=True)
    assert embedding.umap is not None and embedding.umap.shape == (90, 2)
    np.testing.assert_array_equal(embedding.umap, embed(latents, n_clusters=3, umap=True).umap)
    names = [str(k) for k in range(90)]
    assert (tmp_path / "umap.npy") in save_embedding(embedding, names, tmp_path)
    assert list(pd.read_csv(tmp_path / "latent_embedding.csv").columns)[-2:] == ["umap1", "umap2"]
    assert (tmp_path / "umap_clusters.png") in plot_embedding(embedding, tmp_path)
