"""The CIFAR ResNets / wide ResNets mmkd registers with timm."""

from __future__ import annotations

import pytest
import timm
import torch

import mmkd.adapters.cifar_models  # noqa: F401  (registers the models)

# parameter counts of the papers (He et al. 2016; Zagoruyko & Komodakis 2016), with a 10-class fc
PAPER_PARAMS = {
    "resnet20_cifar": 0.27e6,
    "resnet56_cifar": 0.86e6,
    "resnet110_cifar": 1.7e6,
    "wrn_16_1": 0.175e6,
    "wrn_40_2": 2.2e6,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_the_papers(name):
    model = timm.create_model(name, num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, params


def test_timm_api_pooled_features_and_stages():
    model = timm.create_model("resnet8_cifar", num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 64)  # pooled features, no classifier
    stages = timm.create_model("wrn_16_1", features_only=True)(x)
    assert [tuple(t.shape[1:]) for t in stages] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert "resnet20_cifar" in timm.list_models("*_cifar")
    config = timm.data.resolve_data_config({}, model=timm.create_model("resnet20_cifar"))
    assert config["input_size"] == (3, 32, 32)
