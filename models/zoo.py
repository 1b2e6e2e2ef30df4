"""Shipped models: ``models/zoo/<name>/`` holds ``weights.safetensors`` (backbone state and, for
the metric family, the centering vector) and ``card.json`` (architecture, input spec, feature dim,
training command, data, seed, head settings and measured accuracy).

This module loads them (:func:`load_model`); packaging a training run and tuning heads live in
:mod:`fewshot.models.packaging`, and what a loaded model does (methods, adapters) in its family
(:func:`fewshot.models.family.open_shipped`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fewshot.errors import ConfigError
from fewshot.models.backbones import Conv4, ResNet12, build_backbone
from fewshot.models.card import ModelCard, accuracy_key  # noqa: F401  (re-exported for the tools)
from fewshot.models.family import family_of
from fewshot.models.features import backbone_to_onnx
from fewshot.models.preprocess import InputSpec
from fewshot.models.runtime import TorchSession

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


class ModelNotFoundError(ConfigError):
    """Raised when a model name or folder does not hold a model card and weights."""


@dataclass
class ShippedModel:
    """A loaded metric model: its card, backbone (eval mode) and centering vector."""

    name: str
    card: ModelCard
    backbone: Conv4 | ResNet12
    center: torch.Tensor | None
    path: Path

    @property
    def spec(self) -> InputSpec:
        return self.card.spec

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of its bundle's ``meta.safetensors``: backbone state and centering vector."""
        out = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        if self.center is not None:
            out["center"] = self.center
        return {k: v.detach().contiguous().float() for k, v in out.items()}

    def onnx_parts(self) -> dict[str, Callable[[], bytes]]:
        """Each ONNX part, exported when called."""
        spec = self.spec
        return {"backbone": lambda: backbone_to_onnx(self.backbone, spec.channels, spec.size)}

    def torch_parts(self, device: str = "auto") -> dict[str, TorchSession]:
        return {"backbone": TorchSession(self.backbone, ["images"], device)}


@dataclass
class ShippedInnerLoopModel:
    """A loaded inner-loop model: meta-learned initial weights and update rule."""

    name: str
    card: ModelCard
    net: Any
    rule: torch.nn.Module
    meta_params: dict[str, torch.Tensor]
    path: Path

    @property
    def spec(self) -> InputSpec:
        return self.card.spec

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of its bundle's ``meta.safetensors``: meta-parameters and update rule."""
        out = {f"param.{k}": v for k, v in self.meta_params.items()}
        out |= {f"rule.{k}": v for k, v in self.rule.state_dict().items()}
        return {k: v.detach().contiguous() for k, v in out.items()}

    def body(self) -> Conv4:
        """The meta network's body as a plain backbone (unit BatchNorm statistics, or the frozen ones of a
        network initialised from a metric backbone): its features are what a metric head would use; a
        bundle ships it as ``backbone.onnx``."""
        spec, net, p = self.spec, self.net, self.meta_params
        backbone = Conv4(spec.channels, net.width, net.pools, spec.size)
        suffix = ".0" if net.per_step_bn else ""
        convs = [m for m in backbone.encoder if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in backbone.encoder if isinstance(m, torch.nn.BatchNorm2d)]
        stats = net.frozen_statistics(p) if net.frozen_bn else [(torch.zeros(net.width), torch.ones(net.width))] * 4
        with torch.no_grad():
            for l, (conv, bn) in enumerate(zip(convs, norms)):
                conv.weight.copy_(p[f"conv{l}.weight"])
                bn.weight.copy_(p[f"bn{l}.weight{suffix}"]), bn.bias.copy_(p[f"bn{l}.bias{suffix}"])
                assert bn.running_mean is not None and bn.running_var is not None  # BatchNorm2d tracks running statistics by default
                bn.running_mean.copy_(stats[l][0]), bn.running_var.copy_(stats[l][1])
                if net.frozen_bn:  # the frozen statistics carry the backbone's epsilon (training.backbone_params)
                    bn.eps = net.bn_eps
        return backbone.eval()

    def stem_module(self) -> torch.nn.Module:
        """The blocks before ``adapt_from`` of :meth:`body` (the fixed stem): ``(B, C, H, W)`` -> its output
        ``(B, width, h, w)``; a bundle ships it as ``stem.onnx``."""
        net, encoder = self.net, self.body().encoder
        layers = sum(3 + (block < net.pools) for block in range(net.adapt_from))  # conv, BatchNorm, ReLU (, pool)
        return torch.nn.Sequential(*list(encoder)[:layers]).eval()

    def example_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """BatchNorm statistics to trace the network with: the frozen ones, or unit ones."""
        if self.net.frozen_bn:
            return [(m.detach(), v.detach()) for m, v in self.net.frozen_statistics(self.meta_params)]
        return [(torch.zeros(self.net.width), torch.ones(self.net.width))] * 4

    def network_module(self) -> tuple[torch.nn.Module, list[str]]:
        """The classifier as ``module(images, *weights)`` and its input names (``network.onnx``'s)."""
        from fewshot.models.inner_loop.onnx_network import FunctionalNetwork

        module = FunctionalNetwork(self.net, self.card.family_blocks["inner_loop"]["steps"])
        return module, ["images", *module.names]

    def onnx_parts(self) -> dict[str, Callable[[], bytes]]:
        """Each ONNX part, exported when called."""
        from fewshot.models.inner_loop.onnx_network import network_inputs, network_to_onnx

        spec, net, step = self.spec, self.net, self.card.family_blocks["inner_loop"]["steps"]

        def network() -> bytes:
            example = network_inputs(net, self.meta_params, self.example_statistics(), step)
            return network_to_onnx(net, example, step)

        parts = {"backbone": lambda: backbone_to_onnx(self.body(), spec.channels, spec.size), "network": network}
        if net.adapt_from:
            parts["stem"] = lambda: backbone_to_onnx(self.stem_module(), spec.channels, spec.size, "stem")
        return parts

    def torch_parts(self, device: str = "auto") -> dict[str, TorchSession]:
        module, names = self.network_module()
        parts = {"backbone": TorchSession(self.body(), ["images"], device), "network": TorchSession(module, names, device)}
        if self.net.adapt_from:
            parts["stem"] = TorchSession(self.stem_module(), ["images"], device)
        return parts


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """A zoo name (``omniglot-conv4-directsum``) or a folder holding ``card.json``."""
    path = Path(name_or_path)
    if (path / "card.json").exists():
        return path
    if (ZOO_DIR / str(name_or_path) / "card.json").exists():
        return ZOO_DIR / str(name_or_path)
    names = sorted(p.name for p in ZOO_DIR.iterdir() if (p / "card.json").exists()) if ZOO_DIR.exists() else []
    raise ModelNotFoundError(f"unknown model {name_or_path!r}: shipped models are {', '.join(names) or 'none'}")


def load_model(name_or_path: str | os.PathLike) -> ShippedModel | ShippedInnerLoopModel:
    """Load a shipped model (of any family) by zoo name or folder."""
    path = model_dir(name_or_path)
    card = ModelCard.load(path)
    return family_of(card).load_shipped(path, card, load_file(str(path / "weights.safetensors")))


def load_metric_model(path: Path, card: ModelCard, tensors: dict[str, torch.Tensor]) -> ShippedModel:
    center = tensors.pop("center", None)
    backbone = build_backbone(card.architecture)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()})
    return ShippedModel(card.name, card, backbone.eval(), center, path)


def load_inner_loop_model(path: Path, card: ModelCard, tensors: dict[str, torch.Tensor]) -> ShippedInnerLoopModel:
    from fewshot.models.inner_loop.family import inner_loop_model_parts

    net, rule, params = inner_loop_model_parts(card.method, card.architecture, card.family_blocks["inner_loop"], tensors)
    return ShippedInnerLoopModel(card.name, card, net, rule, params, path)


def shipped_models(zoo: Path = ZOO_DIR) -> list[str]:
    """Names of the shipped models (folders of ``zoo`` with a ``card.json``), sorted."""
    return sorted(p.name for p in zoo.iterdir() if (p / "card.json").exists())
