"""Device and precision choice: the only module that decides where and how tensors compute."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from petpipe.compute.distributed import local_rank, world_size
from petpipe.run.errors import PetpipeError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32, otherwise the autocast dtype

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        # bf16 has fp32's exponent range; only fp16 gradients underflow without loss scaling.
        return self.amp_dtype == torch.float16

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches make host-to-GPU copies asynchronous; only CUDA uses them."""
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last on CUDA: tensor cores read NHWC convolutions without transposes."""
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return f"{self.device} ({name}), precision {self.precision}"


def pick_device(requested: str) -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then CPU; an explicit choice must be available."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available[requested]:  # ``requested`` is one of config's values: auto, cuda, mps, cpu
        usable = ", ".join(n for n, ok in available.items() if ok)
        raise PetpipeError(f"device: {requested!r} was requested but is not available here; usable: auto, {usable}")
    return torch.device(requested)


def pick_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """``auto`` = bf16 autocast on CUDA GPUs that support it, fp16 on older ones, fp32 elsewhere."""
    if requested == "auto":
        if device.type != "cuda":
            return None
        # Emulated bf16 (pre-Ampere GPUs) is slow: those get fp16 with loss scaling instead.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if requested == "fp32":
        return None
    if requested == "fp16" and device.type not in ("cuda", "mps"):
        raise PetpipeError(f"precision: 'fp16' needs a cuda or mps device, not {device.type}; use fp32, bf16 or auto")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[requested]


def make_runtime(device: str, precision: str) -> Runtime:
    chosen = pick_device(device)
    if chosen.type == "cuda" and world_size() > 1:
        chosen = torch.device("cuda", local_rank())  # one GPU per torchrun process
        torch.cuda.set_device(chosen)
    if chosen.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    return Runtime(chosen, pick_precision(precision, chosen))


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for DataLoader shuffling.

    The shuffling generator gets its own seed derived from ``seed``: seeded identically to the
    global generator, the shuffle order and the augmentation/dropout draws come out correlated,
    and training measurably degrades (train loss collapsing, then climbing back).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(loader_seed(seed))


def loader_seed(seed: int) -> int:
    """A seed for the DataLoader stream, derived from but independent of ``seed``."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0] >> 1)
