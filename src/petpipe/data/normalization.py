"""Input normalisation: the per-channel mean and std that the model's weights expect.

``train.normalize: auto`` follows the weights (timm's ``pretrained_cfg``, torchvision's weight
transforms; ImageNet statistics for ``weights: none``). The values used travel with the
checkpoint, so every later stage and the logged models normalise exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Normalization:
    """Per-channel (R, G, B) mean and std of inputs scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def as_metrics(self) -> dict[str, float]:
        """Six scalars (``normalize_mean_r`` ...): metrics files and MLflow metrics hold numbers, not lists."""
        return {
            f"normalize_{name}_{channel}": float(value)
            for name, values in (("mean", self.mean), ("std", self.std))
            for channel, value in zip("rgb", values)
        }

    def describe(self) -> str:
        return f"mean {list(self.mean)}, std {list(self.std)}"


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def from_stats(mean: Any, std: Any) -> Normalization:
    return Normalization(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def from_meta(meta: dict[str, Any]) -> Normalization:
    """The normalisation a checkpoint was trained with (checkpoints from before it was recorded: ImageNet)."""
    recorded = meta.get("normalize")
    return from_stats(recorded["mean"], recorded["std"]) if recorded else IMAGENET


def resolve_normalization(setting: str | tuple, *, weights: str, pretrained: Normalization) -> Normalization:
    """``train.normalize`` -> the statistics to use.

    ``auto``: those of the weights (``pretrained``: the model's own), ImageNet's for random weights;
    ``imagenet``; or an explicit ``[[r, g, b], [r, g, b]]`` (mean, std).
    """
    if setting == "imagenet":
        return IMAGENET
    if setting == "auto":
        return IMAGENET if weights == "none" else pretrained
    mean, std = setting
    return from_stats(mean, std)
