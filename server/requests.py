"""The wire's Adapt and Classify, checked and answered in one place for every transport.

The gRPC service (and, through it, the HTTP/JSON API) and the Triton models (:mod:`fewshot.server.triton_models`)
each turn what their client sent into the protobuf request of the RPC, then call the functions below: the
same validation (model, method, support size, labels, settings with their bounds, the inner-loop work cap,
the tenant; the Classify's query count and open-set option) and the same response building. So a request
refused on one transport is refused on all, with the same status and message.

Settings travel generically (``AdaptSettings.values``, a map of name to number or string); which ones a
model takes, their kinds and bounds, come from the model's family (:meth:`Family.settings`), the one place
they are declared, and :func:`model_info` reports them (``ListModels``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from google.protobuf import struct_pb2

from fewshot.models.calibration import OpenSetCalibration
from fewshot.models.family import Family
from fewshot.models.report import Report
from fewshot.models.settings import Setting
from fewshot.server.errors import InvalidRequest, ServiceError
from fewshot.server.state import StateError, load_report
from fewshot.server.store import TaskRecord
from fewshot.server.tasks import AdaptRequest, Rejection, ServiceLimits, check_task_id, get_model, resolve_method
from fewshot.server.versions import ServedModels
from fewshot_proto import fewshot_pb2 as pb

#: The ``AdaptSettings`` fields that predate ``values``: aliases of the settings of the same name.
ALIASES = ("inner_steps", "lambda")


def settings_of(message: pb.AdaptSettings) -> dict[str, Any]:
    """A request's settings by name (numbers as floats, choices as strings), from ``values`` and the two
    alias fields; :class:`InvalidRequest` for a value that is neither, or an alias that contradicts ``values``."""
    out: dict[str, Any] = {}
    for name, value in message.values.items():
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            out[name] = value.number_value
        elif kind == "string_value":
            out[name] = value.string_value
        else:
            raise InvalidRequest(f"setting {name[:64]!r} must be a number or a string, got {kind or 'nothing'}")
    for name in ALIASES:
        if message.HasField(name):
            alias = float(getattr(message, name))
            if name in out and not (isinstance(out[name], float) and math.isclose(out[name], alias, rel_tol=1e-6)):
                raise InvalidRequest(
                    f"setting {name} is given twice with different values ({alias:g} and {out[name]!r}): give it once, in settings.values"
                )
            out.setdefault(name, alias)
    return out


def settings_message(values: Mapping[str, Any]) -> pb.AdaptSettings:
    """Settings by name (numbers or strings) as an ``AdaptSettings`` (``values`` only)."""
    message = pb.AdaptSettings()
    for name, value in values.items():
        message.values[name].CopyFrom(_value(name, value))
    return message


def _value(name: str, value: Any) -> struct_pb2.Value:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"setting {name[:64]!r} must be a number or a string, got {type(value).__name__}")
    return struct_pb2.Value(string_value=value) if isinstance(value, str) else struct_pb2.Value(number_value=float(value))


def support_of(labels: Sequence[str], images: Sequence[bytes], what: str = "images") -> list[pb.LabelledImage]:
    """Labels and encoded images sent side by side (an HTTP form, a Triton request) as labelled images;
    :class:`InvalidRequest` unless there is one label per image."""
    if len(labels) != len(images):
        raise InvalidRequest(f"{len(images)} {what} but {len(labels)} labels: send one label per image, in the same order")
    return [pb.LabelledImage(image=pb.Image(encoded=b), label=label) for b, label in zip(images, labels)]


def check_adapt(
    models: ServedModels,
    limits: ServiceLimits,
    model_name: str,
    method: str,
    support: Sequence[pb.LabelledImage],
    settings: pb.AdaptSettings,
    ttl_seconds: int,
    tenant: str,
    model_version: str = "",
) -> AdaptRequest:
    """An Adapt's fields -> the validated :class:`AdaptRequest` (its images still encoded in ``support``), on
    ``model_version`` of the model (empty: its default version)."""
    model = get_model(models, model_name, model_version, tenant)
    method = resolve_method(model, method)
    limits.check_support(len(support))
    return AdaptRequest.check(
        model, method, [item.label for item in support], settings_of(settings), limits.ttl(ttl_seconds), limits.max_image_steps, tenant
    )


def report_message(record: TaskRecord) -> pb.SupportReport | None:
    """The support-set report stored with ``record`` as the wire's message (labels by name, support images by index),
    or ``None`` for a task adapted without one."""
    try:
        stored = load_report(record.state)
    except StateError:
        return None
    if stored is None:
        return None
    report = Report.from_dict(stored)
    names = record.labels
    message = pb.SupportReport(scheme=report.scheme, held_out=report.held_out, extra_adaptations=report.extra_adaptations, note=report.note)
    if report.estimate is not None:
        message.estimate, message.low, message.high = report.estimate, report.low or 0.0, report.high or 0.0
    message.unlabeled = report.unlabeled
    if report.confidence is not None:
        message.unlabeled_confidence = 100.0 * report.confidence
    for a, b, percent in report.confusions:
        message.confusions.add(label_a=names[a], label_b=names[b], percent=percent)
    for f in report.flags:
        flag = message.flags.add(index=f.index, kind=f.kind, score=f.score)
        if f.other is not None:
            flag.other = f.other
        flag.label = names[f.label]
        if f.looks_like is not None:
            flag.looks_like = names[f.looks_like]
    return message


def adapt_response(record: TaskRecord, accuracy: float = 0.0, seconds: float = 0.0) -> pb.AdaptResponse:
    """What Adapt (and ImportTask, without accuracy and time) answers of the stored task ``record``."""
    return pb.AdaptResponse(
        task_id=record.task_id,
        labels=record.labels,
        support_accuracy=accuracy,
        adapt_seconds=seconds,
        expires_at=record.expires_at,
        model=record.model,
        method=record.method,
        model_version=pb.ModelVersion(version=record.model_version, digest=record.model_digest),
        report=report_message(record),
    )


def check_classify(limits: ServiceLimits, request: pb.ClassifyRequest) -> tuple[str, Rejection | None]:
    """A Classify's task id and open-set option, validated with its query count."""
    task_id = check_task_id(request.task_id)
    limits.check_queries(len(request.queries))
    rejection = Rejection.check(
        request.reject_unknown,
        request.threshold if request.HasField("threshold") else None,
        request.target_recall if request.HasField("target_recall") else None,
    )
    return task_id, rejection


def classify_response(
    logits: torch.Tensor, labels: list[str], top_k: int, open_set: OpenSetCalibration, rejection: Rejection | None
) -> pb.ClassifyResponse:
    """``(Q, N)`` calibrated logits -> ranked predictions by probability (ties broken by label order),
    each marked ``unknown`` or not when ``rejection`` is asked for."""
    probs = torch.softmax(logits, dim=1).numpy()
    k = min(max(top_k, 1), len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, 1).tolist()  # Python floats in one call rather than one per value
    response = pb.ClassifyResponse(labels=labels)
    # added in place: about a third of the time of building each message apart and copying it in
    predictions = response.predictions
    for row, idx, values in zip(probs.tolist(), order.tolist(), top):
        ranked = predictions.add(probabilities=row).ranked
        for j, v in zip(idx, values):
            ranked.add(label=labels[j], probability=v)
    if rejection is not None:
        scores, threshold = rejection.apply(open_set, logits)
        for prediction, score in zip(predictions, scores):
            prediction.unknown, prediction.score, prediction.threshold = bool(score < threshold), float(score), threshold
            prediction.score_name = open_set.score
    return response


def setting_info(setting: Setting, methods: list[str]) -> pb.SettingInfo:
    kind = "choice" if setting.choices else "integer" if setting.integer else "number"
    bounds = {} if setting.choices else {"min": setting.lo, "max": setting.hi}
    return pb.SettingInfo(name=setting.api, kind=kind, choices=setting.choices, methods=methods, **bounds)


def model_settings(model: Family) -> list[pb.SettingInfo]:
    """Every setting the model's methods take, once per distinct declaration, with the methods that take it."""
    by_setting: dict[Setting, list[str]] = {}
    for method in model.methods:
        for setting in model.settings(method).values():
            by_setting.setdefault(setting, []).append(method)
    return [setting_info(s, methods) for s, methods in sorted(by_setting.items(), key=lambda kv: (kv[0].api, kv[1]))]


#: ListTasks' largest page.
MAX_PAGE = 1000


def page_size(requested: int) -> int:
    """ListTasks' page size (0: 100), :class:`InvalidRequest` past :data:`MAX_PAGE`."""
    if requested > MAX_PAGE:
        raise InvalidRequest(f"page_size {requested} is more than {MAX_PAGE}: ask for at most {MAX_PAGE} tasks a page")
    return requested or 100


def page_after(token: str) -> tuple[float, str]:
    """The ``(created_at, task_id)`` a page token continues after (:class:`InvalidRequest` for a token not made here)."""
    if not token:
        return (0.0, "")
    try:
        created, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), check_task_id(str(task_id))
    except (ValueError, TypeError, binascii.Error):
        raise InvalidRequest("page_token is not one ListTasks returned: pass next_page_token as it came") from None


def page_token(created_at: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, task_id]).encode()).decode()


def task_summaries(rows: Sequence[Sequence[Any]], size: int) -> pb.ListTasksResponse:
    """A ListTasks page from up to ``size + 1`` rows of ``SUMMARY`` (one more than the page: there is a next)."""
    tasks = [
        pb.TaskSummary(
            task_id=r[0],
            model=r[1],
            model_version=pb.ModelVersion(version=r[2], digest=r[3]),
            method=r[4],
            ways=len(json.loads(r[5])),
            support_size=r[6],
            created_at=r[7],
            updated_at=r[8] or r[7],
            expires_at=r[9],
            size_bytes=r[10],
            version=r[11],
        )
        for r in rows[:size]
    ]
    more = len(rows) > size
    return pb.ListTasksResponse(tasks=tasks, next_page_token=page_token(tasks[-1].created_at, tasks[-1].task_id) if more else "")


def task_info(record: TaskRecord, models: ServedModels) -> pb.TaskInfo:
    """What GetTask reports of a stored task, with the model version it needs and whether it is loaded."""
    try:
        loaded = bool(models.pinned(record))
    except ServiceError:
        loaded = False
    return pb.TaskInfo(
        task_id=record.task_id,
        model=record.model,
        method=record.method,
        labels=record.labels,
        created_at=record.created_at,
        expires_at=record.expires_at,
        support_size=record.support_size,
        version=record.version,
        shots=record.shots,
        model_version=pb.ModelVersion(version=record.model_version, digest=record.model_digest),
        model_version_loaded=loaded,
        report=report_message(record),
    )


def models_info(models: ServedModels, live: Mapping[tuple[str, str], int]) -> list[pb.ModelInfo]:
    """Every served model (its default version's description) with its loaded versions and their live tasks
    (``live``: by model and version digest, :meth:`TaskStore.live_by_version`)."""
    return [model_info(models[name], models, live) for name in models]


def model_info(model: Family, models: ServedModels | None = None, live: Mapping[tuple[str, str], int] | None = None) -> pb.ModelInfo:
    """A model's methods, input spec, limits and settings as the API reports them; with ``models``, its loaded
    versions too (``live``: live tasks by model and digest)."""
    live = live or {}
    versions = models.versions(model.name) if models is not None else [model]
    default = models.default_version(model.name) if models is not None else model.version
    canary = models.canary(model.name) if models is not None else None
    spec, (min_ways, max_ways) = model.spec, model.way_range()
    return pb.ModelInfo(
        name=model.name,
        family=model.family,
        methods=model.methods,
        default_method=model.default_method,
        input=pb.InputSpec(channels=spec.channels, size=spec.size, mean=spec.mean, std=spec.std, resize=spec.resize),
        min_ways=min_ways,
        max_ways=max_ways,
        max_shots=model.limits.get("max_shots", 0),
        settings=model_settings(model),
        versions=[
            pb.ModelVersionInfo(
                version=v.version,
                digest=v.digest,
                default=v.version == default,
                live_tasks=live.get((v.name, v.digest), 0),
                **(
                    {"canary_percent": canary.percent, "canary_tenants": sorted(canary.tenants)}
                    if canary is not None and canary.version == v.version
                    else {}
                ),
            )
            for v in versions
        ],
    )
