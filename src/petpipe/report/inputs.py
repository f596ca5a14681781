"""What the report shows besides the predictions, read from the run's files and loaders.

Images come from the real loaders, so the page shows what the model saw: the first training batch
(the seed's shuffle, crop positions and augmentation, as the training stages draw them) and the
validation squares after the loader's resample, with the model's normalisation undone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petpipe.compute.device import Runtime, loader_seed
from petpipe.data.augment import AugmentParams, denormalize
from petpipe.data.loaders import CENTRE, DeviceLoader, make_loader
from petpipe.data.normalization import Normalization
from petpipe.data.presize import SKIPPED_FILE, PresizedStore
from petpipe.report.page import DataInfo, LrInfo
from petpipe.run.errors import PetpipeError
from petpipe.train.schedule import discriminative_lrs

LR_SUGGESTIONS = (
    "valley",
    "minimum",
    "steep",
)  # the suggestions in lr_find's result (its other keys are not LRs to mark)


def to_display(batch: torch.Tensor, normalization: Normalization) -> np.ndarray:
    """Model inputs [B, 3, H, W], normalised with ``normalization`` -> uint8 pictures [B, H, W, 3]."""
    pixels = (denormalize(batch, normalization) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def first_training_batch(
    store: PresizedStore,
    runtime: Runtime,
    *,
    size: int,
    batch_size: int,
    augment: AugmentParams | None,
    seed: int,
    n: int,
    normalization: Normalization,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` images (uint8 [n, H, W, 3]) and class indices of the first training batch.

    The loader is built as the training stages build it (same store, batch size, augmentation and
    loader seed), so this is the batch that ``train_frozen`` trained on first: fastai's ``show_batch``.
    """
    generator = torch.Generator().manual_seed(loader_seed(seed))
    loader = make_loader(
        store,
        "train",
        runtime,
        size=size,
        batch_size=batch_size,
        num_workers=0,
        augment=augment,
        generator=generator,
        normalization=normalization,
    )
    images, labels = next(iter(loader))
    return to_display(images[:n], normalization), labels[:n].cpu().numpy()


def validation_inputs(loader: DeviceLoader, items: np.ndarray) -> np.ndarray:
    """Validation items (positions in ``loader``'s dataset) as the model saw them, uint8 [k, H, W, 3]."""
    if len(items) == 0:
        return np.zeros((0, loader.size, loader.size, 3), dtype=np.uint8)
    squares = torch.stack([loader.dataset[(int(i), CENTRE)][0] for i in items])
    return to_display(loader.transform(squares.to(loader.runtime.device)), loader.normalization)


def class_counts(store: PresizedStore) -> list[dict[str, Any]]:
    """Images per class and split, as stored (what training and validation used)."""
    n = len(store.classes)
    train, valid = (np.bincount(store.labels[store.indices(split)], minlength=n) for split in ("train", "valid"))
    return [{"class": c, "train": int(t), "valid": int(v)} for c, t, v in zip(store.classes, train, valid)]


def skipped_files(**lists: Path) -> list[dict[str, str]]:
    """Rows (stage, path, reason) of each stage's skipped-files CSV (``path,reason``), e.g. labels=..., presize=..."""
    rows = []
    for stage, path in lists.items():
        try:
            with open(path, newline="") as f:
                rows += [{"stage": stage, "path": r["path"], "reason": r["reason"]} for r in csv.DictReader(f)]
        except (OSError, KeyError) as err:
            raise PetpipeError(
                f"cannot read the skipped-files list {path} ({type(err).__name__}: {err}); re-run the {stage} stage"
            ) from None
    return rows


def data_info(
    store: PresizedStore,
    runtime: Runtime,
    *,
    labels_skipped: Path,
    classes: list[str],
    size: int,
    batch_size: int,
    augment: AugmentParams | None,
    seed: int,
    n_batch: int,
    normalization: Normalization,
) -> DataInfo:
    """Class counts, the files the labels and presize stages skipped, and the first training batch."""
    batch, labels = first_training_batch(
        store,
        runtime,
        size=size,
        batch_size=batch_size,
        augment=augment,
        seed=seed,
        n=n_batch,
        normalization=normalization,
    )
    skipped = skipped_files(labels=labels_skipped, presize=store.out_dir / SKIPPED_FILE)
    return DataInfo(counts=class_counts(store), skipped=skipped, batch=batch, batch_labels=[classes[i] for i in labels])


def lr_info(curve: Path, result: Path, chosen: Path, *, frozen_lr: float, n_groups: int) -> LrInfo:
    """lr_find's curve and suggestions, the fine-tuning LRs choose_lr picked, and the peak LR of each layer group."""
    rows, suggestions, picked = (
        read_curve(curve, "lr_find"),
        read_json(result, "lr_find"),
        read_json(chosen, "choose_lr"),
    )
    lo, hi = float(picked["lo"]), float(picked["hi"])
    return LrInfo(
        lrs=[r["lr"] for r in rows],
        losses=[r["loss"] for r in rows],
        suggestions={k: suggestions[k] for k in LR_SUGGESTIONS if suggestions.get(k) is not None},
        warning=suggestions.get("warning"),
        lo=lo,
        hi=hi,
        source=str(picked["source"]),
        frozen_lr=frozen_lr,
        group_lrs=discriminative_lrs(lo, hi, n_groups),
    )


def read_json(path: Path, writer: str) -> dict[str, Any]:
    """A JSON file another stage wrote; the error names the file and the stage to re-run."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PetpipeError(
            f"cannot read {path} ({type(err).__name__}: {err}); re-run the {writer} stage (dvc repro {writer})"
        ) from None


def read_curve(path: Path, writer: str) -> list[dict[str, float]]:
    """A numeric CSV (per-epoch metrics, LR-finder curve) another stage wrote."""
    try:
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError) as err:
        raise PetpipeError(
            f"cannot read {path} ({type(err).__name__}: {err}); re-run the {writer} stage (dvc repro {writer})"
        ) from None
