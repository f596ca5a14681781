import pytest
import torch
from torch import nn
from torchvision import models

from petpipe.train.model import (
    ModelError,
    build_model,
    count_trainable,
    create_head,
    freeze_body,
    layer_groups,
    load_torchvision,
    unfreeze,
)


@pytest.fixture(scope="module")
def resnet():
    return build_model("resnet18", 3)


def test_head_replaces_the_classifier(resnet):
    body, head = resnet
    assert not any(isinstance(m, nn.Linear) for m in body.modules())
    assert head[-1].out_features == 3 and head[2].num_features == 2 * 512
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_fastai_head_layout():
    head = create_head(64, 5)
    kinds = [type(m).__name__ for m in head]
    assert kinds == [
        "AdaptiveConcatPool2d",
        "Flatten",
        "BatchNorm1d",
        "Dropout",
        "Linear",
        "ReLU",
        "BatchNorm1d",
        "Dropout",
        "Linear",
    ]
    assert head[3].p == 0.25 and head[7].p == 0.5 and head[4].out_features == 512


def test_freeze_keeps_batchnorm_and_head_trainable(resnet):
    freeze_body(resnet)
    body, head = resnet
    for module in body.modules():
        for p in module.parameters(recurse=False):
            assert p.requires_grad == isinstance(module, nn.BatchNorm2d)
    assert count_trainable(resnet) == sum(
        p.numel() for m in body.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)
    ) + sum(p.numel() for p in head.parameters())
    assert all(p.requires_grad for p in head.parameters())
    frozen_count = count_trainable(resnet)
    unfreeze(resnet)
    assert count_trainable(resnet) == sum(p.numel() for p in resnet.parameters()) > frozen_count


def test_three_layer_groups_cover_every_parameter_once(resnet):
    groups = layer_groups(resnet)
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(resnet.parameters()))
    # resnet: stem + layer1 + layer2 | layer3 + layer4 | head, as fastai splits it
    assert {id(p) for p in resnet[0][6].parameters()} <= {id(p) for p in groups[1]}


@pytest.mark.parametrize(
    "arch, n_groups", [("mobilenet_v3_small", 2), ("efficientnet_b0", 2), ("regnet_y_400mf", 2), ("squeezenet1_1", 3)]
)
def test_other_cnn_families_get_fastais_groups(arch, n_groups):
    """fastai splits the families it knows (resnet, densenet, vgg, alexnet, squeezenet) in two; the rest are body |
    head."""
    model = build_model(arch, 4)
    model.eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    groups = layer_groups(model)
    assert len(groups) == n_groups and all(groups)
    assert sum(len(g) for g in groups) == len(list(model.parameters()))


def test_densenet_groups_match_fastai_parameter_counts():
    """fastai 2.8 vision_learner(densenet121, n_out=37): features[:7] | features[7:] | head."""
    groups = layer_groups(build_model("densenet121", 37))
    assert [sum(p.numel() for p in g) for g in groups] == [1_297_536, 5_656_320, 1_072_640]


def test_frozen_convnext_keeps_its_layernorms_trainable_like_fastai():
    """fastai's train_bn covers every norm layer: convnext_tiny (37 classes) frozen has 824,256 trainable parameters."""
    model = build_model("convnext_tiny", 37)
    freeze_body(model)
    assert count_trainable(model) == 824_256


def test_head_batchnorm_init_is_fastais():
    """fastai BatchNorm(nf, ndim=1): weight 1, bias 1e-3."""
    head = create_head(64, 5)
    for bn in (head[2], head[6]):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.allclose(
            bn.bias, torch.full_like(bn.bias, 1e-3)
        )


def test_weights_from_a_state_dict_file(tmp_path):
    net = models.get_model("resnet18", weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    loaded = load_torchvision("resnet18", str(tmp_path / "r18.pt"))
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)


def test_bad_weights_path_and_mismatched_file(tmp_path):
    with pytest.raises(ModelError, match="train.weights: 'nope.pt' is neither 'imagenet', 'none' nor an existing"):
        load_torchvision("resnet18", "nope.pt")
    torch.save(models.get_model("resnet34", weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(
        ModelError,
        match=r"train.weights: .*r34.pt does not fit resnet18: 96 tensors missing, unexpected or of another shape, "
        r"e.g. unexpected layer1.2.conv1.weight; ",
    ):
        load_torchvision("resnet18", str(tmp_path / "r34.pt"))


def test_non_cnn_and_auxiliary_head_models_are_refused():
    with pytest.raises(ModelError, match="train.arch: 'vit_b_16' has no convolutional body"):
        build_model("vit_b_16", 2)
    with pytest.raises(ModelError, match="train.arch: 'googlenet' has auxiliary classifiers"):
        build_model("googlenet", 2)
