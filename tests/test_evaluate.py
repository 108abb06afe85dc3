"""`cryoflex eval`: a tiny trained run against its simulation's truth; baselines checked by independent numpy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform
from scipy.spatial.transform import Rotation
from scipy.stats import spearmanr

from cryoflex.analysis import DEFAULT_POSTERIOR_SAMPLES
from cryoflex.analysis.evaluate import (
    clash_count,
    evaluate,
    figure_captions,
    fsc_figure,
    parse_residue_group,
    read_truth,
    truth_rows,
)
from cryoflex.analysis.predict import decode_latents, particle_posteriors, posterior_structures
from cryoflex.analysis.run import TrainedRun, load_run
from cryoflex.cli import main as cli_main
from cryoflex.cli.eval import summary_lines
from cryoflex.config import load_config
from cryoflex.errors import CryoflexInputError
from cryoflex.train.loop import train


@pytest.fixture(scope="module")
def simulation(tiny_adk_dataset: Path) -> Path:
    """40 images, 32 px at 4 A/px, of 10 AdK trajectory frames (conftest)."""
    return tiny_adk_dataset


@pytest.fixture(scope="module")
def run_dir(simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one epoch with tiny networks."""
    config = load_config(None, dict(
        particles=str(simulation / "particles.star"), structure=str(simulation / "nominal.pdb"), segments=3,
        latent_dim=2, epochs=1, batch_size=16, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32],
        progress=False, device="cpu",
    ))  # fmt: skip
    out = tmp_path_factory.mktemp("run") / "run"
    train(config, out)
    return out


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> TrainedRun:
    return load_run(run_dir, device="cpu")


def _edited_truth(simulation: Path, path: Path, **changes: np.ndarray) -> Path:
    with np.load(simulation / "truth.npz") as npz:
        fields = {name: npz[name] for name in npz.files}
    fields.update(changes)
    np.savez(path, **fields)
    return path


def test_cli_writes_json_plots_and_summary(
    simulation: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(run_dir), "--truth", str(simulation / "truth.npz"), "--out", str(out), "--device", "cpu",
            "--distance", "A:122-159", "A:30-59", "--distance", "A:122-159", "A", "--fsc-samples", "4"]  # fmt: skip
    assert cli_main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_images"] == 40 and result["epoch"] == 1
    assert result["nominal_vs_truth_nominal_rmsd_A"] == pytest.approx(0.0, abs=1e-3)  # same frame
    for key in ("prediction", "nominal_baseline", "best_fixed_baseline"):
        assert set(result["rmsd_A"][key]) >= {"direct", "superposed", "description"}
    assert [(d["group_a"], d["group_b"]) for d in result["distances"]] == [("A:122-159", "A:30-59"), ("A:122-159", "A")]
    true_range = result["distances"][0]["true_range_A"]
    assert 18 < true_range[0] < true_range[1] < 38  # AdK LID-NMP: 19.8 A closed -> 35.8 A open
    assert -1 <= result["distances"][0]["pearson"] <= 1
    fsc = result["fsc"]
    assert fsc["n_samples"] == 4 and fsc["voxel_size_A"] == 1.5  # min(pixel 4 A, 1.5 A)
    assert fsc["box_size_px"] == 86  # the 128 A particle box at 1.5 A, rounded up to even
    assert len(fsc["frequency_per_A"]) == len(fsc["prediction"]["mean_fsc"]) == 86 // 2 + 1
    assert fsc["prediction"]["mean_fsc"][0] == pytest.approx(1.0)  # same total density: DC terms agree
    assert fsc["nominal"]["median_resolution_A_at_0.143"] >= 3.0  # at best Nyquist, 2 voxels
    assert result["clashes"]["n_structures"] == 40
    assert sorted(result["plots"]) == ["distance_1.png", "distance_2.png", "fsc.png", "rmsd_histogram.png"]
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "best fixed conformation" in printed and "Pearson" in printed and "wrote" in printed
    assert "uncertainty ranks errors: Spearman r = " in printed
    assert result["uncertainty"]["posterior_samples"] == DEFAULT_POSTERIOR_SAMPLES


def test_a_second_evaluation_into_the_same_folder_leaves_no_stale_plot(
    simulation: Path, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """An evaluation with fewer --distance pairs removes the plots the earlier one listed and this one did not write
    (not other files); progress is shown unless --no-progress; an --fsc-samples above the particle count says that
    all are used; a voxel too small for memory is refused."""
    out = tmp_path / "eval"
    base = ["eval", str(run_dir), "--truth", str(simulation), "--out", str(out), "--device", "cpu",
            "--posterior-samples", "4"]  # fmt: skip  (the folder cryoflex simulate wrote: its truth.npz is read)
    pairs = ["--distance", "A:122-159", "A:30-59", "--distance", "A:122-159", "A"]
    assert cli_main([*base, *pairs, "--fsc-samples", "2"]) == 0
    assert (out / "distance_2.png").exists()
    assert "posterior structures: 40/40 img" in capsys.readouterr().err
    (out / "distance_matrix.png").write_bytes(b"the user's own figure")
    with caplog.at_level(logging.INFO):
        assert cli_main([*base, *pairs[:3], "--fsc-samples", "100", "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "distance_1.png", "distance_matrix.png", "fsc.png", "rmsd_histogram.png"
    ]  # fmt: skip
    assert json.loads((out / "eval.json").read_text())["fsc"]["n_samples"] == 40
    assert "--fsc-samples 100 is above the run's 40 images: the FSC uses all of them" in caplog.text
    assert "40/40" not in capsys.readouterr().err
    assert cli_main([*base, "--voxel-size-A", "0.1", "--no-progress"]) == 2  # 1,280^3 voxels: refused before decoding
    assert "give --voxel-size-A 0.5 or more" in capsys.readouterr().err


def test_baselines_and_clashes_match_independent_numpy(simulation: Path, trained: TrainedRun, tmp_path: Path) -> None:
    result = evaluate(trained, simulation / "truth.npz", fsc_samples=2, out_dir=tmp_path)
    with np.load(simulation / "truth.npz") as npz:
        conformation_of = dict(zip(npz["names"].tolist(), npz["conformation_index"].tolist(), strict=True))
        conformations = npz["conformations_A"].astype(np.float64)
    true_index = [conformation_of[name] for name in trained.dataset.metadata.names.tolist()]
    nominal = trained.structure.coords_A[0]
    direct = [np.sqrt(np.mean(np.sum((nominal - conformations[k]) ** 2, axis=1))) for k in true_index]
    superposed = []
    for k in true_index:
        a, b = nominal - nominal.mean(0), conformations[k] - conformations[k].mean(0)
        _, rssd = Rotation.align_vectors(b, a)
        superposed.append(rssd / np.sqrt(len(a)))
    baseline = result["rmsd_A"]["nominal_baseline"]
    assert baseline["direct"]["median"] == pytest.approx(np.median(direct), rel=1e-9)
    assert baseline["direct"]["mean"] == pytest.approx(np.mean(direct), rel=1e-9)
    assert baseline["superposed"]["median"] == pytest.approx(np.median(superposed), rel=1e-6)
    assert 0 < baseline["superposed"]["median"] < baseline["direct"]["median"] or np.median(direct) == 0

    medians = [np.median([np.sqrt(np.mean(np.sum((c - conformations[k]) ** 2, 1))) for k in true_index])
               for c in conformations]  # fmt: skip
    best = result["rmsd_A"]["best_fixed_baseline"]
    assert best["conformation"] == int(np.argmin(medians))
    assert best["direct"]["median"] == pytest.approx(min(medians), rel=1e-9)
    assert best["direct"]["median"] <= baseline["direct"]["median"] + 1e-9

    def brute_clashes(coords: np.ndarray) -> int:
        close = squareform(pdist(coords)) < 4.0
        i, j = np.nonzero(np.triu(close, k=2))  # k=2: not i, i + 1 (one chain here)
        return len(i)

    assert result["clashes"]["nominal"] == brute_clashes(nominal)
    assert result["clashes"]["truth_mean"] == pytest.approx(
        np.mean([brute_clashes(conformations[k]) for k in true_index])
    )


def test_clash_count_skips_only_consecutive_residues_of_one_chain() -> None:
    coords = np.array([[0.0, 0, 0], [3.0, 0, 0], [6.0, 0, 0], [3.0, 3.5, 0]])
    # pairs under 4 A: (0,1) 3.0, (1,2) 3.0, (1,3) 3.5, (2,3) 4.6 no, (0,3) 4.6 no
    assert clash_count(coords, np.array(["A", "A", "A", "A"])) == 1  # (1, 3) only
    assert clash_count(coords, np.array(["A", "B", "B", "B"])) == 2  # (0, 1) now across chains
    assert clash_count(coords[:1], np.array(["A"])) == 0


def test_particles_are_matched_by_name_not_position(simulation: Path, trained: TrainedRun, tmp_path: Path) -> None:
    truth_path = simulation / "truth.npz"
    truth = read_truth(truth_path)
    order = np.random.default_rng(0).permutation(len(truth.names))
    with np.load(simulation / "truth.npz") as npz:
        defocus_u_A = npz["defocus_u_A"]
    shuffled = _edited_truth(simulation, tmp_path / "shuffled.npz", names=truth.names[order],
                             conformation_index=truth.conformation_index[order],
                             defocus_u_A=defocus_u_A[order])  # fmt: skip
    rows = truth_rows(truth.names, read_truth(shuffled))
    np.testing.assert_array_equal(rows, np.argsort(order))
    straight = evaluate(trained, truth_path, fsc_samples=3, out_dir=tmp_path / "a")
    permuted = evaluate(trained, shuffled, fsc_samples=3, out_dir=tmp_path / "b")
    assert permuted["rmsd_A"] == straight["rmsd_A"] and permuted["fsc"] == straight["fsc"]
    # the same file with its conformation indices out of step with the names gives different numbers
    wrong = _edited_truth(simulation, tmp_path / "wrong.npz", conformation_index=truth.conformation_index[order])
    assert evaluate(trained, wrong, fsc_samples=3, out_dir=tmp_path / "c")["rmsd_A"] != straight["rmsd_A"]


def test_user_errors_name_file_and_field(simulation: Path, trained: TrainedRun, tmp_path: Path) -> None:
    truth = read_truth(simulation / "truth.npz")
    short = _edited_truth(simulation, tmp_path / "short.npz", conformations_A=truth.conformations_A[:, :-1])
    with pytest.raises(CryoflexInputError, match=r"short.npz \[conformations_A\]: .*213 residues.* 214"):
        evaluate(trained, short, out_dir=tmp_path)
    with np.load(simulation / "truth.npz") as npz:
        defocus_u_A = npz["defocus_u_A"]
    missing = _edited_truth(simulation, tmp_path / "missing.npz", names=truth.names[1:],
                            conformation_index=truth.conformation_index[1:], defocus_u_A=defocus_u_A[1:])  # fmt: skip
    with pytest.raises(CryoflexInputError, match=r"\[names\]: 1 of 40 particles of the run are not in the truth"):
        evaluate(trained, missing, out_dir=tmp_path)
    # another simulation's truth names the same particles ('000001@...'): its defocus gives it away
    other = _edited_truth(simulation, tmp_path / "other.npz", defocus_u_A=defocus_u_A[::-1].copy())
    with pytest.raises(CryoflexInputError, match=r"other.npz \[defocus_u_A\]: the defocus of \d+ of 40 particles"):
        evaluate(trained, other, out_dir=tmp_path)
    refined = _edited_truth(simulation, tmp_path / "refined.npz", defocus_u_A=defocus_u_A + 150.0)  # CTF refinement
    assert evaluate(trained, refined, fsc_samples=3, out_dir=tmp_path / "refined")["rmsd_A"]
    text = tmp_path / "notes.txt"
    text.write_text("not arrays\n")
    with pytest.raises(CryoflexInputError, match=r"notes.txt \[--truth\]: not a readable .npz file") as error:
        read_truth(text)
    assert "allow_pickle" not in str(error.value)  # numpy's advice to load objects unsafely is not passed on
    with pytest.raises(CryoflexInputError, match=r"\[--truth\]: no such file"):
        evaluate(trained, tmp_path / "absent.npz", out_dir=tmp_path)
    np.savez(tmp_path / "fieldless.npz", names=truth.names)
    with pytest.raises(CryoflexInputError, match=r"\[conformation_index\]: has no field"):
        read_truth(tmp_path / "fieldless.npz")


def test_residue_groups(trained: TrainedRun) -> None:
    np.testing.assert_array_equal(parse_residue_group("A:122-159", trained.structure), np.arange(121, 159))
    assert parse_residue_group(" A ", trained.structure).size == 214
    for spec, message in (("A:159", "not CHAIN or CHAIN:FIRST-LAST"), ("B:1-5", "no chain 'B'"),
                          ("A:300-310", "selects no residue")):  # fmt: skip
        with pytest.raises(CryoflexInputError, match=message):
            parse_residue_group(spec, trained.structure)


def test_fsc_plot_gives_thresholds_and_resolutions_in_its_legend() -> None:
    frequency = np.arange(11) / (20 * 1.5)  # Nyquist 1/3 per A
    curves = {"prediction": np.linspace(1.0, 0.0, 11), "nominal": np.ones(11)}
    figure = fsc_figure(frequency, curves, n_images=4)
    axes = figure.axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    # prediction falls below 0.5 half-way to Nyquist (6 A) and below 0.143 at 0.857 of it (3.5 A)
    assert legend == ["prediction (0.5: 6.0 A, 0.143: 3.5 A)",
                      "nominal (0.5: beyond Nyquist 3.0 A, 0.143: beyond Nyquist 3.0 A)",
                      "FSC = 0.5", "FSC = 0.143"]  # fmt: skip
    assert "4 images" in axes.get_title()


def test_evaluation_figures_have_captions() -> None:
    result = {
        "plots": ["rmsd_histogram.png", "distance_1.png", "fsc.png"],
        "distances": [{"group_a": "A:122-159", "group_b": "A:30-59"}],
        "fsc": {"n_samples": 50, "voxel_size_A": 1.5},
    }
    captions = figure_captions(result)
    assert [name for name, _ in captions] == result["plots"]
    assert "residues A:122-159 and A:30-59" in captions[1][1]
    assert "50 sampled images" in captions[2][1] and "0.143" in captions[2][1]


def test_posterior_mean_structures_are_scored_and_their_expected_rmsd_ranks_errors(
    simulation: Path, trained: TrainedRun, tmp_path: Path
) -> None:
    result = evaluate(trained, simulation / "truth.npz", fsc_samples=2, out_dir=tmp_path, posterior_samples=4, seed=1)
    posterior = particle_posteriors(trained.model, trained.dataset, weighted=True, samples=4, seed=1)
    assert posterior.log_weights is not None  # trained with the Gaussian likelihood: the draws are weighted
    chunks = list(posterior_structures(trained.model, posterior, samples=4, seed=1))
    coords = np.concatenate([c.coords_A for c in chunks]).astype(np.float64)
    expected = np.concatenate([c.expected_rmsd_A for c in chunks])
    truth = read_truth(simulation / "truth.npz")
    true_A = truth.conformations_A[truth.conformation_index[truth_rows(trained.dataset.metadata.names, truth)]]
    error = np.sqrt(np.mean(np.sum((coords - true_A) ** 2, axis=-1), axis=1))
    assert result["rmsd_A"]["prediction"]["direct"]["median"] == pytest.approx(np.median(error), rel=1e-6)
    uncertainty = result["uncertainty"]
    assert uncertainty["posterior_samples"] == 4
    spearman = spearmanr(expected, error).statistic
    assert uncertainty["spearman_expected_vs_true_rmsd"] == pytest.approx(spearman, abs=1e-6)
    assert uncertainty["expected_rmsd_A"]["median"] == pytest.approx(np.median(expected), rel=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text())["uncertainty"] == uncertainty

    at_mean = evaluate(trained, simulation / "truth.npz", fsc_samples=2, out_dir=tmp_path, posterior_samples=0)
    decoded = np.concatenate(list(decode_latents(trained.model, posterior.mean))).astype(np.float64)
    error_at_mean = np.sqrt(np.mean(np.sum((decoded - true_A) ** 2, axis=-1), axis=1))
    assert at_mean["rmsd_A"]["prediction"]["direct"]["median"] == pytest.approx(np.median(error_at_mean), rel=1e-9)
    assert at_mean["uncertainty"]["spearman_expected_vs_true_rmsd"] is None  # no samples: nothing to rank by
    assert "Spearman r = n/a" in "\n".join(summary_lines(at_mean))
    assert any(line.startswith("uncertainty ranks errors: Spearman r = ") for line in summary_lines(result))
