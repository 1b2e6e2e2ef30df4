"""The inner-loop family (MAML, CxGrad, ...): meta-learned initial weights and update rule; a task is
adapted by the inner loop in torch and classified by the adapted network, ``network.onnx`` with the
task's weights as inputs, in whatever runs the model's parts (ONNX Runtime, Triton, or torch for
``fewshot eval --backend torch``). ``fewshot eval`` and the server classify through the same
:class:`NetworkTask`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.models.calibration import UNCALIBRATED, OpenSetCalibration, calibration_for
from fewshot.models.card import accuracy_key
from fewshot.models.family import Adapter, Family, Part
from fewshot.models.features import SessionFeatures, run_batch, run_in_chunks
from fewshot.models.inner_loop.engine import InnerLoopAdapter, InnerLoopTask, pack
from fewshot.models.inner_loop.network import BN_MODES
from fewshot.models.inner_loop.onnx_network import network_input_names, network_inputs
from fewshot.models.inner_loop.rules import UpdateRule
from fewshot.models.inner_loop.stacked import StackedClassify, bucket
from fewshot.models.plan import ClassifyPlan, PlannedTask
from fewshot.models.report import HeldOut, k_fold
from fewshot.models.runtime import Engines, Session, TensorSpec
from fewshot.models.settings import Setting

#: Ways measured for an inner-loop model with a prototype head (RESULTS.md), besides the dataset's settings.
WAY_SWEEP = (2, 3, 5, 10)

#: The one method an inner-loop model offers (a request may also name the model's own, e.g. ``cxgrad``).
METHOD = "inner_loop"
#: Folds of an inner-loop task's held-out predictions (the support-set report): 2 inner loops on half the shots.
REPORT_FOLDS = 2


def inner_loop_model_parts(
    method: str, architecture: dict[str, Any], loop: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> tuple[Any, UpdateRule, dict[str, torch.Tensor]]:
    """Network, update rule (eval mode) and meta-parameters of a gradient model, from its card's (or
    bundle manifest's) ``method``, ``architecture`` and ``inner_loop`` and its ``param.*``/``rule.*`` tensors."""
    from fewshot.models.inner_loop.network import MetaConv4
    from fewshot.models.inner_loop.rules import build_rule

    net = MetaConv4(**{k: v for k, v in architecture.items() if k != "arch"})
    rule = build_rule(method, net, loop["steps"], loop["alpha"], loop.get("beta", 1.0), loop.get("head_alpha", 0.0))
    rule.load_state_dict({k.removeprefix("rule."): v for k, v in tensors.items() if k.startswith("rule.")})
    params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    return net, rule.eval(), params


def bfloat16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class NetworkTask(PlannedTask):
    """An adapted task whose classification runs the network part with the task's weights as inputs."""

    state: InnerLoopTask
    session: Session
    #: The model's cross-task merger (stacked weights, :mod:`fewshot.models.inner_loop.stacked`); ``None``: off.
    stacker: StackedClassify | None = None
    open_set: OpenSetCalibration = UNCALIBRATED

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` -> ``(Q, N)``. Transductive BatchNorm normalises each call with its own
        statistics, which ``network.onnx`` (support statistics as inputs) does not compute: that mode
        runs the torch network."""
        if self.state.bn_mode != "support":
            return self.state.logits(query)
        s = self.state
        feeds = {k: v.cpu().numpy() for k, v in network_inputs(s.net, *s.weights(), s.step).items()}
        run = lambda part: self.session.run(None, {**feeds, "images": part})[0]  # noqa: E731  (a one-line local helper)
        images = np.ascontiguousarray(query.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(run_in_chunks(run, images, run_batch(self.session)))

    def plan(self) -> ClassifyPlan:
        """The adapted network, then the temperature. Under frozen (support) BatchNorm each query is
        independent, so concurrent requests of this task merge into one network call; transductive
        BatchNorm normalises over the call, so it never merges (``key`` None)."""
        if self.transductive:
            return ClassifyPlan(None, self.logits, self.open_set.calibrate)
        return ClassifyPlan(("network", id(self)), self.logits, self.open_set.calibrate, self._group if self.stacker else None)

    def _group(self, query: torch.Tensor) -> tuple[Any, Any, Any] | None:
        """Requests of up to 16 queries merge with other tasks' of this model and step, by padded size."""
        size = bucket(len(query))
        if size is None or self.stacker is None:
            return None
        ways = self.state.params["head.bias"].shape[-1]
        return (
            ("stacked", id(self.stacker), self.state.step, ways, size),
            (self.state, query, self.open_set.calibrate),
            self.stacker.run_many,
        )

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` normalised images -> ``(B, d)``: what the adapted network's head reads (its body and
        feature transform, with the task's weights and frozen statistics; torch)."""
        params, stats = self.state.weights()
        device = next(iter(params.values())).device
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        return self.state.net.embed(params, images, stats, step=self.state.step).float().cpu()

    def embedded_probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` :meth:`embed` output -> ``(B, N)`` calibrated probabilities (the head of the adapted network)."""
        params, _ = self.state.weights()
        logits = torch.nn.functional.linear(embeddings, params["head.weight"].float().cpu(), params["head.bias"].float().cpu())
        return torch.softmax(self.open_set.calibrate(logits), dim=1)

    def to_stored(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        s = self.state
        tensors = {f"param.{k}": v for k, v in s.params.items()}
        for i, (mean, var) in enumerate(s.bn_stats or []):
            tensors[f"bn.{i}.mean"], tensors[f"bn.{i}.var"] = mean, var
        return tensors, {
            "kind": METHOD,
            "bn_mode": s.bn_mode,
            "step": s.step,
            "bn_layers": len(s.bn_stats or []),
            "support_losses": s.support_losses,
            "open_set": self.open_set.to_dict(),
        }


class NetworkAdapter:
    """The inner loop (torch), with classification by the network part."""

    def __init__(
        self,
        adapter: InnerLoopAdapter,
        session: Session,
        stacker: StackedClassify | None = None,
        open_set: OpenSetCalibration = UNCALIBRATED,
    ) -> None:
        self.adapter, self.session, self.stacker, self.open_set = adapter, session, stacker, open_set
        self.steps, self.bn_mode = adapter.steps, adapter.bn_mode

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> NetworkTask:
        return NetworkTask(self.adapter.adapt(support, labels), self.session, self.stacker, self.open_set)

    def adapt_many(self, supports: list[torch.Tensor], labels: list[torch.Tensor]) -> list[NetworkTask]:
        """Several tasks, one stacked inner loop where the rule and shapes allow (equal to :meth:`adapt` each)."""
        return [NetworkTask(s, self.session, self.stacker, self.open_set) for s in self.adapter.adapt_many(supports, labels)]

    def adapt_scored(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[NetworkTask, torch.Tensor]:
        """The task and its ``(S, N)`` probabilities on the support set (one network pass)."""
        task = self.adapt(support, labels)
        return task, task.classify(support)

    def adapt_reported(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[NetworkTask, torch.Tensor, HeldOut, torch.Tensor]:
        """:meth:`adapt_scored`, held-out predictions by two more inner loops on half the shots each
        (:func:`~fewshot.models.report.k_fold`) and the ``(S, d)`` support features of the adapted network."""
        task = self.adapt(support, labels)
        embeddings = task.embed(support)  # one torch pass gives the features and (through the head) the probabilities
        return task, task.embedded_probabilities(embeddings), k_fold(self, support, labels, REPORT_FOLDS), embeddings


class StemFeatures:
    """The fixed stem (``stem.onnx``) run by a :class:`~fewshot.models.runtime.Session`: ``(B, C, H, W)``
    normalised images -> ``(B, c, h, w)`` stem outputs, in runs of at most :func:`run_batch` images."""

    def __init__(self, session: Session, shape: tuple[int, int, int]) -> None:
        self.run, self.shape = SessionFeatures(session, shape[0] * shape[1] * shape[2]), shape

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images).view(len(images), *self.shape)


class InnerLoopFamily(Family):
    """``network.onnx`` (and ``backbone.onnx``, the network's body, for Triton's feature models), the
    meta-parameters and the learned update rule of ``meta.safetensors``; one method, the inner loop."""

    family = "inner_loop"
    parts = (
        Part("backbone", "features", batched=True, served=False),
        Part("network", "logits", batched=False),
        # the fixed stem of a network that adapts its last blocks only: run once per Adapt, in ONNX Runtime
        # (2.5-3x torch eager on this CPU, BENCHMARKS.md); a bundle without it runs the stem in torch
        Part("stem", "stem", batched=True, optional=True),
    )

    def __init__(self, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], engines: Engines, device: str = "auto") -> None:
        super().__init__(manifest, tensors, engines, device)
        self.loop: dict[str, Any] = self.manifest["inner_loop"]
        #: How the head starts (:data:`~fewshot.models.inner_loop.engine.HEAD_INITS`): ``prototypes`` adapts any
        #: number of classes in the card's range; ``learned`` (cards before it) exactly the training ways.
        self.head_init: str = self.loop.get("head_init", "learned")
        self.net, rule, params = inner_loop_model_parts(self.manifest["method"], self.manifest["architecture"], self.loop, tensors)
        self.rule = rule.to(self.device)
        self.params = {k: v.to(self.device) for k, v in params.items()}
        self.session = engines.session("network")
        #: The fixed stem (``adapt_from`` > 0) in its engine, where the bundle has one; on CUDA the stem stays
        #: in torch beside the loop (no round trip through host memory).
        self.stem: StemFeatures | None = None
        if self.net.adapt_from and engines.has("stem") and self.device.type == "cpu":
            self.stem = StemFeatures(engines.session("stem"), self.stem_shape())
        #: Cross-task Classify merging (stacked weights, in torch on the model's device): on where it
        #: wins, CUDA; on CPU one network call per task is as fast (BENCHMARKS.md). ``merge_tasks`` sets it.
        self.stacker: StackedClassify | None = StackedClassify(self.net) if self.device.type == "cuda" else None
        #: What adapted weights are held (and stored) in: float32, or float16 (``--task-dtype``, half the memory).
        self.task_dtype = torch.float32
        #: What the inner loop computes in: float32, or bfloat16 autocast (``--inner-precision``).
        self.precision = torch.float32
        #: Concurrent Adapts of one shape as one stacked inner loop (``--batch-adapts``): on CUDA by
        #: default; on this CPU it won 1.2-1.4x for Omniglot and lost on Tiny ImageNet (BENCHMARKS.md).
        self.adapt_batching = self.device.type == "cuda"

    def hold_tasks_in(self, dtype: torch.dtype) -> None:
        """Adapted weights held in ``dtype`` (float16: half the memory; agreement in BENCHMARKS.md)."""
        self.task_dtype = dtype

    def adapt_in(self, precision: torch.dtype) -> None:
        """The inner loop under ``precision`` autocast (bfloat16: 1.4-1.6x faster on CPUs with native
        bfloat16, accuracy within the float32 interval: RESULTS.md); refused where the CPU lacks it."""
        if precision == torch.bfloat16 and self.device.type == "cpu" and not bfloat16_supported():
            raise ConfigError(
                "--inner-precision bfloat16 needs a CPU with native bfloat16 (AVX-512 BF16 or AMX) "
                "or a CUDA device; this one has neither: use float32"
            )
        self.precision = precision

    def batch_adapts(self, on: bool) -> None:
        self.adapt_batching = on

    def adapt_batch_key(self, adapter: Adapter, support_shape: tuple[int, ...]) -> Any:
        network = cast(NetworkAdapter, adapter)  # a family is only given the adapters its own adapter() built
        if not self.adapt_batching or not network.adapter.stacks([support_shape]):
            return None
        return ("adapt", id(self), network.steps, network.bn_mode, str(network.adapter.dtype), support_shape)

    def merge_tasks(self, on: bool) -> None:
        """Merge Classify requests of different tasks into one stacked call (``True``) or not."""
        self.stacker = StackedClassify(self.net) if on else None

    @classmethod
    def load_shipped(cls, path: Any, card: Any, tensors: dict[str, torch.Tensor]) -> Any:
        from fewshot.models.zoo import load_inner_loop_model

        return load_inner_loop_model(path, card, tensors)

    @classmethod
    def methods_for(cls, manifest: Mapping[str, Any]) -> list[str]:
        return [METHOD]

    @property
    def default_method(self) -> str:
        return METHOD

    def aliases(self) -> dict[str, str]:
        return {self.manifest["method"]: METHOD}

    def way_range(self) -> tuple[int, int]:
        """Classes per task: the card's ``limits`` with a prototype head; the head's rows with a learned one."""
        if self.head_init == "learned":
            return self.net.ways, self.net.ways
        limits = self.manifest.get("limits", {})
        return int(limits.get("min_ways", 2)), int(limits.get("max_ways", self.net.ways))

    def settings(self, method: str) -> dict[str, Setting]:
        return {
            "inner_steps": Setting("inner_steps", "steps", 1, self.loop["max_steps"], integer=True),
            "bn": Setting("bn", "bn_mode", choices=tuple(self.loop.get("bn_modes", BN_MODES))),
        }

    def adapter(
        self, method: str | None = None, shots: int = 1, steps: int | None = None, bn_mode: str | None = None, **settings: Any
    ) -> NetworkAdapter:
        if settings:  # the base signature takes any settings; this family has only steps and bn_mode
            raise TypeError(f"{type(self).__name__}.adapter() got an unexpected keyword argument {next(iter(settings))!r}")
        self.resolve_method(method)
        steps = self.loop["steps"] if steps is None else steps
        if not 1 <= steps <= self.loop["max_steps"]:
            raise ConfigError(f"inner steps must be in 1..{self.loop['max_steps']} for {self.name}, got {steps}")
        return NetworkAdapter(
            InnerLoopAdapter(
                self.net,
                self.rule,
                self.params,
                steps,
                bn_mode or self.loop["bn_mode"],
                self.task_dtype,
                self.precision,
                self.head_init,
                self.stem,
            ),
            self.session,
            self.stacker,
            calibration_for(self.manifest, METHOD, shots),
        )

    def describe(self, adapter: Adapter) -> dict[str, Any]:
        network = cast(NetworkAdapter, adapter)  # a family is only given the adapters its own adapter() built
        row = {"method": self.manifest["method"], "bn": network.bn_mode, "inner_steps": network.steps}
        return row | ({"inner_precision": str(self.precision).removeprefix("torch.")} if self.precision != torch.float32 else {})

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> NetworkTask:
        if meta.get("kind") != METHOD:
            raise ConfigError(f"a stored task of kind {meta.get('kind')!r} is not an inner-loop task")
        params = {k.removeprefix("param."): v.to(self.device) for k, v in tensors.items() if k.startswith("param.")}
        stats = [
            (tensors[f"bn.{i}.mean"].to(self.device), tensors[f"bn.{i}.var"].to(self.device)) for i in range(meta["bn_layers"])
        ] or None
        params, stats = pack(params, stats, self.task_dtype)
        return NetworkTask(
            InnerLoopTask(self.net, params, meta["bn_mode"], stats, meta["step"], meta["support_losses"]),
            self.session,
            self.stacker,
            OpenSetCalibration.from_dict(meta.get("open_set")),
        )

    @classmethod
    def accuracy_key(cls, manifest: Mapping[str, Any], ways: int, shots: int, method: str) -> str:
        """Inner-loop figures are keyed by the model's own method and the served BatchNorm mode."""
        return accuracy_key(ways, shots, manifest["method"], manifest["inner_loop"]["bn_mode"])

    @classmethod
    def result_runs(cls, card: Mapping[str, Any], settings: list[tuple[int, int]]) -> list[tuple[int, int, str, list[str]]]:
        """The setting it was meta-trained for, in each BatchNorm mode; with a prototype head also, as
        served (support BatchNorm), :data:`WAY_SWEEP` ways at the training shots and the dataset's
        settings of more ways at those shots (Omniglot's 20-way 1-shot)."""
        cfg, method, loop = card["training"]["config"], card["method"], card["inner_loop"]
        runs = [(cfg["ways"], cfg["shots"], method, ["--set", f"bn={bn}"]) for bn in loop["bn_modes"]]
        if loop.get("head_init", "learned") == "learned":
            return runs
        more = [w for w in WAY_SWEEP if w != cfg["ways"]]
        more += [w for w, s in settings if s == cfg["shots"] and w not in WAY_SWEEP and w != cfg["ways"]]
        runs += [(w, cfg["shots"], method, ["--set", f"bn={loop['bn_mode']}"]) for w in sorted(set(more))]
        if loop.get("head_init") == "centroid":  # from a metric backbone: the dataset's other shots too (issue 33)
            runs += [(w, s, method, ["--set", f"bn={loop['bn_mode']}"]) for w, s in settings if s != cfg["shots"]]
        return runs

    @classmethod
    def open_set_runs(cls, card: Mapping[str, Any], settings: list[tuple[int, int]]) -> list[tuple[int, int, str, list[str]]]:
        """Every given setting as served (the served BatchNorm), not only the training one."""
        return [(w, s, card["method"], ["--set", f"bn={card['inner_loop']['bn_mode']}", "--open-set"]) for w, s in settings]

    def inner_steps(self, adapter: Adapter) -> int:
        return cast(NetworkAdapter, adapter).steps  # a family is only given the adapters its own adapter() built

    def part_inputs(self, part: Part) -> tuple[TensorSpec, ...]:
        if part.name != "network":
            return ()
        width = self.net.width
        weights = network_inputs(self.net, self.params, [(torch.zeros(width), torch.ones(width))] * 4, self.loop["steps"])
        return tuple(TensorSpec(n, "FP32", (-1, *t.shape[1:]) if n.startswith("head.") else tuple(t.shape)) for n, t in weights.items())

    def stem_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image's stem output (the input of block ``adapt_from``)."""
        side = self.spec.size
        for _ in range(min(self.net.adapt_from, self.net.pools)):
            side //= 2
        return self.net.width, side, side

    def part_output(self, part: Part) -> TensorSpec:
        """The network's ``(batch, ways)`` logits (the head's rows are a graph input: any number of classes);
        the stem's ``(batch, channels, height, width)``."""
        if part.name == "stem":
            return TensorSpec("stem", "FP32", (-1, *self.stem_shape()))
        return TensorSpec("logits", "FP32", (-1, -1))

    def network_input_names(self) -> list[str]:
        return network_input_names(self.net, self.loop["steps"])
