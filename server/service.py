"""The ``fewshot.v1.FewShot`` servicer: Adapt (and AdaptStream), Classify, GetTask, DeleteTask, ListModels.

Adaptation calls the bundle's adapter, the same code ``fewshot eval`` measures with; the adapted
state is written to the task store before the answer goes out. Decoding, adaptation and inference
run in a thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import torch

from fewshot.export.loader import BundleModel
from fewshot.server.batcher import Batcher
from fewshot.server.errors import InvalidRequest, NotFound, ServiceError
from fewshot.server.images import decode_for_model
from fewshot.server.metrics import ServiceMetrics
from fewshot.server.store import TaskRecord, TaskStore
from fewshot.server.tasks import AdaptRequest, ServiceLimits, find_task, get_model, resolve_method
from fewshot_client._proto import fewshot_pb2 as pb
from fewshot_client._proto import fewshot_pb2_grpc as pb_grpc

__all__ = ["FewShotService", "ServiceLimits", "model_info"]  # ServiceLimits lives in tasks.py, shared with Triton

log = logging.getLogger("fewshot.server")



@dataclass
class _AdaptCall:
    model: str
    method: str
    settings: pb.AdaptSettings
    ttl: int
    support: list[pb.LabelledImage]


class FewShotService(pb_grpc.FewShotServicer):
    """Async servicer over the loaded models, one task store and one thread pool."""

    def __init__(self, models: dict[str, BundleModel], store: TaskStore, executor: ThreadPoolExecutor,
                 metrics: ServiceMetrics, limits: ServiceLimits = ServiceLimits(), batch_delay: float = 0.002,
                 max_batch: int = 256) -> None:
        self.models, self.store, self.executor, self.metrics, self.limits = models, store, executor, metrics, limits
        self.batcher = Batcher(executor, batch_delay, max_batch, on_batch=metrics.batch_images.observe)

    # -- plumbing -------------------------------------------------------------------------------
    async def _call(self, rpc: str, context: grpc.aio.ServicerContext, body: Callable[[dict], Awaitable[Any]]) -> Any:
        """Run ``body``, map service errors to statuses, record metrics and one log line."""
        fields: dict[str, Any] = {"method": ""}
        start, code, message = time.perf_counter(), grpc.StatusCode.OK, ""
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError
            return await body(fields)
        except ServiceError as exc:
            code, message = exc.code, str(exc)
        except asyncio.TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the work finished"
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # a bug: answer INTERNAL, keep serving, log the trace
            log.exception("internal error in %s", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        finally:
            seconds = time.perf_counter() - start
            method = fields.get("method", "")
            self.metrics.requests.labels(rpc, method, code.name).inc()
            self.metrics.latency.labels(rpc, method).observe(seconds)
            log.info(json.dumps({"rpc": rpc, "code": code.name, "ms": round(seconds * 1e3, 2), **fields,
                                 **({"error": message} if message else {}), "peer": context.peer()}))
        await context.abort(code, message)

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- Adapt ----------------------------------------------------------------------------------
    async def Adapt(self, request: pb.AdaptRequest, context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        call = _AdaptCall(request.model, request.method, request.settings, request.ttl_seconds, list(request.support))
        return await self._call("Adapt", context, lambda f: self._adapt(call, f))

    async def AdaptStream(self, request_iterator: AsyncIterator[pb.AdaptChunk], context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        async def body(fields: dict) -> pb.AdaptResponse:
            call: _AdaptCall | None = None
            async for chunk in request_iterator:
                if call is None:
                    call = _AdaptCall(chunk.model, chunk.method, chunk.settings, chunk.ttl_seconds, [])
                call.support.extend(chunk.support)
                self.limits.check_support(len(call.support))
            if call is None:
                raise InvalidRequest("the stream carried no chunk: the first chunk names the model")
            return await self._adapt(call, fields)

        return await self._call("AdaptStream", context, body)

    async def _adapt(self, call: _AdaptCall, fields: dict) -> pb.AdaptResponse:
        model = get_model(self.models, call.model)
        method = resolve_method(model, call.method)
        fields.update(model=model.name, method=method, support=len(call.support))
        self.limits.check_support(len(call.support))
        names = [item.label for item in call.support]
        settings = call.settings
        request = AdaptRequest.check(model, method, names, settings.inner_steps if settings.HasField("inner_steps") else None,
                                     getattr(settings, "lambda") if settings.HasField("lambda") else None,
                                     self.limits.ttl(call.ttl))
        images = [item.image for item in call.support]
        record, task, accuracy = await self._offload(lambda: request.run(decode_for_model(images, model, self.limits.image, "support")))
        await self._offload(self.store.put, record, task)  # durable before we acknowledge
        fields["task"] = record.task_id
        return pb.AdaptResponse(task_id=record.task_id, labels=record.labels, support_accuracy=accuracy,
                                adapt_seconds=request.seconds, expires_at=record.expires_at, model=model.name, method=method)

    # -- Classify -------------------------------------------------------------------------------
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async def body(fields: dict) -> pb.ClassifyResponse:
            fields["task"] = request.task_id
            record, task, model = await self._offload(find_task, self.store, self.models, request.task_id)
            fields.update(model=model.name, method=record.method, queries=len(request.queries))
            self.limits.check_queries(len(request.queries))
            x = await self._offload(decode_for_model, list(request.queries), model, self.limits.image, "query")
            probs = await self._classify(record, task, model, x)
            return _response(probs.numpy(), record.labels, request.top_k)

        return await self._call("Classify", context, body)

    async def _classify(self, record: TaskRecord, task: Any, model: BundleModel, x: torch.Tensor) -> torch.Tensor:
        """``(Q, C, H, W)`` -> ``(Q, N)`` probabilities; the heavy call is merged with concurrent requests."""
        if model.family == "metric":
            features = await self.batcher.submit(("features", model.name), x, model.extract)
            return await self._offload(task.classify_features, features)
        if task.transductive:  # queries normalise each other: never merged with another request
            return await self._offload(task.classify, x)
        logits = await self.batcher.submit(("network", record.task_id), x, task.logits)
        return torch.softmax(logits, dim=1)

    # -- task and model info --------------------------------------------------------------------
    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.TaskInfo:
        async def body(fields: dict) -> pb.TaskInfo:
            fields["task"] = request.task_id
            if not request.task_id:
                raise InvalidRequest("task_id is empty: use the id that Adapt returned")
            rec = await self._offload(self.store.record, request.task_id)
            if rec is None:
                raise NotFound(f"task {request.task_id} is unknown, deleted or expired")
            return pb.TaskInfo(task_id=rec.task_id, model=rec.model, method=rec.method, labels=rec.labels,
                               created_at=rec.created_at, expires_at=rec.expires_at, support_size=rec.support_size)

        return await self._call("GetTask", context, body)

    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: grpc.aio.ServicerContext) -> pb.DeleteTaskResponse:
        async def body(fields: dict) -> pb.DeleteTaskResponse:
            fields["task"] = request.task_id
            if not request.task_id:
                raise InvalidRequest("task_id is empty: use the id that Adapt returned")
            if not await self._offload(self.store.delete, request.task_id):
                raise NotFound(f"task {request.task_id} is unknown, already deleted or expired")
            return pb.DeleteTaskResponse(deleted=True)

        return await self._call("DeleteTask", context, body)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def body(fields: dict) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[model_info(m) for _, m in sorted(self.models.items())])

        return await self._call("ListModels", context, body)


def model_info(model: BundleModel) -> pb.ModelInfo:
    """A model's methods, input spec and limits as the API reports them."""
    spec, limits = model.spec, model.manifest["limits"]
    ways = model.net.ways if model.family == "inner_loop" else None
    return pb.ModelInfo(name=model.name, family=model.family, methods=model.methods, default_method=model.default_method,
                        input=pb.InputSpec(channels=spec.channels, size=spec.size, mean=spec.mean, std=spec.std, resize=spec.resize),
                        min_ways=ways or 2, max_ways=ways or limits.get("max_ways", 0), max_shots=limits.get("max_shots", 0))


def _response(probs: np.ndarray, labels: list[str], top_k: int) -> pb.ClassifyResponse:
    """``(Q, N)`` probabilities -> ranked predictions (ties broken by label order)."""
    k = min(max(top_k, 1), len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    predictions = [pb.Prediction(ranked=[pb.LabelScore(label=labels[j], probability=float(p[j])) for j in idx],
                                 probabilities=p.tolist()) for p, idx in zip(probs, order)]
    return pb.ClassifyResponse(predictions=predictions, labels=labels)
