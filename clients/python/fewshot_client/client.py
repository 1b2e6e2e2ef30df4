"""The synchronous client: ``FewShotClient`` and its ``Task`` handles."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from fewshot_client import errors, messages
from fewshot_client.images import ImageLike
from fewshot_client.messages import ModelInfo, Prediction, TaskFields, TaskInfo, TaskPage
from fewshot_proto import fewshot_pb2, fewshot_pb2_grpc


@dataclass
class Task(TaskFields):
    """An adapted task on the server; classify queries against it."""

    client: FewShotClient = field(kw_only=True, repr=False, compare=False)

    def classify(
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
        return self.client.classify(self.id, images, top_k, reject_unknown, threshold, target_recall, explain)

    def update(
        self, images: Sequence[ImageLike] = (), labels: Sequence[str] = (), remove: Sequence[str] = (), expected_version: int | None = None
    ) -> Task:
        """Adds labelled images (more shots, or new classes) and/or removes classes; the server re-adapts
        the task on the union support set under the same id and the next version. This handle's labels,
        version and support accuracy follow; returns it. ``expected_version``: apply only at that version
        (else ``Aborted``)."""
        response = self.client.update(self.id, images, labels, remove, expected_version)
        self.labels, self.version = list(response.labels), response.version
        self.support_accuracy, self.adapt_seconds = float(response.support_accuracy), response.adapt_seconds
        self.report = messages.report_of(response)
        return self

    def info(self) -> TaskInfo:
        """The server's record of this task."""
        return self.client.task_info(self.id)

    def delete(self) -> bool:
        """Deletes the task (True); raises NotFound if it is already gone."""
        return self.client.delete(self.id)


class FewShotClient:
    """Client of the ``fewshot.v1.FewShot`` service.

    ``target``: one server (``HOST:PORT``), or replicas: a list of ``IP:PORT`` or a ``dns:///NAME:PORT``
    name with an address per replica; calls are spread over the ready replicas (round robin), and a
    retried UNAVAILABLE goes to another (``messages.channel_target``).

    Every call carries ``token`` as a bearer token (if given) and a ``timeout`` in seconds; UNAVAILABLE
    is retried ``retries`` times with exponential ``backoff``; failures raise ``errors.FewShotError``
    subclasses.

    The channel is plaintext unless ``tls`` is true or any of ``root_certificates`` (the CAs to trust;
    None: the system's roots), ``client_certificate`` and ``client_key`` (for mutual TLS, both or
    neither) is given; each is PEM content (bytes) or a PEM file's path (str or os.PathLike). Bad
    certificate arguments raise ValueError, unreadable files OSError (see
    ``messages.channel_credentials``).
    """

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
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )
        self._stub = fewshot_pb2_grpc.FewShotStub(self._channel)
        self._admin = fewshot_pb2_grpc.FewShotAdminStub(self._channel)

    def _call(self, rpc: Any, request: messages.Request) -> Any:
        for attempt in itertools.count():
            try:
                return rpc(messages.sendable(request), **self._config.call_options)
            except grpc.RpcError as err:
                time.sleep(self._config.retry.delay_after(err, attempt))

    def adapt(
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
    ) -> Task:
        """Adapts ``model`` to the labelled support set and returns the new task.

        ``settings``: per-request settings by name, e.g. ``{"inner_steps": 3, "bn": "support"}``; which ones a
        model's methods take, with their bounds, is in :meth:`models` (``ModelInfo.settings``). ``inner_steps``
        and ``lam`` are shortcuts for the settings ``inner_steps`` and ``lambda``. ``model_version``: one of the
        model's loaded versions (default: its default version); the task stays pinned to it. ``report``: also
        compute the support-set report (``task.report``: the expected accuracy with its interval, confused
        labels, flagged images; about one more adaptation of cost). ``unlabeled`` (with ``report``): images of the kinds
        the task will be asked about, without labels (e.g. a sample of its traffic): the report reads them, for a
        sharper accuracy estimate and mislabel flags (RESULTS.md); they never change the task's answers.

        Large support sets (over half the message size limit), or any with ``stream=True``, go
        through AdaptStream in chunks.
        """
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
        return Task(**vars(messages.adapted_fields(self._call(rpc, request))), client=self)

    def classify(
        self,
        task_id: str,
        images: Sequence[ImageLike],
        top_k: int = 1,
        reject_unknown: bool = False,
        threshold: float | None = None,
        target_recall: float | None = None,
        explain: int = 0,
    ) -> list[Prediction]:
        """Classifies ``images`` against task ``task_id`` (open-set options: :meth:`Task.classify`)."""
        request = messages.classify_request(task_id, images, top_k, reject_unknown, threshold, target_recall, explain)
        return messages.predictions(self._call(self._stub.Classify, request))

    def update(
        self,
        task_id: str,
        images: Sequence[ImageLike] = (),
        labels: Sequence[str] = (),
        remove: Sequence[str] = (),
        expected_version: int | None = None,
    ) -> fewshot_pb2.UpdateTaskResponse:
        """UpdateTask on ``task_id`` (see :meth:`Task.update`); the response has the new version,
        labels and per-class shots."""
        request = messages.update_request(task_id, images, labels, remove, expected_version)
        return self._call(self._stub.UpdateTask, request)

    def task_info(self, task_id: str) -> TaskInfo:
        """The server's record of task ``task_id``; raises NotFound if there is none."""
        request = fewshot_pb2.GetTaskRequest(task_id=task_id)
        return messages.task_info(self._call(self._stub.GetTask, request))

    def task(self, task_id: str) -> Task:
        """A handle on the existing task ``task_id``; raises NotFound if there is none."""
        return Task(**vars(messages.looked_up_fields(self.task_info(task_id))), client=self)

    def delete(self, task_id: str) -> bool:
        """Deletes task ``task_id`` (True); raises NotFound if there is none."""
        request = fewshot_pb2.DeleteTaskRequest(task_id=task_id)
        return self._call(self._stub.DeleteTask, request).deleted

    def list_tasks(self, page_size: int = 100, page_token: str = "") -> TaskPage:
        """One page of this tenant's live tasks, oldest first (pass ``next_page_token`` on for the next)."""
        request = fewshot_pb2.ListTasksRequest(page_size=page_size, page_token=page_token)
        return messages.task_page(self._call(self._stub.ListTasks, request))

    def export_task(self, task_id: str) -> bytes:
        """Task ``task_id`` as one blob (its stored state, integrity-checked) that :meth:`import_task` takes elsewhere."""
        return self._call(self._stub.ExportTask, fewshot_pb2.ExportTaskRequest(task_id=task_id)).blob

    def import_task(self, blob: bytes, ttl_seconds: int | None = None) -> Task:
        """A new task of this tenant from an :meth:`export_task` blob; FailedPrecondition when its model version is
        not loaded here, InvalidArgument when the blob is corrupt or of a newer format."""
        response = self._call(self._stub.ImportTask, fewshot_pb2.ImportTaskRequest(blob=blob, ttl_seconds=ttl_seconds or 0))
        return Task(**vars(messages.adapted_fields(response)), client=self)

    def models(self) -> list[ModelInfo]:
        """The models the server offers."""
        return messages.model_infos(self._call(self._stub.ListModels, fewshot_pb2.ListModelsRequest()))

    # -- admin: the served model versions (the admin token, not a tenant's) --------------------------------
    def _admin_rpc(self, rpc: Any, request: Any, admin_token: str) -> fewshot_pb2.ModelAdminResponse:
        """One admin call, with the admin token instead of the tenant's; failures raise the typed errors."""
        try:
            return rpc(request, **messages.admin_options(self._config.call_options, admin_token))
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None

    def _admin_call(self, rpc: Any, model: str, version: str, admin_token: str) -> ModelInfo | None:
        response = self._admin_rpc(rpc, fewshot_pb2.ModelVersionRequest(model=model, version=str(version)), admin_token)
        return messages.model_infos(fewshot_pb2.ListModelsResponse(models=[response.model]))[0] if response.HasField("model") else None

    def load_model(self, model: str, version: str, admin_token: str) -> ModelInfo | None:
        """Verifies and loads ``version`` of ``model`` from the server's model directory; the model as served after."""
        return self._admin_call(self._admin.LoadModel, model, version, admin_token)

    def unload_model(self, model: str, version: str, admin_token: str) -> ModelInfo | None:
        """Stops serving ``version`` of ``model`` (its tasks raise FailedPrecondition until it is loaded again)."""
        return self._admin_call(self._admin.UnloadModel, model, version, admin_token)

    def set_default_version(self, model: str, version: str, admin_token: str) -> ModelInfo | None:
        """Makes the loaded ``version`` the one adapts of ``model`` use when they name none."""
        return self._admin_call(self._admin.SetDefaultVersion, model, version, admin_token)

    def set_canary(
        self, model: str, version: str | None, admin_token: str, percent: float = 0.0, tenants: Sequence[str] = ()
    ) -> ModelInfo | None:
        """Sends ``percent`` of ``model``'s adapts that name no version, and all of ``tenants``', to the loaded
        ``version`` (a candidate beside the default); ``version=None`` ends the canary."""
        request = fewshot_pb2.CanaryRequest(model=model, version=version or "", percent=percent, tenants=list(tenants))
        response = self._admin_rpc(self._admin.SetCanary, request, admin_token)
        return messages.model_infos(fewshot_pb2.ListModelsResponse(models=[response.model]))[0] if response.HasField("model") else None

    def migrate_tasks(self, model: str, version: str, admin_token: str) -> fewshot_pb2.MigrationStatus:
        """Starts re-adapting every stored task of ``model`` onto its loaded ``version`` in the server's background (as
        ``fewshot migrate``); while it runs, a call answers its progress (``done``, ``left``, ``failed``)."""
        request = fewshot_pb2.ModelVersionRequest(model=model, version=str(version))
        return self._admin_rpc(self._admin.MigrateTasks, request, admin_token).migration

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> FewShotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
