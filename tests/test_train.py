"""Training loop: checkpoints and exact resume, divergence, the CLI, and gradient averaging across processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cryoflex.cli import main as cli_main
from cryoflex.config import TrainConfig, load_config
from cryoflex.errors import CryoflexInputError
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
    straight = train(_config(tiny_dataset, epochs=3), tmp_path / "straight")
    train(_config(tiny_dataset, epochs=1), tmp_path / "stopped")
    resumed = train(_config(tiny_dataset, epochs=3), tmp_path / "stopped", resume=True)
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

    monkeypatch.setattr(objective, "correlation_loss", lambda predicted, observed: predicted.sum((1, 2)) * float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 2"):
        train(_config(tiny_dataset, epochs=2), tmp_path / "run", resume=True)
    after = load_checkpoint(find_checkpoint(tmp_path / "run"))
    assert after["epoch"] == 1
    _assert_same_state(before["model"], after["model"])


def test_cli_train_and_resume(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert "keeps its configuration" in capsys.readouterr().err


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("segmens: 4\n")
    with pytest.raises(CryoflexInputError, match="unknown setting"):
        load_config(path)
    with pytest.raises(CryoflexInputError, match="segments"):
        load_config(None, {"particles": "p.star", "structure": "s.pdb", "segments": 0})


def test_epoch_batches_shard_disjointly() -> None:
    ranks = [epoch_batches(10, 3, epoch=2, seed=0, rank=r, world_size=2) for r in range(2)]
    flat = [sorted(i for batch in shard for i in batch) for shard in ranks]
    assert len(flat[0]) == len(flat[1]) == 5 and not set(flat[0]) & set(flat[1])
    assert epoch_batches(10, 3, epoch=2, seed=0) == epoch_batches(10, 3, epoch=2, seed=0)
    assert epoch_batches(10, 3, epoch=2, seed=0) != epoch_batches(10, 3, epoch=3, seed=0)


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
