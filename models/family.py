"""Model families: the one place that knows what a model's ``family`` means.

A family is a type. :data:`FAMILIES` maps the ``family`` field of a model card or bundle manifest to
its class (``metric``: :class:`~fewshot.models.metric_adapter.MetricFamily`; ``inner_loop``:
:class:`~fewshot.models.inner_loop.family.InnerLoopFamily`). An instance is one loaded model (manifest,
tensors, the engines that run its ONNX parts) and owns everything that differs between families:
its methods and their defaults, validation of a task's classes and settings, building the adapter for a
method, restoring a stored task, and the ONNX parts a bundle carries with the Triton signature of each.
``fewshot eval`` (:func:`open_shipped`), export, the gRPC service and the Triton models all use it, and
nothing else branches on the family.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from fewshot.errors import ConfigError
from fewshot.models.calibration import OpenSetCalibration
from fewshot.models.card import accuracy_key, version_digest
from fewshot.models.plan import ClassifyPlan
from fewshot.models.preprocess import InputSpec
from fewshot.models.report import HeldOut, ReportSettings
from fewshot.models.runtime import Engines, OnnxEngines, SessionEngines, Signature, TensorSpec, part_model_name, torch_device
from fewshot.models.settings import Setting, check_settings

if TYPE_CHECKING:
    from fewshot.models.zoo import ShippedInnerLoopModel, ShippedModel

#: Families by the name cards and manifests carry (filled as the family classes are defined).
FAMILIES: dict[str, type[Family]] = {}


class Task(Protocol):
    """An adapted task: ``calibrated_logits`` is ``plan().run`` and ``classify`` its softmax; ``open_set`` its
    calibration (:mod:`fewshot.models.calibration`); ``to_stored`` is what the task store keeps."""

    @property
    def transductive(self) -> bool:
        """Whether classification depends on the whole query batch (it never merges across requests)."""

    def plan(self) -> ClassifyPlan: ...

    def calibrated_logits(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` logits divided by the calibrated temperature."""

    def classify(self, query: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` normalised images -> ``(Q, N)`` probabilities."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` normalised images -> ``(B, d)`` features in the task's own space (the report's
        outliers and mislabels, the nearest-support explanations)."""

    def to_stored(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, JSON-able metadata with its "kind")`` from which :meth:`Family.decode` rebuilds it."""


class Adapter(Protocol):
    #: The open-set calibration its tasks classify with (open-set calibration replaces it while it measures).
    open_set: OpenSetCalibration

    def adapt(self, support: torch.Tensor, labels: torch.Tensor) -> Task:
        """``(S, C, H, W)`` normalised images, ``(S,)`` labels in ``0..N-1`` -> the task."""

    def adapt_scored(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[Task, torch.Tensor]:
        """The task and ``task.classify(support)``, without a second pass of the backbone where the
        family can avoid it (the server reports the support accuracy of every Adapt)."""

    def adapt_reported(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[Task, torch.Tensor, HeldOut, torch.Tensor]:
        """:meth:`adapt_scored`, the held-out predictions of the support set and its ``(S, d)`` features in the
        task's space (:mod:`fewshot.models.report`: the support-set report)."""


@dataclass(frozen=True)
class Part:
    """An ONNX graph of a model (``<name>.onnx`` in a bundle): ``images`` (and, for the network, the
    task's weights) -> ``output``. ``batched``: its first axis is a batch that Triton may merge across
    requests (the backbone); the network's weights are per task, so it is not. ``served``: the server
    runs it (an inner-loop bundle's backbone is exported for other uses, not served). ``optional``: a
    bundle may lack it (one exported before the part existed, or a model without it); the family then
    computes it in torch (:meth:`Family.parts_in`)."""

    name: str
    output: str
    batched: bool
    served: bool = True
    optional: bool = False


def family_of(manifest: Any) -> type[Family]:
    """The family class of a card or manifest (:class:`ConfigError` for an unknown family)."""
    load_families()
    name = _get(manifest, "family")
    if name not in FAMILIES:
        raise ConfigError(f"model {_get(manifest, 'name')} has unknown family {name!r} (this version knows {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


class Family(ABC):
    """One loaded model of a family.

    Args:
        manifest: the bundle manifest (or model card): ``name``, ``input``, ``limits``, ``heads`` ...
        tensors: ``meta.safetensors`` (or the shipped weights in the same layout).
        engines: what runs the model's :attr:`parts`.
        device: where torch work (inner loops) runs.
    """

    #: The name cards and manifests carry in ``family``.
    family: ClassVar[str] = ""
    #: The ONNX graphs a bundle of this family holds.
    parts: ClassVar[tuple[Part, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    def __init__(self, manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], engines: Engines, device: str = "auto") -> None:
        self.manifest, self.engines = dict(manifest), engines
        self.name: str = self.manifest["name"]
        #: The exact version: its name (the bundle's version folder or manifest) and the identity of its weights
        #: (:func:`fewshot.export.registry.version_digest`; ``""`` for a model card, as ``fewshot eval`` runs).
        self.version: str = str(self.manifest.get("version", ""))
        self.digest: str = version_digest(self.manifest)
        self.spec = InputSpec.from_dict(self.manifest["input"])
        self.limits: dict[str, Any] = dict(self.manifest.get("limits", {}))
        self.device = torch_device(device)

    @classmethod
    @abstractmethod
    def load_shipped(cls, path: Any, card: Any, tensors: dict[str, torch.Tensor]) -> Any:
        """The shipped model of ``models/zoo/<name>/`` (``card.json``, ``weights.safetensors``) in its
        trainable torch form (:mod:`fewshot.models.zoo`)."""

    # -- methods and validation -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def methods_for(cls, manifest: Mapping[str, Any]) -> list[str]:
        """The adaptation methods a model of this card or manifest offers (``Adapt(method=...)``)."""

    @property
    def methods(self) -> list[str]:
        return self.methods_for(self.manifest)

    @property
    @abstractmethod
    def default_method(self) -> str:
        """The method used when a request names none."""

    def aliases(self) -> dict[str, str]:
        """Other names a request may use for a method."""
        return {}

    def resolve_method(self, method: str | None) -> str:
        """``method`` (empty: the default) as one of :attr:`methods`."""
        method = method or self.default_method
        method = self.aliases().get(method, method)
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r} for model {self.name}: use {', '.join(self.methods)}")
        return method

    @abstractmethod
    def way_range(self) -> tuple[int, int]:
        """``(fewest, most)`` classes of a task."""

    def check_ways(self, ways: int) -> None:
        """:class:`ConfigError` unless a task of ``ways`` classes fits this model."""
        lo, hi = self.way_range()
        if lo == hi and ways != lo:
            raise ConfigError(f"model {self.name} adapts {lo}-way tasks (its head has {lo} outputs); the support set has {ways} classes")
        if ways > hi:
            raise ConfigError(f"the support set has {ways} classes; model {self.name} allows at most {hi}")

    @abstractmethod
    def settings(self, method: str) -> dict[str, Setting]:
        """The settings ``method`` accepts, by API name."""

    def check_settings(self, method: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Settings by API name (``None``: not given) -> adapter keywords, each within its bounds."""
        return check_settings(self.settings(method), given, method, self.name)

    # -- adaptation and stored tasks --------------------------------------------------------------
    @abstractmethod
    def adapter(self, method: str | None = None, shots: int = 1, **settings: Any) -> Adapter:
        """The adapter of ``method`` (default: the model's) for ``shots``-shot tasks; ``settings`` are
        adapter keywords from :meth:`check_settings`."""

    def report_settings(self, method: str, shots: int) -> ReportSettings:
        """What the support-set report of ``method`` runs with at ``shots`` shots: the estimate map and mislabel
        threshold fitted on validation tasks (the card's ``report`` block, ``fewshot report --write-card``), or
        the defaults (the held-out accuracy itself) where none were fitted."""
        return ReportSettings.for_manifest(self.manifest, method, shots)

    def inner_steps(self, adapter: Adapter) -> int:
        """Inner-loop steps ``adapter`` runs per support image (the server caps support images x steps per
        Adapt); 0 for families that adapt without an inner loop."""
        return 0

    def calibration_inputs(self, images: Any) -> Callable[[Any], torch.Tensor]:
        """What open-set calibration feeds its adapters (:meth:`calibration_adapter`) from validation ``images``
        (a uint8 array): index array -> inputs. By default normalised images; a family may compute once what
        every task shares (a metric family: the backbone's features)."""
        return lambda idx: self.spec.normalize(images[idx])

    def calibration_adapter(self, method: str, shots: int) -> Adapter:
        """The adapter open-set calibration runs on :meth:`calibration_inputs`, uncalibrated."""
        return self.adapter(method, shots=shots)

    def hold_tasks_in(self, dtype: torch.dtype) -> None:
        """Hold (and store) adapted task state in ``dtype`` where the family supports it (inner-loop
        weights in float16); metric heads keep float32."""

    def adapt_in(self, precision: torch.dtype) -> None:
        """Run adaptation in ``precision`` where the family supports it (the inner loop under bfloat16
        autocast); metric heads fit in float32."""

    def batch_adapts(self, on: bool) -> None:
        """Run concurrent Adapts of one shape as one call where the family can (the stacked inner loop)."""

    def adapt_batch_key(self, adapter: Adapter, support_shape: tuple[int, ...]) -> Any:
        """The key under which an Adapt by ``adapter`` of this support shape may run with others
        (``adapter.adapt_many``), or ``None``: it runs alone."""
        return None

    def merge_tasks(self, on: bool) -> None:
        """Merge Classify requests of different tasks into one call where the family can (inner-loop
        networks, stacked weights); metric heads already share one backbone call per model."""

    @abstractmethod
    def describe(self, adapter: Adapter) -> dict[str, Any]:
        """The settings ``adapter`` runs with (``fewshot eval`` rows)."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Task:
        """The task that ``task.to_stored()`` described (``KeyError``/``ConfigError`` when it cannot be)."""

    @classmethod
    def accuracy_key(cls, manifest: Mapping[str, Any], ways: int, shots: int, method: str) -> str:
        """Key of the measured accuracy in a card's ``accuracy`` for a served method at its default settings."""
        return accuracy_key(ways, shots, method)

    @classmethod
    @abstractmethod
    def result_runs(cls, card: Mapping[str, Any], settings: list[tuple[int, int]]) -> list[tuple[int, int, str, list[str]]]:
        """What ``make results`` measures for this model: ``(ways, shots, --head, other fewshot eval
        arguments)`` rows, given the dataset's ``(ways, shots)`` settings."""

    @classmethod
    def open_set_runs(cls, card: Mapping[str, Any], settings: list[tuple[int, int]]) -> list[tuple[int, int, str, list[str]]]:
        """The open-set rows ``make results`` measures: by default :meth:`result_runs` with ``--open-set``."""
        return [(w, s, h, [*extra, "--open-set"]) for w, s, h, extra in cls.result_runs(card, settings)]

    # -- Triton -----------------------------------------------------------------------------------
    def signatures(self) -> list[Signature]:
        """The Triton model of each served part and the tensors it must have."""
        images = TensorSpec("images", "FP32", (-1, self.spec.channels, self.spec.size, self.spec.size))
        return [
            Signature(part_model_name(self.name, p.name), (images, *self.part_inputs(p)), (self.part_output(p),))
            for p in parts_in(self.manifest)
            if p.served
        ]

    def part_inputs(self, part: Part) -> tuple[TensorSpec, ...]:
        """Inputs of ``part`` besides ``images``."""
        return ()

    @abstractmethod
    def part_output(self, part: Part) -> TensorSpec:
        """The output of ``part``."""


def parts_in(manifest: Any) -> tuple[Part, ...]:
    """The parts a bundle carries: every required part of its family, and the optional ones its manifest
    lists among its files (a model card lists none: a shipped model gives its parts in memory)."""
    files = _get(manifest, "files") or {}
    return tuple(p for p in family_of(manifest).parts if not p.optional or f"{p.name}.onnx" in files)


def _get(manifest: Any, key: str) -> Any:
    return manifest.get(key) if isinstance(manifest, Mapping) else getattr(manifest, key, None)


def _mapping(manifest: Any) -> Mapping[str, Any]:
    """A manifest as it is, a :class:`~fewshot.models.card.ModelCard` as its JSON form."""
    return manifest if isinstance(manifest, Mapping) else manifest.to_dict()


def methods_of(manifest: Any) -> list[str]:
    """The methods of the model a card or manifest describes (without loading it)."""
    return family_of(manifest).methods_for(_mapping(manifest))


def open_shipped(
    model: ShippedModel | ShippedInnerLoopModel, backend: str = "onnxruntime", device: str = "auto", threads: int = 0
) -> Family:
    """A shipped model as its family's object, its parts exported in memory to ONNX Runtime (default)
    or run by the torch modules themselves (``backend="torch"``): what ``fewshot eval`` runs."""
    if backend == "onnxruntime":
        engines: Engines = OnnxEngines(model.onnx_parts(), device, threads)
    elif backend == "torch":
        engines = SessionEngines(model.torch_parts(device))
    else:
        raise ConfigError(f"unknown backend {backend!r}: use onnxruntime or torch")
    card = model.card.to_dict()
    return family_of(card)(card, model.meta_tensors(), engines, device)


#: Modules to import after the built-in families (comma-separated): a head, a family or a setting of your own,
#: added without changing this package (each module registers what it adds, as the built-in ones do).
PLUGINS_ENV = "FEWSHOT_PLUGINS"


def load_families() -> None:
    """Import every family module (each registers itself), then the plugins of ``$FEWSHOT_PLUGINS``: a
    comma-separated list of module names (importable from ``PYTHONPATH``) or paths of ``.py`` files (what a
    process whose ``PYTHONPATH`` is not yours, such as Triton's python-backend stub, can still load)."""
    from fewshot.models import metric_adapter  # noqa: F401  (imported to register the family)
    from fewshot.models.inner_loop import family  # noqa: F401  (imported to register the family)

    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        _load_plugin(name)


def _load_plugin(name: str) -> None:
    """Import one plugin (a module name or a ``.py`` path) once per process."""
    if name.endswith(".py"):
        path = os.path.abspath(name)
        key = "fewshot_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:16]
        if key in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(key, path) if os.path.isfile(path) else None
        if spec is None or spec.loader is None:
            raise ConfigError(f"${PLUGINS_ENV} names {name!r}, which is not a readable .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[key]
            raise
        return
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"${PLUGINS_ENV} names module {name!r}, which does not import ({exc}): "
                "put its folder on PYTHONPATH, give the path of its .py file, or fix the name"
            ) from None
