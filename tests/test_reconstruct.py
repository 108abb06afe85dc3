"""`cryoflex reconstruct`: half split, groups, bad input, outputs, the model-bias table and the two-state check."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoflex.analysis import report
from cryoflex.analysis.export import write_subset
from cryoflex.analysis.reconstruct import (
    CONSENSUS,
    ModelBias,
    check_groups,
    cluster_groups,
    group_passes,
    half_split,
    model_bias,
    model_bias_summary,
    particle_latents,
    pc_bin_groups,
    reconstruct_groups,
    stored_half_split,
    subset_group,
)
from cryoflex.cli import main as cli_main
from cryoflex.data.dataset import ParticleDataset
from cryoflex.errors import CryoflexInputError
from cryoflex.imaging.volume import gaussian_volume
from cryoflex.io.metadata import read_metadata
from cryoflex.io.structure import read_structure

N_IMAGES = 120
BOX_PX = 32
PIXEL_A = 4.0


@pytest.fixture(scope="module")
def dataset_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 images, 32 px at 4 A/px, of 10 AdK trajectory frames (enough particles for halves of small groups)."""
    from cryoflex.io.trajectory import read_trajectory
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    out = tmp_path_factory.mktemp("reconstruct_data")
    config = SimulationConfig(n_images=N_IMAGES, box_size_px=BOX_PX, pixel_size_A=PIXEL_A, sigma_A=4.0, snr=1.0,
                              seed=3)  # fmt: skip
    simulate_dataset(ensemble, config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained_run(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run of tiny networks (seconds): enough to decode structures for the model-bias check."""
    out = tmp_path_factory.mktemp("reconstruct_run")
    config = out / "config.yaml"
    config.write_text("encoder_hidden: [16]\ndecoder_hidden: [16]\nsigma_A: 4.0\n")
    run = out / "run"
    args = ["train", "--particles", str(dataset_dir / "particles.star"), "--structure",
            str(dataset_dir / "nominal.pdb"), "--out", str(run), "--config", str(config), "--epochs", "1",
            "--segments", "2", "--latent-dim", "2", "--batch-size", "40", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    return run


@pytest.fixture(scope="module")
def fake_analysis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An analysis folder as `cryoflex analyze` lays it out: two k-means clusters and a PCA, one row per particle."""
    out = tmp_path_factory.mktemp("fake_analysis")
    (out / "latent").mkdir()
    labels = (np.arange(N_IMAGES) % 3 == 0).astype(np.int64)  # cluster 1 (label 0): 80 particles, cluster 2: 40
    np.save(out / "latent" / "kmeans_labels.npy", labels)
    np.save(out / "latent" / "pca.npy", np.random.default_rng(0).normal(size=(N_IMAGES, 2)))
    return out


def _reconstruct(run: Path, out: Path, *options: str) -> int:
    return cli_main(["reconstruct", str(run), "--out", str(out), "--device", "cpu", "--no-progress",
                     "--max-structures", "20", *options])  # fmt: skip


# ------------------------------------------------------------ half split and groups


def test_half_split_is_fixed_per_seed_and_stored(tmp_path: Path) -> None:
    first = half_split(101, seed=4)
    assert first.dtype == bool and first.sum() == 51
    np.testing.assert_array_equal(first, half_split(101, seed=4))
    assert not np.array_equal(first, half_split(101, seed=5))

    path = tmp_path / "reconstruct" / "half_split.npy"
    stored = stored_half_split(path, 101, seed=4)
    np.testing.assert_array_equal(np.load(path), stored)
    np.testing.assert_array_equal(stored_half_split(path, 101, seed=9), stored)  # reused, whatever the seed
    assert stored_half_split(path, 50, seed=4).shape == (50,)  # another particle count: a new split
    np.testing.assert_array_equal(np.load(path), half_split(50, seed=4))


def test_half_maps_follow_the_refinements_half_sets(data_dir: Path, tmp_path: Path) -> None:
    """cryoSPARC's alignments3D/split (1,010 and 1,009 particles of the data pack's file) become the halves, stored for
    later runs; a file whose particles all lie in one half gets seeded random halves instead."""
    from cryoflex.analysis.reconstruct import reconstruction_halves

    metadata = read_metadata(data_dir / "cryosparc_P12_J24_001_particles.cs")
    split = np.load(data_dir / "cryosparc_P12_J24_001_particles.cs")["alignments3D/split"]
    np.testing.assert_array_equal(metadata.half_sets, split + 1)
    path = tmp_path / "half_split.npy"
    in_half_a = reconstruction_halves(metadata, path, seed=0)
    np.testing.assert_array_equal(in_half_a, split == 0)
    assert in_half_a.sum() == 1010 and (~in_half_a).sum() == 1009
    np.testing.assert_array_equal(np.load(path), in_half_a)
    one_half = replace(metadata, half_sets=np.ones(metadata.n_particles, np.int64))
    np.testing.assert_array_equal(reconstruction_halves(one_half, tmp_path / "other.npy", seed=3),
                                  half_split(metadata.n_particles, seed=3))  # fmt: skip


def test_groups_from_clusters_pc_bins_and_subset(dataset_dir: Path, tmp_path: Path) -> None:
    groups = cluster_groups(np.array([1, 0, 0, 2, 1]))
    assert list(groups) == ["cluster_01", "cluster_02", "cluster_03"]  # numbered from 1, as analyze does
    np.testing.assert_array_equal(groups["cluster_01"], [1, 2])
    np.testing.assert_array_equal(groups["cluster_03"], [3])

    pca = np.array([[5.0, 0], [1.0, 0], [3.0, 0], [2.0, 0], [4.0, 0], [0.0, 0]])
    bins = pc_bin_groups(pca, 1, 3)
    assert list(bins) == ["pc1_bin01", "pc1_bin02", "pc1_bin03"]
    np.testing.assert_array_equal(bins["pc1_bin01"], [1, 5])  # the two lowest PC1 values
    np.testing.assert_array_equal(bins["pc1_bin03"], [0, 4])
    for n_bins in (1, 0):  # one bin is the consensus: nothing to compare it with
        with pytest.raises(CryoflexInputError, match="give --bins 2 or more"):
            pc_bin_groups(pca, 1, n_bins)
    with pytest.raises(CryoflexInputError, match="no PC3"):
        pc_bin_groups(pca, 3, 2)

    metadata = read_metadata(dataset_dir / "particles.star")
    chosen = np.array([3, 17, 64, 99])
    star = write_subset(metadata, chosen[::-1], tmp_path / "mine")[0]
    np.testing.assert_array_equal(subset_group(star, metadata, PIXEL_A), chosen)
    refined = replace(metadata.ctf, defocus_u_A=metadata.ctf.defocus_u_A + 300.0)  # CTF refinement: the same particles
    star = write_subset(replace(metadata, ctf=refined), chosen, tmp_path / "refined")[0]
    np.testing.assert_array_equal(subset_group(star, metadata, PIXEL_A), chosen)
    other = replace(metadata.ctf, defocus_u_A=metadata.ctf.defocus_u_A[::-1] + 5000.0)  # another simulation's rows
    star = write_subset(replace(metadata, ctf=other), chosen, tmp_path / "other")[0]
    with pytest.raises(CryoflexInputError, match="lists another dataset's particles"):
        subset_group(star, metadata, PIXEL_A)


def test_star_subsets_of_cryosparc_and_symmetry_expanded_runs_find_their_particles(
    data_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    """Names differ there (uids; rows numbered within each file), so the particles are matched by image, and among
    the copies of an expanded image by pose."""
    cs = read_metadata(data_dir / "cryosparc_P12_J24_001_particles.cs")
    chosen = np.array([5, 700, 2018])
    star, cs_subset = write_subset(cs, chosen, tmp_path / "from_cs")
    for path in (star, cs_subset):
        np.testing.assert_array_equal(subset_group(path, cs, float(cs.pixel_size_A[0])), chosen)

    table = starfile.read(dataset_dir / "particles.star", always_dict=True)
    particles = table["particles"]
    turned = particles.assign(rlnAngleRot=particles["rlnAngleRot"] + 120.0)
    table["particles"] = pd.concat([particles, turned], ignore_index=True)  # each image twice, two poses
    expanded_path = tmp_path / "expanded.star"
    starfile.write(table, expanded_path)
    expanded = read_metadata(expanded_path, duplicate_images="distinct")
    chosen = np.array([2, 120 + 2, 150])
    subset = write_subset(expanded, chosen, tmp_path / "expanded_subset")[0]
    np.testing.assert_array_equal(subset_group(subset, expanded, PIXEL_A), chosen)


def test_memory_budget_splits_the_groups_into_passes_with_the_same_maps(dataset_dir: Path) -> None:
    assert group_passes(["a", "b", "c"], 32, 2, 10 << 30) == [["a", "b", "c"]]
    assert group_passes(["a", "b", "c"], 32, 2, 1) == [["a"], ["b"], ["c"]]
    dataset = ParticleDataset(read_metadata(dataset_dir / "particles.star"))
    groups = {CONSENSUS: np.arange(N_IMAGES), "odd": np.arange(1, N_IMAGES, 2)}
    in_half_a = half_split(N_IMAGES, 0)
    one_pass = reconstruct_groups(dataset, groups, in_half_a, batch_size=50)
    two_passes = reconstruct_groups(dataset, groups, in_half_a, batch_size=50, memory_budget_bytes=1)
    for name in groups:
        torch.testing.assert_close(one_pass[name].half_a, two_passes[name].half_a)
        torch.testing.assert_close(one_pass[name].full, two_passes[name].full)
        assert one_pass[name].fsc.shape == (BOX_PX // 2 + 1,)


# ------------------------------------------------------------ bad input


def test_groups_too_small_for_two_half_maps(caplog: pytest.LogCaptureFixture) -> None:
    """A required group (consensus, a subset file) too small is an error; a small cluster or bin is skipped."""
    in_half_a = half_split(100, 0)
    empty = np.array([], dtype=np.int64)
    with pytest.raises(CryoflexInputError, match="group b holds no particles"):
        check_groups({"a": np.arange(100), "b": empty}, in_half_a, Path("p.star"), required={"a", "b"})
    with pytest.raises(CryoflexInputError, match="a half-map needs at least 10") as error:
        check_groups({"few": np.arange(12)}, in_half_a, Path("p.star"), required={"few"})
    assert "a larger subset" in str(error.value)
    with caplog.at_level(logging.WARNING):
        usable = check_groups({"a": np.arange(100), "few": np.arange(12), "none": empty}, in_half_a, Path("p.star"),
                              required={"a"})  # fmt: skip
    assert list(usable) == ["a"]
    assert "2 of 2 groups have fewer than 10 particles in a half and are skipped: few (" in caplog.text
    assert "none (0 + 0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # many small bins: the warning names five, then counts the rest
        check_groups({f"bin{k:03d}": np.array([k]) for k in range(100)}, in_half_a, Path("p.star"), required=set())
    assert "bin004 (" in caplog.text and "bin005 (" not in caplog.text and "and 95 more" in caplog.text


def test_bad_input_is_refused_with_file_and_fix(
    trained_run: Path, dataset_dir: Path, fake_analysis: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _reconstruct(trained_run, out, "--clusters") == 2
    message = capsys.readouterr().err
    assert "kmeans_labels.npy" in message and "cryoflex analyze RUN" in message

    assert _reconstruct(trained_run, out, "--box-size-px", "64") == 2
    assert "--box-size-px" in capsys.readouterr().err
    assert _reconstruct(trained_run, out, "--padding", "0") == 2
    assert "give --padding 1 or more" in capsys.readouterr().err
    assert _reconstruct(trained_run, out, "--all", "--padding", "100") == 2  # 183 GB a map: refused, not attempted
    assert "--padding 100 at 32 px needs" in capsys.readouterr().err
    for memory in ("0", "-1", "nan", "inf"):
        assert _reconstruct(trained_run, out, "--all", "--memory-gb", memory) == 2
        assert "give a positive size" in capsys.readouterr().err

    assert _reconstruct(trained_run, out, "--bins", "3") == 2  # not silently ignored
    assert "--bins without --pc" in capsys.readouterr().err
    assert _reconstruct(trained_run, out, "--analysis", str(fake_analysis), "--pc", "1", "--bins", "10") == 2
    assert "none of the 10 groups asked for has 10 particles in each half" in capsys.readouterr().err

    metadata = read_metadata(dataset_dir / "particles.star")
    few = write_subset(metadata, np.arange(12), tmp_path / "few")[0]  # a subset file asked for is required
    assert _reconstruct(trained_run, out, "--subset", str(few)) == 2
    assert "a half-map needs at least 10" in capsys.readouterr().err
    star = write_subset(metadata, np.arange(30), tmp_path / "subset")[0]
    unknown = tmp_path / "unknown.star"
    unknown.write_text(star.read_text().replace("000001@", "000999@"))
    assert _reconstruct(trained_run, out, "--subset", str(unknown)) == 2
    message = capsys.readouterr().err
    assert "unknown.star" in message and "1 of its 30 particles are not in the run" in message

    other_pixel = tmp_path / "other_pixel.star"
    other_pixel.write_text(star.read_text().replace("4.000000\t300", "3.000000\t300"))
    assert _reconstruct(trained_run, out, "--subset", str(other_pixel)) == 2
    assert "pixel size 3 A does not match the run's 4 A" in capsys.readouterr().err
    assert not any(out.glob("*.mrc"))


def test_model_bias_decodes_the_analysis_latents_else_the_encoders_means(trained_run: Path, tmp_path: Path) -> None:
    from cryoflex.analysis.predict import latent_means
    from cryoflex.analysis.run import load_run

    run = load_run(trained_run, device="cpu")
    analysis = tmp_path / "analysis"
    (analysis / "latent").mkdir(parents=True)
    np.testing.assert_array_equal(particle_latents(run, analysis, 64), latent_means(run.model, run.dataset))
    posterior = np.random.default_rng(1).normal(size=(N_IMAGES, 2))
    np.save(analysis / "latent" / "latents.npy", posterior)
    np.testing.assert_array_equal(particle_latents(run, analysis, 64), posterior.astype(np.float32))
    np.save(analysis / "latent" / "latents.npy", np.zeros((N_IMAGES, 3)))
    with pytest.raises(CryoflexInputError, match=r"latents of shape \(120, 3\), not \(120, 2\)"):
        particle_latents(run, analysis, 64)


def test_an_analysis_of_another_model_is_refused(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cryoflex.analysis.latent import write_source
    from cryoflex.analysis.run import load_run, model_fingerprint

    run = load_run(trained_run, device="cpu")
    analysis = tmp_path / "analysis"
    (analysis / "latent").mkdir(parents=True)
    np.save(analysis / "latent" / "latents.npy", np.zeros((N_IMAGES, 2), np.float32))
    with caplog.at_level("WARNING"):
        particle_latents(run, analysis, 64)  # no source.json: an older analysis, used with a warning
        particle_latents(run, analysis, 64)  # reconstruct reads several of its files: one warning
    assert caplog.text.count("cannot check that its latents came from the model loaded here") == 1

    write_source(analysis / "latent", run.epoch, run.fingerprint)
    assert particle_latents(run, analysis, 64).shape == (N_IMAGES, 2)
    assert load_run(trained_run, device="cpu").fingerprint == run.fingerprint  # the same checkpoint, reloaded

    changed = copy.deepcopy(run.model)
    with torch.no_grad():
        changed.log_image_scale += 1e-6
    assert model_fingerprint(changed) != run.fingerprint
    write_source(analysis / "latent", 7, model_fingerprint(changed))
    with pytest.raises(CryoflexInputError, match="made with the model after epoch 7") as refused:
        particle_latents(run, analysis, 64)
    assert "--epoch 7" in str(refused.value) and "source.json" in str(refused.value)


# ------------------------------------------------------------ outputs


def test_outputs_exist_parse_and_overlay_the_structures(trained_run: Path, fake_analysis: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    assert _reconstruct(trained_run, out, "--analysis", str(fake_analysis)) == 0
    names = [CONSENSUS, "cluster_01", "cluster_02"]
    for name in names:
        for suffix in ("", "_filtered", "_half_a", "_half_b", "_structures"):
            with mrcfile.open(out / f"{name}{suffix}.mrc", permissive=True) as volume:
                assert volume.data.shape == (BOX_PX,) * 3
                assert float(volume.voxel_size.x) == pytest.approx(PIXEL_A)
                origin = volume.header.origin
                assert (float(origin.x), float(origin.y), float(origin.z)) == (-64.0, -64.0, -64.0)
        assert read_structure(out / f"{name}.pdb").n_residues == 214
    split = np.load(trained_run / "reconstruct" / "half_split.npy")
    np.testing.assert_array_equal(split, half_split(N_IMAGES, 0))

    table = pd.read_csv(out / "fsc.csv")
    assert len(table) == 3 * (BOX_PX // 2 + 1) and list(table["group"].unique()) == names
    document = json.loads((out / "fsc.json").read_text())
    assert document["voxel_size_A"] == PIXEL_A and [g["group"] for g in document["groups"]] == names
    consensus = document["groups"][0]
    assert consensus["particles"] == N_IMAGES and consensus["half_a"] + consensus["half_b"] == N_IMAGES
    assert len(consensus["fsc"]) == BOX_PX // 2 + 1 and {"resolution_0.5_A", "resolution_0.143_A"} <= set(consensus)

    bias = pd.read_csv(out / "model_bias.csv", index_col="map")
    assert list(bias.index) == names and list(bias.columns) == names
    assert np.isfinite(bias.to_numpy()).all()
    bias_json = json.loads((out / "model_bias.json").read_text())
    assert np.asarray(bias_json["mean_fsc"]).shape == (3, 3) and "summary" in bias_json
    assert (out / "fsc.png").stat().st_size > 0 and (out / "model_bias.png").stat().st_size > 0
    script = (out / "reconstruct.cxc").read_text()
    assert "open cluster_02_filtered.mrc" in script and "open cluster_02.pdb" in script
    page = (out / "report.html").read_text()
    assert "Density from the particles" in page and "Model-bias check" in page


def test_another_box_from_the_stacks_and_consensus_only_without_analysis(trained_run: Path, tmp_path: Path) -> None:
    """--box-size-px reads the original stacks at a smaller box (voxel 8 A here); with no analysis the default is
    the consensus alone."""
    out = tmp_path / "small_box"
    assert _reconstruct(trained_run, out, "--box-size-px", "16") == 0
    assert sorted(p.name for p in out.glob("*.mrc")) == sorted(
        f"consensus{suffix}.mrc" for suffix in ("", "_filtered", "_half_a", "_half_b", "_structures")
    )
    for path in out.glob("*.mrc"):
        with mrcfile.open(path, permissive=True) as volume:
            assert volume.data.shape == (16, 16, 16) and float(volume.voxel_size.x) == pytest.approx(8.0)
            assert float(volume.header.origin.x) == pytest.approx(-64.0)
    assert json.loads((out / "fsc.json").read_text())["voxel_size_A"] == pytest.approx(8.0)


def test_report_section_shows_fsc_and_model_bias(tmp_path: Path) -> None:
    assert report.reconstruction_content(tmp_path / "nothing") == ([], {})
    from cryoflex.analysis import reconstruct as module
    from cryoflex.analysis.reconstruct import GroupMaps, ModelBias

    frequency = np.arange(5) / 32.0
    volume = torch.zeros(8, 8, 8)
    group = GroupMaps("consensus", np.arange(20), volume, volume, volume, volume, frequency,
                      np.array([1.0, 0.9, 0.4, 0.1, 0.0]), 12.0)  # fmt: skip
    module.write_fsc({"consensus": group}, np.arange(20) % 2 == 0, 4.0, tmp_path)
    module.write_model_bias(ModelBias(["consensus"], np.array([[0.7]]), np.array([[20.0]]), 12.0), tmp_path)
    sections, tables = report.reconstruction_content(tmp_path)
    assert [title for title, _ in sections[0].figures][0].startswith("Gold-standard FSC")
    rows = next(iter(tables.values()))
    assert rows[0]["group"] == "consensus" and rows[0]["resolution_0.143_A"] == pytest.approx(12.0)
    page = report.write_report(tmp_path / "report.html", title="t", sections=sections, config={}, tables=tables)
    assert page.read_text().count("data:image/png;base64,") == 2


def test_report_leaves_out_reconstructions_of_another_model_clustering_or_call(tmp_path: Path) -> None:
    """A later `reconstruct` without --deformed, `analyze --epoch` of another state or another k-means clustering:
    the report does not show maps that are not of what it describes."""
    from cryoflex.analysis import reconstruct as module
    from cryoflex.analysis.reconstruct import GroupMaps

    volume = torch.zeros(8, 8, 8)
    group = GroupMaps("consensus", np.arange(20), volume, volume, volume, volume, np.arange(5) / 32.0,
                      np.array([1.0, 0.9, 0.4, 0.1, 0.0]), 12.0)  # fmt: skip
    (tmp_path / report.RECONSTRUCT_DEFORMED_JSON).write_text(
        json.dumps({"global": {"plain_resolution_A": 9.0, "deformed_resolution_A": 8.0}})
    )
    for deformed in (True, False):
        provenance = {"epoch": 3, "model_fingerprint": "abc", "deformed": deformed, "clusters_fingerprint": "k6"}
        module.write_fsc({"consensus": group}, np.arange(20) % 2 == 0, 4.0, tmp_path, provenance)
        _, tables = report.reconstruction_content(tmp_path, "abc", "k6")
        assert any(title.startswith("Deformed backprojection") for title in tables) == deformed
    _, tables = report.reconstruction_content(tmp_path, "another state", "k6")
    assert "model after epoch 3" in tables["Density from the particles"][0]["note"]
    _, tables = report.reconstruction_content(tmp_path, "abc", "k8")
    assert "other k-means clusters" in tables["Density from the particles"][0]["note"]


# ------------------------------------------------------------ the two-state check


def test_two_states_each_map_agrees_best_with_its_own_state(data_dir: Path, tmp_path: Path) -> None:
    """Particles of two AdK conformations, grouped by their true state: each group's map correlates best with its
    own state's Gaussian map, and the model-bias table says so."""
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    closed, opened = read_structure(data_dir / "adk_closed.pdb"), read_structure(data_dir / "adk_open.pdb")
    ensemble = closed.with_coords(np.stack([closed.coords_A[0], opened.coords_A[0]]))
    config = SimulationConfig(n_images=400, box_size_px=BOX_PX, pixel_size_A=PIXEL_A, sigma_A=4.0, snr=1.0,
                              seed=7)  # fmt: skip
    simulate_dataset(ensemble, config, tmp_path, progress=False)
    truth = np.load(tmp_path / "truth.npz")
    state = truth["conformation_index"]
    groups = {"closed": np.flatnonzero(state == 0), "open": np.flatnonzero(state == 1)}
    dataset = ParticleDataset(read_metadata(tmp_path / "particles.star"))
    maps = reconstruct_groups(dataset, groups, half_split(len(dataset), 0), batch_size=100)
    structure_maps = {
        name: torch.from_numpy(gaussian_volume(truth["conformations_A"][k].astype(np.float64), truth["amplitudes_e"],
                                               BOX_PX, PIXEL_A, 4.0)).float()
        for k, name in enumerate(groups)
    }  # fmt: skip
    bias = model_bias(maps, structure_maps, PIXEL_A)
    assert bias.own_best == ["closed", "open"], bias.mean_fsc
    assert bias.mean_fsc[0, 0] - bias.mean_fsc[0, 1] > 0.2 and bias.mean_fsc[1, 1] - bias.mean_fsc[1, 0] > 0.2
    assert (
        bias.resolution_05_A[0, 0] < bias.resolution_05_A[0, 1]
        and bias.resolution_05_A[1, 1] < bias.resolution_05_A[1, 0]
    )
    assert all(group.resolution_A < 20.0 for group in maps.values())  # 4 A/px, 4 A Gaussians: about 10-13 A


def test_deformed_consensus_is_written_and_compared(trained_run: Path, tmp_path: Path) -> None:
    """--deformed adds the motion-corrected consensus (analysis/deformed.py) and its comparison with the plain one."""
    pytest.importorskip("cryoflex.analysis.deformed")
    out = tmp_path / "deformed"
    assert _reconstruct(trained_run, out, "--all", "--deformed") == 0
    for suffix in ("", "_filtered", "_half_a", "_half_b"):
        with mrcfile.open(out / f"consensus_deformed{suffix}.mrc", permissive=True) as volume:
            assert volume.data.shape == (BOX_PX,) * 3 and float(volume.voxel_size.x) == pytest.approx(PIXEL_A)
    comparison = json.loads((out / "deformed.json").read_text())
    assert {"plain_resolution_A", "deformed_resolution_A"} <= set(comparison["global"])
    assert "Deformed backprojection" in (out / "report.html").read_text()


def test_analyze_report_shows_the_reconstruction(trained_run: Path, tmp_path: Path) -> None:
    """Once RUN/reconstruct holds results, `cryoflex analyze` puts the FSC, resolutions and model bias in its report."""
    run_out = trained_run / "reconstruct"
    assert cli_main(["reconstruct", str(trained_run), "--all", "--device", "cpu", "--no-progress",
                     "--max-structures", "10"]) == 0  # fmt: skip
    assert (run_out / "consensus.mrc").is_file() and (run_out / "fsc.json").is_file()
    analysis = tmp_path / "analysis"
    assert cli_main(["analyze", str(trained_run), "--out", str(analysis), "--clusters", "2", "--points", "2",
                     "--device", "cpu"]) == 0  # fmt: skip
    page = (analysis / "report.html").read_text()
    assert "Density from the particles" in page and "Model-bias check" in page and "resolution_0.143_A" in page


def test_the_model_bias_verdict_judges_the_groups_not_the_consensus() -> None:
    """The consensus map is every particle's: whether it agrees best with its own structures says nothing about the
    motion, so the verdict names only the groups."""
    fsc = np.array([[0.9, 0.95, 0.8], [0.7, 0.9, 0.6], [0.6, 0.7, 0.9]])  # consensus row: best against cluster_01
    bias = ModelBias([CONSENSUS, "cluster_01", "cluster_02"], fsc, np.zeros((3, 3)), 5.0)
    assert model_bias_summary(bias).startswith("supported by the data: every group's map agrees best with its own")
    fsc[1] = [0.7, 0.6, 0.9]  # cluster_01's map agrees better with cluster_02's structures
    assert model_bias_summary(bias) == (
        "supported by the data for cluster_02; not for cluster_01 (their maps agree better with another group's "
        "structures)"
    )
