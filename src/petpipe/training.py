"""What the model stages (train_frozen, lr_find, finetune, report) share: runtime, data, restore, fit-and-record.

Kept out of ``stage.py`` so fetch and labels neither import torch nor depend on this file.
Functions take explicit values, never the whole config: the stage scripts are the only readers
of params (tests check their reads against dvc.yaml).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from petpipe.augment import AugmentParams
from petpipe.device import Runtime, make_runtime, seed_everything
from petpipe.distributed import destroy_process_group, init_process_group, is_main, rank, world_size
from petpipe.engine import fit_one_cycle, save_checkpoint
from petpipe.files import write_json, write_rows
from petpipe.model import count_trainable
from petpipe.normalization import from_meta
from petpipe.resume import ResumePoint, clear_state
from petpipe.tracking.runs import StageRun, stage_run


def prepare(*, device: str, precision: str, seed: int, backend: str = "auto") -> tuple[Runtime, torch.Generator]:
    """Device and precision (a bad choice fails here, before any work), the torchrun process group
    when there is one, then every seed (the same on every process: identical initial weights).

    Seeding comes before any model is built, so ``seed`` fixes the head's (and, with
    ``train.weights: none``, the body's) initial weights as well as the data order.
    """
    runtime = make_runtime(device, precision)
    init_process_group(backend, runtime.device)
    atexit.register(destroy_process_group)
    return runtime, seed_everything(seed)


def fit_and_record(
    stage: str, params: dict[str, Any], *, runtime: Runtime, model: nn.Sequential, meta: dict[str, Any], train_loader: DataLoader,
    valid_loader: DataLoader, epochs: int, lr_max: list[float], pct_start: float, weight_decay: float, checkpoint: Path, metrics: Path,
    plot: Path, extra_metrics: dict[str, float] | None = None, resume: ResumePoint | None = None, tracking: dict[str, Any] | None = None,
    on_recorded: Callable[[StageRun, dict[str, float]], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Body of train_frozen and finetune: one-cycle fit, checkpoint, metrics, curves, one MLflow run.

    With several torchrun processes every process trains; only rank 0 writes and logs.
    ``tracking``: keyword arguments of ``tracking.stage_run`` (lineage); ``on_recorded(run, final)``
    logs more once the outputs are written. The checkpoint itself stays in DVC: the run records its
    digest (``stage_run(outputs=...)``), never a copy.
    """
    print(f"{stage}: {runtime.describe()}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid images; "
          f"{count_trainable(model):,} trainable parameters; lr_max per layer group {['%.2e' % lr for lr in lr_max]}"
          + (f"; process {rank()} of {world_size()}" if world_size() > 1 else ""))  # fmt: skip
    if not is_main():  # another torchrun process: trains, writes and logs nothing
        history = _fit(model, train_loader, valid_loader, epochs, lr_max, pct_start, weight_decay, runtime, resume, None)
        if resume:
            clear_state(resume)
        return {k: v for k, v in history[-1].items() if k != "epoch"}
    with stage_run(stage, params, **(tracking or {})) as run:
        run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        normalization = from_meta(meta)
        run.log_params({f"{stage}.lr_max_groups": [float(f"{lr:.4g}") for lr in lr_max], f"{stage}.normalize": normalization.as_dict()})
        history = _fit(model, train_loader, valid_loader, epochs, lr_max, pct_start, weight_decay, runtime, resume, run)
        save_checkpoint(checkpoint, model, meta={**meta, "stage": stage, "epochs": epochs})
        extra_metrics = normalization.as_metrics() | (extra_metrics or {})  # the values used: recorded with the results
        final = {k: v for k, v in history[-1].items() if k != "epoch"} | extra_metrics
        write_json(metrics, final)
        write_rows(plot, history)
        # Outputs first, then logging: an outage from here on cannot cost the written outputs.
        run.log_metrics(extra_metrics)
        run.log_artifact(plot, "curves")
        if on_recorded:
            on_recorded(run, final)
    if resume:
        clear_state(resume)  # the outputs are complete: nothing left to resume
    return final


def _fit(
    model: nn.Sequential, train_loader: DataLoader, valid_loader: DataLoader, epochs: int, lr_max: list[float], pct_start: float,
    weight_decay: float, runtime: Runtime, resume: ResumePoint | None, run: StageRun | None,
) -> list[dict[str, float]]:  # fmt: skip
    """``fit_one_cycle``, its epochs logged to ``run`` when there is one (rank 0)."""
    history = fit_one_cycle(
        model, train_loader, valid_loader, epochs=epochs, lr_max=lr_max, pct_start=pct_start, weight_decay=weight_decay, runtime=runtime,
        on_epoch_end=run and (lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))),
        resume=resume, on_resume=run and (lambda epoch: run.set_tags({"petpipe.resumed_after_epoch": str(epoch)})),
    )  # fmt: skip
    return history


def augment_params(augment: AugmentParams | str) -> AugmentParams | None:
    """``train.augment`` (a validated section, or ``none``) -> the augmentation's argument (None: off)."""
    return None if augment == "none" else augment
