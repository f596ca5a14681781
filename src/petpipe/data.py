"""Transforms, the image Dataset and DataLoaders built from the labels table."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from petpipe.labels import LabelTable

# ImageNet channel statistics: pretrained torchvision weights expect inputs normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int, min_scale: float, flip: bool) -> T.Compose:
    """Random crop of at least ``min_scale`` of the area, resized to ``size``; optional flips."""
    steps: list = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def valid_transform(size: int) -> T.Compose:
    """Deterministic: shorter side to ``size``, centre crop."""
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageTable(Dataset):
    """(image, class index) pairs for one split of the labels table."""

    def __init__(self, root: Path, table: LabelTable, split: str, transform: T.Compose):
        index = {name: i for i, name in enumerate(table.classes)}
        self.samples = [(root / item.path, index[item.label]) for item in table.items if item.split == split]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), target


def make_loader(
    dataset: Dataset, *, batch_size: int, train: bool, num_workers: int, generator: torch.Generator | None = None, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        # A last batch of one image breaks BatchNorm in training mode; fastai drops it too.
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
    )


def make_loaders(
    root: Path,
    table: LabelTable,
    *,
    size: int,
    batch_size: int,
    num_workers: int,
    min_scale: float,
    flip: bool,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training loader (augmented, shuffled) and validation loader (deterministic, in table order)."""
    train = ImageTable(root, table, "train", train_transform(size, min_scale, flip))
    valid = ImageTable(root, table, "valid", valid_transform(size))
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    return make_loader(train, train=True, generator=generator, **common), make_loader(valid, train=False, **common)
