"""Adapters built from a verified bundle alone (what the server runs): backbone features and the
adapted network in ONNX Runtime, inner loops in torch, settings from ``manifest.json``.

They call the same adapter classes as ``fewshot eval``, so a bundle's predictions equal the shipped
model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fewshot.export.onnx_graphs import network_inputs
from fewshot.export.registry import Bundle
from fewshot.models.features import OnnxFeatures, onnx_providers
from fewshot.models.meta.inner_loop import InnerLoopAdapter, InnerLoopTask
from fewshot.models.meta.network import MetaConv4
from fewshot.models.meta.rules import build_rule
from fewshot.models.metric_adapter import MetricAdapter
from fewshot.models.preprocess import InputSpec
from fewshot.models.zoo import build_head


@dataclass
class OnnxInnerLoopTask:
    """An adapted task whose classification runs ``network.onnx`` with the task's weights as inputs."""

    state: InnerLoopTask
    session: Any

    @property
    def transductive(self) -> bool:
        return self.state.transductive

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.state.bn_mode != "support":
            return self.state.logits(query)  # transductive BatchNorm is not what network.onnx computes
        feeds = {k: v.cpu().numpy() for k, v in network_inputs(self.state.net, self.state.params, self.state.bn_stats, self.state.step).items()}
        feeds["images"] = np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(query), dim=1)


class OnnxInnerLoopAdapter:
    """The bundle's inner loop (torch) with classification in ONNX Runtime."""

    def __init__(self, adapter: InnerLoopAdapter, session: Any) -> None:
        self.adapter, self.session = adapter, session
        self.steps, self.bn_mode = adapter.steps, adapter.bn_mode

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> OnnxInnerLoopTask:
        return OnnxInnerLoopTask(self.adapter.adapt(support, labels), self.session)


def bundle_spec(bundle: Bundle) -> InputSpec:
    return InputSpec.from_dict(bundle.manifest["input"])


def bundle_adapter(bundle: Bundle, head: str | None = None, device: str = "auto", shots: int = 1,
                   bn_mode: str | None = None, steps: int | None = None, **overrides: Any):
    """The adapter of ``bundle`` for ``head`` (default: the model's own method)."""
    import onnxruntime as ort

    m = bundle.manifest
    tensors = load_file(str(bundle.file("meta.safetensors")))
    head = head or m["default_head"]
    if m["family"] == "metric":
        extract = OnnxFeatures(str(bundle.file("backbone.onnx")), int(m["feature_dim"]), device)
        return MetricAdapter(extract, build_head(m["heads"], head, shots, tensors.get("center"), m["name"], **overrides))
    if head not in (m["method"], "inner_loop"):
        raise ValueError(f"model {m['name']} adapts with its inner loop ({m['method']}), not {head!r}")
    arch = {k: v for k, v in m["architecture"].items() if k != "arch"}
    net = MetaConv4(**arch)
    loop = m["inner_loop"]
    rule = build_rule(m["method"], net, loop["steps"], loop["alpha"], loop.get("beta", 1.0))
    rule.load_state_dict({k.removeprefix("rule."): v for k, v in tensors.items() if k.startswith("rule.")})
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    steps = loop["steps"] if steps is None else steps
    if not 1 <= steps <= loop["max_steps"]:
        raise ValueError(f"inner steps must be in 1..{loop['max_steps']} for {m['name']}, got {steps}")
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    adapter = InnerLoopAdapter(net, rule.to(dev).eval(), {k: v.to(dev) for k, v in params.items()}, steps,
                               bn_mode or loop["bn_mode"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(bundle.file("network.onnx")), opts, providers=onnx_providers(device))
    return OnnxInnerLoopAdapter(adapter, session)
