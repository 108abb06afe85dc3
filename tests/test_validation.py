"""Issue 10, training that does not overfit the noise: a fixed validation share, its loss every epoch, the best
checkpoint, early stopping and the cosine learning-rate schedule (with exact resume)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import cryoflex.train.loop as loop
from cryoflex.analysis.run import load_run
from cryoflex.cli import build_parser
from cryoflex.cli import main as cli_main
from cryoflex.config import TrainConfig, load_config
from cryoflex.errors import CryoflexInputError
from cryoflex.io.metadata import read_metadata
from cryoflex.run_dir import RunDir
from cryoflex.train.checkpoint import load_checkpoint
from cryoflex.train.distributed import training_batches
from cryoflex.train.loop import train
from cryoflex.train.setup import COSINE_FINAL_SHARE, validation_mask


def _config(dataset: Path, **changes: object) -> TrainConfig:
    values = dict(
        particles=str(dataset / "particles.star"), structure=str(dataset / "nominal.pdb"), segments=3, latent_dim=2,
        epochs=2, batch_size=16, sigma_A=4.0, encoder_hidden=[32], decoder_hidden=[32], progress=False, device="cpu",
        learning_rate=1e-3, neighbour_list_every_steps=2, validation_fraction=0.25,
    )  # fmt: skip
    values.update(changes)
    return load_config(None, values)


def _epoch_records(run: Path) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    return [line for line in lines if line["kind"] == "epoch"]


def test_validation_split_is_fixed_per_particle() -> None:
    """Same names, same split, whatever the order or subset; about the configured share; not Python's salted hash."""
    names = np.array([f"{k:06d}@stacks/particles_{k // 1000:03d}.mrcs" for k in range(4000)])
    mask = validation_mask(names, 0.05)
    assert 0.04 < mask.mean() < 0.06
    assert int(mask.sum()) == 214  # pinned: the same in every process and Python session
    order = np.random.default_rng(0).permutation(len(names))
    np.testing.assert_array_equal(validation_mask(names[order], 0.05), mask[order])
    subset = order[:300]
    np.testing.assert_array_equal(validation_mask(names[subset], 0.05), mask[subset])
    assert not validation_mask(names, 0.0).any()
    assert (validation_mask(names, 0.2) >= mask).all()  # a larger share only adds particles
    training = np.flatnonzero(~mask)
    for world_size in (1, 3):
        drawn = {i for rank in range(world_size) for batch in training_batches(training, 64, 5, 0, rank, world_size)
                 for i in batch}  # fmt: skip
        assert drawn == set(training.tolist())


def test_validation_particles_are_never_trained_on_and_their_loss_is_logged(
    tiny_adk_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    held_out = set(np.flatnonzero(validation_mask(read_metadata(tiny_adk_dataset / "particles.star").names, 0.25)))
    assert 0 < len(held_out) < 40
    trained: set[int] = set()
    original_step = loop.train_step

    def recording_step(engine, optimizer, losses, batch, *args):  # type: ignore[no-untyped-def]
        trained.update(batch.indices.tolist())
        return original_step(engine, optimizer, losses, batch, *args)

    monkeypatch.setattr(loop, "train_step", recording_step)
    with caplog.at_level(logging.INFO):
        train(_config(tiny_adk_dataset, epochs=2), tmp_path / "run")
    assert trained == set(range(40)) - held_out
    records = _epoch_records(tmp_path / "run")
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert {"val_total", "val_one_minus_correlation", "val_latent_kl", "learning_rate"} <= set(record)
        assert 0 < record["val_one_minus_correlation"] < 2
    assert caplog.text.count("val loss") == 2 and f"{40 - len(held_out)} particles train" in caplog.text


@pytest.mark.parametrize("likelihood", ["gaussian", "correlation"])
def test_best_checkpoint_is_the_epoch_of_the_best_validation_score(
    likelihood: str, tiny_adk_dataset: Path, tmp_path: Path
) -> None:
    """The highest held-out log evidence with the Gaussian likelihood; the lowest validation total with the original
    objective, which has no evidence."""
    run = RunDir(tmp_path / "run")
    train(_config(tiny_adk_dataset, epochs=3, learning_rate=1e-2, likelihood=likelihood), run.root)
    records = _epoch_records(run.root)
    if likelihood == "gaussian":
        scores = [-record["val_log_evidence"] for record in records]
    else:
        assert all("val_log_evidence" not in record for record in records)
        scores = [record["val_total"] for record in records]
    best = load_checkpoint(run.best_checkpoint)
    assert best["epoch"] == int(np.argmin(scores)) + 1
    twin = load_checkpoint(run.checkpoint(best["epoch"]))
    for name, value in best["model"].items():
        assert torch.equal(value, twin["model"][name]), name


def _scripted_validation(monkeypatch: pytest.MonkeyPatch, totals: list[float]) -> None:
    """Validation totals in this order, one per epoch (the rest of training runs as usual)."""
    values: Iterator[float] = iter(totals)
    monkeypatch.setattr(loop, "validation_terms", lambda *args: {"val_total": next(values)})


def test_early_stopping_stops_and_a_resume_says_so(
    tiny_adk_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    _scripted_validation(monkeypatch, [0.5, 0.3, 0.4, 0.35, 0.2, 0.1])
    run = RunDir(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        result = train(_config(tiny_adk_dataset, epochs=6, early_stopping_patience=2), run.root)
    assert result.stopped_early and result.epochs_done == 4
    assert "stopping early after epoch 4" in caplog.text
    assert load_checkpoint(run.best_checkpoint)["epoch"] == 2 and load_checkpoint(run.last_checkpoint)["epoch"] == 4
    assert not run.checkpoint(5).exists()
    capsys.readouterr()
    assert cli_main(["train", "--out", str(run.root), "--resume", "--no-progress"]) == 0
    assert "stopped early after epoch 4" in capsys.readouterr().out
    assert load_checkpoint(run.last_checkpoint)["epoch"] == 4
    # a larger patience continues the run: epoch 5 improves, epoch 6 too
    result = train(_config(tiny_adk_dataset, epochs=6, early_stopping_patience=3), run.root, resume=True)
    assert not result.stopped_early and result.epochs_done == 6


def test_load_run_takes_the_last_checkpoint_unless_told_otherwise(
    tiny_adk_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_validation(monkeypatch, [0.5, 0.3, 0.4])
    run = tmp_path / "run"
    train(_config(tiny_adk_dataset, epochs=3), run)
    assert load_run(run, device="cpu").epoch == 3
    assert load_run(run, checkpoint="best", device="cpu").epoch == 2
    assert load_run(run, checkpoint="last", device="cpu").epoch == 3
    assert load_run(run, epoch=1, device="cpu").epoch == 1
    plain = tmp_path / "plain"
    train(_config(tiny_adk_dataset, epochs=1, validation_fraction=0.0), plain)
    assert not RunDir(plain).best_checkpoint.exists()
    assert load_run(plain, device="cpu").epoch == 1
    with pytest.raises(CryoflexInputError, match="no best checkpoint"):
        load_run(plain, checkpoint="best", device="cpu")
    for command in (["analyze", "RUN"], ["eval", "RUN", "--truth", "t.npz"], ["reconstruct", "RUN"]):
        args = build_parser().parse_args([*command, "--checkpoint", "last"])
        assert args.checkpoint == "last" and args.epoch is None
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--checkpoint", "best", "--epoch", "2"])


def test_cosine_schedule_ends_at_a_tenth_and_resumes_exactly(tiny_adk_dataset: Path, tmp_path: Path) -> None:
    straight = train(_config(tiny_adk_dataset, epochs=3, lr_schedule="cosine"), tmp_path / "straight")
    state = load_checkpoint(RunDir(tmp_path / "straight").last_checkpoint)
    rates = [group["lr"] for group in state["optimizer"]["param_groups"]]
    assert COSINE_FINAL_SHARE == 0.1
    assert rates == pytest.approx([0.1 * 1e-3, 0.1 * 3e-3], rel=1e-12)
    first = _epoch_records(tmp_path / "straight")[0]["learning_rate"]
    assert 0.1 * 1e-3 < first < 1e-3
    # a 3-epoch run stopped after epoch 1 (the schedule spans the configured epochs), resumed
    stopped = RunDir(tmp_path / "stopped")
    stopped.checkpoints.mkdir(parents=True)
    shutil.copy(RunDir(tmp_path / "straight").config, stopped.config)
    shutil.copy(RunDir(tmp_path / "straight").checkpoint(1), stopped.last_checkpoint)
    resumed = train(_config(tiny_adk_dataset, epochs=3, lr_schedule="cosine"), stopped.root, resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def _rank_main(rank: int, port: int, config: TrainConfig, run_dir: Path, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    result = train(config, run_dir)
    (out / f"{rank}.json").write_text(json.dumps([result.epochs_done, result.stopped_early]))


def test_two_processes_validate_on_rank_0_and_stop_together(tiny_adk_dataset: Path, tmp_path: Path) -> None:
    """gloo DDP: rank 0 validates and decides on early stopping; every rank ends after the same epoch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(tiny_adk_dataset, epochs=3, cache=False, early_stopping_patience=1, learning_rate=0.05)
    mp.spawn(_rank_main, args=(port, config, tmp_path / "run", tmp_path), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2))
    assert rank0 == rank1
    records = _epoch_records(tmp_path / "run")
    assert len(records) == rank0[0] and all("val_total" in record for record in records)


def test_epoch_line_shows_the_validation_loss() -> None:
    from cryoflex.train.logs import format_validation

    values = {"total": 1.0, "val_one_minus_correlation": 0.7390, "val_latent_kl": 0.2, "val_total": 0.7412}
    assert format_validation(values, best=True) == ", val loss 0.7412 val 1-corr 0.7390 (best)"
    assert format_validation({"total": 1.0}, best=False) == ""


def _numpy_log_likelihood(model, coords_A: torch.Tensor, batch, row: int) -> float:  # type: ignore[no-untyped-def]
    """log p(image | structure) in numpy: the model's image scale, a least-squares offset, its noise variance."""
    with torch.no_grad():
        image = model.render(coords_A, batch.poses[[row]], batch.ctf[[row]])[0].double().numpy().ravel()
    observed = batch.images[row].double().numpy().ravel()
    target = observed - float(model.log_image_scale.detach().exp()) * image
    (offset,), *_ = np.linalg.lstsq(np.ones((target.size, 1)), target, rcond=None)
    variance = float(model.log_noise_variance.detach().exp())
    return -(np.square(target - offset).sum() / (2 * variance) + 0.5 * observed.size * np.log(variance))


def test_held_out_log_evidence_is_the_mean_likelihood_of_prior_draws(data_dir: Path, tiny_adk_dataset: Path) -> None:
    """prior_log_evidence against numpy: log (1/K) sum_k p(image | z_k) over the prior's draws, each image with its own
    draws (drawn pass by pass, image-major); and, for a decoder that ignores z, exactly log p(image | that
    structure)."""
    from scipy.special import logsumexp

    from cryoflex.data.dataset import ParticleDataset
    from cryoflex.io.structure import read_structure
    from cryoflex.train.objective import EVIDENCE_DRAWS, EVIDENCE_DRAWS_PER_PASS, prior_log_evidence
    from cryoflex.train.setup import build_model

    dataset = ParticleDataset(read_metadata(tiny_adk_dataset / "particles.star"))
    batch = dataset.__getitems__([3, 11])
    torch.manual_seed(1)
    config = load_config(None, dict(particles="unused.star", structure=str(data_dir / "adk_open.pdb"), segments=2,
                                    latent_dim=2, encoder_hidden=[8], decoder_hidden=[8],
                                    noise_model="white"))  # fmt: skip
    model = build_model(config, read_structure(tiny_adk_dataset / "nominal.pdb"), 32, 4.0).eval()
    with torch.no_grad():
        model.log_noise_variance.fill_(0.3)
        model.log_image_scale.fill_(-0.4)
        torch.nn.init.normal_(model.decoder.net[-1].weight, std=0.3)
    evidence = prior_log_evidence(model, batch, torch.Generator().manual_seed(7)).numpy()
    generator = torch.Generator().manual_seed(7)
    per_draw = np.empty((2, EVIDENCE_DRAWS))
    for start in range(0, EVIDENCE_DRAWS, EVIDENCE_DRAWS_PER_PASS):
        latent = torch.randn(2, EVIDENCE_DRAWS_PER_PASS, 2, generator=generator)
        for row in range(2):
            for k in range(EVIDENCE_DRAWS_PER_PASS):
                with torch.no_grad():
                    coords_A, _ = model.decode(latent[row, k][None], sample_segmentation=False)
                per_draw[row, start + k] = _numpy_log_likelihood(model, coords_A, batch, row)
    np.testing.assert_allclose(evidence, logsumexp(per_draw, axis=1) - np.log(EVIDENCE_DRAWS), rtol=1e-5, atol=1e-3)

    with torch.no_grad():  # a decoder that ignores z: every draw gives the nominal structure (the output bias is 0)
        model.decoder.net[-1].weight.zero_()
        model.decoder.net[-1].bias.zero_()
    evidence = prior_log_evidence(model, batch, torch.Generator().manual_seed(7)).numpy()
    nominal = model.nominal_coords_A[None]
    expected = [_numpy_log_likelihood(model, nominal, batch, row) for row in range(2)]
    np.testing.assert_allclose(evidence, expected, rtol=1e-5, atol=1e-3)


def test_each_rank_and_epoch_draws_its_own_random_numbers() -> None:
    """Ranks train on different images and must not share their latent draws and dropout masks; an epoch's draws
    depend on (seed, epoch, rank) alone, so a resumed run draws what an uninterrupted one would."""
    from cryoflex.train.distributed import seed_epoch

    def draws(seed: int, epoch: int, rank: int) -> torch.Tensor:
        seed_epoch(seed, epoch, rank)
        return torch.randn(4)

    first = draws(0, 3, 0)
    torch.randn(100)  # whatever was drawn before
    assert torch.equal(draws(0, 3, 0), first)
    for other in ((0, 3, 1), (0, 4, 0), (1, 3, 0)):
        assert not torch.equal(draws(*other), first)
