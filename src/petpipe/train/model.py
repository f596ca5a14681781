"""Backbone + new head, layer groups, freeze / unfreeze.

The model is ``nn.Sequential(body, head)`` like fastai's ``vision_learner``: the body is the
torchvision network cut before its pooling layer, or a timm model's features (``timm/<name>``, as
fastai's ``create_timm_model``); the head is fastai's default head (concat pooling, BatchNorm,
dropout 0.25 / 0.5, a 512-unit hidden layer).
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from petpipe.data.normalization import IMAGENET, Normalization, from_stats
from petpipe.run.errors import PetpipeError

TIMM_PREFIX = "timm/"  # train.arch: timm/<name>[.<pretrained tag>]; anything else is a torchvision name
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


def create_head(n_features: int, n_classes: int, pool: bool = True) -> nn.Sequential:
    """fastai's default head: [pool], [BN, dropout, linear, ReLU], [BN, dropout, linear].

    ``pool=False`` for bodies that pool themselves (timm models without a ``pool_size``), as fastai.
    """
    n_in = 2 * n_features if pool else n_features
    head = nn.Sequential(
        *((AdaptiveConcatPool2d(), nn.Flatten()) if pool else ()),
        nn.BatchNorm1d(n_in),
        nn.Dropout(DROPOUT / 2),
        nn.Linear(n_in, HIDDEN, bias=False),  # no bias: BatchNorm just before supplies it
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
    """``weights``: ``imagenet`` (torchvision's default weights), ``none``, or a state-dict file of the whole model."""
    if arch not in available_archs():
        raise ModelError(f"train.arch: {arch!r} is not a torchvision classification model{close_matches(arch)}")
    if weights == "imagenet":
        try:
            return models.get_model(arch, weights="DEFAULT")
        except (OSError, RuntimeError) as err:  # urllib errors are OSErrors; a corrupt cached file a RuntimeError
            raise ModelError(
                f"train.weights: torchvision's ImageNet weights for {arch} could not be loaded ({err}); they are "
                "downloaded once into the torch hub cache, so run with network access once, or set train.weights "
                "to a state-dict file of the model"
            ) from None
    net = models.get_model(arch, weights=None)
    if weights != "none":
        # The old classifier (replaced by petpipe's head anyway) need not match; the rest must.
        load_weights_file(net, Path(weights), arch, classifier=(list(net.named_children())[-1][0],))
    return net


def torchvision_normalization(arch: str) -> Normalization:
    """The mean and std of torchvision's default weights for ``arch`` (their inference transforms)."""
    transforms = models.get_model_weights(arch).DEFAULT.transforms()
    return from_stats(transforms.mean, transforms.std)


def close_matches(name: str) -> str:
    """'; close matches: ...' from torchvision's and timm's model names (empty when there are none)."""
    import timm

    torchvision_names = difflib.get_close_matches(name, available_archs(), n=4, cutoff=0.6)
    timm_names = [
        TIMM_PREFIX + n
        for n in difflib.get_close_matches(name.removeprefix(TIMM_PREFIX), timm.list_models(), n=4, cutoff=0.6)
    ]
    found = torchvision_names + timm_names
    return (
        f"; close matches: {', '.join(found)}"
        if found
        else "; give a torchvision name (e.g. resnet34) or timm/<name> (e.g. timm/convnext_tiny)"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors``, ``.pt`` or ``.pth`` file (tensors only: nothing is unpickled)."""
    if not path.is_file():
        raise ModelError(f"train.weights: {str(path)!r} is neither 'imagenet', 'none' nor an existing state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise several kinds for a file that is not theirs
        raise ModelError(
            f"train.weights: {path} cannot be read as a state dict ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"train.weights: {path} does not hold a state dict (a mapping of tensor names to tensors)")
    return state


def load_weights_file(net: nn.Module, path: Path, arch: str, *, classifier: tuple[str, ...]) -> None:
    """Load a state-dict file into ``net``; keys under ``classifier`` are ignored, any other misfit is an error."""

    def is_classifier(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    state = {k: v for k, v in read_state_dict(path).items() if not is_classifier(k)}
    expected = {k: v for k, v in net.state_dict().items() if not is_classifier(k)}
    misfits = [f"missing {k}" for k in expected if k not in state]
    misfits += [f"unexpected {k}" for k in state if k not in expected]
    misfits += [
        f"{k} has shape {list(v.shape)}, the model {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if misfits:
        raise ModelError(
            f"train.weights: {path} does not fit {arch}: {len(misfits)} tensors missing, unexpected or of another "
            "shape, e.g. "
            f"{'; '.join(misfits[:3])} (the file must be the state dict of that model, with its library's key names)"
        )
    net.load_state_dict(state, strict=False)


def cut_body(net: nn.Module, arch: str) -> nn.Sequential:
    """The network up to (not including) its last pooling child, as fastai's ``create_body`` does."""
    if arch in AUX_HEAD_ARCHS:
        raise ModelError(
            f"train.arch: {arch!r} has auxiliary classifiers inside its body, which petpipe does not support; use "
            "e.g. resnet50"
        )
    children = list(net.children())
    pools = [
        i for i, c in enumerate(children) if isinstance(c, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d))
    ]
    if pools:
        body = children[: pools[-1]]
    elif isinstance(getattr(net, "features", None), nn.Module):  # densenet pools in forward()
        body = [net.features]
    else:
        raise ModelError(
            f"train.arch: {arch!r} has no convolutional body followed by pooling; use a CNN such as resnet34 or "
            "convnext_tiny"
        )
    # vgg, efficientnet, convnext (one `features` block), regnet (stem + trunk): open the blocks so
    # the layer groups have stages to split.
    while len(body) < 3 and any(isinstance(m, nn.Sequential) and len(m) > 1 for m in body):
        body = [c for m in body for c in (m.children() if isinstance(m, nn.Sequential) else [m])]
    return nn.Sequential(*body)


class TimmBody(nn.Module):
    """A timm model without its classifier as a body, as fastai's ``TimmBody``: its ``forward_features``
    (unpooled feature maps) when it has a pooling size, else its whole forward (already pooled)."""

    def __init__(
        self, model: nn.Module, *, needs_pool: bool, normalization: Normalization, has_unused_parameters: bool
    ):
        super().__init__()
        self.model = model
        self.needs_pool = needs_pool
        self.num_features: int = model.num_features
        self.normalization = normalization
        self.has_unused_parameters = has_unused_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x) if self.needs_pool else self.model(x)


def build_timm_body(name: str, weights: str) -> TimmBody:
    """``timm.create_model(name, num_classes=0)`` as fastai's ``create_timm_model`` builds it; ``weights``:
    ``imagenet`` (timm's pretrained weights for the name's tag, from the Hugging Face hub), ``none``, or a
    state-dict file with timm's key names (the classifier's keys are ignored)."""
    import timm

    if not timm.is_model(name):
        raise ModelError(f"train.arch: {TIMM_PREFIX + name!r} is not a timm model{close_matches(name)}")
    try:
        model = timm.create_model(name, pretrained=weights == "imagenet", num_classes=0)
    except RuntimeError as err:
        if "pretrained tag" not in str(err):
            raise
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")[:6]
        tags = ", ".join(TIMM_PREFIX + tag for tag in tags) or "none"
        raise ModelError(f"train.arch: {TIMM_PREFIX + name!r}: {err} Names with pretrained weights: {tags}") from None
    except OSError as err:  # the hub download: offline, or the weights are not there
        raise ModelError(
            f"train.weights: timm's pretrained weights for {name} could not be downloaded ({type(err).__name__}: "
            f"{str(err)[:160]}); "
            "run once with network access (they are cached by huggingface_hub), or set train.weights to a state-dict "
            "file "
            "of the model (.safetensors, .pt or .pth)"
        ) from None
    config = model.pretrained_cfg
    if weights not in ("imagenet", "none"):
        classifier = config.get("classifier") or ()
        load_weights_file(
            model,
            Path(weights),
            f"{TIMM_PREFIX}{name}",
            classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier),
        )
    needs_pool = config.get("pool_size") is not None
    return TimmBody(
        model,
        needs_pool=needs_pool,
        normalization=from_stats(config["mean"], config["std"]),
        has_unused_parameters=needs_pool and has_head_parameters(model, config),
    )


def has_head_parameters(model: nn.Module, config: dict) -> bool:
    """Whether the module holding the classifier (``head`` of ``head.fc``) keeps parameters that
    ``forward_features`` never uses (convnext's ``head.norm``): DDP must then look for unused ones."""
    classifier = config.get("classifier")
    names = [classifier] if isinstance(classifier, str) else list(classifier or ())
    parents = {n.rsplit(".", 1)[0] for n in names if "." in n}
    return any(any(True for _ in model.get_submodule(parent).parameters()) for parent in parents)


def body_features(body: nn.Module) -> int:
    """Channels the body outputs, found with one dummy forward pass."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 224, 224))
    body.train(was_training)
    return out.shape[1]


class PetpipeModel(nn.Sequential):
    """``Sequential(body, head)`` that remembers where fastai splits its body (None: no split) and
    the normalisation its weights expect (``pretrained_normalization``)."""

    def __init__(
        self,
        body: nn.Module,
        head: nn.Sequential,
        body_split: int | None,
        pretrained_normalization: Normalization = IMAGENET,
        has_unused_parameters: bool = False,
    ):
        super().__init__(body, head)
        self.body_split = body_split
        self.pretrained_normalization = pretrained_normalization
        # DistributedDataParallel must be told when some parameters never get a gradient.
        self.has_unused_parameters = has_unused_parameters


def body_split_for(arch: str, n_children: int) -> int | None:
    """fastai's split point for ``arch``'s family, if it has one and the body is long enough."""
    family = next((f for f in sorted(BODY_SPLITS, key=len, reverse=True) if arch.startswith(f)), None)
    split = BODY_SPLITS.get(family) if family else None
    return split if split is not None and 0 < split < n_children else None


def build_model(arch: str, n_classes: int, weights: str = "none") -> PetpipeModel:
    """``arch``: a torchvision name or ``timm/<name>``; ``weights``: ``imagenet``, ``none`` or a state-dict file."""
    if arch.startswith(TIMM_PREFIX):
        timm_body = build_timm_body(arch.removeprefix(TIMM_PREFIX), weights)
        head = create_head(timm_body.num_features, n_classes, pool=timm_body.needs_pool)
        # fastai's default_split for timm models: two layer groups, body | head.
        return PetpipeModel(
            timm_body, head, None, timm_body.normalization, has_unused_parameters=timm_body.has_unused_parameters
        )
    body = cut_body(load_torchvision(arch, weights), arch)
    return PetpipeModel(
        body,
        create_head(body_features(body), n_classes),
        body_split_for(arch, len(body)),
        torchvision_normalization(arch),
    )


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
