"""Loaders over the presized store: uint8 square batches, augmented and normalised on the device.

Per item the loader decodes one stored JPEG and slices: fastai's item transform (a square of side
min(w, h) at a random position along the long side on train, the centre on valid) is a cut from an
image already stored with its shorter side at ``presize.size`` (decoded at a fraction of that where
training is far smaller: ``PresizedStore.for_training_size``). The batch is stacked as uint8, copied to the training
device (pinned, non-blocking on CUDA) and augmented there in one resample (``augment``).

Every random draw (shuffle order, crop positions, augmentation) comes from generators seeded in the
training process, so results do not depend on ``num_workers``, nor on ``store_on_device``: with the
store on the device (``device_store``) the host only draws the same indices and the device gathers
the same squares (``StoreLoader``, over ``StoreBatches``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from petpipe.compute import distributed
from petpipe.compute.device import Runtime
from petpipe.data.augment import AugmentParams, train_batch, valid_batch
from petpipe.data.device_store import DeviceStore, wants_device_store
from petpipe.data.normalization import IMAGENET, Normalization
from petpipe.data.presize import PresizedStore, default_workers
from petpipe.run.errors import PetpipeError

CENTRE = 0.5  # crop position of validation squares


class SquareCrops(Dataset):
    """Items ``(store position, crop position)`` -> (uint8 [S, S, 3] square, class index).

    Squares stay in the store's HWC layout: the device permutes them for free, where a CHW copy
    here would cost a strided pass over every image. ``__getitems__`` cuts a whole batch straight
    into one tensor (one copy per image, no collate step).
    """

    def __init__(self, store: PresizedStore, split: str):
        self.store = store
        self.positions = store.indices(split)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: tuple[int, float]) -> tuple[torch.Tensor, int]:
        i, position = key
        index = int(self.positions[i])
        return torch.from_numpy(np.array(self.store.square(index, position))), int(
            self.store.labels[index]
        )  # a copy: the store is read-only

    def __getitems__(self, keys: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.store.square_size
        images = torch.empty((len(keys), size, size, 3), dtype=torch.uint8)
        out = images.numpy()
        labels = torch.empty(len(keys), dtype=torch.int64)
        for row, (i, position) in enumerate(keys):
            index = int(self.positions[i])
            out[row] = self.store.square(index, position)
            labels[row] = int(self.store.labels[index])
        return images, labels


def whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The collate step of ``SquareCrops.__getitems__``: the batch is already one tensor."""
    return batch


class CropSampler(Sampler):
    """Yields ``(item, crop position)``: a seeded shuffle with random positions (train), or in order at the centre
    (valid).

    With several processes (``world > 1``) every process draws the same shuffle and takes every
    ``world``-th item from ``rank`` on (as DistributedSampler does; the few items left over by an
    uneven split are skipped that epoch). The shared generator advances every epoch, which is what
    DistributedSampler's ``set_epoch`` achieves.
    """

    def __init__(self, n: int, generator: torch.Generator | None, rank: int = 0, world: int = 1):
        self.n, self.generator, self.rank, self.world = n, generator, rank, world

    def __len__(self) -> int:
        return self.n if self.generator is None else self.n // self.world

    def __iter__(self) -> Iterator[tuple[int, float]]:
        if self.generator is None:
            yield from ((i, CENTRE) for i in range(self.n))
            return
        order = torch.randperm(self.n, generator=self.generator).tolist()
        positions = torch.rand(self.n, generator=self.generator, dtype=torch.float64).tolist()
        mine = slice(self.rank, len(self) * self.world, self.world)
        yield from zip(order[mine], positions[mine])


class StoreBatches:
    """The host DataLoader's batches (same order, crops, sharding, drop_last), gathered from a ``DeviceStore``."""

    def __init__(
        self, dataset: SquareCrops, sampler: CropSampler, device_store: DeviceStore, *, batch_size: int, drop_last: bool
    ):
        self.dataset, self.sampler, self.device_store = dataset, sampler, device_store
        self.batch_size, self.drop_last = batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_keys(self) -> Iterator[list[tuple[int, float]]]:
        """The sampler's ``(item, crop position)`` draws, in batches.

        Each pass first takes one draw from torch's global generator, as a DataLoader's iterator does
        (its base seed): the model's own draws (dropout) then see the host loader's global stream."""
        torch.empty((), dtype=torch.int64).random_()
        batch: list[tuple[int, float]] = []
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def gather(self, keys: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 squares and labels of one batch of draws, on the device."""
        items = self.dataset.positions[np.fromiter((i for i, _ in keys), dtype=np.int64, count=len(keys))]
        positions = np.fromiter((p for _, p in keys), dtype=np.float64, count=len(keys))
        return self.device_store.gather(items, positions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The untransformed batches (what the host DataLoader yields, already on the device)."""
        return (self.gather(keys) for keys in self.batch_keys())


class DeviceLoader:
    """A DataLoader whose batches arrive on the device, transformed (augmented or centred, normalised)."""

    def __init__(
        self,
        loader: DataLoader,
        runtime: Runtime,
        *,
        size: int,
        augment: AugmentParams | None,
        generator: torch.Generator | None,
        normalization: Normalization = IMAGENET,
    ):
        self.loader, self.runtime, self.size, self.augment, self.generator = loader, runtime, size, augment, generator
        self.normalization = normalization

    @property
    def dataset(self) -> SquareCrops:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        """[B, 3, size, size] of a full batch as the model receives it."""
        return (self.loader.batch_size, 3, self.size, self.size)

    @property
    def generators(self) -> list[torch.Generator]:
        """Every random stream of this loader (shuffle and crop positions, augmentation): a resumed run restores
        them."""
        return [g for g in (self.loader.sampler.generator, self.generator) if g is not None]

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] squares (on the device) -> normalised float [B, 3, size, size]."""
        images = images.permute(0, 3, 1, 2)
        if self.generator is None:
            out = valid_batch(images, size=self.size, normalization=self.normalization)
        else:
            out = train_batch(
                images, size=self.size, params=self.augment, generator=self.generator, normalization=self.normalization
            )
        return out.contiguous(memory_format=self.runtime.memory_format)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches one ahead: batch i+1 is copied to the device and transformed before batch i is
        handed out. On CUDA that work runs on a side stream, so the copy and the augmentation of the
        next batch overlap the model's work on this one; elsewhere the same loop runs without streams."""
        device = self.runtime.device
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        ready = None
        for work in self.pending():
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                staged = (*self.stage(work), record_event(side))
            if ready is not None:
                yield hand_over(*ready)
            ready = staged
        if ready is not None:
            yield hand_over(*ready)

    def pending(self) -> Iterator:
        """The work of each batch, in order: here the host DataLoader's uint8 batches."""
        return iter(self.loader)

    def stage(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's work on the device: copy (non-blocking from pinned memory on CUDA), transform."""
        images, targets = batch
        device = self.runtime.device
        return self.transform(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)


class StoreLoader(DeviceLoader):
    """A DeviceLoader over the store on the device (``device_store``): the host draws the batch's items and crop
    positions, the device gathers the squares; the transform is the host loader's."""

    loader: StoreBatches

    def pending(self) -> Iterator[list[tuple[int, float]]]:
        return self.loader.batch_keys()

    def stage(self, keys: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.loader.gather(keys)
        return self.transform(images), targets

    @property
    def store_copy_seconds(self) -> float:
        """Seconds to copy the store to the device (shared by the stage's loaders; ~0 on the CPU: mapped)."""
        return self.loader.device_store.copy_seconds

    @property
    def store_device_bytes(self) -> int:
        """Bytes of the store (pixels and index) held on the device (on the CPU: mapped, not copied)."""
        return self.loader.device_store.device_bytes


def record_event(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event after the work queued so far on ``stream`` (None without a stream)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def hand_over(
    images: torch.Tensor, targets: torch.Tensor, done: torch.cuda.Event | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for the current stream: it waits for this batch's copy and transform only (not for
    the next batch's, already queued behind them), and the tensors' memory is kept until it is done with them."""
    if done is not None:
        current = torch.cuda.current_stream(images.device)
        current.wait_event(done)
        images.record_stream(current)
        targets.record_stream(current)
    return images, targets


def resolve_workers(num_workers: int | str, device: torch.device) -> int:
    """``auto``: no workers on the CPU (workers would take cores from the training threads, and a presized JPEG
    decodes in well under a step's time per image at CPU training sizes), ``min(8, cores - 1)`` with an
    accelerator, where the CPU is otherwise idle."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type == "cpu":
        return 0
    return max(0, min(8, default_workers() - 1))


def make_loader(
    store: PresizedStore,
    split: str,
    runtime: Runtime,
    *,
    size: int,
    batch_size: int,
    num_workers: int | str,
    augment: AugmentParams | None = None,
    generator: torch.Generator | None = None,
    normalization: Normalization = IMAGENET,
    device_store: DeviceStore | None = None,
    rank: int | None = None,
    world: int | None = None,
) -> DeviceLoader:
    """Training loader when ``generator`` is given (shuffled, random crops, augmented, last partial
    batch dropped), else a validation loader (in store order, centre crops).

    With ``device_store`` the batches are gathered on the device from that copy of ``store`` (a
    ``StoreLoader``: the same batches, no workers), else cut on the host by a DataLoader. ``rank`` and
    ``world`` default to the torchrun process's."""
    store = store.for_training_size(size)  # decoded no larger than training needs (``decode_reduction``)
    if device_store is not None and device_store.store.reduction != store.reduction:
        raise ValueError(
            f"the device store is decoded at 1/{device_store.store.reduction}, training at {size} px reads the store "
            f"at 1/{store.reduction}: build it from store.for_training_size({size})"
        )
    dataset = SquareCrops(store, split)
    train = generator is not None
    # Training is sharded over torchrun processes (each takes its share of the global batch);
    # every process validates on the whole set, so the metrics need no gathering.
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    rank, world = (rank, world) if train else (0, 1)
    if train:
        batch_size = distributed.shard_batch_size(batch_size, world)
    if store.size < size:
        raise PetpipeError(
            f"train.size {size} is larger than presize.size {store.size}: raise presize.size (and re-run presize) or "
            "lower train.size"
        )
    sampler = CropSampler(len(dataset), generator, rank, world)
    # A last batch of one image breaks BatchNorm in training mode; fastai drops it too.
    drop_last = train and len(dataset) // world > batch_size
    # Augmentation draws from its own stream, so the crop positions and shuffle order stay the same
    # whether or not augmentation is on.
    augment_generator = torch.Generator().manual_seed(generator.initial_seed() + 1 + rank) if train else None
    transform = dict(size=size, augment=augment, generator=augment_generator, normalization=normalization)
    if device_store is not None:
        batches = StoreBatches(dataset, sampler, device_store, batch_size=batch_size, drop_last=drop_last)
        return StoreLoader(batches, runtime, **transform)
    workers = resolve_workers(num_workers, runtime.device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=whole_batch,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        # Not fork: the training process runs threads (MLflow's system metrics, the allocator) whose
        # locks a forked worker could inherit held. forkserver workers start clean, once (persistent).
        multiprocessing_context="forkserver" if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=runtime.pin_memory,
    )
    return DeviceLoader(loader, runtime, **transform)


def make_loaders(
    store_dir: Path,
    runtime: Runtime,
    *,
    size: int,
    batch_size: int,
    num_workers: int | str,
    augment: AugmentParams | None,
    generator: torch.Generator,
    normalization: Normalization,
    store_on_device: bool | str = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Training loader (shuffled, random crops, augmented) and validation loader (in order, centre crops),
    both normalised with ``normalization`` (the model's: see ``normalization.resolve_normalization``).

    ``store_on_device`` (``train.store_on_device``: ``auto``, True, False) chooses between the host
    loader and one copy of the store on the device that both loaders gather from (``device_store``)."""
    store = PresizedStore(store_dir).for_training_size(size)
    on_device = wants_device_store(store, runtime.device, store_on_device)
    common = dict(
        size=size,
        batch_size=batch_size,
        num_workers=num_workers,
        normalization=normalization,
        device_store=DeviceStore(store, runtime.device) if on_device else None,
    )
    return (
        make_loader(store, "train", runtime, augment=augment, generator=generator, **common),
        make_loader(store, "valid", runtime, **common),
    )
