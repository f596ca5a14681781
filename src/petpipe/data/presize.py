"""Decode every labelled image exactly once into a store of presized JPEGs that an epoch reads cheaply.

fastai's item transform ``Resize(460)`` cuts, every epoch, a square of side min(w, h) at a random
position along the long side (train) or at the centre (valid) and resizes it to 460. Resizing the
square is the same as resizing the whole image so that its shorter side is 460 and then cutting a
460-pixel square, so the store keeps each image with its shorter side at ``size`` and its aspect
kept, and the loader cuts the square per item as a cheap slice (``PresizedStore.square``). No
crop position is frozen into the store.

Each presized image is stored re-encoded as a JPEG (quality ``JPEG_QUALITY``): 40-70 KB for a 460 px
photo against 635-830 KB of raw pixels, so the store, DVC's hash of it and its cache copy cost
a tenth of the raw bytes (benchmarks/RESULTS.md, "The presized store"). Decoding a stored image
(libjpeg-turbo, ~1 ms for 460 px on one core) replaces the original's decode plus resize (~4 ms):
the host loader decodes per item; the device store decodes the whole store once per stage, on all
cores, with the same decoder (nvjpeg's pixels differ). Serving applies the same round trip
(``presized_pixels``), so a served image is exactly what training saw.

Before anything is decoded or written, a bound on the store's size is known from the image headers
(the sum of the presized shapes' raw pixels; a quality-90 4:2:0 JPEG codes 1.5 samples a pixel
in far fewer bits), and a store that does not fit on its disk stops presize in one line.

The decode is also the image verification: a file that does not fully decode (truncated, corrupt,
not an image, too large for Pillow's decompression-bomb guard) is left out and listed in
``skipped.csv`` with a short reason.

Store layout (a folder; every file byte-reproducible, so DVC sees identical hashes on a re-run):

- ``images.jpg``  all presized images back to back, each one baseline JPEG (RGB, 4:2:0)
- ``index.npy``   one record per stored image: offset and length (int64, bytes into images.jpg),
                  height and width (int32, of the presized image), label (int64 class index),
                  split (uint8: 0 train, 1 valid)
- ``paths.json``  image paths relative to the dataset root, in store order (= input order)
- ``skipped.csv`` path,reason of every image that was not stored
- ``store.json``  format, size and counts
"""

from __future__ import annotations

import copy
import functools
import io
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from petpipe.run.errors import PetpipeError, check_room
from petpipe.run.files import free_bytes, naming_full_disk, staged_dir, write_json, write_rows
from petpipe.run.signals import raise_if_stopped

FORMAT = "petpipe-presized-v2"
SPLITS = ("train", "valid")  # split code = position in this tuple
INDEX_DTYPE = np.dtype(
    [("offset", "<i8"), ("length", "<i8"), ("height", "<i4"), ("width", "<i4"), ("label", "<i8"), ("split", "u1")]
)
IMAGES_FILE = "images.jpg"
# Chosen by measurement (RESULTS.md): at 90, a 460 px image is ~8-12x smaller than raw and decodes in ~1 ms; the
# error it adds (mean |diff| ~1-3 levels of 255) is below what the augmentation's resampling changes.
JPEG_QUALITY = 90
JPEG_SUBSAMPLING = "4:2:0"  # the photos' own, and the fastest to decode
INDEX_FILE = "index.npy"
PATHS_FILE = "paths.json"
SKIPPED_FILE = "skipped.csv"
META_FILE = "store.json"
FIX = "run the presize stage (dvc repro presize)"
MAX_CHUNKSIZE = 16  # images per pool task: few enough that the progress bar moves smoothly
# The stored JPEG decoded at 1/k of its size (libjpeg's DCT scaling), largest first. 1 is the full decode.
REDUCTIONS = (8, 4, 2)
# The reduced square keeps at least this multiple of the training size: fastai presizes to 460 for 224, ~2x, as
# room for the random crop (down to sqrt(0.75) of the side) and the zoom (up to 1.1) to stay a downscale.
HEADROOM = 2
MAX_HEADER_CHUNKSIZE = 256  # reading a header is ~0.1-0.5 ms: larger tasks, fewer round trips
NO_ROOM_FIX = (
    "free space on it, lower presize.size (the store grows with its square), "
    "or move the DVC cache to another disk (dvc cache dir PATH)"
)


class PresizeError(PetpipeError):
    """The store cannot be written or read; the message names the folder or value and the fix."""


@dataclass
class PresizeResult:
    n_images: int  # stored
    n_skipped: int
    skipped: list[tuple[str, str]]  # (path, reason)
    bytes: int  # size of images.jpg
    decoded_bytes: int  # the presized images' raw pixels: what the device store holds at the full decode
    seconds: float


def default_workers() -> int:
    """The CPUs this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity on macOS / Windows
        return max(1, os.cpu_count() or 1)


def presized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side at ``size``, the long side scaled and rounded half up."""
    short, long = min(width, height), max(width, height)
    scaled = max(size, (2 * long * size + short) // (2 * short))  # integer round-half-up: no float drift
    return (size, scaled) if width <= height else (scaled, size)


def square_of(image: np.ndarray, size: int, position: float) -> np.ndarray:
    """The ``size`` x ``size`` square of a presized image (shorter side ``size``) at ``position`` along
    its long side: 0 = top / left, 0.5 = centre, 1 = bottom / right (fastai's ``Resize`` crop)."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    height, width = image.shape[:2]
    start = round(position * (max(height, width) - size))
    return image[start : start + size] if height > width else image[:, start : start + size]


def decode_presized(path: Path | BinaryIO, size: int) -> np.ndarray:
    """Fully decode ``path``, apply its EXIF orientation, convert to RGB, shorter side to ``size``.

    Returns an HxWx3 uint8 C-contiguous array. Raises whatever Pillow raises for a file that does
    not fully decode (truncated images are never accepted; the decompression-bomb guard stays on).
    """
    with Image.open(path) as img:
        img.load()  # the full decode: a truncated file raises here
        ImageOps.exif_transpose(img, in_place=True)  # in place: a copy of every image costs ~0.2 ms
        if img.mode != "RGB":
            img = img.convert("RGB")
    img = img.resize(presized_shape(img.width, img.height, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """An HxWx3 uint8 image as the store's JPEG (byte-reproducible for the same libjpeg)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buffer.getvalue()


def decode_reduction(presize_size: int, train_size: int) -> int:
    """The DCT scaling 1/k at which a store presized to ``presize_size`` is decoded for training at ``train_size``:
    the largest k of ``REDUCTIONS`` whose square (``reduced(presize_size, k)``) is still ``HEADROOM`` x
    ``train_size``, else 1 (the full decode: the pets profiles' 460 for 224, the digits default's 64 for 32)."""
    return next((k for k in REDUCTIONS if reduced(presize_size, k) >= HEADROOM * train_size), 1)


def reduced(pixels: int, reduction: int) -> int:
    """A side of ``pixels`` decoded at 1/``reduction``: libjpeg rounds up."""
    return -(-pixels // reduction)


def decode_jpeg(data: bytes | memoryview | np.ndarray, reduction: int = 1) -> np.ndarray:
    """A stored JPEG -> HxWx3 uint8, its sides ``reduced`` by ``reduction`` (1, 2, 4 or 8).

    The full decode is torchvision's libjpeg-turbo (the same pixels as Pillow's, twice as fast), or Pillow's where
    a torchvision no longer decodes (it deprecated its decoders in 0.29); a reduced one is Pillow's ``draft``,
    libjpeg-turbo's DCT scaling (torchvision has none).
    """
    decode = torchvision_decoder() if reduction == 1 else None
    if decode is not None:
        return decode(np.frombuffer(data, dtype=np.uint8))
    with Image.open(io.BytesIO(np.asarray(data).tobytes())) as img:
        if reduction > 1:
            # Asking for the floor of each side picks exactly 1/reduction: Pillow's scale is the largest of 8, 4, 2, 1
            # <= min(side // asked), and side // (side // k) lies in [k, 2k) for every side >= k.
            img.draft("RGB", (max(1, img.width // reduction), max(1, img.height // reduction)))
        return np.asarray(img.convert("RGB"))


@functools.cache
def torchvision_decoder() -> Callable[[np.ndarray], np.ndarray] | None:
    """torchvision's JPEG decoder as bytes -> HxWx3 uint8, or None without one (imported on first use: presize
    itself never decodes a stored image, and stays free of torch)."""
    try:
        import torch
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as decode
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

    def decoder(encoded: np.ndarray) -> np.ndarray:
        return decode(torch.from_numpy(encoded.copy()), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    return decoder


def presized_pixels(path: Path | BinaryIO, size: int, reduction: int = 1) -> np.ndarray:
    """What the store holds for the image at ``path`` (a file or its bytes), decoded as training decodes it
    (``reduction``): presized, then the JPEG round trip (serving uses this, so that a served image is exactly what
    training saw)."""
    return decode_jpeg(encode_jpeg(decode_presized(path, size)), reduction)


def skip_reason(err: Exception) -> str:
    """A short, reproducible reason for a file that did not decode."""
    if isinstance(err, Image.DecompressionBombError):
        kind = "image too large (decompression-bomb guard)"
    elif isinstance(err, UnidentifiedImageError):
        kind = "not an image"
    elif isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        kind = "cannot read file"
    else:  # OSError "image file is truncated", SyntaxError "broken PNG file", zlib errors, ...
        kind = "truncated or corrupt image"
    message = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    return f"{kind}: {message}"


def _decode_item(rel_path: str, *, root: Path, size: int) -> tuple[bytes | None, tuple[int, int], str]:
    """One pool task: (JPEG, (height, width), "") or (None, (0, 0), reason). Module level so worker processes can
    import it; the JPEG, not the pixels, travels back (a tenth of the bytes)."""
    full = root / rel_path
    try:
        pixels = decode_presized(full, size)
    except Exception as err:  # Pillow raises many types for broken files; each becomes a skip reason
        return None, (0, 0), skip_reason(err).replace(str(full), rel_path)  # no absolute paths in a compared output
    return encode_jpeg(pixels), pixels.shape[:2], ""


def _stored_bytes(rel_path: str, *, root: Path, size: int) -> int:
    """One pool task: the raw pixel bytes of image ``rel_path`` presized, from its header alone (no decode).

    EXIF orientation swaps width and height, which leaves the presized area the same. A file whose
    header does not read is skipped by the decode: it takes no room.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the decode warns once, for real
            with Image.open(root / rel_path) as img:
                width, height = img.size
    except Exception:  # not an image, unreadable, decompression bomb: the decode skips it with its reason
        return 0
    presized_width, presized_height = presized_shape(width, height, size)
    return presized_width * presized_height * 3


def store_bytes(pixel_bytes: int, paths: Sequence[str], classes: Sequence[str]) -> int:
    """A bound on the whole store's size: ``pixel_bytes`` (the raw pixels: the JPEGs take a fraction of them)
    plus the index, each path (in paths.json, or in skipped.csv with its reason), and 64 KiB for store.json and
    the last filesystem block of each file."""
    per_image = INDEX_DTYPE.itemsize + 256  # the path in paths.json, or in skipped.csv with a reason
    names = sum(len(p.encode()) + per_image for p in paths) + sum(len(c.encode()) + 8 for c in classes)
    return pixel_bytes + names + 64 * 1024


OrderedMap = Callable[[Callable, list[str], int], Iterable]  # (task, paths, max_chunksize) -> results in input order


@contextmanager
def _ordered_map(workers: int) -> Iterator[OrderedMap]:
    """A map over paths on ``workers`` processes (1: in this process); the workers end on leaving, also on an error."""
    if workers == 1:
        yield lambda task, paths, max_chunksize: map(task, paths)
        return
    # forkserver, not fork: the stage process already runs threads (MLflow, the allocator), and a
    # forked child can inherit one of their locks held and hang on it.
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:  # __exit__ terminates the workers
        yield lambda task, paths, max_chunksize: pool.imap(
            task, paths, chunksize=max(1, min(max_chunksize, len(paths) // (4 * workers)))
        )


def check_items(items: Sequence[tuple[str, int, str]], *, size: int, workers: int) -> None:
    if size < 1:
        raise PresizeError(f"presize.size: {size} is not allowed; use a positive number of pixels")
    if workers < 1:
        raise PresizeError(f"presize workers: {workers} is not allowed; use 1 or more")
    if not items:
        raise PresizeError("presize: the labels table holds no images; run the labels stage (dvc repro labels)")
    for path, _, split in items:
        if split not in SPLITS:
            raise PresizeError(f"presize: {path} has split {split!r}; allowed: {', '.join(SPLITS)}")


def write_store(
    root: Path,
    items: Sequence[tuple[str, int, str]],
    out_dir: Path,
    *,
    size: int,
    workers: int,
    classes: Sequence[str] = (),
    progress: bool = True,
) -> PresizeResult:
    """Decode each (path, class index, split) of ``items`` once and write the store to ``out_dir``.

    The store's size is read from the image headers first: a store larger than its disk's free space
    is a NoRoomError before any decoding. The store is written in a temp sibling folder and moved
    into place only when complete; a disk that fills anyway is a DiskFullError naming the file.
    """
    check_items(items, size=size, workers=workers)
    start = time.perf_counter()
    paths = [path for path, _, _ in items]
    with _ordered_map(workers) as ordered_map:
        stored_bytes = functools.partial(_stored_bytes, root=root, size=size)
        pixel_bytes = sum(ordered_map(stored_bytes, paths, MAX_HEADER_CHUNKSIZE))
        needed = store_bytes(pixel_bytes, paths, classes)
        free = free_bytes(out_dir.parent)  # the staging folder goes beside out_dir
        what = f"presize: the store {out_dir} at presize.size {size}"
        check_room(needed, free, what=what, where="its disk", fix=NO_ROOM_FIX)
        decoded = ordered_map(functools.partial(_decode_item, root=root, size=size), paths, MAX_CHUNKSIZE)
        return _write(root, items, decoded, out_dir, size=size, classes=classes, progress=progress, start=start)


def _write(
    root: Path,
    items: Sequence[tuple[str, int, str]],
    decoded: Iterable[tuple[bytes | None, tuple[int, int], str]],
    out_dir: Path,
    *,
    size: int,
    classes: Sequence[str],
    progress: bool,
    start: float,
) -> PresizeResult:
    """The store's files from the ``decoded`` images (in ``items`` order), written in a staging folder."""
    with staged_dir(out_dir) as staging:
        records, paths, skipped, offset, decoded_bytes = [], [], [], 0, 0
        bar = tqdm(decoded, total=len(items), desc="presize", unit="img", mininterval=1.0, disable=not progress)
        with naming_full_disk(out_dir / IMAGES_FILE), open(staging / IMAGES_FILE, "wb") as images:
            for (path, label, split), (jpeg, (height, width), reason) in zip(items, bar):
                raise_if_stopped()
                if jpeg is None:
                    skipped.append((path, reason))
                    continue
                images.write(jpeg)
                records.append((offset, len(jpeg), height, width, label, SPLITS.index(split)))
                paths.append(path)
                offset += len(jpeg)
                decoded_bytes += height * width * 3
        if not records:
            first = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
            raise PresizeError(
                f"presize: none of the {len(items)} images could be decoded (first: {first}); check the dataset under "
                f"{root}"
            )
        index = np.array(records, dtype=INDEX_DTYPE)
        with naming_full_disk(out_dir / INDEX_FILE):  # a full disk names the file at its place in the finished store
            np.save(staging / INDEX_FILE, index, allow_pickle=False)
        write_json(staging / PATHS_FILE, paths)
        write_skipped(staging / SKIPPED_FILE, skipped)
        counts = {f"n_{name}": int((index["split"] == code).sum()) for code, name in enumerate(SPLITS)}
        meta = {
            "format": FORMAT,
            "size": size,
            "n_images": len(records),
            **counts,
            "n_skipped": len(skipped),
            "bytes": offset,
            "decoded_bytes": decoded_bytes,
            "jpeg_quality": JPEG_QUALITY,
            "classes": list(classes),
        }
        write_json(staging / META_FILE, meta)
    return PresizeResult(len(records), len(skipped), skipped, offset, decoded_bytes, time.perf_counter() - start)


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    write_rows(path, [{"path": p, "reason": r} for p, r in skipped], columns=["path", "reason"])


class PresizedStore:
    """Reader of a store written by ``write_store``.

    ``images.jpg`` is memory-mapped lazily on first access, and the map is dropped when the object is
    pickled, so it travels cheaply into DataLoader worker processes (each maps the file itself).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        meta = self._read_meta()
        try:
            index = np.load(self.out_dir / INDEX_FILE, allow_pickle=False)
            self.paths: list[str] = json.loads((self.out_dir / PATHS_FILE).read_text())
            encoded_bytes = (self.out_dir / IMAGES_FILE).stat().st_size
        except (OSError, ValueError) as err:
            raise PresizeError(f"{self.out_dir}: incomplete presized image store ({err}); {FIX}") from err
        if (
            index.dtype != INDEX_DTYPE
            or len(index) != len(self.paths)
            or len(index) != meta["n_images"]
            or encoded_bytes != meta["bytes"]
        ):
            raise PresizeError(f"{self.out_dir}: presized image store files do not match each other; {FIX}")
        self.size: int = meta["size"]
        self.classes: list[str] = meta.get("classes", [])  # class names, indexed by ``labels``
        self.offsets: np.ndarray = index["offset"]
        self.lengths: np.ndarray = index["length"]
        self.stored_heights: np.ndarray = index["height"]  # of the stored JPEGs
        self.stored_widths: np.ndarray = index["width"]
        self.heights, self.widths = self.stored_heights, self.stored_widths  # as decoded (``for_training_size``)
        self.labels: np.ndarray = index["label"]
        self.splits: np.ndarray = index["split"]  # codes: SPLITS[code] is the split's name
        self.reduction = 1  # images decode at 1/reduction of their stored sides (``for_training_size``)
        self._encoded: np.ndarray | None = None

    def for_training_size(self, train_size: int) -> PresizedStore:
        """This store as training at ``train_size`` reads it: decoded at ``decode_reduction``, with ``heights``,
        ``widths`` and ``square_size`` those of the decoded images (itself where it is already read so)."""
        reduction = decode_reduction(self.size, train_size)
        if reduction == self.reduction:
            return self
        reader = copy.copy(self)
        reader.reduction = reduction
        reader.heights, reader.widths = (reduced(a, reduction) for a in (self.stored_heights, self.stored_widths))
        return reader

    def _read_meta(self) -> dict:
        meta_file = self.out_dir / META_FILE
        if not meta_file.is_file():
            raise PresizeError(f"{self.out_dir}: no presized image store here (no {META_FILE}); {FIX}")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise PresizeError(f"{meta_file}: unreadable ({err}); {FIX}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise PresizeError(
                f"{self.out_dir}: not a presized image store of format {FORMAT} (found {found!r}); {FIX}"
            )
        return meta

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_encoded"] = None  # each process maps the file itself
        return state

    @property
    def encoded(self) -> np.ndarray:
        """All stored JPEGs as one flat read-only uint8 array backed by the memory map."""
        if self._encoded is None:
            # A plain ndarray view of the map: slicing it skips np.memmap's per-slice bookkeeping.
            self._encoded = np.memmap(self.out_dir / IMAGES_FILE, dtype=np.uint8, mode="r").view(np.ndarray)
        return self._encoded

    @property
    def square_size(self) -> int:
        """The side of an image's square as decoded: ``size``, ``reduced`` by the store's reduction."""
        return reduced(self.size, self.reduction)

    @property
    def decoded_bytes(self) -> int:
        """The raw pixels of every image as this reader decodes it (HxWx3 each, at its reduction): what a decoded copy
        of the store holds."""
        return int((self.heights.astype(np.int64) * self.widths * 3).sum())

    def jpeg(self, i: int) -> np.ndarray:
        """Image ``i``'s JPEG, a read-only view into the memory map."""
        start = int(self.offsets[i])
        return self.encoded[start : start + int(self.lengths[i])]

    def indices(self, split: str) -> np.ndarray:
        """Store positions of the images of ``split``, in store order."""
        if split not in SPLITS:
            raise PresizeError(f"split {split!r} is not allowed; allowed: {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == SPLITS.index(split))

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` decoded (at the store's reduction): ``heights[i]`` x ``widths[i]`` x 3 uint8."""
        pixels = decode_jpeg(self.jpeg(i), self.reduction)
        if pixels.shape[:2] != (self.heights[i], self.widths[i]):
            raise PresizeError(
                f"{self.out_dir}: image {i} decoded as {pixels.shape[1]}x{pixels.shape[0]}, the index says "
                f"{self.widths[i]}x{self.heights[i]} (at 1/{self.reduction}); {FIX}"
            )
        return pixels

    def square(self, i: int, position: float) -> np.ndarray:
        """The ``square_size`` x ``square_size`` square of image ``i`` at ``position`` along its long side.

        0 = top / left, 0.5 = centre, 1 = bottom / right: fastai's ``Resize`` crop, already resized.
        """
        return square_of(self.image(i), self.square_size, position)
