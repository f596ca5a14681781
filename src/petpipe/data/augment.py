"""fastai's ``aug_transforms`` on whole batches, on the training device, with a single resample.

The formulas and defaults are those of fastai 2.8's ``aug_transforms(min_scale=0.75)``
(vision/augment.py): horizontal flip, rotation, zoom and perspective warp, each with its own
probability; a square random resized crop; brightness and contrast in logit space. fastai runs
the crop and the affine/warp as two ``grid_sample`` calls; here every geometric step is a 3x3
matrix, they are multiplied into one projective transform per image, and the batch is resampled
once (sharper, and half the memory traffic).

Coordinates are ``grid_sample``'s normalised [-1, 1] with ``align_corners=True`` (x = column,
y = row), and every matrix maps OUTPUT coordinates to INPUT coordinates. An output point goes
through, in this order::

    crop -> zoom -> rotate -> flip -> warp -> input pixel
    transform = warp @ flip @ rotate @ zoom @ crop

In image terms that is fastai's pipeline: the full image is warped, flipped, rotated and zoomed
(reflection padding at the image's own borders), then the random crop is taken and resized.

Random numbers are drawn on the CPU from the caller's ``torch.Generator``, as [B]-shaped
tensors; the finished [B, 3, 3] transforms and lighting values go to the images' device in one
pinned, non-blocking copy. The same seed gives the same augmentation on CPU and CUDA, no global RNG
state is read, and nothing waits for the GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from petpipe.data.normalization import IMAGENET, Normalization
from petpipe.run.sections import AugmentConfig

LOGIT_EPS = 1e-6  # keeps logit() finite on pure black / white pixels

# The four corners of the image as [x, y] points, in grid_sample coordinates.
CORNERS = ((-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0))


# The settings are the params file's train.augment section: defined, documented and validated once, in config.
AugmentParams = AugmentConfig
# fastai's aug_transforms(min_scale=0.75) defaults (the pets profiles use them).
FASTAI_DEFAULTS = dict(
    flip=True,
    max_rotate=10.0,
    min_zoom=1.0,
    max_zoom=1.1,
    max_warp=0.2,
    p_affine=0.75,
    min_scale=0.75,
    max_lighting=0.2,
    p_lighting=0.75,
)


def fastai_augment(**changes: Any) -> AugmentParams:
    """fastai's defaults with ``changes``, validated as a params file's ``train.augment`` is."""
    return AugmentParams.model_validate({**FASTAI_DEFAULTS, **changes})


@dataclass(frozen=True)
class BatchDraw:
    """One batch's random parameters: CPU tensors of shape [B], neutral where a step is not applied."""

    flip: Tensor  # bool
    degrees: Tensor  # rotation; 0 = none
    zoom: Tensor  # magnification; 1 = none
    zoom_col: Tensor  # zoom window position, U(0, 1) across / down the image
    zoom_row: Tensor
    crop_side: Tensor  # side of the square crop as a fraction of the image side; 1 = whole image
    crop_col: Tensor
    crop_row: Tensor
    warp_x: Tensor  # perspective magnitudes; 0 = none
    warp_y: Tensor
    brightness: Tensor  # fastai's "change" in (0, 1); 0.5 = none
    contrast: Tensor  # logit-space multiplier; 1 = none


# ---------------------------------------------------------------------------------------------
# Random draws (CPU, caller's generator)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _chance(n: int, p: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def draw_batch(batch_size: int, *, params: AugmentParams, generator: torch.Generator) -> BatchDraw:
    """Draws every per-image random number for one batch, always in the same order.

    fastai draws one random resized crop per batch; this draws one per image (the same formula,
    strictly more diverse).
    """
    n, g, p = batch_size, generator, params
    flip = _chance(n, 0.5, g) & p.flip
    degrees = _uniform(n, -p.max_rotate, p.max_rotate, g) * _chance(n, p.p_affine, g)
    zoom = torch.where(_chance(n, p.p_affine, g), _uniform(n, p.min_zoom, p.max_zoom, g), 1.0)
    zoom_col, zoom_row = _uniform(n, 0, 1, g), _uniform(n, 0, 1, g)
    crop_side = _uniform(n, p.min_scale, 1, g).sqrt()  # area fraction -> side fraction (ratio 1:1)
    crop_col, crop_row = _uniform(n, 0, 1, g), _uniform(n, 0, 1, g)
    warp_on = _chance(n, p.p_affine, g)
    warp_x = _uniform(n, -p.max_warp, p.max_warp, g) * warp_on
    warp_y = _uniform(n, -p.max_warp, p.max_warp, g) * warp_on
    change = _uniform(n, 0.5 * (1 - p.max_lighting), 0.5 * (1 + p.max_lighting), g)
    brightness = torch.where(_chance(n, p.p_lighting, g), change, 0.5)
    log_contrast = -math.log(1 - p.max_lighting)
    contrast = torch.where(_chance(n, p.p_lighting, g), _uniform(n, -log_contrast, log_contrast, g).exp(), 1.0)
    return BatchDraw(
        flip, degrees, zoom, zoom_col, zoom_row, crop_side, crop_col, crop_row, warp_x, warp_y, brightness, contrast
    )


# ---------------------------------------------------------------------------------------------
# Geometry: [B, 3, 3] matrices mapping output coordinates to input coordinates


def _affine(row0: list[Tensor], row1: list[Tensor]) -> Tensor:
    """[B, 3, 3] from the two top rows of 2x3 affine matrices (each entry a [B] tensor)."""
    zero, one = torch.zeros_like(row0[0]), torch.ones_like(row0[0])
    return torch.stack([torch.stack(row0, -1), torch.stack(row1, -1), torch.stack([zero, zero, one], -1)], -2)


def flip_matrix(flip: Tensor) -> Tensor:
    """x -> -x where ``flip`` is true."""
    sign = 1.0 - 2.0 * flip.double()
    zero = torch.zeros_like(sign)
    return _affine([sign, zero, zero], [zero, torch.ones_like(sign), zero])


def rotate_matrix(degrees: Tensor) -> Tensor:
    theta = degrees.double() * math.pi / 180
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    return _affine([cos, -sin, zero], [sin, cos, zero])


def crop_matrix(side: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """A square window of ``side`` (fraction of the image side) stretched over the output.

    ``col``/``row`` in [0, 1] place the window from the left/top edge to the right/bottom edge, so
    it always stays inside the image (uniform top-left corner = uniform centre).
    """
    side = side.double()
    zero = torch.zeros_like(side)
    col_c, row_c = (1 - side) * (2 * col.double() - 1), (1 - side) * (2 * row.double() - 1)
    return _affine([side, zero, col_c], [zero, side, row_c])


def zoom_matrix(zoom: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """fastai's zoom: a window of side ``1/zoom`` placed by ``col``/``row``."""
    return crop_matrix(1 / zoom.double(), col, row)


def warp_targets(warp_x: Tensor, warp_y: Tensor) -> Tensor:
    """[B, 4, 2]: where fastai's perspective warp puts the four ``CORNERS`` in the output."""
    x, y = warp_x.double(), warp_y.double()
    points = [(-1 - y, -1 - x), (-1 + y, 1 + x), (1 + y, -1 + x), (1 - y, 1 - x)]
    return torch.stack([torch.stack(p, -1) for p in points], -2)


def homography_coeffs(source: Tensor, target: Tensor) -> Tensor:
    """[B, 8] coefficients c of the projective map taking 4 ``source`` points to ``target`` points.

    ``x' = (c0 x + c1 y + c2) / (c6 x + c7 y + 1)``, ``y' = (c3 x + c4 y + c5) / (c6 x + c7 y + 1)``;
    each point pair gives two rows of an 8x8 linear system, solved batched.
    """
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    system = torch.cat([rows_u, rows_v], -2)  # [B, 8, 8]
    return torch.linalg.solve(system, torch.cat([u, v], -1))


def warp_coeffs(warp_x: Tensor, warp_y: Tensor) -> Tensor:
    """[B, 8] perspective coefficients: output point ``warp_targets`` samples input corner ``CORNERS``."""
    targets = warp_targets(warp_x, warp_y)
    corners = torch.tensor(CORNERS, dtype=targets.dtype).expand_as(targets)
    return homography_coeffs(targets, corners)


def perspective_matrix(coeffs: Tensor) -> Tensor:
    """[B, 3, 3] homogeneous form of [B, 8] perspective coefficients."""
    return torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], -1).view(-1, 3, 3)


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Applies [B, 3, 3] projective matrices to [B, ..., 2] points (x, y), dividing by w."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], -1)
    mapped = torch.einsum("bij,b...j->b...i", matrix, homogeneous)
    return mapped[..., :2] / mapped[..., 2:]


def batch_transform(draw: BatchDraw) -> Tensor:
    """[B, 3, 3] float64 on the CPU: ``warp @ flip @ rotate @ zoom @ crop`` (crop acts first)."""
    crop = crop_matrix(draw.crop_side, draw.crop_col, draw.crop_row)
    zoom = zoom_matrix(draw.zoom, draw.zoom_col, draw.zoom_row)
    warp = perspective_matrix(warp_coeffs(draw.warp_x, draw.warp_y))
    return warp @ flip_matrix(draw.flip) @ rotate_matrix(draw.degrees) @ zoom @ crop


def sample_grid(matrix: Tensor, *, size: int) -> Tensor:
    """[B, size, size, 2] grid_sample grid: output pixel centres mapped through ``matrix``."""
    axis = torch.linspace(-1, 1, size, device=matrix.device, dtype=matrix.dtype)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    output_points = torch.stack([cols, rows], -1).expand(matrix.shape[0], size, size, 2)
    return transform_points(output_points, matrix)


def resample(images: Tensor, grid: Tensor) -> Tensor:
    """The one bilinear resample of the batch (reflection padding, as fastai), on the 0-255 scale."""
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)


# ---------------------------------------------------------------------------------------------
# Pixel values


def adjust_lighting(images: Tensor, *, brightness: Tensor, contrast: Tensor) -> Tensor:
    """fastai brightness then contrast, in logit space, on [B, C, H, W] values in [0, 1]."""
    logits = torch.logit(images.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
    logits = (logits + torch.logit(brightness).view(-1, 1, 1, 1)) * contrast.view(-1, 1, 1, 1)
    return torch.sigmoid(logits)


@functools.cache
def channel_stats(normalization: Normalization, device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and std as [1, 3, 1, 1] tensors on ``device``."""
    # Cached: building them from Python lists each batch is a blocking copy to the GPU.
    mean = torch.tensor(normalization.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(images: Tensor, normalization: Normalization = IMAGENET) -> Tensor:
    """Per-channel mean/std normalisation of [B, 3, H, W] values in [0, 1]."""
    mean, std = channel_stats(normalization, images.device)
    return ((images - mean) / std).contiguous()


def denormalize(images: Tensor, normalization: Normalization = IMAGENET) -> Tensor:
    """``normalize`` undone: model inputs back to values in [0, 1] (clamped)."""
    mean, std = channel_stats(normalization, images.device)
    return (images.float() * std + mean).clamp(0, 1)


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on ``device`` without stalling the host (pinned, non-blocking copy to CUDA)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Entry points


def train_batch(
    images: Tensor,
    *,
    size: int,
    params: AugmentParams | None,
    generator: torch.Generator,
    normalization: Normalization = IMAGENET,
) -> Tensor:
    """Augmented, normalised float32 [B, 3, size, size] from a square batch (uint8, or float 0-255).

    ``params=None`` switches augmentation off (ablation): the result is ``valid_batch``'s.
    ``generator`` must be a CPU generator; it alone decides the augmentation.
    """
    if params is None:
        return valid_batch(images, size=size, normalization=normalization)
    draw = draw_batch(images.shape[0], params=params, generator=generator)
    # One host-to-device copy per batch: the 3x3 transforms and the two lighting values.
    per_image = torch.cat([batch_transform(draw).flatten(1), draw.brightness[:, None], draw.contrast[:, None]], 1)
    per_image = to_device(per_image.float(), images.device)
    matrix, brightness, contrast = per_image[:, :9].view(-1, 3, 3), per_image[:, 9], per_image[:, 10]
    unit = resample(images, sample_grid(matrix, size=size)) / 255
    if params.max_lighting > 0 and params.p_lighting > 0:
        unit = adjust_lighting(unit, brightness=brightness, contrast=contrast)
    return normalize(unit, normalization)


def valid_batch(images: Tensor, *, size: int, normalization: Normalization = IMAGENET) -> Tensor:
    """Normalised float32 [B, 3, size, size]: the whole square resampled to ``size`` (fastai's centre crop
    of the presized image), through the same single grid_sample with the identity transform."""
    identity = torch.eye(3, device=images.device).expand(images.shape[0], 3, 3)
    return normalize(resample(images, sample_grid(identity, size=size)) / 255, normalization)
