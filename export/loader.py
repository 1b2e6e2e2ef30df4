"""Adapters built from a verified bundle alone (what the server runs): backbone features and the
adapted network in ONNX Runtime, inner loops in torch, settings from ``manifest.json``.

They call the same adapter classes as ``fewshot eval``, so a bundle's predictions equal the shipped
model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from fewshot.errors import ConfigError
from fewshot.export.onnx_graphs import network_inputs
from fewshot.export.registry import Bundle
from fewshot.models.features import FeatureExtractor, OnnxFeatures, run_batch, run_in_chunks
from fewshot.models.meta.inner_loop import InnerLoopAdapter, InnerLoopTask
from fewshot.models.metric_adapter import MetricAdapter
from fewshot.models.plan import ClassifyPlan, softmax_rows
from fewshot.models.preprocess import InputSpec
from fewshot.models.runtime import onnx_session, torch_device
from fewshot.models.zoo import build_head, inner_loop_adapter, meta_model_parts


class NetworkSession(Protocol):
    """What runs ``network.onnx``: an ONNX Runtime ``InferenceSession``, or the Triton feature
    backend's stand-in (``fewshot.server.triton_backend.TritonNetwork``)."""

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``feeds`` (``images`` and the weight inputs) -> ``[logits]``."""


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
        run = lambda part: self.session.run(None, {**feeds, "images": part})[0]  # noqa: E731
        images = np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(run_in_chunks(run, images, run_batch(self.session)))

    def plan(self) -> ClassifyPlan:
        """The adapted network, then a softmax. Under frozen (support) BatchNorm each query is
        independent, so concurrent requests of this task merge into one network call; transductive
        BatchNorm normalises over the call, so it never merges (``key`` None)."""
        return ClassifyPlan(None if self.transductive else ("network", id(self)), self.logits, softmax_rows)

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        return self.plan().run(query)


class OnnxInnerLoopAdapter:
    """The bundle's inner loop (torch) with classification in ONNX Runtime."""

    def __init__(self, adapter: InnerLoopAdapter, session: Any) -> None:
        self.adapter, self.session = adapter, session
        self.steps, self.bn_mode = adapter.steps, adapter.bn_mode

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> OnnxInnerLoopTask:
        return OnnxInnerLoopTask(self.adapter.adapt(support, labels), self.session)


def bundle_spec(bundle: Bundle) -> InputSpec:
    return InputSpec.from_dict(bundle.manifest["input"])


class BundleModel:
    """One bundle loaded once (ONNX Runtime sessions, meta-parameters, update rule); ``adapter`` then
    builds the adapter of any head and settings cheaply, sharing those sessions. The server keeps one
    per model; ``fewshot demo`` and the round-trip tests use it through :func:`bundle_adapter`."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int = 0, extract: FeatureExtractor | None = None,
                 network: NetworkSession | None = None) -> None:
        """``extract``: where backbone features come from (metric models), ``network``: what runs the
        adapted network (inner-loop models). Default: ``backbone.onnx`` / ``network.onnx`` in ONNX
        Runtime, in process; the Triton feature backend passes its own."""
        m = self.manifest = bundle.manifest
        self.bundle, self.name, self.family, self.spec = bundle, m["name"], m["family"], bundle_spec(bundle)
        tensors = load_file(str(bundle.file("meta.safetensors")))
        self.device = torch_device(device)
        if self.family == "metric":
            self.center = tensors.get("center")
            self.extract = extract or OnnxFeatures(str(bundle.file("backbone.onnx")), int(m["feature_dim"]), device, threads)
            return
        self.loop = m["inner_loop"]
        self.net, rule, params = meta_model_parts(m["method"], m["architecture"], self.loop, tensors)
        self.rule = rule.to(self.device)
        self.params = {k: v.to(self.device) for k, v in params.items()}
        if network is not None:
            self.session = network
            return
        self.session = onnx_session(str(bundle.file("network.onnx")), device, threads)

    @property
    def methods(self) -> list[str]:
        """The adaptation methods this model offers (``inner_loop`` for the gradient family)."""
        if self.family == "metric":
            return [h for h in ("centroid", "laplacianshot") if h in self.manifest["heads"]]
        return ["inner_loop"]

    @property
    def default_method(self) -> str:
        return self.manifest["default_head"] if self.family == "metric" else "inner_loop"

    def adapter(self, head: str | None = None, shots: int = 1, bn_mode: str | None = None, steps: int | None = None,
                **overrides: Any):
        """The adapter for ``head`` (default: the model's own method) and per-task settings."""
        m = self.manifest
        head = head or m["default_head"]
        if self.family == "metric":
            if bn_mode or steps is not None:
                raise ConfigError(f"BatchNorm mode and inner steps apply to inner-loop models; {self.name} is a metric model")
            return MetricAdapter(self.extract, build_head(m["heads"], head, shots, self.center, self.name, **overrides))
        if head not in (m["method"], "inner_loop"):
            raise ConfigError(f"model {self.name} adapts with its inner loop ({m['method']}), not {head!r}")
        if any(v is not None for v in overrides.values()):
            raise ConfigError(f"{', '.join(k for k, v in overrides.items() if v is not None)} apply to metric heads, not to {self.name}'s inner loop")
        return OnnxInnerLoopAdapter(inner_loop_adapter(self.name, self.loop, self.net, self.rule, self.params, steps, bn_mode),
                                    self.session)


def bundle_adapter(bundle: Bundle, head: str | None = None, device: str = "auto", shots: int = 1,
                   bn_mode: str | None = None, steps: int | None = None, **overrides: Any):
    """The adapter of ``bundle`` for ``head`` (default: the model's own method)."""
    return BundleModel(bundle, device).adapter(head, shots, bn_mode, steps, **overrides)
