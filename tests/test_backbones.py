"""Backbones: feature shapes and torch.func.functional_call with explicit parameters and buffers."""

import pytest
import torch
from torch.func import functional_call

from fewshot.models.backbones import Conv4, ResNet12, build_backbone

pytestmark = pytest.mark.unit


def test_conv4_feature_dims():
    assert Conv4(1, 64, 4, 28)(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    assert Conv4(3, 64, 4, 64)(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)
    m = Conv4(1, 64, 2, 28)
    assert m.features(torch.zeros(3, 1, 28, 28)).shape == (3, m.feature_dim) and m.feature_dim == 3136


def test_resnet12_gives_640_features():
    m = ResNet12(3, image_size=32)
    assert m.features(torch.zeros(2, 3, 32, 32)).shape == (2, 640)


def test_functional_call_with_explicit_params_and_buffers():
    for m in (Conv4(3, 16, 4, 32), ResNet12(3, (8, 8, 8, 16), 32)):
        x = torch.randn(4, 3, 32, 32)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        out = functional_call(m, (params, buffers), (x,))
        assert torch.allclose(out, m(x), atol=1e-6)
        (g,) = torch.autograd.grad(out.sum(), [next(iter(params.values()))])
        assert g.abs().sum() > 0


def test_build_backbone_round_trips_config():
    m = Conv4(1, 32, 3, 28)
    assert build_backbone(m.config).feature_dim == m.feature_dim
