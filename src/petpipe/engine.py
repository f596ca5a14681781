"""Training and evaluation loops (one code path for CPU, CUDA, MPS, fp32 and AMP) and checkpoints."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from petpipe.device import Runtime
from petpipe.errors import PetpipeError
from petpipe.model import layer_groups
from petpipe.schedule import OneCycle

ADAM_BETAS = (0.9, 0.99)  # fastai's Adam defaults; beta1 is overwritten by the one-cycle momentum
ADAM_EPS = 1e-5  # fastai's Adam eps


class DivergedError(PetpipeError):
    """The training loss became NaN or infinite: the learning rate is too high."""


def make_optimizer(model: nn.Sequential, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one parameter group per layer group (decoupled weight decay, as fastai's Adam)."""
    groups = [{"params": params, "lr": 0.0} for params in layer_groups(model)]
    return torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: OneCycle,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    desc: str = "train",
) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for images, targets in tqdm(loader, desc=desc, leave=False, mininterval=1.0):
        images = images.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        schedule.apply()
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(images), targets)
        if not math.isfinite(loss.item()):
            raise DivergedError(f"training loss became {loss.item()} at step {schedule.step_num}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        total += loss.item() * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, runtime: Runtime, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and targets for every item of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, mininterval=1.0):
        with runtime.autocast():
            out = model(images.to(runtime.device, non_blocking=True))
        logits.append(out.float().cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime) -> dict[str, float]:
    logits, targets = predict(model, loader, runtime, desc="valid")
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return {"valid_loss": nn.functional.cross_entropy(logits, targets).item(), "accuracy": accuracy, "error_rate": 1.0 - accuracy}


def fit_one_cycle(
    model: nn.Sequential,
    train_loader: DataLoader,
    valid_loader: DataLoader,
    *,
    epochs: int,
    lr_max: list[float],
    pct_start: float,
    weight_decay: float,
    runtime: Runtime,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> tuple[list[dict[str, float]], torch.optim.Optimizer]:
    """fastai's ``fit_one_cycle``: one cycle over all epochs; returns the per-epoch metrics."""
    model.to(runtime.device)
    optimizer = make_optimizer(model, weight_decay)
    schedule = OneCycle(optimizer, lr_max, total_steps=epochs * len(train_loader), pct_start=pct_start)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    history = []
    for epoch in range(epochs):
        train_loss = train_one_epoch(model, train_loader, optimizer, schedule, scaler, runtime, desc=f"epoch {epoch + 1}/{epochs}")
        row = {"epoch": epoch + 1, "train_loss": train_loss, **evaluate(model, valid_loader, runtime)}
        history.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if on_epoch_end:
            on_epoch_end(row)
    return history, optimizer


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: Path, model: nn.Module, *, meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    atomic_save(state, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Checkpoint dict (loaded on the CPU); the error names the file if it is missing or broken."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PetpipeError(f"checkpoint {path} does not exist: run the stage that writes it (dvc repro)") from None
    except Exception as err:
        raise PetpipeError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); re-run the stage that writes it") from None
