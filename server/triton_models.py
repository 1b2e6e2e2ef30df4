"""Adapt and Classify as Triton python-backend models: ``fewshot_adapt`` and ``fewshot_classify``.

``fewshot export --triton-repo`` writes both into the model repository (``model.py`` imports the classes
below). They run the code the gRPC service runs (:mod:`fewshot.server.tasks`, :mod:`fewshot.server.images`,
:mod:`fewshot.server.state`) and keep tasks in the same SQLite store (:class:`~fewshot.server.store.TaskStore`,
the ``state_dir`` parameter), so a task adapted here is classifiable by ``fewshot serve --state-dir``
on that directory, by another Triton instance or replica, and the reverse. Backbone features and
adapted-network logits come from the repository's ``<name>_backbone`` / ``<name>_network`` models
through business-logic scripting (BLS); heads and inner loops run here, in torch.

Tensor contract (KServe v2; ``BYTES`` is Triton's ``TYPE_STRING``, one element per string):

- ``fewshot_adapt``: inputs ``model`` BYTES [1], ``labels`` BYTES [S] (UTF-8, one per image),
  ``images`` BYTES [S] (encoded image bytes, anything Pillow opens), optional ``method`` BYTES [1]
  (one of the model's methods, as ``ListModels`` reports them, or the model's own method name; default: the model's)
  and optional ``settings`` BYTES [1] (one JSON object of per-request settings by name, as ``ListModels``
  describes them, e.g. ``{"inner_steps": 3}``).
  Outputs ``task_id`` BYTES [1], ``labels`` BYTES [N] (the classes in order of first appearance).
- ``fewshot_classify``: inputs ``task_id`` BYTES [1], ``images`` BYTES [Q], optional ``reject_unknown``
  BOOL [1] with at most one of ``threshold`` / ``target_recall`` FP64 [1] (the gRPC Classify's open-set
  option) and optional ``explain`` INT32 [1] (k, at most 10). Outputs ``probabilities`` FP32 [Q, N] (column j is
  class ``labels[j]``), ``labels`` BYTES [N]; with ``reject_unknown`` also ``unknown`` BOOL [Q], ``scores`` FP64 [Q]
  and ``threshold`` FP64 [1]; with ``explain`` the k support images nearest each query, as gRPC's Classify gives
  them: ``nearest_index`` INT32 [Q, k], ``nearest_label`` BYTES [Q, k], ``nearest_similarity`` FP64 [Q, k].

Bad input (an undecodable image, one class, an unknown model or task, ...) answers that request with a
Triton error carrying the service's message and status (``INVALID_ARG``, ``NOT_FOUND``, ``UNAVAILABLE``
when a backbone is not loaded); the model keeps serving. Each instance uses one torch and one ONNX
Runtime thread (``threads`` parameter); Triton scales by instances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.export.loader import open_bundle
from fewshot.export.registry import Registry
from fewshot.models.family import parts_in
from fewshot.models.runtime import SessionEngines, part_model_name
from fewshot.server.auth import DEFAULT_TENANT
from fewshot.server.budget import CallBudget
from fewshot.server.errors import BackendUnavailable, InvalidRequest, ServiceError
from fewshot.server.explain import SupportFeatures, check_explain, explain, stored_state
from fewshot.server.images import decode_for_model, decode_pixels_for_model
from fewshot.server.requests import adapt_response, check_adapt, check_classify, classify_response, settings_message, support_of
from fewshot.server.store import TaskStore
from fewshot.server.tasks import ServiceLimits, find_task
from fewshot.server.versions import ServedModels
from fewshot_proto import fewshot_pb2 as pb

#: Images per BLS call to a backbone (its config's ``max_batch_size``).
BLS_MAX_BATCH = 256


def _bls(pb: Any, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One BLS inference of Triton model ``model``; a failed call raises :class:`BackendUnavailable`."""
    request = pb.InferenceRequest(
        model_name=model,
        requested_output_names=[output],
        inputs=[pb.Tensor(k, np.ascontiguousarray(v, dtype=np.float32)) for k, v in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise BackendUnavailable(
            f"Triton model {model} failed: {response.error().message()} (is it in the repository "
            f"and loaded? with --model-control-mode=explicit, pass --load-model={model})"
        )
    return pb.get_output_tensor_by_name(response, output).as_numpy()


class BlsSession:
    """A :class:`~fewshot.models.runtime.Session` served by Triton model ``model`` through BLS, in runs
    of at most :data:`BLS_MAX_BATCH` images (``max_batch``, read by the feature extractor)."""

    max_batch = BLS_MAX_BATCH

    def __init__(self, pb: Any, model: str, output: str) -> None:
        self.pb, self.model, self.output = pb, model, output

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [_bls(self.pb, self.model, feeds, self.output)]


class _FewShotModel:
    """What both models share: parameters, the models of the bundle directory, the task store, and
    answering each request on its own (an error answers that request only)."""

    #: Triton error code by the gRPC status of the service's error. Triton has no RESOURCE_EXHAUSTED (answered
    #: INVALID_ARG) and no FAILED_PRECONDITION: a task whose model version is not loaded answers INVALID_ARG with
    #: the message starting ``FAILED_PRECONDITION:``, so a client tells it apart (docs/triton.md).
    CODES = {
        "INVALID_ARGUMENT": "INVALID_ARG",
        "RESOURCE_EXHAUSTED": "INVALID_ARG",
        "FAILED_PRECONDITION": "INVALID_ARG",
        "NOT_FOUND": "NOT_FOUND",
        "UNAVAILABLE": "UNAVAILABLE",
    }
    #: gRPC statuses named at the start of the message (Triton has no code of them and no other status maps to INVALID_ARG's meaning).
    NAMED = ("FAILED_PRECONDITION",)

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        missing = [k for k in ("bundle_dir", "state_dir") if not params.get(k)]
        if missing:
            raise ConfigError(
                f"{config['name']}: config.pbtxt lacks the parameter(s) {', '.join(missing)}: "
                "write the repository with `fewshot export --triton-repo`"
            )
        threads = int(params.get("threads", "1"))
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        root = Path(args["model_repository"]).parent  # relative paths in the config are read from the repository root
        self.limits = ServiceLimits.default()
        registry = Registry.load(root / params["bundle_dir"])
        self.models = ServedModels(
            open_bundle(
                b,
                "cpu",
                threads,
                SessionEngines({p.name: BlsSession(pb_utils, part_model_name(name, p.name), p.output) for p in parts_in(b.manifest)}),
            )
            for name, b in registry.bundles.items()
        )
        self.store = TaskStore(root / params["state_dir"])
        self.support_features = SupportFeatures()  # for Classify with explain
        self.models.pin_old_rows(self.store)  # rows stored before versions were recorded, as fewshot serve pins them

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: Any) -> Any:
        pb = self.pb
        try:
            outputs = self.handle(request)
            return pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in outputs.items()])
        except ServiceError as exc:
            message, code = str(exc), self.CODES.get(exc.code.name, "INTERNAL")
            if exc.code.name in self.NAMED:
                message = f"{exc.code.name}: {message}"
        except Exception as exc:  # a bug: answer INTERNAL with the cause, keep serving
            message, code = f"internal error: {type(exc).__name__}: {exc}", "INTERNAL"
            pb.Logger.log_error(f"{type(self).__name__}: {message}")
        return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code)))

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        """One request -> its output tensors by name; raises a ServiceError for bad input."""
        raise NotImplementedError

    @overload
    def _bytes(self, request: Any, name: str) -> list[bytes]: ...

    @overload
    def _bytes(self, request: Any, name: str, optional: bool) -> list[bytes] | None: ...

    def _bytes(self, request: Any, name: str, optional: bool = False) -> list[bytes] | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            if optional:
                return None
            raise InvalidRequest(f"input {name!r} is missing: send it as a BYTES tensor (docs/triton.md)")
        return [v if isinstance(v, bytes) else str(v).encode() for v in tensor.as_numpy().reshape(-1)]

    @overload
    def _strings(self, request: Any, name: str) -> list[str]: ...

    @overload
    def _strings(self, request: Any, name: str, optional: bool) -> list[str] | None: ...

    def _strings(self, request: Any, name: str, optional: bool = False) -> list[str] | None:
        values = self._bytes(request, name, optional)
        try:
            return None if values is None else [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {name!r} is not UTF-8 text") from None

    @overload
    def _one(self, request: Any, name: str) -> str: ...

    @overload
    def _one(self, request: Any, name: str, optional: bool) -> str | None: ...

    def _one(self, request: Any, name: str, optional: bool = False) -> str | None:
        values = self._strings(request, name, optional)
        if values is not None and len(values) != 1:
            raise InvalidRequest(f"input {name!r} must hold exactly one string, got {len(values)}")
        return None if values is None else values[0]


def _strings_out(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


class AdaptModel(_FewShotModel):
    """``fewshot_adapt``: a labelled support set -> a stored task (``task_id``, ``labels``), checked and answered
    by the service's own Adapt handling (:mod:`fewshot.server.requests`)."""

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        support = support_of(self._strings(request, "labels"), self._bytes(request, "images"))
        adapt = check_adapt(
            self.models,
            self.limits,
            self._one(request, "model"),
            self._one(request, "method", optional=True) or "",
            support,
            self._settings(request),
            0,
            DEFAULT_TENANT,
        )
        budget = CallBudget(self.limits.max_call_pixels)  # the per-call pixel cap; Triton bounds the time
        adapt.pixels = decode_pixels_for_model([item.image for item in support], adapt.model, self.limits.image, "support", budget)
        record, _, accuracy = adapt.run(adapt.model.spec.normalize(adapt.pixels))
        self.store.put(record)  # durable before we answer; this process never classifies, so nothing to cache
        response = adapt_response(record, accuracy, adapt.seconds)
        return {"task_id": _strings_out([response.task_id]), "labels": _strings_out(list(response.labels))}

    def _settings(self, request: Any) -> pb.AdaptSettings:
        """The optional ``settings`` input: one JSON object of settings by name (``{"inner_steps": 3}``)."""
        text = self._one(request, "settings", optional=True)
        if not text:
            return pb.AdaptSettings()
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"input 'settings' is not JSON ({exc}): send one object of settings by name") from None
        if not isinstance(values, dict):
            raise InvalidRequest("input 'settings' must be a JSON object of settings by name, e.g. {\"inner_steps\": 3}")
        return settings_message(values)


class ClassifyModel(_FewShotModel):
    """``fewshot_classify``: a task id and query images -> ``(Q, N)`` ``probabilities`` and ``labels``, checked
    and answered by the service's own Classify handling (:mod:`fewshot.server.requests`)."""

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        message = pb.ClassifyRequest(
            task_id=self._one(request, "task_id") or "",
            queries=[pb.Image(encoded=b) for b in self._bytes(request, "images")],
            reject_unknown=bool(self._number(request, "reject_unknown")),
        )
        for name in ("threshold", "target_recall"):
            value = self._number(request, name)
            if value is not None:
                setattr(message, name, value)
        task_id, rejection = check_classify(self.limits, message)
        k = check_explain(int(self._number(request, "explain") or 0))
        record, task, model = find_task(self.store, self.models, task_id, DEFAULT_TENANT)
        budget = CallBudget(self.limits.max_call_pixels)
        x = decode_for_model(list(message.queries), model, self.limits.image, "query", budget)
        embedded = bool(k) and hasattr(task, "logits_and_embeddings")  # explained: the features once, for both
        if embedded:
            logits, x = task.logits_and_embeddings(x)
        else:
            logits = task.calibrated_logits(x)
        response = classify_response(logits, record.labels, len(record.labels), task.open_set, rejection)
        out = {
            "probabilities": np.array([p.probabilities for p in response.predictions], dtype=np.float32).reshape(len(logits), -1),
            "labels": _strings_out(list(response.labels)),
        }
        if rejection is not None:
            out |= {
                "unknown": np.array([p.unknown for p in response.predictions], dtype=bool),
                "scores": np.array([p.score for p in response.predictions], dtype=np.float64),
                "threshold": np.array([response.predictions[0].threshold if response.predictions else np.nan]),
            }
        if k:  # the service's explanations: the k support images nearest each query
            explain(response, record, task, model, x, k, self.support_features, stored_state(self.store, task_id, DEFAULT_TENANT), embedded)
            nearest = [list(p.nearest) for p in response.predictions]
            width = min(len(m) for m in nearest) if nearest else 0
            out |= {
                "nearest_index": np.array([[m.index for m in row[:width]] for row in nearest], dtype=np.int32).reshape(len(nearest), width),
                "nearest_label": np.array([[m.label.encode() for m in row[:width]] for row in nearest], dtype=object).reshape(
                    len(nearest), width
                ),
                "nearest_similarity": np.array([[m.similarity for m in row[:width]] for row in nearest], dtype=np.float64).reshape(
                    len(nearest), width
                ),
            }
        return out

    def _number(self, request: Any, name: str) -> float | None:
        """An optional one-element input (BOOL or FP64) as a float, or ``None`` when absent."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        values = tensor.as_numpy().reshape(-1)
        if len(values) != 1:
            raise InvalidRequest(f"input {name!r} must hold exactly one value, got {len(values)}")
        return float(values[0])
