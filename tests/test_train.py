"""Training loop: checkpoints and exact resume, divergence, the CLI, and gradient averaging across processes."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from cryoflex.cli import main as cli_main
from cryoflex.config import TrainConfig, load_config
from cryoflex.data.batch import ParticleBatch
from cryoflex.errors import CryoflexInputError
from cryoflex.geometry.rotations import uniform_random_rotations
from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.noise import n_shells, shell_counts, shell_sums
from cryoflex.model.cryosphere import CryoSphere, ModelOutput
from cryoflex.train.checkpoint import find_checkpoint, load_checkpoint
from cryoflex.train.distributed import epoch_batches
from cryoflex.train.loop import TrainingDiverged, train


@pytest.fixture(scope="module")
def tiny_dataset(tiny_adk_dataset: Path) -> Path:
    """40 images, 32 px at 4 A/px, of 10 AdK trajectory frames (conftest); returns the dataset directory."""
    return tiny_adk_dataset


def _config(dataset: Path, **changes: object) -> TrainConfig:
    values = dict(
        particles=str(dataset / "particles.star"), structure=str(dataset / "nominal.pdb"), segments=3, latent_dim=2,
        epochs=2, batch_size=16, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32], progress=False, device="cpu",
        learning_rate=1e-3, neighbour_list_every_steps=2,
    )  # fmt: skip
    values.update(changes)
    return load_config(None, values)


def _assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_resume_gives_the_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    # extended with more epochs: exact where the rates do not depend on the planned epochs (the cosine schedule's
    # exact resume of an interrupted run is in test_validation)
    straight = train(_config(tiny_dataset, epochs=3, lr_schedule="constant"), tmp_path / "straight")
    train(_config(tiny_dataset, epochs=1, lr_schedule="constant"), tmp_path / "stopped")
    resumed = train(_config(tiny_dataset, epochs=3, lr_schedule="constant"), tmp_path / "stopped", resume=True)
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    initial = train(_config(tiny_dataset, epochs=1, seed=1), tmp_path / "other")
    assert not torch.equal(initial.model.decoder.net[-1].weight, straight.model.decoder.net[-1].weight)
    last = load_checkpoint(find_checkpoint(tmp_path / "stopped"))
    assert last["epoch"] == 3 and last["step"] == 9  # 40 images / 16 -> 3 steps per epoch
    lines = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line["kind"] == "epoch"] == [1, 2, 3]
    assert (tmp_path / "straight" / "config.yaml").is_file()
    assert any((tmp_path / "straight" / "tensorboard").iterdir())


def test_existing_run_is_not_overwritten(tiny_dataset: Path, tmp_path: Path) -> None:
    train(_config(tiny_dataset, epochs=1), tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(tiny_dataset, epochs=1), tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(_config(tiny_dataset, epochs=1), tmp_path / "run")
    before = load_checkpoint(find_checkpoint(tmp_path / "run"))
    import cryoflex.train.objective as objective

    def not_a_number(predicted: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return predicted.real.sum((-2, -1)) * float("nan")  # images (B, N, N) or draws' spectra (B, K, N, N//2 + 1)

    monkeypatch.setattr(objective, "correlation_loss", not_a_number)
    monkeypatch.setattr(objective, "gaussian_image_nll", not_a_number)
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 2") as diverged:
        train(_config(tiny_dataset, epochs=2), tmp_path / "run", resume=True)
    assert "epoch_0001.pt, is intact" in str(diverged.value)  # and advice that can be followed:
    assert "start a new run (another --out) with a lower --learning-rate" in str(diverged.value)
    after = load_checkpoint(find_checkpoint(tmp_path / "run"))
    assert after["epoch"] == 1
    _assert_same_state(before["model"], after["model"])


def test_a_run_that_raises_keeps_its_tensorboard_scalars(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training that fails after logging an epoch (here: the checkpoint cannot be written) still closes TensorBoard's
    event file, so the curve up to the failure can be read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import cryoflex.train.loop as loop

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(_config(tiny_dataset, epochs=2), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("epoch/total")] == [3]  # 40 images / 16: 3 steps in epoch 1


def test_cli_train_and_resume(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    common = ["train", "--out", str(run), "--no-progress", "--device", "cpu"]
    inputs = ["--particles", str(tiny_dataset / "particles.star"), "--structure", str(tiny_dataset / "nominal.pdb")]
    config = tmp_path / "c.yaml"
    config.write_text("encoder_hidden: [16]\ndecoder_hidden: [16]\nsigma_A: 4.0\n")
    assert cli_main([*common, *inputs, "--config", str(config), "--epochs", "1", "--segments", "2"]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.segments == 2 and saved.encoder_hidden == [16] and saved.epochs == 1
    assert cli_main([*common, "--resume", "--epochs", "2"]) == 0
    assert load_checkpoint(find_checkpoint(run))["epoch"] == 2
    assert cli_main([*common, "--resume", "--segments", "4"]) == 2
    assert "keeps its configuration, but segments 4 (saved: 2) was given" in capsys.readouterr().err
    # the same command again, inputs and settings as saved, goes on; a relative path means the same file
    moved_to = tmp_path / "elsewhere"
    moved_to.mkdir()
    monkeypatch.chdir(tiny_dataset)
    relative = ["--particles", "particles.star", "--structure", str(tiny_dataset / "nominal.pdb")]
    assert cli_main([*common, *relative, "--config", str(config), "--segments", "2", "--resume", "--epochs", "3",
                     "--datadir", str(tiny_dataset)]) == 0  # fmt: skip
    assert load_checkpoint(find_checkpoint(run))["epoch"] == 3
    saved = load_config(run / "config.yaml")
    assert saved.particles == str(tiny_dataset / "particles.star") and saved.datadir == str(tiny_dataset)
    monkeypatch.chdir(moved_to)  # the run's paths are absolute: it opens from anywhere
    assert cli_main([*common, "--resume", "--epochs", "3"]) == 0


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("segmens: 4\n")
    with pytest.raises(CryoflexInputError, match=r"(?s)unknown setting.*did you mean segments\?"):
        load_config(path)
    with pytest.raises(CryoflexInputError, match="segments"):
        load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": -1})


def test_automatic_segments_follow_the_images_signal_and_the_structure_size() -> None:
    from cryoflex.train.setup import automatic_segments

    assert automatic_segments(24.0, 214) == 40 and automatic_segments(2.4, 214) == 20
    assert automatic_segments(10.0, 214) == 40 and automatic_segments(9.9, 214) == 20
    assert automatic_segments(1e3, 100) == 20 and automatic_segments(1e3, 12) == 2 and automatic_segments(0.0, 3) == 1


@pytest.fixture(scope="module")
def noise_dataset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset's images at SNR 1e-4: nearly pure noise."""
    from cryoflex.io.trajectory import read_trajectory
    from cryoflex.simulate import SimulationConfig, simulate_dataset

    ensemble = read_trajectory(data_dir / "adk.psf", data_dir / "adk_dims.dcd", stride=10)
    out = tmp_path_factory.mktemp("noise")
    simulate_dataset(ensemble, SimulationConfig(n_images=40, box_size_px=32, pixel_size_A=4.0, sigma_A=4.0, snr=1e-4,
                                                seed=3), out, progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize(("dataset", "expected"), [("tiny_dataset", 40), ("noise_dataset", 20)])
def test_segments_0_are_chosen_from_the_images_and_saved_with_the_run(
    request: pytest.FixtureRequest, tmp_path: Path, dataset: str, expected: int
) -> None:
    """AdK (214 residues): clean images get 40 segments, images of nearly pure noise 20; the count is in the saved
    configuration and the checkpoint, so resume and analysis rebuild the same model."""
    data = request.getfixturevalue(dataset)
    result = train(_config(data, segments=0, epochs=1), tmp_path / "run")
    assert result.model.segmentation.n_segments == expected
    assert load_config(tmp_path / "run" / "config.yaml").segments == expected
    assert load_checkpoint(find_checkpoint(tmp_path / "run"))["config"]["segments"] == expected
    direct = train(_config(data, segments=expected, epochs=1), tmp_path / "direct")
    _assert_same_state(result.model.state_dict(), direct.model.state_dict())  # as if the count had been given


def test_epoch_batches_shard_disjointly() -> None:
    ranks = [epoch_batches(10, 3, epoch=2, seed=0, rank=r, world_size=2) for r in range(2)]
    flat = [sorted(i for batch in shard for i in batch) for shard in ranks]
    assert len(flat[0]) == len(flat[1]) == 5 and not set(flat[0]) & set(flat[1])
    assert epoch_batches(10, 3, epoch=2, seed=0) == epoch_batches(10, 3, epoch=2, seed=0)
    assert epoch_batches(10, 3, epoch=2, seed=0) != epoch_batches(10, 3, epoch=3, seed=0)


@pytest.mark.parametrize(("n_images", "world_size"), [(10, 4), (3, 8), (1, 4)])
def test_epoch_batches_give_every_rank_the_same_count(n_images: int, world_size: int) -> None:
    """Ranks pair their gradient averages batch by batch, so none may run out first, even with fewer images than
    ranks; every image is still seen."""
    shards = [epoch_batches(n_images, 2, epoch=0, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1
    assert len({sum(len(batch) for batch in shard) for shard in shards}) == 1
    assert {i for shard in shards for batch in shard for i in batch} == set(range(n_images))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, config: TrainConfig, run_dir: Path, out: Path) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    result = train(config, run_dir)
    torch.save({name: value.detach().clone() for name, value in result.model.state_dict().items()}, out / f"{rank}.pt")


def test_two_processes_hold_identical_parameters(tiny_dataset: Path, tmp_path: Path) -> None:
    """gloo DDP: the ranks see different particles, yet their parameters stay identical (gradients are averaged)."""
    config = _config(tiny_dataset, epochs=2, cache=False)
    mp.spawn(_rank_main, args=(2, _free_port(), config, tmp_path / "run", tmp_path), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    _assert_same_state(rank0, rank1)
    single = train(_config(tiny_dataset, epochs=2, cache=False), tmp_path / "single")
    weight = "decoder.net.2.weight"
    assert not torch.equal(rank0[weight], single.model.state_dict()[weight])  # really trained on shards
    assert rank0[weight].abs().sum() > 0


def test_segments_above_the_residues_are_refused_before_any_output(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13.3: 1000 segments on 214 residues is an error naming the setting and the limit; many segments warn."""
    with pytest.raises(CryoflexInputError, match="at most 214 segments") as caught:
        train(_config(tiny_dataset, segments=1000), tmp_path / "run")
    assert caught.value.field == "segments"
    assert not (tmp_path / "run").exists()
    with pytest.raises(CryoflexInputError, match="only 100 residues") as caught:
        train(_config(tiny_dataset, parts=["A:1-100:101"]), tmp_path / "run")
    assert caught.value.field == "parts"
    from cryoflex.train.setup import check_inputs

    with caplog.at_level(logging.WARNING):
        check_inputs(_config(tiny_dataset, segments=80))
    assert "more than a third" in caplog.text


def test_images_that_fail_their_checks_leave_no_run_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    """A box the stacks cannot be downsampled to is found when the images are opened, after the config is saved:
    the half-made folder goes, so the next attempt is not mistaken for a run to resume."""
    with pytest.raises(CryoflexInputError, match="box"):
        train(_config(tiny_dataset, downsample=64), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(CryoflexInputError, match="box"):
        train(_config(tiny_dataset, downsample=64), tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_validation_share_that_leaves_few_particles_to_train_on_warns(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        train(_config(tiny_dataset, validation_fraction=0.9, epochs=1), tmp_path / "run")
    assert "more held out for validation): under 1000" in caplog.text
    assert "and a smaller validation_fraction" in caplog.text


def test_a_part_past_its_chain_warns_once_per_training(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The input checks and the model's construction both parse --parts; the user reads the warning once."""
    with caplog.at_level(logging.WARNING):
        train(_config(tiny_dataset, parts=["A:121-500:2"], epochs=1), tmp_path / "run")
    assert sum("reaches past chain A" in record.getMessage() for record in caplog.records) == 1


def test_inputs_are_checked_before_the_cache_and_the_run_directory(tiny_dataset: Path, tmp_path: Path) -> None:
    """Issue 13.4: a bad structure is reported before any cache is built, and leaves nothing that blocks a rerun."""
    bad = tmp_path / "bad.pdb"
    bad.write_text("hello\nworld\n")
    run = tmp_path / "run"
    with pytest.raises(CryoflexInputError, match="bad.pdb"):
        train(_config(tiny_dataset, structure=str(bad), cache=True), run)
    assert not run.exists()
    run.mkdir()  # a directory left by a run that stopped before its first checkpoint
    (run / "config.yaml").write_text("stale: true\n")
    (run / "cache").mkdir()
    assert train(_config(tiny_dataset, epochs=1), run).epochs_done == 1


def test_cuda_without_a_gpu_is_a_clear_input_error(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13.7: --device cuda without a visible GPU says so and what to do, without a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inputs = ["--particles", str(tiny_dataset / "particles.star"), "--structure", str(tiny_dataset / "nominal.pdb")]
    assert cli_main(["train", "--out", str(tmp_path / "run"), "--device", "cuda", *inputs]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "--device cpu" in err and "CUDA_VISIBLE_DEVICES" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_cryodrgn_input_trains_with_stack(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13.12: poses.pkl + ctf.pkl + --stack trains; --duplicate-images reaches the metadata reader."""
    from cryoflex.io.metadata import read_metadata, write_cryodrgn_pkl

    write_cryodrgn_pkl(tmp_path / "poses.pkl", tmp_path / "ctf.pkl", read_metadata(tiny_dataset / "particles.star"))
    stacks = sorted((tiny_dataset / "stacks").glob("*.mrcs"))
    assert len(stacks) == 1
    run = tmp_path / "run"
    args = [
        "train", "--out", str(run), "--no-progress", "--device", "cpu", "--epochs", "1", "--segments", "2",
        "--particles", str(tmp_path / "poses.pkl"), "--ctf", str(tmp_path / "ctf.pkl"), "--stack", str(stacks[0]),
        "--structure", str(tiny_dataset / "nominal.pdb"), "--sigma-A", "4", "--config", str(_small_networks(tmp_path)),
    ]  # fmt: skip
    assert cli_main(args) == 0
    assert load_config(run / "config.yaml").stack == str(stacks[0])
    import cryoflex.train.setup as setup

    seen: dict[str, object] = {}
    monkeypatch.setattr(setup, "read_metadata", lambda path, **options: seen.update(options))
    setup.read_particles(_config(tiny_dataset, duplicate_images="first"))
    assert seen["duplicate_images"] == "first"


def _small_networks(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text("encoder_hidden: [16]\ndecoder_hidden: [16]\n")
    return path


def test_metrics_name_the_image_term_and_resume_drops_logged_steps_after_the_checkpoint(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """The image term is logged as one_minus_correlation; a resumed run rewrites metrics.jsonl without repeats."""
    run = tmp_path / "run"
    train(_config(tiny_dataset, epochs=1), run)
    metrics = run / "metrics.jsonl"
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all("one_minus_correlation" in line and "correlation" not in line for line in first)
    # what a run killed during epoch 2 leaves: a step logged after the checkpoint and a cut-off line
    with metrics.open("a") as stream:
        stream.write(json.dumps({**first[0], "epoch": 2, "step": 6}) + '\n{"kind": "st')
    train(_config(tiny_dataset, epochs=2), run, resume=True)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    keys = [(line["kind"], line["step"]) for line in lines]
    assert keys == [("step", 3), ("epoch", 3), ("step", 6), ("epoch", 6)]


def test_resuming_a_finished_run_says_how_to_extend_it(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(_config(tiny_dataset, epochs=1), run)
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already at 1 epochs" in out and "--resume --epochs" in out
    # segments 0 (automatic) asked again matches the count chosen and saved when the run started
    assert cli_main(["train", "--out", str(run), "--resume", "--segments", "0", "--no-progress"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    train(_config(tiny_dataset, epochs=2), run, resume=True)
    assert yaml.safe_load((run / "config.yaml").read_text()) == {**saved, "epochs": 2}
    # fewer epochs than the run has: nothing to do, and the saved settings still describe the run
    assert cli_main(["train", "--out", str(run), "--resume", "--epochs", "1", "--no-progress"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2


def test_a_terminated_train_says_where_it_stopped_and_how_to_go_on(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (Slurm's scancel) stops train as Ctrl-C does, with the epoch kept and the command that goes on."""
    import os
    import signal

    import cryoflex.train.loop as loop

    run = tmp_path / "run"
    train(_config(tiny_dataset, epochs=1), run)
    original = loop.train_step

    def terminated_step(*args, **kwargs):  # the signal arrives during the second epoch's first step
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", terminated_step)
    capsys.readouterr()
    code = cli_main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress", "--device", "cpu"])
    assert code == 128 + signal.SIGTERM
    message = capsys.readouterr().err
    assert "terminated" in message and "checkpoints up to epoch 1" in message
    assert f"cryoflex train --out {run} --resume" in message
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """No tqdm redraws in a log file; a handful of particles warns."""
    with caplog.at_level(logging.WARNING):
        train(_config(tiny_dataset, epochs=1, progress=True), tmp_path / "run")
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err
    assert "training on only 38 particles (2 more held out for validation)" in caplog.text  # 40, 5% held out


def test_epoch_progress_lines_and_short_terms() -> None:
    from cryoflex.train.logs import EpochProgress, format_terms

    values = {"total": 0.95, "one_minus_correlation": 0.94, "latent_kl": 1.5, "segmentation_kl": 0.01,
              "continuity": 0.001, "clash": 0.0}  # fmt: skip
    terms = format_terms(values)
    assert terms.startswith("loss 0.9500 1-corr 0.9400 kl 1.5000 seg") and len(terms) < 80
    stream, now = io.StringIO(), [0.0]
    with EpochProgress("epoch 1/2", 100, enabled=True, stream=stream, clock=lambda: now[0]) as progress:
        for _ in range(100):
            now[0] += 1.0
            progress.update(values)
    lines = stream.getvalue().splitlines()
    assert lines == [f"epoch 1/2: step {k}/100, {terms}" for k in (30, 60, 90)]


def test_contrast_verdict_says_when_the_sign_is_not_significant() -> None:
    from cryoflex.train.loop import contrast_verdict

    generator = np.random.default_rng(0)
    weak = 0.0008 + 0.01 * generator.standard_normal(5)
    line, warn = contrast_verdict(weak, inverted=False)
    assert "not significant" in line and "fits better" not in line and not warn
    line, warn = contrast_verdict(0.05 + 0.01 * generator.standard_normal(64), inverted=False)
    assert "as used fits better" in line and not warn
    line, warn = contrast_verdict(-0.05 + 0.01 * generator.standard_normal(64), inverted=True)
    assert "the opposite sign fits better" in line and warn
    assert "not significant" in contrast_verdict(np.array([0.3]), inverted=False)[0]


def _nominal_batches(model: CryoSphere, scale: float) -> list[ParticleBatch]:
    """Two batches of images = scale x the nominal structure's projection + an offset per image + white noise."""
    generator = np.random.default_rng(4)
    batches = []
    for start in (0, 5):
        count = 5 if start == 0 else 3
        rotations = torch.as_tensor(uniform_random_rotations(count, generator), dtype=torch.float32)
        poses = PoseBatch(rotations, torch.zeros(count, 2))
        ctf = CTFBatch.from_values(torch.full((count,), 15000.0), 14000.0, 30.0, 300.0, 2.7, 0.1)
        with torch.no_grad():
            clean = model.render(model.nominal_density_A.expand(count, -1, -1), poses, ctf)
        offsets = torch.as_tensor(generator.normal(size=(count, 1, 1)), dtype=torch.float32)
        noise = torch.as_tensor(generator.normal(scale=0.2, size=clean.shape), dtype=torch.float32)
        images = scale * clean + offsets + noise * clean.std()
        groups = torch.ones(count, dtype=torch.int64)
        batches.append(ParticleBatch(images, poses, ctf, torch.arange(start, start + count), groups))
    return batches


def test_projections_blank_at_the_width_are_a_clear_error(data_dir: Path) -> None:
    """A Gaussian width far beyond the box renders constant images: an error naming sigma_A, not a division by 0."""
    from cryoflex.io.structure import read_structure
    from cryoflex.train.loop import nominal_fit
    from cryoflex.train.setup import build_model

    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8], sigma_A=1000.0))  # fmt: skip
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0).eval()
    with pytest.raises(CryoflexInputError, match="blank at the Gaussian width 1000 A") as refused:
        nominal_fit(model, _nominal_batches(model, scale=0.37), torch.device("cpu"))
    assert refused.value.field == "sigma_A"


def test_nominal_fit_is_the_least_squares_scale_with_an_offset_per_image(data_dir: Path) -> None:
    """Scale and noise variance equal numpy's least squares on one design (the projections and one indicator column
    per image); a scale the images contradict (here negative) starts at the floor instead."""
    from cryoflex.io.structure import read_structure
    from cryoflex.train.loop import nominal_fit
    from cryoflex.train.setup import build_model

    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8]))  # fmt: skip
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0).eval()
    batches = _nominal_batches(model, scale=0.37)
    fit = nominal_fit(model, batches, torch.device("cpu"))
    with torch.no_grad():
        projections = torch.cat([model.render(model.nominal_density_A.expand(len(b), -1, -1), b.poses, b.ctf)
                                 for b in batches]).flatten(1).double().numpy()  # fmt: skip
    observed = torch.cat([b.images for b in batches]).flatten(1).double().numpy()
    n, pixels = observed.shape
    design = np.concatenate([projections.reshape(-1, 1), np.kron(np.eye(n), np.ones((pixels, 1)))], axis=1)
    coefficients, residual, *_ = np.linalg.lstsq(design, observed.ravel(), rcond=None)
    assert fit.image_scale == pytest.approx(coefficients[0], rel=1e-6)
    assert fit.image_scale == pytest.approx(0.37, rel=0.05)
    assert fit.noise_variance == pytest.approx(float(residual[0]) / observed.size, rel=1e-6)
    # per Fourier shell: each shell's share of the same residual, over its frequencies (Parseval: the shares add up)
    frequencies = shell_counts(32).numpy() * n
    assert np.sum(fit.shell_noise_variances[1:] * frequencies[1:]) == pytest.approx(float(residual[0]), rel=1e-6)
    assert fit.correlations.shape == (8,) and np.all(fit.correlations > 0)
    # the SNR these images were made with: the scaled projections' variance over the noise's (std 0.2 x each batch's
    # projections' std, as _nominal_batches adds it)
    signal_variance = 0.37**2 * projections.var(axis=1).mean()
    noise_variance = np.mean([(0.2 * projections[:5].std()) ** 2] * 5 + [(0.2 * projections[5:].std()) ** 2] * 3)
    assert fit.snr == pytest.approx(signal_variance / noise_variance, rel=0.1)
    inverted = [ParticleBatch(-b.images, b.poses, b.ctf, b.indices, b.optics_groups) for b in batches]
    floor = nominal_fit(model, inverted, torch.device("cpu"))
    observed_power = np.square(observed - observed.mean(1, keepdims=True)).sum()
    projected_power = np.square(projections - projections.mean(1, keepdims=True)).sum()
    assert floor.image_scale == pytest.approx(0.01 * np.sqrt(observed_power / projected_power), rel=1e-6)
    assert np.all(floor.correlations < 0)


def test_nominal_fit_gives_each_optics_group_the_spectrum_of_its_own_images(data_dir: Path) -> None:
    """With two optics groups, each group's starting spectrum is the fit to its own images at the shared scale (the
    same shell sums as a fit to them alone, scale held), and a group without images starts from the pooled one."""
    from cryoflex.io.structure import read_structure
    from cryoflex.train.loop import nominal_fit
    from cryoflex.train.setup import build_model

    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8]))  # fmt: skip
    model = build_model(config, read_structure(data_dir / "adk_open.pdb"), 32, 4.0, [1, 2, 3]).eval()
    assert model.log_noise_variance.shape == (3, n_shells(32))
    batches = _nominal_batches(model, scale=0.37)
    batches = [  # even particles in group 1, odd ones in group 2; group 3 has no image
        ParticleBatch(b.images, b.poses, b.ctf, b.indices, torch.where(b.indices % 2 == 0, 1, 2)) for b in batches
    ]
    fit = nominal_fit(model, batches, torch.device("cpu"))
    assert fit.images_per_group.tolist() == [4, 4, 0]
    np.testing.assert_array_equal(fit.group_shell_noise_variances[2], fit.shell_noise_variances)
    with torch.no_grad():
        for group in (1, 2):
            members = [b[b.optics_groups == group] for b in batches]
            residual = torch.cat([
                m.images - fit.image_scale * model.render(model.nominal_density_A.expand(len(m), -1, -1), m.poses,
                                                          m.ctf)
                for m in members
            ]).double()  # fmt: skip
            spectrum = torch.fft.rfft2(residual).abs().square() / 32**2
            expected = shell_sums(spectrum)[1:] / (shell_counts(32)[1:] * 4)
            np.testing.assert_allclose(fit.group_shell_noise_variances[group - 1][1:], expected.numpy(), rtol=1e-5)


def test_training_starts_the_likelihood_at_the_nominal_fit_and_refuses_checkpoints_of_the_old_likelihood(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first epoch's logged image scale and noise variance are near the nominal fit the log reports; a Gaussian
    checkpoint without an image scale (earlier versions fitted one per image) is refused with the file named."""
    from cryoflex.analysis.run import load_run

    with caplog.at_level(logging.INFO, logger="cryoflex"):
        train(_config(tiny_dataset, epochs=1), tmp_path / "run")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("likelihood starts"))
    start_scale = float(line.split("image scale ")[1].split(",")[0])
    state = load_checkpoint(find_checkpoint(tmp_path / "run"))
    learned_scale = float(state["model"]["log_image_scale"].exp())
    assert start_scale > 0 and learned_scale == pytest.approx(start_scale, rel=0.2) and learned_scale != start_scale
    del state["model"]["log_image_scale"]
    torch.save(state, find_checkpoint(tmp_path / "run"))
    with pytest.raises(CryoflexInputError, match="fitted every image's own scale"):
        load_run(tmp_path / "run", device="cpu")
    with pytest.raises(CryoflexInputError, match="fitted every image's own scale"):
        train(_config(tiny_dataset, epochs=2), tmp_path / "run", resume=True)


def test_automatic_threads_train_and_are_logged(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """threads 0 without OMP_NUM_THREADS: the tuner runs inside the loop and each epoch records the count it kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("cryoflex.threads.usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        train(_config(tiny_dataset, epochs=2, batch_size=4), tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [record["threads"] for record in epochs if record["kind"] == "epoch"]
    assert len(counts) == 2 and set(counts) <= {1, 2}


def test_tensorboard_pairs_each_observed_image_with_its_own_prediction(tmp_path: Path) -> None:
    """With K latent draws per image the predictions are image-major (B K): the figure shows the first draw of each
    of the first images above those images, not K draws of the first image."""
    from types import SimpleNamespace

    from cryoflex.run_dir import RunDir
    from cryoflex.train.logs import RunLogs

    logged: dict[str, torch.Tensor] = {}
    logs = RunLogs(RunDir(tmp_path / "run"))
    logs.tensorboard = SimpleNamespace(add_figure=lambda *args: None,
                                       add_images=lambda tag, images, step: logged.update(images=images))  # fmt: skip
    images, draws = 5, 3
    predicted = torch.eye(16)[: images * draws].view(-1, 4, 4)  # prediction k lights pixel k: scaling keeps it
    unused = dict.fromkeys(("coords_A", "latent_mean", "latent_std", "segmentation_kl", "log_noise_variance",
                            "log_image_scale", "sigma_A"), torch.zeros(()))  # fmt: skip
    output = ModelOutput(predicted=torch.fft.rfft2(predicted), latent=torch.zeros(images * draws, 2),
                         assignment=torch.ones(8, 1), **unused)  # band-limited rendering: spectra
    logs.figures(None, output, torch.randn(images, 4, 4), step=0)  # type: ignore[arg-type]
    assert logged["images"].shape == (8, 1, 4, 4)  # four predictions above four observed images
    shown = [int(image.argmax()) for image in logged["images"][:4, 0]]
    assert shown == [0, 3, 6, 9]  # images 0-3, the first of their three draws each


def test_training_learns_the_width_and_runs_from_before_it_resume_at_their_width(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """The width moves from where it starts and is logged every epoch; a checkpoint saved before the width was
    learned (no log_sigma_A, nothing for it in the optimiser) resumes with the configured width, fixed."""
    run = tmp_path / "run"
    train(_config(tiny_dataset, epochs=1), run)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [line["sigma_A"] for line in epochs if line["kind"] == "epoch"]
    assert len(logged) == 1 and logged[0] != pytest.approx(4.0, abs=1e-4)
    checkpoint = find_checkpoint(run)
    state = load_checkpoint(checkpoint)
    assert float(state["model"]["log_sigma_A"].exp()) == pytest.approx(logged[0], rel=1e-2)  # logged: epoch mean
    del state["model"]["log_sigma_A"]
    scalars = state["optimizer"]["param_groups"][1]["params"]
    state["optimizer"]["state"].pop(scalars.pop())  # the width is the scalar group's last parameter
    torch.save(state, checkpoint)
    resumed = train(_config(tiny_dataset, epochs=2), run, resume=True)
    assert float(resumed.model.sigma_A.detach()) == pytest.approx(4.0)
    assert not resumed.model.log_sigma_A.requires_grad


def test_tf32_projections_on_cuda_unless_fp32_and_never_on_a_cpu() -> None:
    """The projections' products use TF32 where the networks use bf16 automatically, on CUDA; precision fp32 keeps
    them float32, and a CPU never changes its products (the flag only concerns CUDA)."""
    from cryoflex.train.setup import use_tf32_projections

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only their types are read: no GPU needed

    def config(precision: str) -> TrainConfig:
        return load_config(None, {"particles": "p.star", "structure": "s.pdb", "precision": precision})

    assert use_tf32_projections(config("auto"), cuda) and use_tf32_projections(config("bf16"), cuda)
    assert not use_tf32_projections(config("fp32"), cuda)
    assert not any(use_tf32_projections(config(p), cpu) for p in ("auto", "bf16", "fp32"))


def _two_optics_groups(dataset: Path, out: Path, groups: tuple[int, int] = (1, 2)) -> Path:
    """The dataset's particle file with its particles alternating between two optics groups of equal optics."""
    import starfile

    tables = starfile.read(dataset / "particles.star", always_dict=True)
    optics, particles = tables["optics"], tables["particles"].copy()
    optics = pd.concat([optics.assign(rlnOpticsGroup=g, rlnOpticsGroupName=f"opticsGroup{g}") for g in groups])
    particles["rlnOpticsGroup"] = np.where(np.arange(len(particles)) % 2 == 0, *groups)
    particles["rlnImageName"] = [f"{n.split('@')[0]}@{dataset / n.split('@')[1]}" for n in particles["rlnImageName"]]
    path = out / "two_groups.star"
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def test_each_optics_group_learns_its_own_noise_spectrum(tiny_dataset: Path, tmp_path: Path) -> None:
    """Particles of two optics groups train one noise spectrum per group; analysis maps each particle to its group's;
    a checkpoint from before (one spectrum) loads as that spectrum for every group; a particle file that has since
    gained a group is refused by analysis and by a resumed training, with the file and the field named."""
    from cryoflex.analysis.figures import noise_spectrum_figure
    from cryoflex.analysis.run import load_run

    particles = _two_optics_groups(tiny_dataset, tmp_path)
    train(_config(tiny_dataset, particles=str(particles), epochs=1), tmp_path / "run")
    path = find_checkpoint(tmp_path / "run")
    state = load_checkpoint(path)
    spectra = state["model"]["log_noise_variance"]
    assert spectra.shape == (2, n_shells(32)) and state["model"]["noise_optics_groups"].tolist() == [1, 2]
    assert not torch.equal(spectra[0], spectra[1])  # each started from its own images' fit and learned its own

    run = load_run(tmp_path / "run", device="cpu")
    chosen = run.model.noise_spectra(torch.tensor([2, 1, 2]))
    torch.testing.assert_close(chosen, spectra[[1, 0, 1]])
    figure = noise_spectrum_figure(run, tmp_path / "noise_spectrum.png")  # the report's: a curve per group
    assert figure is not None and figure.stat().st_size > 0

    state["model"]["log_noise_variance"] = spectra[1].clone()  # one spectrum for all, as saved before groups
    del state["model"]["noise_optics_groups"]
    torch.save(state, path)
    old = load_run(tmp_path / "run", device="cpu")
    torch.testing.assert_close(old.model.log_noise_variance.detach(), spectra[[1, 1]])

    _two_optics_groups(tiny_dataset, tmp_path, groups=(1, 3))  # the same file, now with a group 3
    torch.save({**state, "model": {**state["model"], "log_noise_variance": spectra,
                                   "noise_optics_groups": torch.tensor([1, 2])}}, path)  # fmt: skip
    with pytest.raises(CryoflexInputError, match=r"optics group\(s\) \[3\] were not in the particles") as refused:
        load_run(tmp_path / "run", device="cpu")
    assert "two_groups.star" in str(refused.value) and "rlnOpticsGroup" in str(refused.value)
    with pytest.raises(CryoflexInputError, match="the run learned a noise spectrum for each of those"):
        train(_config(tiny_dataset, particles=str(particles), epochs=2), tmp_path / "run", resume=True)


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path: Path) -> None:
    """Steps 6-10 were logged, then the run was killed and resumed from its checkpoint at step 5: TensorBoard shows
    each step once, the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cryoflex.run_dir import RunDir
    from cryoflex.train.logs import RunLogs

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    for resume_step, steps, value in ((None, range(1, 11), 1.0), (5, range(6, 9), 2.0)):
        logs = RunLogs(run, resume_step=resume_step)
        assert logs.tensorboard is not None
        for step in steps:
            logs.tensorboard.add_scalar("loss", value, step)
        logs.tensorboard.close()
    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    scalars = [(event.step, event.value) for event in events.Scalars("loss")]
    assert scalars == [*((step, 1.0) for step in range(1, 6)), *((step, 2.0) for step in range(6, 9))]
