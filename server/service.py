"""The ``fewshot.v1.FewShot`` servicer: Adapt (and AdaptStream), Classify, UpdateTask, GetTask, DeleteTask, ListModels.

Adaptation calls the bundle's adapter, the same code ``fewshot eval`` measures with; the adapted
state is written to the task store before the answer goes out. Decoding, adaptation and inference
run in a thread pool, off the event loop.

Every call goes through :meth:`FewShotService._call`, in this order: authenticate from metadata alone
(a refused call's body is never parsed), parse the request bytes (a message that does not parse is
INVALID_ARGUMENT, not UNKNOWN), validate, wait for an admission slot (heavy calls), then work in
stages that stop once the client has gone. Errors map to the statuses of the error table (docs/errors-and-security.md);
messages and log lines quote input only in bounded length, and log tasks by a short hash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from fewshot.errors import one_line
from fewshot.models.family import Family
from fewshot.models.plan import ClassifyPlan
from fewshot.server.admission import Admission
from fewshot.server.auth import Authenticator, Tenant
from fewshot.server.batcher import Batcher
from fewshot.server.budget import BodyBudget, BodyHold, CallBudget
from fewshot.server.config import ServeConfig
from fewshot.server.errors import InvalidRequest, NotFound, ServiceError
from fewshot.server.explain import SupportFeatures, check_explain, explain, stored_state
from fewshot.server.images import decode_for_model, decode_pixels_for_model
from fewshot.server.metrics import ServiceMetrics
from fewshot.server.requests import (
    adapt_response,
    check_adapt,
    check_classify,
    classify_response,
    model_info,
    models_info,
    page_after,
    page_size,
    report_message,
    task_info,
    task_summaries,
)
from fewshot.server.store import TaskRecord, TaskStore
from fewshot.server.task_blob import export_blob, import_blob
from fewshot.server.tasks import AdaptRequest, ServiceLimits, TaskUpdate, check_task_id, find_task, task_ref
from fewshot.server.versions import ServedModels
from fewshot_proto import fewshot_pb2 as pb

__all__ = ["FewShotService", "ServiceLimits", "STATUSES"]  # ServiceLimits lives in tasks.py, shared with Triton

log = logging.getLogger("fewshot.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FewShot"].full_name
#: Every status the services answer with (docs/errors-and-security.md; the fuzz tests hold it to this).
STATUSES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,  # the admin service (server/admin.py)
        grpc.StatusCode.INTERNAL,
    }
)
#: Locks serialising UpdateTask calls of one task in this process (a task id hashes to one of them).
UPDATE_LOCKS = 64
#: Longest error text kept in a log line (messages are already bounded; this is the backstop).
MAX_LOGGED_ERROR = 500
M = TypeVar("M", bound=Message)


def parse(kind: type[M], raw: bytes) -> M:
    """``raw`` bytes as a ``kind`` message (:class:`InvalidRequest` when they do not parse, e.g. a
    truncated message or a string field that is not UTF-8)."""
    message = kind()
    try:
        message.ParseFromString(raw)
    except Exception as exc:  # DecodeError, or the C parser's own errors
        raise InvalidRequest(f"the request is not a valid {kind.DESCRIPTOR.full_name} message ({one_line(str(exc), 120)})") from None
    return message


@dataclass
class _Call:
    """One call in progress: its tenant, budget and the fields of its log line."""

    tenant: Tenant
    budget: CallBudget
    #: The call's share of the process-wide budget for request bodies in flight.
    body: BodyHold
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def about(self, task_id: str) -> str:
        """Note the task this call is about; the log line shows only its short hash."""
        self.fields["task"], self.fields["_task_id"] = task_ref(task_id), task_id
        return task_id


@dataclass
class _AdaptCall:
    model: str
    method: str
    settings: pb.AdaptSettings
    ttl: int
    support: list[pb.LabelledImage]
    model_version: str = ""
    report: bool = False
    #: AdaptRequest.unlabeled (read only with ``report``).
    unlabeled: list[pb.Image] = field(default_factory=list)


class FewShotService:
    """Async servicer over the loaded models, one task store and one thread pool.

    Register it with :meth:`add_to_server`: its handlers take the raw request bytes, so that
    authentication comes before parsing and a parse failure has a status of our choosing.
    """

    def __init__(
        self,
        models: ServedModels,
        store: TaskStore,
        executor: ThreadPoolExecutor,
        metrics: ServiceMetrics,
        limits: ServiceLimits | None = None,
        batch_delay: float = 0.002,
        max_batch: int = 256,
        auth: Authenticator | None = None,
        admission: Admission | None = None,
        bodies: BodyBudget | None = None,
    ) -> None:
        self.models, self.store, self.executor, self.metrics = models, store, executor, metrics
        self.limits = limits or ServiceLimits.default()
        #: Request bytes all calls in flight hold together (``--max-inflight-body-mb``).
        self.bodies = bodies or BodyBudget(ServeConfig().max_inflight_body_mb << 20)
        self.auth = auth or Authenticator()
        self.admission = admission or Admission(capacity=64, max_queue=256)
        self.batcher = Batcher(executor, batch_delay, max_batch, on_batch=metrics.batch_images.observe, on_wait=metrics.worker_waited)
        #: Adapts, where the model stacks them: sizes count tasks, at most 32 per stacked inner loop
        self.adapt_batcher = Batcher(executor, batch_delay, 32, on_batch=metrics.adapt_batch_tasks.observe, on_wait=metrics.worker_waited)
        self._update_locks: list[asyncio.Lock] = []  # made in the event loop, on the first UpdateTask
        #: Support features of recently explained tasks (Classify with ``explain``), bounded in bytes.
        self.support_features = SupportFeatures()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the ``fewshot.v1.FewShot`` methods on ``server`` (request bytes are parsed by us)."""

        def unary(fn: Callable) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, response_serializer=lambda m: m.SerializeToString())

        handlers = {
            "Adapt": unary(self.Adapt),
            "Classify": unary(self.Classify),
            "GetTask": unary(self.GetTask),
            "UpdateTask": unary(self.UpdateTask),
            "DeleteTask": unary(self.DeleteTask),
            "ListModels": unary(self.ListModels),
            "ListTasks": unary(self.ListTasks),
            "ExportTask": unary(self.ExportTask),
            "ImportTask": unary(self.ImportTask),
            "AdaptStream": grpc.stream_unary_rpc_method_handler(self.AdaptStream, response_serializer=lambda m: m.SerializeToString()),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    # -- plumbing -------------------------------------------------------------------------------
    async def _call(self, rpc: str, context: grpc.aio.ServicerContext, body: Callable[[_Call], Awaitable[Any]], size: int = 0) -> Any:
        """Authenticate, charge ``size`` bytes to the body budget (a unary call: twice its message, the bytes and
        their parsed copy, both held until it ends), run ``body``, map service errors to statuses, record metrics
        and one log line; the call's charge is given back when it ends."""
        fields: dict[str, Any] = {"method": ""}
        start, code, message, http_status = time.perf_counter(), grpc.StatusCode.OK, "", 500
        budget = CallBudget.for_call(
            self.limits.max_call_pixels, context.time_remaining(), lambda stage: self.metrics.stopped.labels(stage.split()[0]).inc()
        )
        hold = self.bodies.hold()
        try:
            tenant = self.auth.authenticate(context.invocation_metadata() or (), context.peer())
            if self.auth.required:
                fields["tenant"] = tenant.name
            hold.charge(size)
            budget.check("starting")
            return await body(_Call(tenant, budget, hold, fields))
        except ServiceError as exc:
            code, message, http_status = exc.code, str(exc), exc.http_status
        except asyncio.TimeoutError:
            code, message, http_status = grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the work finished", 504
        except asyncio.CancelledError:
            budget.abandon()  # the worker stops at its next stage boundary
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # a bug: answer INTERNAL, keep serving, log the trace
            log.exception("internal error in %s", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {one_line(str(exc), 200)}"
        finally:
            hold.close()
            seconds = time.perf_counter() - start
            method = fields.get("method", "")
            # by the version the call ran on, where it ran on one: canaries are compared by it
            self.metrics.call_ended(rpc, method, code.name, seconds, fields.get("model", ""), fields.get("model_version", ""))
            task_id = fields.pop("_task_id", None)
            logged = message.replace(task_id, fields["task"]) if task_id and message else message
            log.info(
                json.dumps(
                    {
                        "rpc": rpc,
                        "code": code.name,
                        "ms": round(seconds * 1e3, 2),
                        **fields,
                        **({"error": logged[:MAX_LOGGED_ERROR]} if logged else {}),
                        "peer": context.peer(),
                    }
                )
            )
        if hasattr(context, "http_status"):  # the HTTP/JSON API's context (server/http_api.py)
            context.http_status = http_status
        await context.abort(code, message)

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread; how long it waited for one goes to ``fewshot_queue_seconds{queue="worker"}``."""
        submitted = time.perf_counter()

        def timed() -> Any:
            self.metrics.worker_waited(time.perf_counter() - submitted)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self.executor, timed)

    # -- Adapt ----------------------------------------------------------------------------------
    async def Adapt(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        async def body(call: _Call) -> pb.AdaptResponse:
            self.limits.check_request_bytes(len(raw))
            request = parse(pb.AdaptRequest, raw)
            adapt = _AdaptCall(
                request.model,
                request.method,
                request.settings,
                request.ttl_seconds,
                list(request.support),
                request.model_version,
                request.report,
                list(request.unlabeled),
            )
            return await self._adapt(adapt, call)

        return await self._call("Adapt", context, body, 2 * len(raw))

    async def AdaptStream(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        async def body(call: _Call) -> pb.AdaptResponse:
            support: list[pb.LabelledImage] = []
            try:
                adapt = await self._read_stream(request_iterator, call, support)
                return await self._adapt(adapt, call)
            finally:  # what the stream read is dropped before the call gives its charge back
                support.clear()

        return await self._call("AdaptStream", context, body)

    async def _read_stream(self, request_iterator: AsyncIterator[bytes], call: _Call, support: list[pb.LabelledImage]) -> _AdaptCall:
        """The AdaptStream's chunks as one Adapt (its images appended to ``support``), each chunk charged to
        the call's body budget and checked against the per-call limits as it arrives."""
        adapt: _AdaptCall | None = None
        received = 0
        async for raw in request_iterator:
            received += len(raw)
            self.limits.check_request_bytes(received)  # as chunks arrive, not once the stream ends
            call.body.charge(len(raw))  # before it is kept: the parsed chunk holds as much
            chunk = parse(pb.AdaptChunk, raw)
            del raw
            if adapt is None:
                adapt = _AdaptCall(chunk.model, chunk.method, chunk.settings, chunk.ttl_seconds, support, chunk.model_version, chunk.report)
            else:  # later chunks may repeat the first chunk's model, version and method, not name others
                for name, first in (("model", adapt.model), ("method", adapt.method), ("model_version", adapt.model_version)):
                    later = getattr(chunk, name)
                    if later and later != first:
                        raise InvalidRequest(
                            f"a later AdaptStream chunk names {name} {one_line(later, 64)!r}, the "
                            f"first named {one_line(first, 64)!r}: set it in the first chunk only"
                        )
            support.extend(chunk.support)
            adapt.unlabeled.extend(chunk.unlabeled)
            self.limits.check_support(len(support) + len(adapt.unlabeled))
        if adapt is None:
            raise InvalidRequest("the stream carried no chunk: the first chunk names the model")
        return adapt

    async def _adapt(self, adapt: _AdaptCall, call: _Call) -> pb.AdaptResponse:
        request = check_adapt(
            self.models,
            self.limits,
            adapt.model,
            adapt.method,
            adapt.support,
            adapt.settings,
            adapt.ttl,
            call.tenant.name,
            adapt.model_version,
        )
        request.report = adapt.report
        if adapt.unlabeled and not adapt.report:
            raise InvalidRequest(
                f"the Adapt sends {len(adapt.unlabeled)} unlabeled images without report: they only feed the support-set "
                "report; set report, or leave them out"
            )
        self.limits.check_support(len(adapt.support) + len(adapt.unlabeled))
        model = request.model
        call.fields.update(model=model.name, model_version=model.version, method=request.method, support=len(adapt.support))
        images = [item.image for item in adapt.support]
        budget = call.budget

        def work() -> tuple[Any, torch.Tensor, tuple[TaskRecord, Any, float] | None]:
            request.pixels = decode_pixels_for_model(images, model, self.limits.image, "support", budget)
            if adapt.unlabeled:
                request.unlabeled = decode_pixels_for_model(adapt.unlabeled, model, self.limits.image, "unlabeled", budget)
            x = model.spec.normalize(request.pixels)
            budget.check("adaptation")
            key = request.batch_key(x)
            if key is None:
                return None, x, request.run(x, budget.check)
            ran, result = self.adapt_batcher.run_if_idle(key, 1, lambda: request.run(x, budget.check))
            return key, x, result if ran else None

        async with self.admission.slot():
            key, x, result = await self._offload(work)
            if result is None:  # with concurrent Adapts of its shape, as one stacked inner loop
                result = await self.adapt_batcher.submit_many(key, (request, x), 1, AdaptRequest.run_many)
            record, task, accuracy = result
        # durable before we acknowledge; the tenant's quota is checked in the same transaction
        await self._offload(lambda: self.store.put(record, task, self.auth.quota_tasks(call.tenant)))
        call.about(record.task_id)
        return adapt_response(record, accuracy, request.seconds)

    # -- Classify -------------------------------------------------------------------------------
    async def Classify(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async def body(call: _Call) -> pb.ClassifyResponse:
            request = parse(pb.ClassifyRequest, raw)
            task_id, rejection = check_classify(self.limits, request)
            k = check_explain(request.explain)
            call.about(task_id)
            budget, queries = call.budget, list(request.queries)

            def find_decode_run() -> tuple[TaskRecord, Family, Any, tuple[Any, ...], pb.ClassifyResponse | None]:
                """One hop: the lookup, decoding and, when nothing could merge with it, the work and
                the response itself."""
                record, task, model = find_task(self.store, self.models, task_id, call.tenant.name)
                x = decode_for_model(queries, model, self.limits.image, "query", budget)
                budget.check("classification")
                plan = task.plan()
                key, grouped = self._merge(plan, x)
                if k and hasattr(task, "logits_and_embeddings"):  # explained: the features once, for both
                    (logits, embedded), ran = task.logits_and_embeddings(x), True
                    x = embedded
                elif key is None:  # depends on the whole batch: never merged
                    ran, logits = True, plan.run(x)
                else:
                    ran, logits = self.batcher.run_if_idle(key, len(x), lambda: plan.run(x))
                return (
                    record,
                    model,
                    task,
                    (plan, x, key, grouped),
                    classify_response(logits, record.labels, request.top_k, task.open_set, rejection) if ran else None,
                )

            async with self.admission.slot():
                record, model, task, work, response = await self._offload(find_decode_run)
                call.fields.update(model=model.name, model_version=model.version, method=record.method, queries=len(queries))
                if response is None:  # merged with concurrent requests
                    logits = await self._classify(*work)
                    response = classify_response(logits, record.labels, request.top_k, task.open_set, rejection)
                if k:
                    state = stored_state(self.store, task_id, call.tenant.name)
                    embedded = hasattr(task, "logits_and_embeddings")  # work[1]: the queries' features, else their pixels
                    await self._offload(explain, response, record, task, model, work[1], k, self.support_features, state, embedded)
            if self.store.deleted_since(task_id, call.started):  # DeleteTask answered while we worked
                raise NotFound(f"task {task_id} was deleted during this call")
            return response

        return await self._call("Classify", context, body, 2 * len(raw))

    @staticmethod
    def _merge(plan: ClassifyPlan, x: torch.Tensor) -> tuple[Any, Any]:
        """The batcher key under which this request merges, with the group (``item``, ``run_many``) when it
        merges with other tasks' requests; key ``None``: it runs alone."""
        grouped = plan.group(x) if plan.group is not None else None
        if grouped is not None:
            return grouped[0], grouped[1:]
        return plan.key, None

    async def _classify(self, plan: ClassifyPlan, x: torch.Tensor, key: Any, grouped: Any) -> torch.Tensor:
        """``(Q, C, H, W)`` -> ``(Q, N)`` calibrated logits by the task's own plan (what ``task.classify``
        runs), its heavy part merged with concurrent requests of the same ``key`` (or, stacked, of other
        tasks of the model: ``grouped``), as :meth:`_merge` gave them."""
        if grouped is not None:
            item, run_many = grouped
            return await self.batcher.submit_many(key, item, len(x), run_many)
        return await self.batcher.submit(key, x, plan.heavy, plan.finish)

    # -- UpdateTask -----------------------------------------------------------------------------
    async def UpdateTask(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.UpdateTaskResponse:
        async def body(call: _Call) -> pb.UpdateTaskResponse:
            self.limits.check_request_bytes(len(raw))
            request = parse(pb.UpdateTaskRequest, raw)
            task_id = call.about(check_task_id(request.task_id))
            self.limits.check_support(len(request.add))
            update = TaskUpdate(
                task_id,
                None,
                [item.label for item in request.add],
                list(dict.fromkeys(request.remove_labels)),
                request.expected_version if request.HasField("expected_version") else None,
            )
            images, budget = [item.image for item in request.add], call.budget

            def work() -> tuple[TaskRecord, float, float]:
                decode = (lambda model: decode_pixels_for_model(images, model, self.limits.image, "added", budget)) if images else None
                record, _, accuracy, seconds = update.apply(
                    self.store, self.models, call.tenant.name, self.limits, check=budget.check, decode=decode
                )
                return record, accuracy, seconds

            # one update of a task at a time in this process (others wait here, not in a worker thread);
            # across processes the store's compare-and-set serialises them
            async with self._update_lock(task_id), self.admission.slot():
                record, accuracy, seconds = await self._offload(work)
            call.fields.update(
                model=record.model,
                model_version=record.model_version,
                method=record.method,
                support=record.support_size,
                version=record.version,
            )
            return pb.UpdateTaskResponse(
                task_id=record.task_id,
                version=record.version,
                labels=record.labels,
                shots=record.shots,
                support_accuracy=accuracy,
                adapt_seconds=seconds,
                report=report_message(record),
            )

        return await self._call("UpdateTask", context, body, 2 * len(raw))

    def _update_lock(self, task_id: str) -> asyncio.Lock:
        """One of :data:`UPDATE_LOCKS` locks, by the task id's hash (bounded memory, rare sharing)."""
        if not self._update_locks:
            self._update_locks = [asyncio.Lock() for _ in range(UPDATE_LOCKS)]
        return self._update_locks[hash(task_id) % UPDATE_LOCKS]

    # -- task and model info --------------------------------------------------------------------
    async def GetTask(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TaskInfo:
        async def body(call: _Call) -> pb.TaskInfo:
            task_id = call.about(check_task_id(parse(pb.GetTaskRequest, raw).task_id))
            return task_info(await self._record(task_id, call.tenant.name), self.models)

        return await self._call("GetTask", context, body, 2 * len(raw))

    async def _record(self, task_id: str, tenant: str) -> TaskRecord:
        """``tenant``'s stored record of ``task_id`` (:class:`NotFound` when there is none)."""
        record = await self._offload(self.store.record, task_id, tenant)
        if record is None:
            raise NotFound(f"task {task_id} is unknown, deleted or expired")
        return record

    async def DeleteTask(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.DeleteTaskResponse:
        async def body(call: _Call) -> pb.DeleteTaskResponse:
            task_id = call.about(check_task_id(parse(pb.DeleteTaskRequest, raw).task_id))
            if not await self._offload(self.store.delete, task_id, call.tenant.name):
                raise NotFound(f"task {task_id} is unknown, already deleted or expired")
            return pb.DeleteTaskResponse(deleted=True)

        return await self._call("DeleteTask", context, body, 2 * len(raw))

    async def ListTasks(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        async def body(call: _Call) -> pb.ListTasksResponse:
            request = parse(pb.ListTasksRequest, raw)
            size, after = page_size(request.page_size), page_after(request.page_token)
            rows = await self._offload(self.store.list_tasks, call.tenant.name, after, size + 1)
            return task_summaries(rows, size)

        return await self._call("ListTasks", context, body, 2 * len(raw))

    async def ExportTask(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ExportTaskResponse:
        async def body(call: _Call) -> pb.ExportTaskResponse:
            task_id = call.about(check_task_id(parse(pb.ExportTaskRequest, raw).task_id))
            return pb.ExportTaskResponse(blob=export_blob(await self._record(task_id, call.tenant.name)))

        return await self._call("ExportTask", context, body, 2 * len(raw))

    async def ImportTask(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        async def body(call: _Call) -> pb.AdaptResponse:
            self.limits.check_request_bytes(len(raw))
            request = parse(pb.ImportTaskRequest, raw)
            ttl = self.limits.ttl(request.ttl_seconds)
            async with self.admission.slot():
                record, task = await self._offload(import_blob, request.blob, self.models, call.tenant.name, ttl)
            call.fields.update(model=record.model, model_version=record.model_version, method=record.method)
            await self._offload(lambda: self.store.put(record, task, self.auth.quota_tasks(call.tenant)))
            call.about(record.task_id)
            return adapt_response(record)

        return await self._call("ImportTask", context, body, 2 * len(raw))

    def describe_model(self, name: str) -> pb.ModelInfo | None:
        """``name`` as ListModels reports it (blocking: counts its live tasks), or ``None`` when not served."""
        if name not in self.models:
            return None
        return model_info(self.models[name], self.models, self.store.live_by_version())

    async def ListModels(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def body(call: _Call) -> pb.ListModelsResponse:
            parse(pb.ListModelsRequest, raw)
            return pb.ListModelsResponse(models=models_info(self.models, await self._offload(self.store.live_by_version)))

        return await self._call("ListModels", context, body, 2 * len(raw))
