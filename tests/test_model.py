import pytest
import torch
from torch import nn
from torchvision import models

from petpipe.model import (
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
    assert kinds == ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert head[3].p == 0.25 and head[7].p == 0.5 and head[4].out_features == 512


def test_freeze_keeps_batchnorm_and_head_trainable(resnet):
    freeze_body(resnet)
    body, head = resnet
    for module in body.modules():
        for p in module.parameters(recurse=False):
            assert p.requires_grad == isinstance(module, nn.BatchNorm2d)
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


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "densenet121", "efficientnet_b0", "regnet_y_400mf"])
def test_other_cnn_families_get_a_body_head_and_three_real_groups(arch):
    model = build_model(arch, 4)
    model.eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert all(len(group) > 0 for group in layer_groups(model))


def test_weights_from_a_state_dict_file(tmp_path):
    net = models.get_model("resnet18", weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    loaded = load_torchvision("resnet18", str(tmp_path / "r18.pt"))
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)


def test_bad_weights_path_and_mismatched_file(tmp_path):
    with pytest.raises(ModelError, match="train.weights: 'nope.pt' is neither 'imagenet', 'none' nor an existing"):
        load_torchvision("resnet18", "nope.pt")
    torch.save(models.get_model("resnet34", weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ModelError, match=r"train.weights: .*r34.pt does not fit resnet18: \d+ tensors missing or unexpected, e.g. \['layer"):
        load_torchvision("resnet18", str(tmp_path / "r34.pt"))


def test_non_cnn_and_auxiliary_head_models_are_refused():
    with pytest.raises(ModelError, match="train.arch: 'vit_b_16' has no convolutional body"):
        build_model("vit_b_16", 2)
    with pytest.raises(ModelError, match="train.arch: 'googlenet' has auxiliary classifiers"):
        build_model("googlenet", 2)
