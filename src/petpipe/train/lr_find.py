"""LR range test (Smith 2015, as fastai's ``lr_find``) and LR suggestions.

The LR grows exponentially from ``start_lr`` to ``end_lr`` over ``num_it`` mini-batches; the loss
is smoothed with an exponential moving average (beta 0.98, debiased) and the test stops once the
smoothed loss exceeds 4x its best value (diverged) or becomes NaN.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from petpipe.compute.device import Runtime
from petpipe.run.files import write_bytes, write_json, write_rows
from petpipe.train.engine import make_optimizer, train_step
from petpipe.train.lr_choice import auto_max_lr
from petpipe.train.lr_plot import lr_find_figure
from petpipe.train.schedule import exp_lr
from petpipe.train.tracker import Tracker

SMOOTH_BETA = 0.98  # fastai Recorder: exponential moving average of the loss
DIVERGE_FACTOR = 4.0  # fastai LRFinder: stop when smooth loss > 4 x best
SKIP_START_DIVISOR = 10  # fastai lr_find: suggestions ignore the first num_it // 10 points ...
SKIP_END = 5  # ... and the last 5


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
    """Train with a growing LR (same for all layers) and record the loss.

    ``model``'s weights (and norm statistics) are restored afterwards, as fastai's ``lr_find`` does.
    """
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        return _range_test(
            model, loader, runtime, start_lr=start_lr, end_lr=end_lr, num_it=num_it, weight_decay=weight_decay
        )
    finally:
        model.load_state_dict(initial)


def _range_test(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    *,
    start_lr: float,
    end_lr: float,
    num_it: int,
    weight_decay: float,
) -> dict[str, list[float]]:
    model.to(runtime.device, memory_format=runtime.memory_format).train()
    optimizer = make_optimizer(model, weight_decay, [list(model.parameters())])  # one LR for all layers
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    recorder = LossRecorder(warmup=num_it // SKIP_START_DIVISOR)
    lrs = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # cycle through epochs if needed
    for i, (images, targets) in zip(tqdm(range(num_it), desc="lr_find", mininterval=1.0), batches):
        lr = exp_lr(i / num_it, start_lr, end_lr)  # fastai: position train_iter / num_it
        for group in optimizer.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        if recorder.add(train_step(model, images, targets, optimizer, scaler, runtime).item()):
            break
    return {"lr": lrs, "loss": recorder.smooth, "raw_loss": recorder.raw}


class LossRecorder:
    """Exponential moving average of the loss (debiased) and the divergence test.

    Unlike fastai, the divergence test (and the best loss it compares with) starts only after
    ``warmup`` points: the first few smoothed values rest on one or two mini-batches, and on small
    data their noise alone can exceed the 4x threshold. Those points are ignored by the
    suggestions anyway (``num_it // 10``).
    """

    def __init__(self, warmup: int = 0) -> None:
        self.warmup = warmup
        self.raw: list[float] = []
        self.smooth: list[float] = []
        self.average, self.best = 0.0, math.inf

    def add(self, loss: float) -> bool:
        """Record one loss; True when the test should stop (NaN, or smooth loss > 4x best)."""
        self.average = SMOOTH_BETA * self.average + (1 - SMOOTH_BETA) * loss
        smoothed = self.average / (1 - SMOOTH_BETA ** (len(self.raw) + 1))
        self.raw.append(loss)
        self.smooth.append(smoothed)
        if not math.isfinite(smoothed):
            return True
        if len(self.raw) <= self.warmup:
            return False
        self.best = min(self.best, smoothed)
        return smoothed > DIVERGE_FACTOR * self.best


def trimmed(lrs: list[float], losses: list[float], num_it: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the noisy start (num_it // 10 points) and the diverging end, as fastai does.

    fastai keeps training through a NaN (NaN is never > 4x the best loss) to ``num_it``, drops the
    last 5 points, then cuts at the first NaN. A smoothed NaN stays NaN, so we stop at the first
    one and cut at min(first NaN, num_it - 5): the same points, without the wasted iterations.
    A test stopped by the 4x rule (or run to the end) drops its last 5 points.
    """
    start = num_it // SKIP_START_DIVISOR
    losses_array = np.asarray(losses, float)
    non_finite = np.flatnonzero(~np.isfinite(losses_array))
    end = min(int(non_finite[0]), num_it - SKIP_END) if len(non_finite) else len(lrs) - SKIP_END
    return np.asarray(lrs[start:end], float), losses_array[start:end]


def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """One tenth of the LR with the lowest loss."""
    return float(lrs[int(np.argmin(losses))] / 10)


def suggest_steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The LR where the loss falls fastest per unit of log-LR (forward differences, as fastai)."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])


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
    # A stretch starting at index 0 gives span_start -1 (fastai's formula, kept). When the stretch is
    # also shorter than 3 points the index is -1, and fastai returns the LAST (largest, diverging)
    # LR; we return the first instead: a valley cannot lie beyond the stretch it describes.
    return float(lrs[max(0, span_start + int(third) + int(third / 2))])


SUGGESTIONS = ("valley", "minimum", "steep")
MIN_POINTS = 3  # fewer points left after trimming give no slope to read


def suggest(curve: dict[str, list[float]], num_it: int) -> tuple[dict[str, float | None], str | None]:
    """fastai's three suggestions, and a warning instead of them when the curve is too short to read.

    A short curve is not an error here: explicit ``finetune.max_lr`` needs no suggestion, so only
    choose_lr (with ``max_lr: auto``) refuses null suggestions.
    """
    lrs, losses = trimmed(curve["lr"], curve["loss"], num_it)
    if len(lrs) < MIN_POINTS:
        warning = (
            f"lr_find: only {len(curve['lr'])} points before the loss diverged, too few to suggest an LR; lower "
            "lr_find.start_lr "
            "or raise lr_find.num_it, or give finetune.max_lr explicitly"
        )
        return dict.fromkeys(SUGGESTIONS), warning
    return {
        "valley": suggest_valley(lrs, losses),
        "minimum": suggest_minimum(lrs, losses),
        "steep": suggest_steep(lrs, losses),
    }, None


def lr_find_summary(curve: dict[str, list[float]], num_it: int) -> dict[str, float | str | None]:
    """lr_find's result file: the suggestions (null when there are none), [lo, hi] for ``max_lr: auto``,
    the number of points, and the warning (null when the curve could be read)."""
    suggestions, warning = suggest(curve, num_it)
    lo, hi = auto_max_lr(suggestions) if warning is None else (None, None)
    return {
        **suggestions,
        "auto_max_lr_lo": lo,
        "auto_max_lr_hi": hi,
        "iterations": len(curve["lr"]),
        "warning": warning,
    }


def record_lr_find(
    run: Tracker,
    curve: dict[str, list[float]],
    summary: dict[str, float | str | None],
    *,
    result: Path,
    plot: Path,
    figure: Path,
) -> None:
    """lr_find's outputs (the result JSON, the curve CSV, the figure), then the same on ``run``; the warning, if
    any, also on stderr."""
    suggestions = {k: summary[k] for k in SUGGESTIONS if summary[k] is not None}
    write_json(result, summary)
    write_rows(plot, [{"lr": lr, "loss": loss} for lr, loss in zip(curve["lr"], curve["loss"])])
    write_bytes(figure, lr_find_figure(curve["lr"], curve["loss"], suggestions))
    run.log_series({"lr_find_loss": curve["loss"], "lr_find_lr": curve["lr"]})  # batched: one request per 1,000 points
    run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    if summary["warning"]:
        run.set_tags({"petpipe.lr_find_warning": summary["warning"]})
        print(f"warning: {summary['warning']}", file=sys.stderr)
    run.log_artifact(figure, "lr_find")
    print(f"lr_find: {len(curve['lr'])} iterations; suggestions {suggestions or 'none'}")
