"""Backbone + new head, layer groups, freeze / unfreeze.

The model is ``nn.Sequential(body, head)`` like fastai's ``vision_learner``: the body is the
torchvision network cut before its pooling layer, the head is fastai's default head
(concat pooling, BatchNorm, dropout 0.25 / 0.5, a 512-unit hidden layer).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from petpipe.errors import PetpipeError

HIDDEN = 512  # fastai create_head: lin_ftrs=[512]
DROPOUT = 0.5  # fastai create_head: ps=0.5 (the first dropout uses ps/2)
AUX_HEAD_ARCHS = ("googlenet", "inception_v3")  # their bodies hold training-only auxiliary classifiers
# Where fastai splits a body into two layer groups (vision/learner.py model_meta), by arch family:
# the first N children of the cut body form group 0. Families fastai has no split for get two
# groups, body | head.
BODY_SPLITS = {"resnet": 6, "resnext": 6, "wide_resnet": 6, "densenet": 7, "vgg": 22, "alexnet": 6, "squeezenet": 5}
# The layers fastai's train_bn keeps trainable in a frozen body and exempts from weight decay:
# BatchNorm and InstanceNorm (both _NormBase) and LayerNorm (convnext's LayerNorm2d too), not GroupNorm.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm)


class ModelError(PetpipeError, ValueError):
    """The requested model cannot be built; the message names the key and the fix."""


@cache
def available_archs() -> list[str]:
    """torchvision's classification models (not detection, segmentation, video...)."""
    return sorted(models.list_models(module=models))


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side: twice the features of either (fastai's default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1), nn.functional.adaptive_avg_pool2d(x, 1)], dim=1)


def create_head(n_features: int, n_classes: int) -> nn.Sequential:
    """fastai's default head: pool, [BN, dropout, linear, ReLU], [BN, dropout, linear]."""
    head = nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(DROPOUT / 2),
        nn.Linear(2 * n_features, HIDDEN, bias=False),  # no bias: BatchNorm just before supplies it
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(HIDDEN),
        nn.Dropout(DROPOUT),
        nn.Linear(HIDDEN, n_classes, bias=False),
    )
    for layer in head:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
        elif isinstance(layer, nn.BatchNorm1d):  # fastai BatchNorm(nf, ndim=1): weight 1, bias 1e-3
            nn.init.ones_(layer.weight)
            nn.init.constant_(layer.bias, 1e-3)
    return head


def load_torchvision(arch: str, weights: str) -> nn.Module:
    """``weights``: ``imagenet`` (torchvision's default weights), ``none``, or a state-dict path."""
    archs = available_archs()
    if arch not in archs:
        close = [a for a in archs if a.startswith(arch[:5])][:8] or archs[:8]
        raise ModelError(f"train.arch: {arch!r} is not a torchvision classification model; e.g. {', '.join(close)}")
    if weights == "imagenet":
        try:
            return models.get_model(arch, weights="DEFAULT")
        except (OSError, RuntimeError) as err:  # urllib errors are OSErrors; a corrupt cached file a RuntimeError
            raise ModelError(
                f"train.weights: torchvision's ImageNet weights for {arch} could not be loaded ({err}); they are "
                "downloaded once into the torch hub cache, so run with network access once, or set train.weights "
                "to a state-dict file"
            ) from None
    net = models.get_model(arch, weights=None)
    if weights == "none":
        return net
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"train.weights: {weights!r} is neither 'imagenet', 'none' nor an existing state-dict file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ModelError(f"train.weights: {path} does not fit {arch}: {str(err)[:300]}") from None
    # Only the old classifier (replaced by petpipe's head anyway) may differ; the body must fit exactly.
    classifier = list(net.named_children())[-1][0] + "."
    misfits = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith(classifier)]
    if misfits:
        raise ModelError(f"train.weights: {path} does not fit {arch}: {len(misfits)} tensors missing or unexpected, e.g. {misfits[:3]}")
    return net


def cut_body(net: nn.Module, arch: str) -> nn.Sequential:
    """The network up to (not including) its last pooling child, as fastai's ``create_body`` does."""
    if arch in AUX_HEAD_ARCHS:
        raise ModelError(f"train.arch: {arch!r} has auxiliary classifiers inside its body, which petpipe does not support; use e.g. resnet50")
    children = list(net.children())
    pools = [i for i, c in enumerate(children) if isinstance(c, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d))]
    if pools:
        body = children[: pools[-1]]
    elif isinstance(getattr(net, "features", None), nn.Module):  # densenet pools in forward()
        body = [net.features]
    else:
        raise ModelError(f"train.arch: {arch!r} has no convolutional body followed by pooling; use a CNN such as resnet34 or convnext_tiny")
    # vgg, efficientnet, convnext (one `features` block), regnet (stem + trunk): open the blocks so
    # the layer groups have stages to split.
    while len(body) < 3 and any(isinstance(m, nn.Sequential) and len(m) > 1 for m in body):
        body = [c for m in body for c in (m.children() if isinstance(m, nn.Sequential) else [m])]
    return nn.Sequential(*body)


def body_features(body: nn.Module) -> int:
    """Channels the body outputs, found with one dummy forward pass."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 224, 224))
    body.train(was_training)
    return out.shape[1]


class PetpipeModel(nn.Sequential):
    """``Sequential(body, head)`` that remembers where fastai splits its body (None: no split)."""

    def __init__(self, body: nn.Sequential, head: nn.Sequential, body_split: int | None):
        super().__init__(body, head)
        self.body_split = body_split


def body_split_for(arch: str, n_children: int) -> int | None:
    """fastai's split point for ``arch``'s family, if it has one and the body is long enough."""
    family = next((f for f in sorted(BODY_SPLITS, key=len, reverse=True) if arch.startswith(f)), None)
    split = BODY_SPLITS.get(family) if family else None
    return split if split is not None and 0 < split < n_children else None


def build_model(arch: str, n_classes: int, weights: str = "none") -> PetpipeModel:
    body = cut_body(load_torchvision(arch, weights), arch)
    return PetpipeModel(body, create_head(body_features(body), n_classes), body_split_for(arch, len(body)))


def layer_groups(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """fastai's groups for discriminative LRs: early body | late body | head for the families it
    splits (resnets, densenets, vgg, ...), body | head for the others (efficientnet, convnext, ...)."""
    body, head = model[0], model[1]
    split = getattr(model, "body_split", None)
    if split is None:
        return [list(body.parameters()), list(head.parameters())]
    return [list(body[:split].parameters()), list(body[split:].parameters()), list(head.parameters())]


def freeze_body(model: nn.Sequential) -> None:
    """Train only the head, plus every norm layer (fastai's ``train_bn=True``)."""
    for module in model[0].modules():
        trainable = isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)
    model[1].requires_grad_(True)


def unfreeze(model: nn.Module) -> None:
    model.requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
