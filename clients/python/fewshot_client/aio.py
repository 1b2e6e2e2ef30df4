"""The asyncio client: ``AsyncFewShotClient`` and its ``AsyncTask`` handles (grpc.aio)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from fewshot_client import messages
from fewshot_client.images import ImageLike
from fewshot_client.messages import ModelInfo, Prediction, TaskFields, TaskInfo, TaskPage
from fewshot_proto import fewshot_pb2, fewshot_pb2_grpc


@dataclass
class AsyncTask(TaskFields):
    """An adapted task on the server, with coroutine methods."""

    client: AsyncFewShotClient = field(kw_only=True, repr=False, compare=False)

    async def classify(
        self,
        images: Sequence[ImageLike],
        top_k: int = 1,
        reject_unknown: bool = False,
        threshold: float | None = None,
        target_recall: float | None = None,
        explain: int = 0,
    ) -> list[Prediction]:
        """One prediction per image, with the ``top_k`` best labels ranked; ``reject_unknown``: each says
        whether it fits none of the labels (``prediction.unknown``), at the model's calibrated threshold
        for 95% acceptance of known classes, or at ``target_recall`` (0.5..0.99), or at ``threshold``.
        ``explain``: each prediction also names the ``explain`` (at most 10) support images nearest its query
        (``prediction.nearest``)."""
        return await self.client.classify(self.id, images, top_k, reject_unknown, threshold, target_recall, explain)

    async def update(
        self, images: Sequence[ImageLike] = (), labels: Sequence[str] = (), remove: Sequence[str] = (), expected_version: int | None = None
    ) -> AsyncTask:
        """As :meth:`fewshot_client.client.Task.update`."""
        response = await self.client.update(self.id, images, labels, remove, expected_version)
        self.labels, self.version = list(response.labels), response.version
        self.support_accuracy, self.adapt_seconds = float(response.support_accuracy), response.adapt_seconds
        self.report = messages.report_of(response)
        return self

    async def info(self) -> TaskInfo:
        """The server's record of this task."""
        return await self.client.task_info(self.id)

    async def delete(self) -> bool:
        """Deletes the task (True); raises NotFound if it is already gone."""
        return await self.client.delete(self.id)


class AsyncFewShotClient:
    """The asyncio twin of ``FewShotClient``: same arguments (TLS ones included), same retries and
    errors; create it inside a running event loop and ``await client.close()`` (or use ``async with``)."""

    def __init__(
        self,
        target: str | Sequence[str],
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_message_mb: float = 64,
        *,
        tls: bool = False,
        root_certificates: messages.PemSource | None = None,
        client_certificate: messages.PemSource | None = None,
        client_key: messages.PemSource | None = None,
    ) -> None:
        self._config = messages.ClientConfig.of(token, timeout, retries, backoff, max_message_mb)
        credentials = messages.channel_credentials(tls, root_certificates, client_certificate, client_key)
        target, balancing = messages.channel_target(target)
        options: list[tuple[str, Any]] = [*self._config.channel_options(), *balancing]
        self._channel = (
            grpc.aio.insecure_channel(target, options=options)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options)
        )
        self._stub = fewshot_pb2_grpc.FewShotStub(self._channel)

    async def _call(self, rpc: Any, request: messages.Request) -> Any:
        for attempt in itertools.count():
            try:
                return await rpc(messages.sendable(request), **self._config.call_options)
            except grpc.RpcError as err:
                await asyncio.sleep(self._config.retry.delay_after(err, attempt))

    async def adapt(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        model: str,
        method: str | None = None,
        inner_steps: int | None = None,
        lam: float | None = None,
        ttl_seconds: int | None = None,
        stream: bool | None = None,
        settings: Mapping[str, messages.SettingValue] | None = None,
        model_version: str | None = None,
        report: bool = False,
        unlabeled: Sequence[ImageLike] = (),
    ) -> AsyncTask:
        """Adapts ``model`` to the labelled support set and returns the new task (see
        ``FewShotClient.adapt``, settings included)."""
        rpc, request = messages.adapt_call(
            self._stub,
            self._config.max_bytes,
            stream,
            images,
            labels,
            model,
            method,
            messages.merge_settings(settings, inner_steps, lam),
            ttl_seconds,
            model_version,
            report,
            unlabeled,
        )
        response = await self._call(rpc, request)
        return AsyncTask(**vars(messages.adapted_fields(response)), client=self)

    async def classify(
        self,
        task_id: str,
        images: Sequence[ImageLike],
        top_k: int = 1,
        reject_unknown: bool = False,
        threshold: float | None = None,
        target_recall: float | None = None,
        explain: int = 0,
    ) -> list[Prediction]:
        """Classifies ``images`` against task ``task_id`` (open-set options: :meth:`AsyncTask.classify`)."""
        request = messages.classify_request(task_id, images, top_k, reject_unknown, threshold, target_recall, explain)
        response = await self._call(self._stub.Classify, request)
        return messages.predictions(response)

    async def update(
        self,
        task_id: str,
        images: Sequence[ImageLike] = (),
        labels: Sequence[str] = (),
        remove: Sequence[str] = (),
        expected_version: int | None = None,
    ) -> fewshot_pb2.UpdateTaskResponse:
        """UpdateTask on ``task_id``."""
        return await self._call(self._stub.UpdateTask, messages.update_request(task_id, images, labels, remove, expected_version))

    async def task_info(self, task_id: str) -> TaskInfo:
        """The server's record of task ``task_id``; raises NotFound if there is none."""
        response = await self._call(self._stub.GetTask, fewshot_pb2.GetTaskRequest(task_id=task_id))
        return messages.task_info(response)

    async def task(self, task_id: str) -> AsyncTask:
        """A handle on the existing task ``task_id``; raises NotFound if there is none."""
        info = await self.task_info(task_id)
        return AsyncTask(**vars(messages.looked_up_fields(info)), client=self)

    async def delete(self, task_id: str) -> bool:
        """Deletes task ``task_id`` (True); raises NotFound if there is none."""
        response = await self._call(self._stub.DeleteTask, fewshot_pb2.DeleteTaskRequest(task_id=task_id))
        return response.deleted

    async def list_tasks(self, page_size: int = 100, page_token: str = "") -> TaskPage:
        """One page of this tenant's live tasks (see ``FewShotClient.list_tasks``)."""
        request = fewshot_pb2.ListTasksRequest(page_size=page_size, page_token=page_token)
        return messages.task_page(await self._call(self._stub.ListTasks, request))

    async def export_task(self, task_id: str) -> bytes:
        """Task ``task_id`` as one blob (see ``FewShotClient.export_task``)."""
        return (await self._call(self._stub.ExportTask, fewshot_pb2.ExportTaskRequest(task_id=task_id))).blob

    async def import_task(self, blob: bytes, ttl_seconds: int | None = None) -> AsyncTask:
        """A new task from an ``export_task`` blob (see ``FewShotClient.import_task``)."""
        response = await self._call(self._stub.ImportTask, fewshot_pb2.ImportTaskRequest(blob=blob, ttl_seconds=ttl_seconds or 0))
        return AsyncTask(**vars(messages.adapted_fields(response)), client=self)

    async def models(self) -> list[ModelInfo]:
        """The models the server offers."""
        response = await self._call(self._stub.ListModels, fewshot_pb2.ListModelsRequest())
        return messages.model_infos(response)

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncFewShotClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
