"""Backbones: Conv-4 and ResNet-12. Both map images ``(B, C, H, W)`` to features ``(B, d)``.

They are plain ``nn.Module`` trees with parameters and BatchNorm buffers only, so they work with
``torch.func.functional_call`` (the gradient inner loops pass adapted weights explicitly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewshot.errors import ConfigError


class Conv4(nn.Module):
    """Four blocks of 3x3 conv (no bias) -> BatchNorm -> ReLU -> 2x2 max-pool, then flatten.

    Args:
        in_channels: 1 or 3.
        width: filters per block (64 in the literature; 48 in CxGrad's 84x84 configs).
        pools: how many of the four blocks end with a max-pool (the first ``pools`` blocks do). With
            all four a 28x28 input gives ``d = width``; fewer pools keep more spatial cells, which the
            direct-sum loss needs when the training classes outnumber ``width`` (it requires d > C).
        image_size: input side, used to compute :attr:`feature_dim`.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, pools: int = 4, image_size: int = 84) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"Conv4 takes 1 or 3 input channels, got {in_channels}")
        if not 0 <= pools <= 4:
            raise ConfigError(f"pools must be in 0..4, got {pools}")
        self.config: dict[str, Any] = {
            "arch": "conv4",
            "in_channels": in_channels,
            "width": width,
            "pools": pools,
            "image_size": image_size,
        }
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for block in range(4):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if block < pools:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = width
        self.encoder = nn.Sequential(*layers)
        self.feature_dim = width * side * side

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, d)``."""
        return self.encoder(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _ResBlock(nn.Module):
    """Three 3x3 conv-BN-LeakyReLU(0.1) layers with a 1x1 conv-BN shortcut, then 2x2 max-pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 (Lee et al. 2019; widths 64-160-320-640), global average pooled: ``d = 640``."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640), image_size: int = 84) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"arch": "resnet12", "in_channels": in_channels, "widths": list(widths), "image_size": image_size}
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(_ResBlock(cin, w))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 640)``."""
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(config: dict[str, Any]) -> Conv4 | ResNet12:
    """Rebuild a backbone from its ``config`` dict (as stored in a model card)."""
    cfg = dict(config)
    arch = cfg.pop("arch")
    if arch == "conv4":
        return Conv4(**cfg)
    if arch == "resnet12":
        cfg["widths"] = tuple(cfg.get("widths", (64, 160, 320, 640)))
        return ResNet12(**cfg)
    raise ConfigError(f"unknown architecture {arch!r}: use conv4 or resnet12")
