"""The presized store decoded once on the training device: batches gathered there, the host only draws indices.

``DeviceStore`` decodes every stored JPEG once per stage, on the host's cores with the host loader's
decoder (libjpeg-turbo), into one flat uint8 tensor of HxWx3 images back to back, and copies it with
its index (offsets, heights, widths, labels) to the device in large chunks. Not nvjpeg: on an H200
its decode differed from libjpeg-turbo's by up to 62 levels of 255 (benchmarks/RESULTS.md), and the
device store must give exactly the host loader's batches (and serving's pixels). The CPU runs the
same decode and gather as a GPU does, so the CPU tests prove the batches identical to the host
loader's. Every square of a presized image is rows of
``square_size * 3`` bytes at a fixed stride (the image's row length) from one origin, so a batch is one
``index_select`` of ``square_size`` rows per item from an overlapping-window view of the flat pixels: the
same bytes ``PresizedStore.square`` cuts.

This module knows the store and the device, not the loaders: ``loaders`` builds its batches on it.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from petpipe.data.presize import PresizedStore, default_workers
from petpipe.run.errors import check_room

DECODE_CHUNK = 64  # JPEGs per thread task: small enough to balance the threads, large enough to amortise a task
CHUNK_BYTES = 256 * 2**20  # host-to-device copy size: large enough for full PCIe speed, small pinned buffer
AUTO_SHARE = 0.5  # ``auto`` keeps the store on the device only when it takes at most this share of the free memory
NO_ROOM_FIX = "set train.store_on_device: auto (the host loader when the store does not fit) or lower presize.size"


def store_bytes_on_device(store: PresizedStore) -> int:
    """Device bytes of the decoded store: its pixels plus the index (offsets, heights, widths, labels as int64)."""
    return store.decoded_bytes + 4 * 8 * len(store)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere."""
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
                f"train.store_on_device auto: the decoded store ({needed:,} bytes) takes more than half of {device}'s "
                f"free memory ({free:,} bytes); using the host loader"
            )
            return False
        return True
    if free is not None:
        what = f"train.store_on_device true: the presized store {store.out_dir}"
        check_room(needed, free, what=what, where=f"device {device}", fix=NO_ROOM_FIX)
    return True


def decoded_offsets(store: PresizedStore) -> np.ndarray:
    """Where each image starts in the flat decoded pixels (bytes; images back to back in store order)."""
    sizes = store.heights.astype(np.int64) * store.widths * 3
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def decode_into(pixels: np.ndarray, store: PresizedStore, offsets: np.ndarray, items: range) -> None:
    """Decode images ``items`` of ``store`` into their places in the flat host ``pixels``. Runs in threads: the
    decoder and numpy's copy release the GIL."""
    for i in items:
        start, height, width = int(offsets[i]), int(store.heights[i]), int(store.widths[i])
        pixels[start : start + height * width * 3].reshape(height, width, 3)[...] = store.image(i)


def decode_store(store: PresizedStore, workers: int) -> torch.Tensor:
    """Every stored image decoded on the host, HxWx3 back to back (``decoded_offsets``), as one flat tensor."""
    pixels = torch.empty(store.decoded_bytes, dtype=torch.uint8)
    chunks = [range(first, min(first + DECODE_CHUNK, len(store))) for first in range(0, len(store), DECODE_CHUNK)]
    decode = functools.partial(decode_into, pixels.numpy(), store, decoded_offsets(store))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, chunks))  # list(): a decode's error is raised here
    return pixels


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``pixels`` on ``device``: themselves on the CPU, else copied in chunks (through pinned memory on CUDA)."""
    if device.type == "cpu":
        return pixels
    out = torch.empty(pixels.numel(), dtype=torch.uint8, device=device)
    pinned = device.type == "cuda"
    buffer = torch.empty(min(CHUNK_BYTES, pixels.numel()), dtype=torch.uint8, pin_memory=pinned)
    for start in range(0, pixels.numel(), CHUNK_BYTES):
        chunk = pixels[start : start + CHUNK_BYTES]
        buffer[: len(chunk)].copy_(chunk)
        out[start : start + len(chunk)].copy_(buffer[: len(chunk)], non_blocking=pinned)
        if pinned:
            torch.cuda.current_stream(device).synchronize()  # the buffer is refilled next
    return out


class DeviceStore:
    """The presized store decoded on ``device``, with the decode's time and the device bytes it holds."""

    def __init__(self, store: PresizedStore, device: torch.device):
        started = time.perf_counter()
        self.store, self.device = store, device
        self.pixels = to_device(decode_store(store, default_workers()), device)
        self.offsets, self.heights, self.widths, self.labels = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
            for a in (decoded_offsets(store), store.heights, store.widths, store.labels)
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.copy_seconds = time.perf_counter() - started
        self.device_bytes = store_bytes_on_device(store)
        row = store.square_size * 3
        # Every run of ``row`` bytes, starting at any byte: a square is ``size`` of these rows.
        self.rows = self.pixels.as_strided((self.pixels.numel() - row + 1, row), (1, 1))

    def square_starts(self, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Where each square starts along its image's long side: ``square_of``'s ``round(position * (long - size))``
        (round half to even, as Python's round)."""
        long = np.maximum(self.store.heights[items], self.store.widths[items]).astype(np.int64)
        return np.rint(positions * (long - self.store.square_size)).astype(np.int64)

    def gather(self, items: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, S, S, 3] squares (S: the store's ``square_size``) of store images ``items`` at ``positions``, and
        their labels, on the device."""
        size = self.store.square_size
        starts = torch.from_numpy(self.square_starts(items, positions)).to(self.device)
        index = torch.from_numpy(items.astype(np.int64)).to(self.device)
        widths, heights = self.widths[index], self.heights[index]
        stride = widths * 3  # bytes per image row
        # Tall images: the square starts ``start`` rows down; wide ones: ``start`` pixels in.
        origin = self.offsets[index] + torch.where(heights > widths, starts * stride, starts * 3)
        rows = origin[:, None] + torch.arange(size, device=self.device)[None, :] * stride[:, None]
        images = self.rows.index_select(0, rows.reshape(-1)).view(len(items), size, size, 3)
        return images, self.labels[index]
