"""Several training processes (DistributedDataParallel) through PyTorch's own launcher, torchrun.

A training stage whose ``distributed.nproc_per_node * distributed.nnodes`` is above 1 re-runs its
own command under ``torchrun`` (``petpipe.run.torchrun``; so ``dvc exp run -S distributed.nproc_per_node=8``
uses 8 GPUs); each process then sees torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. ``train.batch_size``
stays the global batch: each process takes ``batch_size / world_size`` images per step, so the
learning rates mean the same as with one process. Only rank 0 writes outputs and logs to MLflow.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from petpipe.run.errors import PetpipeError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the process that writes outputs and logs."""
    return rank() == 0


def init_process_group(backend: str, device: torch.device) -> None:
    """Join the torchrun group (no-op for a single process); ``auto`` = nccl on CUDA, gloo otherwise."""
    if world_size() == 1 or dist.is_initialized():
        return
    chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and device.type != "cuda":
        raise PetpipeError(f"distributed.backend: 'nccl' needs CUDA devices, not {device.type}; use gloo or auto")
    dist.init_process_group(chosen)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over every process (the value itself for one process)."""
    if world_size() == 1 or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.item() / world_size()


def shard_batch_size(batch_size: int, world: int | None = None) -> int:
    """Images per process and step: the global ``train.batch_size`` split evenly over ``world`` (torchrun's)."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise PetpipeError(
            f"train.batch_size: {batch_size} does not split evenly over {world} processes; use a multiple of {world}"
        )
    return batch_size // world


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
