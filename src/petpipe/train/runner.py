"""What the model stages (train_frozen, lr_find, finetune, report) share: runtime, data, restore, fit-and-record.

Kept out of ``run.stage`` so fetch and labels neither import torch nor depend on this file.
Functions take explicit values, never the whole config: the stage scripts are the only readers
of params (tests check their reads against dvc.yaml).
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from petpipe.compute.device import Runtime, make_runtime, seed_everything
from petpipe.compute.distributed import destroy_process_group, init_process_group, is_main, rank, world_size
from petpipe.data.augment import AugmentParams
from petpipe.data.loaders import DeviceLoader, make_loaders
from petpipe.data.normalization import Normalization, from_meta
from petpipe.run.clock import phase
from petpipe.run.files import write_json, write_rows
from petpipe.run.sections import TrainConfig
from petpipe.train.engine import fit_one_cycle, restore, save_checkpoint
from petpipe.train.model import count_trainable, unfreeze
from petpipe.train.resume import ResumePoint, clear_state
from petpipe.train.tracker import Tracker


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


def loaders(
    train: TrainConfig, presized: Path, runtime: Runtime, generator: torch.Generator, normalization: Normalization
) -> tuple[DeviceLoader, DeviceLoader]:
    """The training and validation loaders of the model stages: the one place ``train.*`` becomes their arguments."""
    return make_loaders(
        presized,
        runtime,
        size=train.size,
        batch_size=train.batch_size,
        num_workers=train.num_workers,
        augment=augment_params(train.augment),
        generator=generator,
        normalization=normalization,
        store_on_device=train.store_on_device,
    )


def store_metrics(loader: object) -> dict[str, float]:
    """The device store's copy time and device bytes, when ``loader`` gathers from one (else nothing)."""
    names = ("store_copy_seconds", "store_device_bytes")
    return {name: float(getattr(loader, name)) for name in names if hasattr(loader, name)}


def restore_unfrozen(checkpoint: Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """The stage-1 model with every layer trainable, and its checkpoint's metadata (lr_find, finetune); built with
    its random initialisation first, so the stages' random streams (dropout) stay those of earlier runs."""
    model, meta = restore(checkpoint, initialise=True)
    unfreeze(model)
    return model, meta


def fit_and_record(
    run: Tracker,
    *,
    stage: str,
    runtime: Runtime,
    model: nn.Sequential,
    meta: dict[str, Any],
    train_loader: DataLoader,
    valid_loader: DataLoader,
    epochs: int,
    lr_max: list[float],
    pct_start: float,
    weight_decay: float,
    checkpoint: Path,
    metrics: Path,
    plot: Path,
    extra_metrics: dict[str, float] | None = None,
    resume: ResumePoint | None = None,
    compile: bool = False,
) -> dict[str, float]:
    """Body of train_frozen and finetune: one-cycle fit, then checkpoint, metrics and curves, logged to ``run``.

    With several torchrun processes every process trains; only rank 0 writes (its ``run`` logs; the
    others' do nothing). The checkpoint itself stays in DVC: the run records its digest
    (``stage_run(outputs=...)``), never a copy. Returns the final metrics.
    """
    print(
        f"{stage}: {runtime.describe()}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid images; "
        f"{count_trainable(model):,} trainable parameters; lr_max per layer group {[f'{lr:.2e}' for lr in lr_max]}"
        + (f"; process {rank()} of {world_size()}" if world_size() > 1 else "")
    )
    normalization = from_meta(meta)
    run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
    run.log_params(
        {f"{stage}.lr_max_groups": [float(f"{lr:.4g}") for lr in lr_max], f"{stage}.normalize": normalization.as_dict()}
    )
    timings: dict[str, float] = {}
    history = fit_one_cycle(
        model,
        train_loader,
        valid_loader,
        epochs=epochs,
        lr_max=lr_max,
        pct_start=pct_start,
        weight_decay=weight_decay,
        runtime=runtime,
        on_epoch_end=lambda row: run.log_metrics(
            {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
        ),
        resume=resume,
        on_resume=lambda epoch: run.set_tags({"petpipe.resumed_after_epoch": str(epoch)}),
        compile=compile,
        on_compiled=lambda seconds: timings.update(compile_seconds=seconds),
    )
    # The values used, recorded with the results; the compile time and the device store's copy apart from the
    # epochs' throughput.
    extra_metrics = normalization.as_metrics() | timings | store_metrics(train_loader) | (extra_metrics or {})
    final = {k: v for k, v in history[-1].items() if k != "epoch"} | extra_metrics
    with phase("checkpoint"):
        if is_main():
            save_checkpoint(checkpoint, model, meta={**meta, "stage": stage, "epochs": epochs})
            write_json(metrics, final)
            write_rows(plot, history)
    # Outputs first, then logging: an outage from here on cannot cost the written outputs.
    with phase("logging"):
        run.log_metrics(extra_metrics)
        run.log_artifact(plot, "curves")
    if resume:
        clear_state(resume)  # the outputs are complete: nothing left to resume
    return final


def augment_params(augment: AugmentParams | str) -> AugmentParams | None:
    """``train.augment`` (a validated section, or ``none``) -> the augmentation's argument (None: off)."""
    return None if augment == "none" else augment
