"""`cryoflex analyze` on a tiny trained run: every output exists and parses, numeric outputs are deterministic."""

from __future__ import annotations

import json
import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import yaml

from cryoflex.analysis import figures
from cryoflex.analysis.analyze import uncertainty_summary
from cryoflex.analysis.predict import (
    decode_latents,
    latent_means,
    particle_posteriors,
    posterior_latents,
)
from cryoflex.analysis.run import load_run
from cryoflex.cli import main as cli_main
from cryoflex.io.metadata import read_metadata


@pytest.fixture(scope="module")
def trained_run(tiny_adk_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analyze")
    star = tiny_adk_dataset / "particles.star"
    config = out / "config.yaml"
    config.write_text("encoder_hidden: [32]\ndecoder_hidden: [32]\nsigma_A: 4.0\nlearning_rate: 0.01\n")
    run = out / "run"
    args = ["train", "--particles", str(star), "--structure", str(tiny_adk_dataset / "nominal.pdb"), "--out", str(run),
            "--config", str(config), "--epochs", "2", "--segments", "3", "--latent-dim", "2", "--batch-size", "16",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    return run


def _analyze(run: Path, out: Path) -> None:
    args = ["analyze", str(run), "--out", str(out), "--clusters", "3", "--points", "5", "--volumes",
            "--per-particle", "--per-particle-cif", "0", "7", "--subset-clusters", "1", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0


def test_outputs_exist_parse_and_are_deterministic(trained_run: Path, tiny_adk_dataset: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _analyze(trained_run, first)
    _analyze(trained_run, second)

    numeric = sorted(p.relative_to(first) for p in first.rglob("*") if p.suffix in {".npy", ".csv", ".pdb", ".cif",
                                                                                   ".mrc", ".star", ".cxc"})
    assert len(numeric) > 20
    for relative in numeric:
        assert _content(first / relative) == _content(second / relative), relative

    coords = np.load(first / "per_particle_coords.npy")
    assert coords.dtype == np.float32 and coords.shape == (40, 214, 3)
    embedding = pd.read_csv(first / "latent" / "latent_embedding.csv")
    assert len(embedding) == 40 and {"particle", "z1", "z2", "pc1", "cluster"} <= set(embedding.columns)
    traversal = gemmi.read_structure(str(first / "traversals" / "traversal_pc1.pdb"))
    assert len(traversal) == 5 and traversal[0].count_atom_sites() == 214
    assert "coordset" in (first / "traversals" / "traversal_pc1.cxc").read_text()
    cif = gemmi.read_structure(str(first / "per_particle_subset.cif"))
    assert len(cif) == 2
    assert _first_x(cif[1]) == pytest.approx(float(coords[7, 0, 0]), abs=1e-3)
    with mrcfile.open(first / "traversals" / "volumes" / "cluster_01.mrc", permissive=True) as volume:
        assert volume.data.shape == (32, 32, 32) and float(volume.voxel_size.x) == pytest.approx(4.0)
    segments = pd.read_csv(first / "segments" / "segments.csv")
    assert segments["n_residues"].sum() == 214

    subset = read_metadata(first / "subsets" / "clusters_1.star")
    labels = np.load(first / "latent" / "kmeans_labels.npy")
    original = read_metadata(tiny_adk_dataset / "particles.star")
    np.testing.assert_array_equal(subset.names, original.names[labels == 0])
    np.testing.assert_allclose(subset.rotations, original.rotations[labels == 0], atol=1e-6)

    html = (first / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,', html)
    assert len(images) >= 6  # latent plots, segmentation, motions, training curves
    assert "Segments" in html and "learning_rate" in html


def _content(path: Path) -> bytes:
    """The file's bytes, without time stamps: the star writer's comment line, the MRC header's labels."""
    if path.suffix == ".mrc":
        with mrcfile.open(path, permissive=True) as volume:
            return volume.data.tobytes() + volume.header.origin.tobytes() + volume.voxel_size.tobytes()
    lines = path.read_bytes().splitlines(keepends=True)
    return b"".join(line for line in lines if not line.startswith(b"# Created by the starfile"))


def _first_x(model: gemmi.Model) -> float:
    return next(iter(next(iter(model))))[0].pos.x


@pytest.fixture(scope="module")
def small_analysis(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_analysis")
    args = ["analyze", str(trained_run), "--out", str(out), "--clusters", "3", "--points", "2",
            "--subset-clusters", "3", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    return out


def test_subset_clusters_are_numbered_from_one(
    trained_run: Path, small_analysis: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cluster 0 (or K + 1) is refused before any work, and the advice names valid 1-based numbers."""
    for wrong in ("0", "4"):
        out = tmp_path / f"wrong_{wrong}"
        args = ["analyze", str(trained_run), "--out", str(out), "--clusters", "3", "--subset-clusters", "2", wrong,
                "--device", "cpu"]  # fmt: skip
        assert cli_main(args) == 2
        message = capsys.readouterr().err
        assert f"no cluster {wrong}: the 3 clusters are numbered 1..3" in message
        assert "choose among 1..3" in message and "-1" not in message
        assert not out.exists()
    labels = np.load(small_analysis / "latent" / "kmeans_labels.npy")
    subset = read_metadata(small_analysis / "subsets" / "clusters_3.star")
    assert subset.n_particles == int(np.sum(labels == 2)) > 0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--points", "0"], "give --points 1 or more"),
        (["--pcs", "0"], "give --pcs 1 or more"),
        (["--voxel-size-A", "-2"], "give a positive --voxel-size-A"),
        (["--per-particle-cif", "5", "40"], "no particle 40: the run has 40 particles, at positions 0..39"),
        (["--per-particle-cif", "-1"], "no particle -1"),
        (["--per-particle-cif", "3", "3"], "particle 3 given twice"),
        (["--subset-region", "1", "0", "-1", "1"], "each minimum below its maximum"),
        (["--clusters", "41"], "give --clusters 40 or fewer"),
        (["--voxel-size-A", "0.01", "--volumes"], "give --voxel-size-A 0.25 or more"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    """Options that used to fail with a traceback after the particles were encoded: a clear error, nothing written."""
    out = tmp_path / "analysis"
    assert cli_main(["analyze", str(trained_run), "--out", str(out), "--device", "cpu", *flags]) == 2
    message = capsys.readouterr().err
    assert expected in message and flags[0] in message and "Traceback" not in message
    assert not out.exists()


def test_long_loops_show_progress_unless_asked_not_to(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Encoding and weighting every particle take most of an analysis: each reports its progress (one plain line at
    the end when stderr is not a terminal); --no-progress silences them. --pcs above the latent's size warns."""
    args = ["analyze", str(trained_run), "--clusters", "2", "--points", "2", "--posterior-samples", "4", "--pcs", "3",
            "--device", "cpu"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert cli_main([*args, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().err
    assert "encoding: 40/40 img" in printed
    assert "posterior weights (4 draws each): 40/40 img" in printed
    assert "posterior uncertainty: 40/40 particle" in printed
    assert "--pcs 3 is above the run's latent dimension (2): 2 principal components are traversed" in caplog.text
    assert cli_main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "40/40" not in capsys.readouterr().err


def test_a_second_analysis_into_one_folder_removes_what_the_first_made_and_it_did_not(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-particle files, subsets and traversals of the first analysis's options would otherwise look like the second
    one's outputs; a file the user put there stays, and so does one another program wrote there meanwhile."""
    from cryoflex.analysis import figures

    out = tmp_path / "analysis"
    base = ["analyze", str(trained_run), "--out", str(out), "--clusters", "2", "--points", "2",
            "--posterior-samples", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    particle_images_figure = figures.particle_images_figure

    def while_another_program_writes(run: object, path: Path) -> Path:
        (out / "other_program.log").write_text("written during the analysis, not by it")
        return particle_images_figure(run, path)  # type: ignore[arg-type]

    monkeypatch.setattr(figures, "particle_images_figure", while_another_program_writes)
    assert cli_main([*base, "--epoch", "1", "--per-particle", "--subset-clusters", "1"]) == 0
    monkeypatch.undo()
    first = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert Path("per_particle_coords.npy") in first and Path("subsets/clusters_1.star") in first
    (out / "notes.txt").write_text("mine")
    assert cli_main(base) == 0
    second = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert Path("per_particle_coords.npy") not in second and Path("subsets/clusters_1.star") not in second
    assert {Path("notes.txt"), Path("other_program.log"), Path("report.html"),
            Path("traversals/traversal_pc1.pdb")} <= second  # fmt: skip
    listed = set(map(Path, json.loads((out / "analysis_files.json").read_text())["files"]))
    assert listed == second - {Path("notes.txt"), Path("other_program.log"), Path("analysis_files.json")}


def test_a_region_holding_no_particle_is_refused_with_where_they_lie(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "analysis"
    region = ["--subset-region", "100", "200", "100", "200"]
    assert cli_main(["analyze", str(trained_run), "--out", str(out), "--clusters", "2", "--posterior-samples", "2",
                     *region, "--device", "cpu", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no particle lies in the region PC1 100 to 200, PC2 100 to 200: the particles span PC1 " in err
    assert not out.exists()  # refused before anything was written


def test_umap_without_umap_learn_is_refused_before_the_encoding(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else find_spec(name, *a))
    out = tmp_path / "analysis"
    assert cli_main(["analyze", str(trained_run), "--umap", "--out", str(out), "--device", "cpu"]) == 2
    assert "pip install umap-learn, or leave out --umap" in capsys.readouterr().err
    assert not out.exists()


class _Captions(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.captions: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.inside = tag == "figcaption"

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.captions.append(data)
            self.inside = False


def test_report_captions_say_what_each_figure_shows(small_analysis: Path) -> None:
    parser = _Captions()
    parser.feed((small_analysis / "report.html").read_text(encoding="utf-8"))
    captions = parser.captions
    assert len(captions) == len(set(captions)) >= 9  # particles, 3 latent, 2 segmentation, 2 traversals, motions, ...
    assert all(len(caption.split()) >= 8 for caption in captions), captions  # sentences, not bare file names
    assert sum(caption.startswith("PC1 traversal") for caption in captions) == 1
    assert sum(caption.startswith("PC2 traversal") for caption in captions) == 1
    assert any("1 - correlation" in caption for caption in captions)


def test_traversal_figures_carry_their_component_in_the_title(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    titles = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: titles.append(figure.get_suptitle()) or path)
    frames = np.random.default_rng(0).normal(size=(3, 5, 3)) * 10
    for component in (1, 2):
        figures.traversal_figure(frames, np.ones(5, dtype=int), np.array(["A"] * 5), component, tmp_path / "t.png")
    assert titles[0].startswith("PC1 traversal") and titles[1].startswith("PC2 traversal")


def test_per_particle_uncertainty_outputs(trained_run: Path, tiny_adk_dataset: Path, tmp_path: Path) -> None:
    """Posterior-mean structures, their per-residue spreads, the expected RMSDs in a CSV keyed by name, the report's
    figure and table; the report's noise spectrum."""
    out = tmp_path / "sampled"
    args = ["analyze", str(trained_run), "--out", str(out), "--clusters", "2", "--points", "2", "--per-particle",
            "--posterior-samples", "4", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    coords, spread = np.load(out / "per_particle_coords.npy"), np.load(out / "per_particle_spread_A.npy")
    assert coords.dtype == spread.dtype == np.float32 and coords.shape == (40, 214, 3) and spread.shape == (40, 214)
    assert spread.min() >= 0 and spread.max() > 0
    table = pd.read_csv(out / "per_particle_uncertainty.csv")
    assert list(table.columns) == ["particle", "expected_rmsd_A", "rank"]
    assert table["particle"].tolist() == read_metadata(tiny_adk_dataset / "particles.star").names.tolist()
    # the mean of the draws' RMSDs is at most their root mean square, the RMS over residues of the spread (Jensen),
    # to the float32 resolution of coordinates of tens of A (a particle whose weights sit on one draw has both at
    # rounding level: 1e-30 A against 0 in one run)
    rms_spread = np.sqrt(np.mean(spread.astype(np.float64) ** 2, axis=1))
    assert np.all(table["expected_rmsd_A"] <= rms_spread * (1 + 1e-5) + 1e-5)
    assert np.all(table["expected_rmsd_A"][rms_spread > 1e-3] > 0)
    assert sorted(table["rank"]) == list(range(1, 41))
    assert table.sort_values("rank")["expected_rmsd_A"].is_monotonic_increasing
    assert (out / "per_particle_uncertainty.png").is_file()
    html = (out / "report.html").read_text()
    assert "Per-particle uncertainty (expected RMSD under the posterior, A)" in html
    assert "median_A" in html and "p10_A" in html and "p90_A" in html
    assert "population_A" in html and "median_over_population" in html
    parser = _Captions()
    parser.feed(html)
    assert any(c.startswith("How sure the model is of each particle's structure") for c in parser.captions)
    # the noise spectrum the likelihood learned (noise_model shells, the default)
    assert (out / "noise_spectrum.png").is_file()
    assert any(c.startswith("The noise variance the likelihood learned in each Fourier shell") for c in parser.captions)

    at_mean = tmp_path / "at_mean"
    args = ["analyze", str(trained_run), "--out", str(at_mean), "--clusters", "2", "--points", "2", "--per-particle",
            "--posterior-samples", "0", "--device", "cpu"]  # fmt: skip
    assert cli_main(args) == 0
    run = load_run(trained_run, device="cpu")
    latents = np.load(at_mean / "latent" / "latents.npy")
    decoded = np.concatenate(list(decode_latents(run.model, latents)))
    np.testing.assert_array_equal(np.load(at_mean / "per_particle_coords.npy"), decoded)
    assert not (at_mean / "per_particle_spread_A.npy").exists()
    assert not (at_mean / "per_particle_uncertainty.csv").exists()
    assert np.abs(coords - decoded).max() > 1e-4  # the posterior mean is not the structure at the mean latent
    np.testing.assert_array_equal(latents, latent_means(run.model, run.dataset))  # without samples: the means
    # with samples, the embedding takes each particle's importance-weighted posterior mean of z
    weighted = particle_posteriors(run.model, run.dataset, weighted=True, samples=4, seed=0)
    expected = posterior_latents(weighted, 4, 0)
    np.testing.assert_allclose(np.load(out / "latent" / "latents.npy"), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - latents).max() > 1e-3


def test_posterior_draws_benchmark_scores_both_kinds_of_draws(
    trained_run: Path, tiny_adk_dataset: Path, tmp_path: Path
) -> None:
    """benchmarks/posterior_draws.py on a recovery-style folder (data/ and run/): one row per run, draws and kind."""
    import json
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(tiny_adk_dataset)
    (work / "run").symlink_to(trained_run)
    out = tmp_path / "draws.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "posterior_draws.py"
    subprocess.run([sys.executable, str(script), str(work), "--draws", "4", "--out", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(row["draws"], row["kind"]) for row in rows] == [(4, "independent"), (4, "quasi-random")]
    assert all(row["particles"] == 40 and 0 < row["median_rmsd_A"] < 20 for row in rows)


def test_a_checkpoint_given_as_the_run_or_a_particle_file_gone_is_a_clear_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--clusters", "2", "--device", "cpu"]
    assert cli_main(["analyze", str(trained_run / "checkpoints" / "last.pt"), *args]) == 2
    assert "give the run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("cache", "analysis"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "particles": str(tmp_path / "moved.star")}))
    assert cli_main(["analyze", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert "the particle file this run was trained on is not there" in err and "config.yaml" in err


def test_a_run_whose_stacks_moved_opens_with_datadir(
    trained_run: Path, tiny_adk_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The particle stacks moved after training: analyze (eval, reconstruct) take --datadir, as the error advises."""
    data = tmp_path / "data"
    shutil.copytree(tiny_adk_dataset, data)
    moved = tmp_path / "moved_stacks"
    (data / "stacks").rename(moved)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("cache", "analysis"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "particles": str(data / "particles.star")}))
    args = ["analyze", str(run), "--clusters", "2", "--points", "2", "--posterior-samples", "0", "--device", "cpu"]
    assert cli_main(args) == 2
    assert "pass --datadir DIR" in capsys.readouterr().err
    assert cli_main([*args, "--datadir", str(moved)]) == 0
    assert load_run(run, device="cpu", datadir=moved).config.datadir == str(moved)


def test_a_run_whose_stacks_are_gone_is_analysed_from_its_cache(
    tiny_adk_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scratch space cleared after training: the run's cache of the images (at the training box) is all analysis
    and a reconstruction at that box need, so it stands in for the stacks, with a warning; another box is refused."""
    data = tmp_path / "data"
    shutil.copytree(tiny_adk_dataset, data)
    run = tmp_path / "run"
    assert cli_main(["train", "--particles", str(data / "particles.star"), "--structure", str(data / "nominal.pdb"),
                     "--out", str(run), "--epochs", "1", "--segments", "3", "--latent-dim", "2", "--batch-size", "16",
                     "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    shutil.rmtree(data / "stacks")
    with caplog.at_level(logging.WARNING):
        assert cli_main(["analyze", str(run), "--clusters", "2", "--points", "2", "--posterior-samples", "2",
                         "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert "using the run's images cached at 32 px" in caplog.text
    assert len(pd.read_csv(run / "analysis" / "latent" / "latent_embedding.csv")) == 40
    assert cli_main(["reconstruct", str(run), "--all", "--device", "cpu", "--no-progress"]) == 0  # at the cached box
    assert (run / "reconstruct" / "consensus.mrc").is_file()
    capsys.readouterr()
    assert cli_main(["reconstruct", str(run), "--all", "--box-size-px", "16", "--device", "cpu"]) == 2
    assert "particle stack not found" in capsys.readouterr().err


def test_a_particle_file_changed_since_training_is_reported(
    trained_run: Path, tiny_adk_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints record the particles they were trained on; other rows at analysis give a warning."""
    from cryoflex.train.checkpoint import check_particles, find_checkpoint, load_checkpoint, particle_record

    star = tiny_adk_dataset / "particles.star"
    names = read_metadata(star).names
    state = load_checkpoint(find_checkpoint(trained_run))
    assert state["particles"] == particle_record(names) and state["particles"]["count"] == 40
    with caplog.at_level(logging.WARNING, logger="cryoflex.train.checkpoint"):
        check_particles(star, state, names, resuming=False)
        assert not caplog.records
        check_particles(star, state, names[:35], resuming=False)
    assert "has 35 particles, the run was trained on 40" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cryoflex.train.checkpoint"):
        check_particles(star, state, names[::-1], resuming=True)
    assert "(the same count, other names or order)" in caplog.text and "training goes on with" in caplog.text


def test_the_uncertainty_summary_warns_when_the_images_say_little(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cryoflex.analysis.analyze"):
        informative = uncertainty_summary(np.array([0.2, 0.24, 0.3]), 64, population_A=1.5)
        assert informative["population_A"] == 1.5 and informative["median_over_population"] == pytest.approx(0.16)
        [record] = caplog.records
        assert record.levelno == logging.INFO and "16% of the population's (1.50 A" in record.getMessage()
        caplog.clear()
        uninformative = uncertainty_summary(np.array([1.1, 1.3, 1.9]), 64, population_A=1.5)
    assert uninformative["median_over_population"] == pytest.approx(1.3 / 1.5)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "say little about their own conformations" in record.getMessage() and "87%" in record.getMessage()
