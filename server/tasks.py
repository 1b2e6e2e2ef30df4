"""Adapting and finding tasks, independent of the protocol that asked.

The gRPC service and the Triton python-backend models both check request sizes against
:class:`ServiceLimits`, turn an Adapt into an :class:`AdaptRequest` (validated against the model's
limits), run it on decoded images and store the resulting :class:`TaskRecord`, and look a task up with
:func:`find_task`. Validation messages say what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.models.calibration import ACCEPTANCE_LEVELS, DEFAULT_ACCEPTANCE, OpenSetCalibration
from fewshot.models.family import Family
from fewshot.models.interrupt import interruptible
from fewshot.models.report import adapt_with_report
from fewshot.server.config import ServeConfig
from fewshot.server.errors import Conflict, InvalidRequest, NotFound, NotUpdatable, TooLarge, quoted
from fewshot.server.images import ImageLimits
from fewshot.server.state import StateError, StoredSupport, dump_task, load_report, load_support, load_task
from fewshot.server.store import TaskRecord, TaskStore
from fewshot.server.versions import ServedModels

#: Length limits of identifiers and names (characters); longer ones are refused, never echoed whole.
MAX_MODEL_NAME = 128
MAX_METHOD_NAME = 64
MAX_TASK_ID = 64
MAX_LABEL = 256
TASK_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def task_ref(task_id: str) -> str:
    """What logs say for a task: a short hash (a task id lets a caller of its tenant classify)."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ServiceLimits:
    """Server-wide limits (per-model limits come from each manifest), made from ``fewshot serve``'s settings by
    :meth:`from_config` (:meth:`default`: from those settings' defaults, ``server/config.py``)."""

    max_support: int
    max_queries: int
    default_ttl: int
    image: ImageLimits
    #: Decoded pixels (width x height, summed over a call's images): about 16 images at the per-image limit.
    max_call_pixels: int
    #: Inner-loop work of one Adapt: support images x inner steps.
    max_image_steps: int
    #: Bytes of one Adapt: the message, or all chunks of an AdaptStream together.
    max_request_bytes: int
    max_ttl: int = 30 * 24 * 3600

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> ServiceLimits:
        return cls(
            max_support=cfg.max_support,
            max_queries=cfg.max_queries,
            default_ttl=cfg.default_ttl,
            image=ImageLimits(max_bytes=int(cfg.max_image_mb * (1 << 20))),
            max_call_pixels=int(cfg.max_call_megapixels * (1 << 20)),
            max_image_steps=cfg.max_image_steps,
            max_request_bytes=cfg.max_request_mb << 20,
        )

    @classmethod
    def default(cls) -> ServiceLimits:
        return cls.from_config(ServeConfig())

    def ttl(self, requested: int) -> int:
        """Seconds a task lives: ``requested``, or the default when 0."""
        if requested == 0:
            return self.default_ttl
        if requested > self.max_ttl:
            raise InvalidRequest(f"ttl_seconds {requested} exceeds this server's maximum of {self.max_ttl}")
        return requested

    def check_support(self, count: int) -> None:
        if count > self.max_support:
            raise TooLarge(f"support set has {count} images; this server takes at most {self.max_support}")

    def check_request_bytes(self, size: int) -> None:
        if size > self.max_request_bytes:
            raise TooLarge(
                f"the Adapt carries more than {self.max_request_bytes} bytes ({size} so far); this server "
                "takes at most that per call or stream: send fewer or smaller images"
            )

    def check_queries(self, count: int) -> None:
        if not count:
            raise InvalidRequest("no query images: send at least one")
        if count > self.max_queries:
            raise TooLarge(f"{count} query images; this server takes at most {self.max_queries} per call")


@dataclass(frozen=True)
class Rejection:
    """A Classify's open-set option: a query whose calibrated score is below the threshold is ``unknown``.
    The threshold is the request's own, or the one at which ``target_recall`` of known validation
    queries were accepted (the model card's calibration; default :data:`DEFAULT_ACCEPTANCE`)."""

    threshold: float | None = None
    target_recall: float | None = None

    @staticmethod
    def check(reject: bool, threshold: float | None, target_recall: float | None) -> Rejection | None:
        """The option of a request, validated; ``None`` when rejection is not asked for."""
        if not reject:
            if threshold is not None or target_recall is not None:
                raise InvalidRequest("threshold and target_recall apply only with reject_unknown: set it, or drop them")
            return None
        if threshold is not None and target_recall is not None:
            raise InvalidRequest("give a threshold or a target_recall, not both")
        if threshold is not None and not math.isfinite(threshold):
            raise InvalidRequest(f"threshold must be a finite number, got {threshold}")
        lo, hi = ACCEPTANCE_LEVELS[0], ACCEPTANCE_LEVELS[-1]
        if target_recall is not None and not lo <= target_recall <= hi:
            raise InvalidRequest(f"target_recall must be in {lo}..{hi}, got {target_recall:g}")
        return Rejection(threshold, target_recall)

    def apply(self, open_set: OpenSetCalibration, calibrated: torch.Tensor) -> tuple[np.ndarray, float]:
        """``(Q, N)`` calibrated logits -> ``((Q,) scores, threshold)``; a query is unknown when its score
        is below the threshold. :class:`InvalidRequest` when the task's model has no calibration and no
        threshold was given."""
        threshold = self.threshold
        if threshold is None:
            try:
                threshold = open_set.threshold(DEFAULT_ACCEPTANCE if self.target_recall is None else self.target_recall)
            except ConfigError as exc:
                raise InvalidRequest(str(exc)) from None
        return open_set.scores(calibrated).double().numpy(), float(threshold)


def get_model(models: ServedModels, name: str, version: str = "", tenant: str = "") -> Family:
    """The served model called ``name`` at ``version`` (empty: its default version, or its canary's for the
    canary's tenants and share of Adapts); :class:`InvalidRequest` when the name is empty or too long,
    :class:`NotFound` when the model or that version is not loaded."""
    if not name:
        raise InvalidRequest(f"no model named: set `model` to one of {', '.join(sorted(models))}")
    if len(name) > MAX_MODEL_NAME:
        raise InvalidRequest(f"model name {quoted(name)} is longer than {MAX_MODEL_NAME} characters")
    return models.for_adapt(name, version, tenant)


def check_task_id(task_id: str) -> str:
    """``task_id`` if it can be one (:class:`InvalidRequest` when empty, too long or of other characters)."""
    if not task_id:
        raise InvalidRequest("task_id is empty: use the id that Adapt returned")
    if not TASK_ID.fullmatch(task_id):
        raise InvalidRequest(
            f"task_id {quoted(task_id, 16)} is not a task id: ids are at most {MAX_TASK_ID} "
            "letters, digits, '_' or '-' (Adapt returns 32 hex digits)"
        )
    return task_id


def find_task(store: TaskStore, models: ServedModels, task_id: str, tenant: str = "") -> tuple[TaskRecord, Any, Family]:
    """``(record, ready-to-classify task, the model version it is pinned to)`` of ``tenant``'s live task, from
    the store's cache or disk (blocking); :class:`NotFound` for an unknown, deleted, expired or unrestorable
    task, or one of another tenant (the same answer, so ids of other tenants cannot be probed);
    :class:`VersionNotLoaded` when the version the task was adapted with is not loaded (checked on every
    call, cached or not: a version unloaded at runtime stops answering at once)."""
    check_task_id(task_id)

    def decode(rec: TaskRecord) -> Any:
        try:
            return load_task(rec.state, models.pinned(rec))
        except StateError as exc:
            raise NotFound(f"task {task_id} cannot be restored: {exc}") from None

    found = store.get(task_id, decode, tenant)
    if found is None:
        raise NotFound(f"task {task_id} is unknown, deleted or expired: adapt again")
    record, task = found
    return record, task, models.pinned(record)


def stored_support(state: bytes, task_id: str, refusal: str) -> StoredSupport:
    """The support set stored with a task (what UpdateTask re-adapts on and explanations measure against):
    :class:`NotFound` for a state that cannot be read, :class:`NotUpdatable` for a task stored without its support
    images (``refusal`` says what it therefore cannot do, e.g. "cannot be updated")."""
    try:
        support = load_support(state)
    except StateError as exc:
        raise NotFound(f"task {task_id} cannot be restored: {exc}") from None
    if support is None:
        raise NotUpdatable(
            f"task {task_id} was stored without its support images (adapted by an older server) and {refusal}: "
            "adapt again with the whole support set"
        )
    return support


def resolve_method(model: Family, method: str | None) -> str:
    """``method`` (empty: the model's own) as one of ``model.methods``, or any name its family accepts
    for one (an inner-loop model's own method, e.g. ``cxgrad``, for ``inner_loop``)."""
    if method and len(method) > MAX_METHOD_NAME:
        raise InvalidRequest(f"method {quoted(method)} is longer than {MAX_METHOD_NAME} characters")
    try:
        return model.resolve_method(method)
    except ConfigError:
        raise InvalidRequest(f"unknown method {quoted(method or '')} for model {model.name}: use {', '.join(model.methods)}") from None


def check_labels(model: Family, names: list[str]) -> tuple[list[str], torch.Tensor, int]:
    """Support labels -> (classes in order of first appearance, ``(S,)`` class indices, fewest shots)."""
    if not names:
        raise InvalidRequest("the support set is empty: send at least one labelled image for each of 2 or more classes")
    if any(not n for n in names):
        raise InvalidRequest(f"support image {names.index('')} has an empty label: every image needs its class label")
    for i, n in enumerate(names):
        if len(n) > MAX_LABEL:
            raise InvalidRequest(f"support image {i} has a label of {len(n)} characters ({quoted(n, 32)}); labels are at most {MAX_LABEL}")
    counts = Counter(names)
    labels = list(counts)
    ways, shots = len(labels), max(counts.values())
    if ways < 2:
        raise InvalidRequest(f"the support set has 1 class ({quoted(labels[0])}); a task needs at least 2 classes")
    try:
        model.check_ways(ways)
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from None
    max_shots = model.limits.get("max_shots")
    if max_shots is not None and shots > max_shots:
        worst = max(counts, key=lambda name: counts[name])
        raise InvalidRequest(f"class {quoted(worst)} has {shots} images; model {model.name} allows at most {max_shots} per class")
    index = {n: i for i, n in enumerate(labels)}
    return labels, torch.as_tensor([index[n] for n in names]), min(counts.values())


def check_settings(model: Family, method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request settings by API name (``None``: not given) within the bounds the model's family
    declares for ``method``, as adapter keyword arguments."""
    try:
        return model.check_settings(method, settings)
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from None


@dataclass
class AdaptRequest:
    """A validated Adapt: the model, method, class labels and per-image targets, the adapter to run."""

    model: Family
    method: str
    labels: list[str]
    targets: torch.Tensor
    adapter: Any
    ttl: int
    seconds: float = 0.0
    tenant: str = ""
    #: The request's settings by API name and each image's label: stored with the task (UpdateTask re-adapts with them).
    settings: dict[str, Any] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    #: The decoded support pixels (``decode_pixels_for_model``), set by the caller: stored with the task
    #: so that UpdateTask can re-adapt on the union; ``None``: not kept (the task cannot be updated).
    pixels: np.ndarray | None = None
    #: Compute the support-set report (:mod:`fewshot.models.report`) and store it with the task.
    report: bool = False
    #: The decoded unlabeled images the report reads (AdaptRequest.unlabeled; stored with the task), or ``None``.
    unlabeled: np.ndarray | None = None
    #: The fewest images of a class (what the adapter and the report settings are chosen for).
    shots: int = 1

    @staticmethod
    def check(
        model: Family,
        method: str | None,
        names: list[str],
        settings: Mapping[str, Any] | None = None,
        ttl: int = 24 * 3600,
        max_image_steps: int | None = None,
        tenant: str = "",
    ) -> AdaptRequest:
        """``settings``: the request's per-task settings by API name (``inner_steps``, ``lambda``; ``None``: not given)."""
        method = resolve_method(model, method)
        labels, targets, shots = check_labels(model, names)
        given = {k: v for k, v in (settings or {}).items() if v is not None}
        settings = check_settings(model, method, settings or {})
        try:
            adapter = model.adapter(method, shots=shots, **settings)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        steps = model.inner_steps(adapter)
        if max_image_steps is not None and len(names) * steps > max_image_steps:
            raise TooLarge(
                f"{len(names)} support images x {steps} inner steps = {len(names) * steps} image-steps; this "
                f"server runs at most {max_image_steps} per Adapt: send fewer images or ask fewer inner_steps"
            )
        return AdaptRequest(model, method, labels, targets, adapter, ttl, tenant=tenant, settings=given, names=list(names), shots=shots)

    def run(self, images: torch.Tensor, check: Callable[[str], None] | None = None) -> tuple[TaskRecord, Any, float]:
        """Adapt on normalised ``(S, C, H, W)`` images -> (record to store, task, support accuracy).
        ``check(stage)`` is called at each stage boundary (it raises to stop an abandoned call)."""
        with interruptible(check or (lambda stage: None)):
            start = time.perf_counter()
            report = None
            if self.report:
                settings = self.model.report_settings(self.method, self.shots)
                unlabeled = None if self.unlabeled is None or not len(self.unlabeled) else self.model.spec.normalize(self.unlabeled)
                task, support_probabilities, made = adapt_with_report(self.adapter, images, self.targets, self.pixels, settings, unlabeled)
                report = made.to_dict()
            else:
                task, support_probabilities = self.adapter.adapt_scored(images, self.targets)
            self.seconds = time.perf_counter() - start
        return self._result(task, support_probabilities, len(images), report)

    def batch_key(self, images: torch.Tensor) -> Hashable | None:
        """The key under which this Adapt may run with concurrent ones of the same model, settings and
        support shape (:meth:`run_many`), or ``None`` (it runs alone: so does every Adapt with a report)."""
        return None if self.report else self.model.adapt_batch_key(self.adapter, tuple(images.shape))

    @staticmethod
    def run_many(items: list[tuple[AdaptRequest, torch.Tensor]]) -> list[tuple[TaskRecord, Any, float]]:
        """Adapts of one :meth:`batch_key` as one call (``adapter.adapt_many``, equal to one by one to
        float rounding); each request's ``seconds`` is the batch's."""
        first = items[0][0]
        start = time.perf_counter()
        tasks = first.adapter.adapt_many([x for _, x in items], [request.targets for request, _ in items])
        seconds = time.perf_counter() - start
        results = []
        for (request, images), task in zip(items, tasks):
            request.seconds = seconds
            results.append(request._result(task, task.classify(images), len(images)))
        return results

    def _result(
        self, task: Any, support_probabilities: torch.Tensor, images: int, report: dict[str, Any] | None = None
    ) -> tuple[TaskRecord, Any, float]:
        accuracy = float((support_probabilities.argmax(1) == self.targets).float().mean())
        now = time.time()
        support = None if self.pixels is None else StoredSupport(self.pixels, self.names, self.settings, self.unlabeled)
        shots = torch.bincount(self.targets, minlength=len(self.labels)).tolist()
        record = TaskRecord(
            secrets.token_hex(16),
            self.model.name,
            self.method,
            self.labels,
            now,
            now + self.ttl,
            images,
            dump_task(task, support, report),
            self.tenant,
            1,
            shots,
            self.model.version,
            self.model.digest,
            now,
        )
        return record, task, accuracy


@dataclass
class TaskUpdate:
    """A validated UpdateTask: images to add (decoded pixels, one label each), classes to remove."""

    task_id: str
    pixels: np.ndarray | None
    names: list[str]
    remove: list[str]
    expected_version: int | None = None

    def __post_init__(self) -> None:
        if not self.names and not self.remove:
            raise InvalidRequest("the update adds no image and removes no class: send images to add or labels to remove")
        for i, n in enumerate(self.names):
            if not n:
                raise InvalidRequest(f"added image {i} has an empty label: every image needs its class label")
            if len(n) > MAX_LABEL:
                raise InvalidRequest(
                    f"added image {i} has a label of {len(n)} characters ({quoted(n, 32)}); labels are at most {MAX_LABEL}"
                )
        both = set(self.names) & set(self.remove)
        if both:
            raise InvalidRequest(f"class {quoted(sorted(both)[0])} is both added to and removed from: do one per update")

    def apply(
        self,
        store: TaskStore,
        models: ServedModels,
        tenant: str,
        limits: ServiceLimits,
        attempts: int = 5,
        check: Callable[[str], None] | None = None,
        decode: Callable[[Family], np.ndarray] | None = None,
    ) -> tuple[TaskRecord, Any, float, float]:
        """Re-adapt the task on (its stored support minus the removed classes) + the added images, with the
        method and settings of its Adapt, and commit it as the next version (compare and set). A
        concurrent update that committed first makes this one start again from the new version, at
        most ``attempts`` times, then :class:`Conflict`. ``decode(model)`` gives the added images' pixels
        once the task's model is known (when :attr:`pixels` is not set yet); it runs once, whatever the
        attempts. Returns ``(record, task, support accuracy, seconds)``."""
        for _ in range(attempts):
            current = store.record(self.task_id, tenant)
            if current is None:
                raise NotFound(f"task {self.task_id} is unknown, deleted or expired: adapt again")
            if self.expected_version is not None and current.version != self.expected_version:
                raise Conflict(
                    f"task {self.task_id} is at version {current.version}, not {self.expected_version}: read it again (GetTask) and retry"
                )
            model = models.pinned(current)  # the version the task was adapted with, never another
            if self.pixels is None and decode is not None:
                self.pixels = decode(model)
            support = stored_support(current.state, self.task_id, "cannot be updated")
            unknown = [n for n in self.remove if n not in current.labels]
            if unknown:
                raise InvalidRequest(
                    f"cannot remove {quoted(unknown[0])}: the task's classes are {', '.join(map(quoted, current.labels[:20]))}"
                )
            keep = np.array([n not in self.remove for n in support.names], dtype=bool)
            names = [n for n, k in zip(support.names, keep) if k] + self.names
            limits.check_support(len(names))
            pixels = support.pixels[keep]
            if self.pixels is not None and len(self.pixels):
                if self.pixels.shape[1:] != pixels.shape[1:]:
                    raise InvalidRequest(f"added images decode to {self.pixels.shape[1:]}, the task's to {pixels.shape[1:]}")
                pixels = np.concatenate([pixels, self.pixels.astype(np.promote_types(pixels.dtype, self.pixels.dtype))])
            request = AdaptRequest.check(model, current.method, names, support.settings, 0, limits.max_image_steps, tenant)
            request.pixels = pixels
            request.report = load_report(current.state) is not None  # a task with a report keeps an up-to-date one
            request.unlabeled = support.unlabeled  # and reads the same unlabeled images
            record, task, accuracy = request.run(model.spec.normalize(pixels), check)
            record = dataclasses.replace(
                record, task_id=current.task_id, created_at=current.created_at, expires_at=current.expires_at, version=current.version + 1
            )
            if store.update(record, task):
                return record, task, accuracy, request.seconds
        raise Conflict(
            f"task {self.task_id} was updated by {attempts} other calls while this update ran; nothing was changed by this one: retry it"
        )
