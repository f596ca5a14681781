"""The presized store resident on the training device: batches gathered there, the host only draws indices.

``DeviceStore`` holds the store's pixels as one flat uint8 tensor and its index (offsets, heights,
widths, labels) on the device, copied once per stage in large chunks (through pinned memory on
CUDA). On the CPU it is the memory map itself (no copy), so the CPU tests run the same gather as a
GPU does. Every square of a presized image is rows of ``size * 3`` bytes at a fixed stride (the
image's row length) from one origin, so a batch is one ``index_select`` of ``size`` rows per item
from an overlapping-window view of the flat pixels: the same bytes ``PresizedStore.square`` cuts.

``StoreBatches`` draws the order and crop positions from the loader's ``CropSampler`` (so order,
positions and DDP sharding are the host loader's by construction) and batches them as the host
``DataLoader`` does (``drop_last`` included).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from petpipe.errors import check_room
from petpipe.presize import PresizedStore

if TYPE_CHECKING:
    from petpipe.data import CropSampler, SquareCrops

CHUNK_BYTES = 256 * 2**20  # host-to-device copy size: large enough for full PCIe speed, small pinned buffer
AUTO_SHARE = 0.5  # ``auto`` keeps the store on the device only when it takes at most this share of the free memory
NO_ROOM_FIX = "set train.store_on_device: auto (the host loader when the store does not fit) or lower presize.size"


def store_bytes_on_device(store: PresizedStore) -> int:
    """Device bytes of the store: its pixels plus the index (offsets, heights, widths, labels as int64)."""
    return int(store.pixels.nbytes) + 4 * 8 * len(store)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (the CPU maps the store: nothing is copied)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def wants_device_store(store: PresizedStore, device: torch.device, store_on_device: bool | str) -> bool:
    """``train.store_on_device``: ``auto`` = on CUDA when the store fits in half the free memory (else the host
    loader, with a log line); ``true`` = always (a store that does not fit is a one-line NoRoomError); ``false``."""
    if store_on_device is False:
        return False
    needed, free = store_bytes_on_device(store), free_device_bytes(device)
    if store_on_device == "auto":
        if device.type != "cuda":
            return False
        if needed > AUTO_SHARE * free:
            print(
                f"train.store_on_device auto: the presized store ({needed:,} bytes) takes more than half of {device}'s "
                f"free memory ({free:,} bytes); using the host loader"
            )
            return False
        return True
    if free is not None:
        what = f"train.store_on_device true: the presized store {store.out_dir}"
        check_room(needed, free, what=what, where=f"device {device}", fix=NO_ROOM_FIX)
    return True


def mapped_pixels(store: PresizedStore) -> torch.Tensor:
    """The store's flat pixels as a tensor over the read-only memory map (no copy; never written to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(store.pixels)


def copy_pixels(store: PresizedStore, device: torch.device) -> torch.Tensor:
    """The store's pixels on ``device``: the map itself on the CPU, else copied in chunks (pinned on CUDA)."""
    source = mapped_pixels(store)
    if device.type == "cpu":
        return source
    pixels = torch.empty(source.numel(), dtype=torch.uint8, device=device)
    pinned = device.type == "cuda"
    buffer = torch.empty(min(CHUNK_BYTES, source.numel()), dtype=torch.uint8, pin_memory=pinned)
    for start in range(0, source.numel(), CHUNK_BYTES):
        chunk = source[start : start + CHUNK_BYTES]
        buffer[: len(chunk)].copy_(chunk)
        pixels[start : start + len(chunk)].copy_(buffer[: len(chunk)], non_blocking=pinned)
        if pinned:
            torch.cuda.current_stream(device).synchronize()  # the buffer is refilled next
    return pixels


class DeviceStore:
    """The presized store's pixels and index on ``device``, with the copy's time and the device bytes it holds."""

    def __init__(self, store: PresizedStore, device: torch.device):
        started = time.perf_counter()
        self.store, self.device = store, device
        self.pixels = copy_pixels(store, device)
        self.offsets, self.heights, self.widths, self.labels = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
            for a in (store.offsets, store.heights, store.widths, store.labels)
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.copy_seconds = time.perf_counter() - started
        self.device_bytes = store_bytes_on_device(store)
        row = store.size * 3
        # Every run of ``row`` bytes, starting at any byte: a square is ``size`` of these rows.
        self.rows = self.pixels.as_strided((self.pixels.numel() - row + 1, row), (1, 1))

    def square_starts(self, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Where each square starts along its image's long side: ``square_of``'s ``round(position * (long - size))``
        (round half to even, as Python's round)."""
        long = np.maximum(self.store.heights[items], self.store.widths[items]).astype(np.int64)
        return np.rint(positions * (long - self.store.size)).astype(np.int64)

    def gather(self, items: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, size, size, 3] squares of store images ``items`` at ``positions``, and their labels, on the
        device."""
        size = self.store.size
        starts = torch.from_numpy(self.square_starts(items, positions)).to(self.device)
        index = torch.from_numpy(items.astype(np.int64)).to(self.device)
        widths, heights = self.widths[index], self.heights[index]
        stride = widths * 3  # bytes per image row
        # Tall images: the square starts ``start`` rows down; wide ones: ``start`` pixels in.
        origin = self.offsets[index] + torch.where(heights > widths, starts * stride, starts * 3)
        rows = origin[:, None] + torch.arange(size, device=self.device)[None, :] * stride[:, None]
        images = self.rows.index_select(0, rows.reshape(-1)).view(len(items), size, size, 3)
        return images, self.labels[index]


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
