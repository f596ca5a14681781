"""LR range test (Smith 2015, as fastai's ``lr_find``) and LR suggestions.

The LR grows exponentially from ``start_lr`` to ``end_lr`` over ``num_it`` mini-batches; the loss
is smoothed with an exponential moving average (beta 0.98, debiased) and the test stops once the
smoothed loss exceeds 4x its best value (diverged) or becomes NaN.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from petpipe.device import Runtime
from petpipe.errors import PetpipeError
from petpipe.engine import ADAM_BETAS, ADAM_EPS
from petpipe.schedule import exp_lr

SMOOTH_BETA = 0.98  # fastai Recorder: exponential moving average of the loss
DIVERGE_FACTOR = 4.0  # fastai LRFinder: stop when smooth loss > 4 x best
SKIP_START_FRACTION = 0.1  # fastai lr_find: suggestions ignore the first num_it // 10 points ...
SKIP_END = 5  # ... and the last 5
AUTO_LR_MULT = 100  # fastai fine_tune: slice(base_lr / lr_mult, base_lr), lr_mult=100


def lr_range_test(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    *,
    start_lr: float,
    end_lr: float,
    num_it: int,
    weight_decay: float,
) -> dict[str, list[float]]:
    """Train with a growing LR (same for all layers) and record the loss; modifies ``model``'s weights."""
    model.to(runtime.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=start_lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    lrs, raw, smooth = [], [], []
    average, best = 0.0, math.inf
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # cycle through epochs if needed
    for i, (images, targets) in zip(tqdm(range(num_it), desc="lr_find", mininterval=1.0), batches):
        lr = exp_lr(i / (num_it - 1), start_lr, end_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(images.to(runtime.device)), targets.to(runtime.device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = loss.item()
        average = SMOOTH_BETA * average + (1 - SMOOTH_BETA) * value
        smoothed = average / (1 - SMOOTH_BETA ** (i + 1))
        lrs.append(lr)
        raw.append(value)
        smooth.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGE_FACTOR * best:
            break
    return {"lr": lrs, "loss": smooth, "raw_loss": raw}


def trimmed(lrs: list[float], losses: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Drop the noisy start and the diverging end, as fastai does before suggesting."""
    start = int(len(lrs) * SKIP_START_FRACTION)
    end = max(len(lrs) - SKIP_END, start + 2)
    lr, loss = np.asarray(lrs[start:end], float), np.asarray(losses[start:end], float)
    keep = np.isfinite(loss)
    return lr[keep], loss[keep]


def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """One tenth of the LR with the lowest loss."""
    return float(lrs[int(np.argmin(losses))] / 10)


def suggest_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR where the loss falls fastest per unit of log-LR."""
    return float(lrs[int(np.argmin(np.gradient(losses, np.log(lrs))))])


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's default: half-way (a third plus a sixth) along the longest decreasing stretch.

    The stretch is the longest strictly decreasing subsequence of the losses; its span runs from
    ``end - length`` to ``end``.
    """
    n = len(losses)
    length = [1] * n
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j]:
                length[i] = max(length[i], length[j] + 1)
        if length[i] > length[best_end]:
            best_end = i
    span_start = best_end - length[best_end]
    third = (best_end - span_start) / 3
    return float(lrs[max(0, span_start + int(third) + int(third / 2))])


def suggest(curve: dict[str, list[float]]) -> dict[str, float]:
    lrs, losses = trimmed(curve["lr"], curve["loss"])
    if len(lrs) < 3:
        raise PetpipeError(f"lr_find: only {len(curve['lr'])} points before the loss diverged; lower lr_find.start_lr or raise lr_find.num_it")
    return {"valley": suggest_valley(lrs, losses), "minimum": suggest_minimum(lrs, losses), "steep": suggest_steep(lrs, losses)}


def auto_max_lr(suggestions: dict[str, float]) -> tuple[float, float]:
    """``finetune.max_lr: auto`` -> [valley / 100, valley] (fastai fine_tune's lr_mult=100)."""
    hi = suggestions["valley"]
    return hi / AUTO_LR_MULT, hi
