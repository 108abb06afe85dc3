"""Exports: per-particle structures (streamed, atomic, bounded memory), multi-model mmCIF, particle subsets."""

from __future__ import annotations

import dataclasses
import logging
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cryoflex.analysis.export as export
from cryoflex.analysis.export import (
    expected_rmsds_A,
    export_per_particle,
    export_structures_cif,
    select_by_clusters,
    select_by_names,
    select_by_region,
    write_subset,
    write_uncertainty_table,
)
from cryoflex.analysis.predict import LatentPosterior, PosteriorChunk, posterior_structures
from cryoflex.config import load_config
from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import CTFParameters, read_metadata
from cryoflex.io.structure import Structure, read_structure
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.train.setup import build_model

CS_FILE = "cryosparc_P12_J24_001_particles.cs"


@pytest.fixture(scope="module")
def nominal(data_dir: Path) -> Structure:
    return read_structure(data_dir / "adk_open.pdb")  # 214 residues


@pytest.fixture(scope="module")
def model(data_dir: Path, nominal: Structure) -> CryoSphere:
    """A tiny untrained model whose decoder output is randomised, so that each latent gives its own structure."""
    torch.manual_seed(0)
    config = load_config(
        None,
        dict(
            particles="unused.star",
            structure=str(data_dir / "adk_open.pdb"),
            segments=2,
            latent_dim=2,
            encoder_hidden=[8],
            decoder_hidden=[8],
        ),
    )
    built = build_model(config, nominal, 32, 4.0)
    torch.nn.init.normal_(built.decoder.net[-1].weight, std=0.3)
    return built.eval()


def _decode(model: CryoSphere, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        coords_A, _ = model.decode(torch.as_tensor(latents, dtype=torch.float32), sample_segmentation=False)
    return coords_A.numpy()


def _latents(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)


def _at_means(latents: np.ndarray) -> LatentPosterior:
    """A posterior of zero width: every sample is the mean."""
    return LatentPosterior(latents, np.zeros_like(latents))


def _posterior(n: int, seed: int = 1) -> LatentPosterior:
    rng = np.random.default_rng(seed)
    return LatentPosterior(_latents(n, seed), rng.uniform(0.05, 0.5, size=(n, 2)).astype(np.float32))


# ------------------------------------------------------------ per-particle structures


def test_per_particle_export_matches_decoding_each_particle(model: CryoSphere, tmp_path: Path) -> None:
    latents = _latents(300)
    path = tmp_path / export.PER_PARTICLE_NAME
    export_per_particle(model, _at_means(latents), path, samples=0, chunk_size=128)
    coords = np.load(path)
    assert coords.dtype == np.float32 and coords.shape == (300, 214, 3)
    np.testing.assert_allclose(coords, _decode(model, latents), rtol=0, atol=1e-4)
    assert np.ptp(coords[:, 0, 0]) > 0.5  # particles really differ: a shuffled order would not match
    assert [p.name for p in tmp_path.iterdir()] == [export.PER_PARTICLE_NAME]  # no temporary file left


def test_interrupted_per_particle_export_leaves_no_file(
    model: CryoSphere, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies_after_one_chunk(
        model: CryoSphere, posterior: LatentPosterior, *, samples: int, seed: int, batch_size: int
    ) -> Iterator[PosteriorChunk]:
        yield PosteriorChunk(
            np.zeros((batch_size, 214, 3), np.float32), np.zeros((batch_size, 214), np.float32),
            np.zeros(batch_size, np.float32),
        )  # fmt: skip
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "posterior_structures", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        export_per_particle(model, _posterior(50), tmp_path / "new.npy", spread_path=tmp_path / "s.npy", chunk_size=16)
    assert list(tmp_path.iterdir()) == []
    previous = tmp_path / "old.npy"
    np.save(previous, np.ones((2, 214, 3), np.float32))
    with pytest.raises(KeyboardInterrupt):
        export_per_particle(model, _posterior(50), previous, chunk_size=16)
    assert np.load(previous).shape == (2, 214, 3)  # the good file from before is untouched


def _rss_anon_bytes() -> int:
    """Anonymous resident memory (heap, torch and numpy buffers; not the file pages of a memory map)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status")


class _PeakSampler(threading.Thread):
    """Samples RssAnon every 5 ms: catches memory torch allocates, which tracemalloc does not see."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_anon_bytes()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.005):
            self.peak = max(self.peak, _rss_anon_bytes())


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for RssAnon")
def test_per_particle_export_of_100000_particles_stays_small(model: CryoSphere, tmp_path: Path) -> None:
    latents = _latents(100_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny decode is fastest on one thread; keeps the time independent of load
    baseline = _rss_anon_bytes()
    sampler = _PeakSampler()
    sampler.start()
    tracemalloc.start()
    try:
        path = tmp_path / "coords.npy"
        export_per_particle(model, _at_means(latents), path, samples=0, chunk_size=1024)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sampler.stopped.set()
        sampler.join()
        torch.set_num_threads(threads)
    output_bytes = 100_000 * 214 * 3 * 4  # 257 MB
    assert path.stat().st_size > output_bytes
    # Measured: streamed ~25-50 MB anonymous memory; np.concatenate of the chunks ~660 MB, torch.cat ~330 MB.
    assert numpy_peak < 20e6, numpy_peak / 1e6
    assert sampler.peak - baseline < 150e6, (sampler.peak - baseline) / 1e6
    coords = np.load(path, mmap_mode="r")
    rows = [0, 1023, 1024, 54_321, 99_999]  # chunk edges and the last, partial chunk
    np.testing.assert_allclose(coords[rows], _decode(model, latents[rows]), rtol=0, atol=1e-4)


def test_structures_cif_holds_the_chosen_particles_in_order(
    model: CryoSphere, nominal: Structure, tmp_path: Path
) -> None:
    latents = _latents(20)
    path = export_structures_cif(model, _at_means(latents), [7, 0, 19], nominal, tmp_path / "chosen.cif")
    written = read_structure(path)
    assert written.n_models == 3
    np.testing.assert_array_equal(written.residue_numbers, nominal.residue_numbers)
    np.testing.assert_allclose(written.coords_A, _decode(model, latents[[7, 0, 19]]), rtol=0, atol=2e-3)


def test_posterior_export_writes_structures_spreads_and_expected_rmsds(
    model: CryoSphere, nominal: Structure, tmp_path: Path
) -> None:
    posterior = _posterior(30)
    coords_path, spread_path = tmp_path / export.PER_PARTICLE_NAME, tmp_path / export.PER_PARTICLE_SPREAD_NAME
    expected = export_per_particle(
        model, posterior, coords_path, samples=4, seed=2, spread_path=spread_path, chunk_size=8
    )
    coords, spread = np.load(coords_path), np.load(spread_path)
    assert coords.dtype == spread.dtype == np.float32 and coords.shape == (30, 214, 3) and spread.shape == (30, 214)
    chunks = list(posterior_structures(model, posterior, samples=4, seed=2, batch_size=8))
    np.testing.assert_array_equal(coords, np.concatenate([c.coords_A for c in chunks]))
    np.testing.assert_array_equal(spread, np.concatenate([c.spread_A for c in chunks]))
    np.testing.assert_array_equal(expected, np.concatenate([c.expected_rmsd_A for c in chunks]))
    assert expected.dtype == np.float32 and expected.shape == (30,) and expected.min() > 0
    np.testing.assert_array_equal(expected_rmsds_A(model, posterior, samples=4, seed=2, chunk_size=8), expected)
    # a subset's mmCIF holds the same posterior means as its rows of the full export (draws keyed by particle)
    chosen = export_structures_cif(model, posterior, [21, 3], nominal, tmp_path / "c.cif", samples=4, seed=2)
    np.testing.assert_allclose(read_structure(chosen).coords_A, coords[[21, 3]], rtol=0, atol=2e-3)


def test_posterior_export_memory_does_not_grow_with_the_particles(model: CryoSphere, tmp_path: Path) -> None:
    """Samples are accumulated per chunk: the numpy peak is one chunk's, whether 1,000 or 8,000 particles."""
    peaks = []
    for n in (1000, 8000):
        tracemalloc.start()
        try:
            spread_path = tmp_path / f"s{n}.npy"
            export_per_particle(model, _posterior(n), tmp_path / f"c{n}.npy", samples=2, spread_path=spread_path,
                                chunk_size=500)  # fmt: skip
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0], [p / 1e6 for p in peaks]  # the output alone grows by 18 MB (8000 x 214 x 3 x 4)


def test_uncertainty_table_is_keyed_by_name_with_ranks(tmp_path: Path) -> None:
    expected = np.array([0.5, 0.1, 0.9, 0.1], np.float32)
    path = write_uncertainty_table(expected, ["p1", "p2", "p3", "p4"], tmp_path / export.UNCERTAINTY_CSV_NAME)
    table = pd.read_csv(path)
    assert list(table.columns) == ["particle", "expected_rmsd_A", "rank"]
    assert table["particle"].tolist() == ["p1", "p2", "p3", "p4"]
    np.testing.assert_array_equal(table["expected_rmsd_A"].to_numpy(np.float32), expected)  # round-trips float32
    assert table["rank"].tolist() == [3, 1, 4, 2]  # 1 = smallest expected RMSD; ties in particle order


# ------------------------------------------------------------ selections


def test_selections() -> None:
    labels = np.array([2, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(select_by_clusters(labels, [2, 1]), [0, 2, 3, 5])
    with pytest.raises(CryoflexInputError, match=r"cluster\(s\) \[5\]"):
        select_by_clusters(labels, [0, 5])
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 3.0], [-2.0, 0.5], [0.5, 2.0]])
    np.testing.assert_array_equal(select_by_region(xy, (0.0, 1.0), (0.0, 2.0)), [0, 1, 4])
    with pytest.raises(CryoflexInputError, match="x_range"):
        select_by_region(xy, (1.0, 0.0), (0.0, 2.0))
    names = np.array(["1@a.mrcs", "2@a.mrcs", "1@b.mrcs"])
    np.testing.assert_array_equal(select_by_names(names, ["1@b.mrcs", "1@a.mrcs"]), [2, 0])
    with pytest.raises(CryoflexInputError, match="not in the input"):
        select_by_names(names, ["3@a.mrcs"])


# ------------------------------------------------------------ subsets


def _assert_same_particles(written, original) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_allclose(written.rotations, original.rotations, atol=1e-5)
    np.testing.assert_allclose(written.shifts_A, original.shifts_A, atol=1e-4)
    np.testing.assert_array_equal(written.image_indices, original.image_indices)
    np.testing.assert_array_equal(written.image_paths, original.image_paths)
    np.testing.assert_allclose(written.pixel_size_A, original.pixel_size_A, rtol=1e-6)
    for name in (f.name for f in dataclasses.fields(CTFParameters)):
        np.testing.assert_allclose(getattr(written.ctf, name), getattr(original.ctf, name), rtol=1e-5, err_msg=name)


def test_star_subset_round_trips_with_every_column(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = read_metadata(data_dir / "relion31.star")
    order = [3, 0, 4]
    with caplog.at_level(logging.INFO, logger="cryoflex.analysis.export"):
        paths = write_subset(original, order, tmp_path / "cluster_1")
    assert paths == [tmp_path / "cluster_1.star"]
    assert "no .cs subset" in caplog.text
    written, expected = read_metadata(paths[0]), original.subset(order)
    np.testing.assert_array_equal(written.names, expected.names)
    _assert_same_particles(written, expected)
    for column in (
        "rlnCoordinateX",
        "rlnMicrographName",
        "rlnClassNumber",
        "rlnLogLikeliContribution",
        "rlnImageOriginalName",
        "rlnGroupNumber",
    ):
        assert written.particles_table[column].tolist() == expected.particles_table[column].tolist(), column


def test_cs_subset_keeps_the_original_rows(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / CS_FILE
    original = read_metadata(source)
    order = [1500, 3, 2018, 0]
    paths = write_subset(original, order, tmp_path / "region")
    assert paths == [tmp_path / "region.star", tmp_path / "region.cs"]
    raw = np.load(paths[1], allow_pickle=False)
    expected_rows = np.load(source)[order]
    assert raw.dtype == expected_rows.dtype
    assert raw.tobytes() == expected_rows.tobytes()  # every field, bit for bit
    from_cs, expected = read_metadata(paths[1]), original.subset(order)
    np.testing.assert_array_equal(from_cs.names, expected.names)
    _assert_same_particles(from_cs, expected)
    _assert_same_particles(read_metadata(paths[0]), expected)


def test_empty_or_bad_subsets_are_refused(data_dir: Path, tmp_path: Path) -> None:
    metadata = read_metadata(data_dir / "relion31.star")
    with pytest.raises(CryoflexInputError, match="no particles"):
        write_subset(metadata, np.array([], dtype=np.int64), tmp_path / "none")
    with pytest.raises(ValueError, match="distinct"):
        write_subset(metadata, [1, 1], tmp_path / "twice")
    with pytest.raises(ValueError, match=r"0\.\.4"):
        write_subset(metadata, [5], tmp_path / "outside")
    assert list(tmp_path.iterdir()) == []
