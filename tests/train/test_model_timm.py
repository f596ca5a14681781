"""timm backbones built as fastai 2.8's ``create_timm_model`` builds them, weight files, and the
normalisation that follows the weights. No network: weights are random ones saved to a file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from petpipe.data.normalization import IMAGENET, Normalization, resolve_normalization
from petpipe.train.model import (
    NORM_TYPES,
    ModelError,
    TimmBody,
    build_model,
    count_trainable,
    freeze_body,
    layer_groups,
)

N_CLASSES = 37


def fastai_head_parameters(n_features: int, n_classes: int) -> int:
    """fastai's create_head with concat pooling: BN(2nf), Linear(2nf, 512, no bias), BN(512), Linear(512, n, no
    bias)."""
    return 2 * (2 * n_features) + 2 * n_features * 512 + 2 * 512 + 512 * n_classes


def norm_parameters(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False))


# (timm name, num_features, body parameters, norm parameters in the body): the body is
# timm.create_model(name, num_classes=0), whole, as fastai's TimmBody holds it.
FASTAI_COUNTS = {
    "tf_efficientnet_lite0": (1280, 3_371_008, 42_016),
    "convnext_tiny": (
        768,
        27_820_128,
        16_320,
    ),  # includes head.norm, which forward_features does not use (as in fastai)
    "resnet18": (512, 11_176_512, 9_600),
}


@pytest.mark.parametrize("name", list(FASTAI_COUNTS))
def test_parameter_counts_and_frozen_trainable_counts_are_fastais(name):
    n_features, body_params, body_norm = FASTAI_COUNTS[name]
    reference = timm.create_model(name, num_classes=0)
    assert (
        reference.num_features,
        sum(p.numel() for p in reference.parameters()),
        norm_parameters(reference),
    ) == FASTAI_COUNTS[name]
    model = build_model(f"timm/{name}", N_CLASSES)
    assert isinstance(model[0], TimmBody) and model[0].needs_pool
    total = body_params + fastai_head_parameters(n_features, N_CLASSES)
    assert sum(p.numel() for p in model.parameters()) == total
    freeze_body(model)
    # fastai's freeze with train_bn: the head, and every norm layer of the body
    assert count_trainable(model) == body_norm + fastai_head_parameters(n_features, N_CLASSES)
    groups = layer_groups(model)  # fastai's default_split for timm: body | head
    assert [sum(p.numel() for p in g) for g in groups] == [body_params, fastai_head_parameters(n_features, N_CLASSES)]
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, N_CLASSES)


def test_the_counts_agree_with_the_torchvision_resnet18():
    """The same network from either library: the same fastai counts (11,722,816; 555,904 trainable when frozen)."""
    counts = []
    for arch in ("resnet18", "timm/resnet18"):
        model = build_model(arch, N_CLASSES)
        total = sum(p.numel() for p in model.parameters())
        freeze_body(model)
        counts.append((total, count_trainable(model)))
    assert counts[0] == counts[1] == (11_722_816, 555_904)


def test_only_convnext_keeps_parameters_that_ddp_must_be_told_about():
    assert build_model("timm/convnext_atto", 3).has_unused_parameters  # head.norm: never reached by forward_features
    assert not build_model("timm/resnet10t", 3).has_unused_parameters
    assert not build_model("resnet18", 3).has_unused_parameters


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_weights_file_round_trip_gives_the_same_body_outputs(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t").eval()  # with its 1000-class classifier: those keys are ignored
    path = tmp_path / f"resnet10t{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model("timm/resnet10t", 3, weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model[0](x), source.forward_features(x))
        assert not torch.equal(
            build_model("timm/resnet10t", 3).eval()[0](x), source.forward_features(x)
        )  # random weights differ


def test_a_renamed_key_or_a_wrong_shape_stops_with_one_line(tmp_path):
    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    renamed = {("stem.conv.weight" if k == "conv1.0.weight" else k): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ModelError) as caught:
        build_model("timm/resnet10t", 3, weights=str(tmp_path / "renamed.pt"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        f"train.weights: {tmp_path / 'renamed.pt'} does not fit timm/resnet10t: 2 tensors"
    )
    assert "missing conv1.0.weight" in message and "unexpected stem.conv.weight" in message
    reshaped = dict(state, **{"layer1.0.conv1.weight": torch.zeros(3, 3)})
    save_file({k: v.contiguous() for k, v in reshaped.items()}, tmp_path / "reshaped.safetensors")
    with pytest.raises(
        ModelError,
        match=r"^train.weights: .*reshaped.safetensors does not fit timm/resnet10t: 1 tensors missing, unexpected or "
        r"of another shape, e.g. layer1.0.conv1.weight has shape \[3, 3\], the model \[\d+, \d+, 3, 3\]",
    ):
        build_model("timm/resnet10t", 3, weights=str(tmp_path / "reshaped.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(ModelError, match=r"^train.weights: .*junk.pt cannot be read as a state dict"):
        build_model("timm/resnet10t", 3, weights=str(tmp_path / "junk.pt"))


def test_normalize_auto_follows_the_weights(tmp_path):
    lite = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    torch.save(lite.state_dict(), tmp_path / "lite0.pt")
    half = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cases = {
        (
            "timm/tf_efficientnet_lite0",
            str(tmp_path / "lite0.pt"),
        ): half,  # timm's pretrained_cfg, also for weights from a file
        ("timm/tf_efficientnet_lite0", "none"): IMAGENET,  # random weights: ImageNet statistics
        ("timm/convnext_tiny", "none"): IMAGENET,
        ("resnet18", "none"): IMAGENET,
    }
    for (arch, weights), expected in cases.items():
        model = build_model(arch, 3, weights=weights)
        assert resolve_normalization("auto", weights=weights, pretrained=model.pretrained_normalization) == expected, (
            arch,
            weights,
        )
    assert build_model("timm/convnext_tiny", 3).pretrained_normalization == IMAGENET
    assert resolve_normalization("imagenet", weights="x.pt", pretrained=half) == IMAGENET
    assert resolve_normalization(((0.1, 0.2, 0.3), (1.0, 2.0, 3.0)), weights="none", pretrained=half) == Normalization(
        (0.1, 0.2, 0.3), (1.0, 2.0, 3.0)
    )


def test_unknown_names_and_tags_name_close_matches_from_both_libraries():
    with pytest.raises(
        ModelError,
        match=r"^train.arch: 'timm/convnext_tiy' is not a timm model; close matches: convnext_tiny, "
        r".*timm/convnext_tiny",
    ):
        build_model("timm/convnext_tiy", 3)
    with pytest.raises(
        ModelError,
        match=r"^train.arch: 'resnt18' is not a torchvision classification model; close matches: resnet18, "
        r".*timm/resnet18",
    ):
        build_model("resnt18", 3)
    with pytest.raises(
        ModelError,
        match=r"^train.arch: 'timm/convnext_tiny.in1k_nope': .*Names with pretrained weights: timm/convnext_tiny\.",
    ):
        build_model("timm/convnext_tiny.in1k_nope", 3)


def test_imagenet_weights_offline_name_the_file_form_as_the_fix():
    code = "from petpipe.train.model import build_model; build_model('timm/resnet10t', 3, weights='imagenet')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert (
        result.returncode != 0
        and "ModelError: train.weights: timm's pretrained weights for resnet10t could not be downloaded" in last
    )
    assert "set train.weights to a state-dict file" in last
