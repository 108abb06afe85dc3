"""The training step on another device than the CPU: every tensor it makes must follow the model there.

No GPU runs these tests, so the model is moved to PyTorch's meta device instead: its tensors have shapes but no data,
and an operation that mixes them with CPU tensors fails, as it would on CUDA. A tensor made without the model's device
(a torch.arange or a from_numpy left on the CPU) then fails here, not on a user's first GPU run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import cryoflex.model.deformation as deformation
from cryoflex.config import load_config
from cryoflex.data.dataset import particle_loader
from cryoflex.errors import CryoflexInputError
from cryoflex.model.cryosphere import CryoSphere
from cryoflex.train.objective import LossTerms
from cryoflex.train.setup import prepare_inputs, prepare_model

META = torch.device("meta")


def _whole_chain_bands(assignment: torch.Tensor, *, dense: bool = False) -> list[deformation.Band]:
    """Every segment's band the whole chain: the banded path's own code, without reading the assignment's values
    (which meta tensors do not have)."""
    n, n_segments = assignment.shape
    return [(m, 0, n) for m in range(n_segments)]


@pytest.mark.parametrize(("objective", "layered"), [("default", True), ("original", True), ("default", False)])
def test_a_training_step_keeps_every_tensor_on_the_models_device(
    objective: str, layered: bool, tiny_adk_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward and backward in training, and the validation forward, on the meta device: the default objective and
    the original's, the rotations applied in layers (small structures) and segment by segment (large ones)."""
    values: dict[str, object] = dict(
        particles=str(tiny_adk_dataset / "particles.star"), structure=str(tiny_adk_dataset / "nominal.pdb"),
        segments=4, latent_dim=2, batch_size=8, encoder_hidden=[32], decoder_hidden=[32], progress=False,
    )  # fmt: skip
    if objective == "original":
        values.update(likelihood="correlation", importance_samples=1, rendering="point")
    config = load_config(None, values)
    inputs = prepare_inputs(config, tmp_path / "run", progress=False)
    model = prepare_model(config, inputs, torch.device("cpu"))
    losses = LossTerms(config, model, inputs.structure.chain_ids, len(inputs.dataset))
    batch = next(iter(particle_loader(inputs.dataset, [list(range(config.batch_size))])))
    with torch.no_grad():  # a clash list with pairs in it, built from real structures on the CPU
        losses.neighbours.update(model(batch, 1).coords_A)
    assert len(losses.neighbours.pairs) > 0

    monkeypatch.setattr(deformation, "assignment_bands", _whole_chain_bands)
    if not layered:
        monkeypatch.setattr(deformation, "LAYERED_MAX_POINTS", 0)
    # autocast has no meta device; the networks' precision is not what this test is about
    monkeypatch.setattr(CryoSphere, "_network_precision", lambda self, device: contextlib.nullcontext())
    model = model.to(META)
    losses.pairs, losses.reference_A = losses.pairs.to(META), losses.reference_A.to(META)
    losses.neighbours.pairs = losses.neighbours.pairs.to(META)
    batch = batch.to(META)

    model.train()
    terms = losses(model(batch, config.importance_samples), batch.images, 1.0, False)
    assert {term.device for term in terms.values()} == {META}
    terms["total"].backward()
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    assert len(gradients) >= len(list(model.parameters())) // 2
    assert {gradient.device for gradient in gradients} == {META}

    model.eval()  # validation: the posterior means, nothing sampled
    with torch.no_grad():
        terms = losses(model(batch), batch.images, 1.0, False)
    assert {term.device for term in terms.values()} == {META}


def test_an_explicit_gpu_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:1 with several processes would put them all on GPU 1; the error says to give cuda."""
    from cryoflex.train.distributed import start_processes

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(CryoflexInputError, match="all 2 processes on one GPU") as refused:
        start_processes("cuda:1")
    assert "--device cuda" in str(refused.value)


def test_an_unknown_device_name_is_a_clear_error() -> None:
    from cryoflex.train.distributed import resolve_device

    for name in ("gpu", "cuda:x", "CPU"):
        with pytest.raises(CryoflexInputError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    assert resolve_device("cpu").type == "cpu"
