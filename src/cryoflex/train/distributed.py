"""One process or many (torchrun): who this process is, its device, and its share of every epoch's batches.

Launch several processes with torchrun (one per GPU, or several gloo processes on a CPU); torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK. Every rank draws the same epoch permutation and takes every world_size-th particle, so
shards are disjoint and equally long (the last few particles are repeated to make them so). Only the training
particles are drawn (training_batches); the validation share is never in a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cryoflex.config import is_device_name
from cryoflex.errors import CryoflexInputError


@dataclass(frozen=True)
class ProcessContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the local GPU when there is one, else the CPU; 'cuda' -> this process's GPU."""
    if not is_device_name(requested):
        raise CryoflexInputError(
            None, f"unknown --device {requested!r}", "use auto, cpu, cuda or cuda:N", field="device"
        )
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise CryoflexInputError(
                None, f"--device {requested} was asked for, but no CUDA device is visible to torch "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                f"CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)})",
                "use --device cpu (or auto); for a GPU, check nvidia-smi, CUDA_VISIBLE_DEVICES and that torch was "
                "installed with CUDA support", field="device",
            )  # fmt: skip
        return torch.device(requested if ":" in requested else f"cuda:{local_rank}")
    return torch.device(requested)


def start_processes(requested_device: str) -> ProcessContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and requested_device.startswith("cuda:"):
        raise CryoflexInputError(
            None, f"--device {requested_device} under torchrun would put all {world_size} processes on one GPU",
            "give --device cuda (or auto): each process takes the GPU of its LOCAL_RANK; choose the GPUs with "
            "CUDA_VISIBLE_DEVICES", field="device",
        )  # fmt: skip
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return ProcessContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessContext(dist.get_rank(), dist.get_world_size(), device)


def stop_processes(context: ProcessContext, *, finished: bool) -> None:
    """Leave the process group. After a finished run every rank first waits for the others: a rank that closes its
    connections while another still completes the last collective can make that one abort (gloo: connection closed by
    peer). After an error there is no waiting, since the other ranks may never get there.

    With DDP the backend outlives this (the reducer keeps it), so its worker threads run until the interpreter exits:
    no collective may hand them a tensor that Python also holds (loop._rank0_decides uses the store for that)."""
    if context.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's generators (the CPU's and every GPU's) for this rank's `epoch`: each rank draws its own latents,
    segmentations and dropout masks for its own images, and a resumed run draws what an uninterrupted one would."""
    torch.manual_seed((seed * 1_000_003 + epoch) * 65_537 + rank)


def epoch_batches(
    n_images: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's batches of particle indices for `epoch`: a seeded permutation, sharded, cut into batches.

    The permutation is repeated to a multiple of world_size, so every rank gets as many images, and as many batches,
    as every other (the ranks' gradient averages must pair up), even with fewer images than ranks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_images, generator=generator)
    per_rank = -(-n_images // world_size)
    order = order.repeat(-(-per_rank * world_size // max(n_images, 1)))[: per_rank * world_size]
    mine = order[rank::world_size].tolist()
    return [mine[k : k + batch_size] for k in range(0, len(mine), batch_size)]


def training_batches(
    indices: np.ndarray, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """epoch_batches over the training particles `indices` (dataset indices): validation particles never appear."""
    batches = epoch_batches(len(indices), batch_size, epoch, seed, rank, world_size)
    return [[int(indices[k]) for k in batch] for batch in batches]
