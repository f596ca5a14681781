"""The final model as a predictor of raw images: a DataFrame column ``image`` (file paths or encoded
bytes) in, a DataFrame with ``label`` and ``probability`` out.

Preprocessing is the validation path of training, from the same functions: decode (EXIF-rotated,
RGB) with the shorter side at the presize size, the store's JPEG round trip decoded as the loaders decode it (at a
fraction where training is far smaller: ``decode_reduction``), the centre square, resampled to the training size
and normalised with the mean and std recorded in the checkpoint (those training used). No MLflow here:
``tracking.models.ImageClassifierModel`` wraps it as a pyfunc model.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from petpipe.data.augment import valid_batch
from petpipe.data.loaders import CENTRE
from petpipe.data.normalization import from_meta
from petpipe.data.presize import PresizedStore, decode_reduction, presized_pixels, reduced, square_of
from petpipe.run.errors import PetpipeError
from petpipe.train.engine import restore
from petpipe.train.model import TIMM_PREFIX

IMAGE_COLUMN = "image"
BATCH = 64


class ImageClassifier:
    """A checkpoint's model in eval mode on the CPU, with the preprocessing it was trained with."""

    def __init__(self, checkpoint: Path, presize_size: int):
        self.model, meta = restore(Path(checkpoint))
        self.model.eval()
        self.classes: list[str] = list(meta["classes"])
        self.size: int = int(meta["size"])
        self.normalization = from_meta(meta)
        self.uses_timm = str(meta["arch"]).startswith(TIMM_PREFIX)  # the logged models then need timm to load
        self.presize_size = int(presize_size)
        self.reduction = decode_reduction(self.presize_size, self.size)  # the loaders' decode of the store

    def pixels(self, image: Any) -> np.ndarray:
        source = io.BytesIO(as_bytes(image)) if not is_path(image) else Path(str(image))
        try:
            pixels = presized_pixels(source, self.presize_size, self.reduction)
            return square_of(pixels, reduced(self.presize_size, self.reduction), CENTRE)
        except Exception as err:
            raise PetpipeError(
                f"image {str(image)[:80]!r} cannot be decoded ({type(err).__name__}: {err}); give a file path or the "
                "file's bytes"
            ) from None

    def inputs(self, images: list[Any]) -> torch.Tensor:
        """What the network takes: float32 NCHW at the training size, normalised as in training."""
        squares = np.stack([self.pixels(image) for image in images])
        return valid_batch(
            torch.from_numpy(squares).permute(0, 3, 1, 2).contiguous(), size=self.size, normalization=self.normalization
        )

    @torch.inference_mode()
    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        if IMAGE_COLUMN not in frame.columns:
            raise PetpipeError(
                f"the input needs a column {IMAGE_COLUMN!r} of image paths or bytes; got columns {list(frame.columns)}"
            )
        labels, probabilities = [], []
        images = list(frame[IMAGE_COLUMN])
        for start in range(0, len(images), BATCH):
            best = torch.softmax(self.model(self.inputs(images[start : start + BATCH])).float(), dim=1).max(dim=1)
            labels += [self.classes[int(i)] for i in best.indices]
            probabilities += best.values.tolist()
        return pd.DataFrame({"label": labels, "probability": probabilities})


def is_path(image: Any) -> bool:
    return isinstance(image, str | Path) and (len(str(image)) < 4096 and Path(str(image)).is_file())


def as_bytes(image: Any) -> bytes:
    """Encoded image bytes; a string that is not a file is read as base64 (how JSON, e.g. a serving
    request, carries bytes), with or without MIME line breaks (MLflow's input examples have them)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    try:
        return base64.b64decode("".join(str(image).split()), validate=True)
    except (binascii.Error, ValueError):
        raise PetpipeError(f"image {str(image)[:80]!r} is neither an existing file nor base64-encoded bytes") from None


def load_classifier(checkpoint: Path, presize_size: int) -> ImageClassifier:
    return ImageClassifier(checkpoint, presize_size)


def example_input(store: PresizedStore, count: int = 2) -> pd.DataFrame:
    """An input example for the logged models: the first ``count`` validation images of the store, as
    PNG bytes (two, so that the exported network keeps a variable batch size)."""
    from PIL import Image

    indices = list(store.indices("valid")[:count])
    indices += indices[:1] * (count - len(indices))  # one validation image: repeated, the batch size must stay > 1
    encoded = []
    for index in indices:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(store.image(int(index)))).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return pd.DataFrame({IMAGE_COLUMN: encoded})
