"""Several training processes (DistributedDataParallel) through PyTorch's own launcher, torchrun.

A training stage whose ``distributed.nproc_per_node * distributed.nnodes`` is above 1 re-runs its
own command under ``torchrun`` (so ``dvc exp run -S distributed.nproc_per_node=8`` uses 8 GPUs);
each process then sees torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. ``train.batch_size``
stays the global batch: each process takes ``batch_size / world_size`` images per step, so the
learning rates mean the same as with one process. Only rank 0 writes outputs and logs to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from petpipe.errors import PetpipeError

RDZV_ENV = "PETPIPE_RDZV_ENDPOINT"  # host:port of the rendezvous, needed with nnodes > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0: the process that writes outputs and logs."""
    return rank() == 0


def torchrun_command(script: str | Path, argv: list[str], *, nproc_per_node: int, nnodes: int) -> list[str]:
    """``python -m torch.distributed.run ... script argv`` (torchrun, with the same interpreter)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint:
            raise PetpipeError(f"distributed.nnodes: {nnodes} machines need {RDZV_ENV}=host:port (torchrun's rendezvous) set on each of them")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={os.environ.get('DVC_EXP_NAME', 'petpipe')}"]
    return [*command, str(script), *argv]


def relaunch_under_torchrun(script: str | Path, argv: list[str], *, nproc_per_node: int, nnodes: int) -> int | None:
    """Run this stage again as ``nproc_per_node`` processes and wait for them; None when one process will do
    (a single process, or this already is a torchrun worker)."""
    if nproc_per_node * nnodes == 1 or under_torchrun():
        return None
    command = torchrun_command(script, argv, nproc_per_node=nproc_per_node, nnodes=nnodes)
    print(f"distributed: {nproc_per_node} process(es) per node on {nnodes} node(s): {' '.join(command[1:5])} ...", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        print(f"error: the torchrun workers failed (exit code {code}); their messages are above", file=sys.stderr)
    return code if code >= 0 else 128 - code


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


def shard_batch_size(batch_size: int) -> int:
    """Images per process and step: the global ``train.batch_size`` split evenly."""
    world = world_size()
    if batch_size % world:
        raise PetpipeError(f"train.batch_size: {batch_size} does not split evenly over {world} processes; use a multiple of {world}")
    return batch_size // world


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
