"""The HTTP/JSON API (``fewshot serve --http-port``): the gRPC service's operations over HTTP, in the
same process and through the same service core (:class:`~fewshot.server.service.FewShotService`).

Each route turns its HTTP request into the protobuf request of the RPC (JSON bodies are protobuf's
JSON mapping of that message, so images are base64 strings in ``image.encoded``; multipart bodies
carry image files), serialises it and calls the service's handler with an :class:`HttpContext` in
place of gRPC's: authentication, validation, budgets, admission, metrics and the log line are the
service's, so both APIs answer the same request with the same result, status and message. The status
maps to HTTP by the error's class (``http_status``: 400, 401, 404, 409, 412, 413, 429, 503, 504).

    POST   /v1/tasks                  Adapt        (JSON AdaptRequest, or multipart: model, images + labels)
    POST   /v1/tasks/{id}/classify    Classify     (JSON ClassifyRequest without task_id, or multipart images)
    PATCH  /v1/tasks/{id}             UpdateTask   (JSON UpdateTaskRequest without task_id, or multipart)
    GET    /v1/tasks/{id}             GetTask
    DELETE /v1/tasks/{id}             DeleteTask
    GET    /v1/models                 ListModels
    GET    /v1/tasks                  ListTasks    (?page_size=N&page_token=T)
    GET    /v1/tasks/{id}/export      ExportTask
    POST   /v1/tasks:import           ImportTask   (JSON ImportTaskRequest: the blob base64)
    POST   /v1/admin/models/{model}/versions/{version}/load     LoadModel          (admin token)
    POST   /v1/admin/models/{model}/versions/{version}/unload   UnloadModel        (admin token)
    POST   /v1/admin/models/{model}/versions/{version}/default  SetDefaultVersion  (admin token)
    POST   /v1/admin/models/{model}/canary                      SetCanary          (admin token; JSON CanaryRequest)
    POST   /v1/admin/models/{model}/versions/{version}/migrate  MigrateTasks       (admin token)
    GET    /healthz                   200 while serving, 503 while saturated or stopping
    GET    /openapi.json, /docs       the OpenAPI document (FastAPI's)
    GET    /                          the web console (``server/console/index.html``)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fewshot.errors import FewShotError
from fewshot.server.budget import BodyHold
from fewshot.server.errors import ServiceError
from fewshot.server.openapi import error_statuses, form_schema, json_body, message_schemas, responses, settings_schema
from fewshot.server.requests import model_settings, support_of
from fewshot.server.tasks import MAX_TASK_ID, TASK_ID
from fewshot_proto import fewshot_pb2 as pb

#: Form fields of a multipart Adapt, Classify or UpdateTask besides the image files, by their protobuf type.
FORM_NUMBERS = {"ttl_seconds": int, "top_k": int, "threshold": float, "target_recall": float, "expected_version": int, "explain": int}


def _form_setting(text: str) -> struct_pb2.Value:
    try:
        number = float(text)
    except ValueError:
        return struct_pb2.Value(string_value=text)
    return struct_pb2.Value(number_value=number)


#: A prediction's fields that only a Classify with ``reject_unknown`` fills.
OPEN_SET_FIELDS = ("unknown", "score", "threshold", "score_name")


class HttpAbort(FewShotError):
    """What :meth:`HttpContext.abort` raises: the service's status and message, and the HTTP status."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.http_status = code, message, http_status


class HttpContext:
    """The part of ``grpc.aio.ServicerContext`` the service uses, for one HTTP request: its bearer
    token as call metadata, its peer address, no deadline (HTTP has none; the server's budgets bound the work)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.http_status = 500

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(("authorization", value) for value in self.request.headers.getlist("authorization"))

    def peer(self) -> str:
        client = self.request.client
        return f"ipv4:{client.host}:{client.port}" if client else "unknown"

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise HttpAbort(code, message, self.http_status)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _as_json(message: Message) -> dict[str, Any]:
    """Protobuf's JSON mapping of ``message``, with its 64-bit integers as JSON numbers (the mapping
    writes them as strings; ours, versions and sizes, are far below 2**53)."""
    return _numbers(
        message, json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def _numbers(message: Message, out: dict[str, Any]) -> dict[str, Any]:
    wide = (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
    for field in message.DESCRIPTOR.fields:
        if field.name not in out:
            continue
        repeated = field.is_repeated
        if field.type in wide:
            out[field.name] = [int(v) for v in out[field.name]] if repeated else int(out[field.name])
        elif (
            field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None and not field.message_type.GetOptions().map_entry
        ):
            value = getattr(message, field.name)
            if repeated:
                out[field.name] = [_numbers(m, o) for m, o in zip(value, out[field.name])]
            else:
                out[field.name] = _numbers(value, out[field.name])
    return out


async def _body(request: Request, limit: int, hold: BodyHold | None = None) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before it is all read; each chunk charged to
    ``hold`` (the process-wide budget for bodies in flight: 429 when it is used up) before it is kept."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpAbort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the request has {int(declared)} bytes; the server accepts at most {limit} per request: send fewer or smaller images",
            413,
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request is over {limit} bytes, what the server accepts per request: send fewer or smaller images",
                413,
            )
        if hold is not None:
            try:
                hold.charge(len(chunk))
            except ServiceError as exc:
                raise HttpAbort(exc.code, str(exc), exc.http_status) from None
        chunks.append(chunk)
    return b"".join(chunks)


async def _request(request: Request, kind: type[Message], limit: int, fixed: dict[str, Any], hold: BodyHold | None = None) -> Message:
    """The protobuf ``kind`` of an HTTP request: its JSON body (protobuf's JSON mapping), or its
    multipart form (image files in ``images``, their ``labels``, the other fields by name); ``fixed``
    fields (the path's task id) are set last."""
    message = kind()
    content_type = request.headers.get("content-type", "")
    body = await _body(request, limit, hold)
    if content_type.startswith("multipart/form-data"):
        await _from_form(request, body, message, limit)
    elif body.strip():
        try:
            json_format.Parse(body, message)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            raise HttpAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the body is not a {kind.DESCRIPTOR.name} in JSON ({' '.join(str(exc).split())[:200]})",
                400,
            ) from None
    for name, value in fixed.items():
        if getattr(message, name):
            raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} comes from the path: leave it out of the body", 400)
        setattr(message, name, value)
    return message


async def _from_form(request: Request, body: bytes, message: Any, limit: int) -> None:
    """Fill an AdaptRequest, ClassifyRequest or UpdateTaskRequest from a multipart form (already read,
    within ``limit`` bytes; a part may be as large as the body: the service checks each image's size)."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as Replayed

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Replayed(request.scope, receive).form(max_files=100_000, max_fields=100_000, max_part_size=limit)
    except Exception as exc:  # a malformed multipart body
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"the multipart body does not parse ({exc})", 400) from None
    images = [await f.read() for f in form.getlist("images") if isinstance(f, UploadFile)]
    if "unlabeled" in message.DESCRIPTOR.fields_by_name:  # an Adapt's unlabeled images (with report)
        message.unlabeled.extend([pb.Image(encoded=await f.read()) for f in form.getlist("unlabeled") if isinstance(f, UploadFile)])
    labels = [str(v) for v in form.getlist("labels")]
    fields = {f.name for f in message.DESCRIPTOR.fields}
    if "support" in fields or "add" in fields:
        try:
            support = support_of(labels, images, "`images` files")
        except ServiceError as exc:
            raise HttpAbort(exc.code, str(exc), exc.http_status) from None
        getattr(message, "support" if "support" in fields else "add").extend(support)
    elif "queries" in fields:
        message.queries.extend(pb.Image(encoded=b) for b in images)
    for key in set(form.keys()) - {"images", "labels", "unlabeled"}:
        values = [str(v) for v in form.getlist(key)]
        try:
            _set_form_field(message, key, values)
        except (ValueError, TypeError, AttributeError) as exc:
            raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"form field {key!r}: {exc}", 400) from None


def _set_form_field(message: Any, key: str, values: list[str]) -> None:
    """A form field as the message's field of that name or, for an Adapt, as the setting of that name (a
    number when it reads as one, else a string; the model's family checks it)."""
    if key == "remove_labels":
        message.remove_labels.extend(values)
    elif key in message.DESCRIPTOR.fields_by_name and message.DESCRIPTOR.fields_by_name[key].type == FieldDescriptor.TYPE_BOOL:
        setattr(message, key, values[-1].lower() in ("1", "true", "yes", "on"))  # reject_unknown, report
    elif key in FORM_NUMBERS:
        setattr(message, key, FORM_NUMBERS[key](values[-1]))
    elif key in {f.name for f in message.DESCRIPTOR.fields}:
        setattr(message, key, values[-1])
    elif "settings" in message.DESCRIPTOR.fields_by_name:
        message.settings.values[key].CopyFrom(_form_setting(values[-1]))
    else:
        raise ValueError(f"{message.DESCRIPTOR.name} has no such field")


def http_app(service: Any, max_request_bytes: int, serving: Callable[[], bool] = lambda: True, admin: Any = None) -> FastAPI:
    """The ASGI application over ``service`` (a :class:`~fewshot.server.service.FewShotService`) and, when given,
    ``admin`` (a :class:`~fewshot.server.admin.AdminService`)."""
    app = FastAPI(
        title="fewshot",
        version="1",
        description="Few-shot adaptation: adapt a model to labelled images, "
        "then classify queries. The same operations, validation and statuses as the gRPC API fewshot.v1.FewShot.",
    )

    async def call(request: Request, handler: Callable[[bytes, Any], Awaitable[Message]], message: Message) -> Any:
        context = HttpContext(request)
        try:
            return _as_json(await handler(message.SerializeToString(), context))
        except HttpAbort as abort:
            return _error(abort.http_status, abort.code.name, abort.message)

    async def guarded(
        request: Request, handler: Callable[[bytes, Any], Awaitable[Message]], kind: type[Message], **fixed: Any
    ) -> tuple[Message | None, Any]:
        """``(the request message, the answer)``: the body read and parsed (charged to the body budget until the
        call ends), then the handler called; ``(None, the error)`` when the body cannot be read."""
        with service.bodies.hold() as hold:
            try:
                message = await _request(request, kind, max_request_bytes, fixed, hold)
            except HttpAbort as abort:
                return None, _error(abort.http_status, abort.code.name, abort.message)
            return message, await call(request, handler, message)

    statuses = error_statuses()
    #: What each served model declares (``SettingInfo``): the schema of ``AdaptSettings.values`` and the form's settings.
    settings = settings_schema(info for model in service.models.values() for info in model_settings(model))

    @app.get(
        "/v1/models",
        operation_id="ListModels",
        summary="ListModels: the models, their methods, input and limits",
        responses=responses("ListModelsResponse", statuses),
    )
    async def list_models(request: Request) -> Any:
        return await call(request, service.ListModels, pb.ListModelsRequest())

    @app.post(
        "/v1/tasks",
        operation_id="Adapt",
        summary="Adapt: a new task from labelled images (JSON AdaptRequest or multipart: "
        "model, method, images files with one labels field each)",
        responses=responses("AdaptResponse", statuses),
        openapi_extra=json_body("AdaptRequest", form_schema(pb.AdaptRequest.DESCRIPTOR, FORM_NUMBERS, images=True, settings=settings)),
    )
    async def adapt(request: Request) -> Any:
        return (await guarded(request, service.Adapt, pb.AdaptRequest))[1]

    @app.post(
        "/v1/tasks/{task_id}/classify",
        operation_id="Classify",
        summary="Classify queries (JSON ClassifyRequest or multipart images; reject_unknown, threshold, target_recall, top_k, explain)",
        responses=responses("ClassifyResponse", statuses),
        openapi_extra=json_body("ClassifyBody", form_schema(pb.ClassifyRequest.DESCRIPTOR, FORM_NUMBERS, images=False)),
    )
    async def classify(request: Request, task_id: str) -> Any:
        message, answer = await guarded(request, service.Classify, pb.ClassifyRequest, task_id=task_id)
        if isinstance(answer, dict) and isinstance(message, pb.ClassifyRequest):  # as over gRPC: no fields that were not asked for
            unasked = (OPEN_SET_FIELDS if not message.reject_unknown else ()) + (("nearest",) if not message.explain else ())
            for prediction in answer["predictions"]:
                for key in unasked:
                    prediction.pop(key, None)
        return answer

    @app.patch(
        "/v1/tasks/{task_id}",
        operation_id="UpdateTask",
        summary="UpdateTask: add labelled images, remove classes",
        responses=responses("UpdateTaskResponse", statuses),
        openapi_extra=json_body("UpdateTaskBody", form_schema(pb.UpdateTaskRequest.DESCRIPTOR, FORM_NUMBERS, images=True)),
    )
    async def update(request: Request, task_id: str) -> Any:
        return (await guarded(request, service.UpdateTask, pb.UpdateTaskRequest, task_id=task_id))[1]

    @app.get("/v1/tasks/{task_id}", operation_id="GetTask", summary="GetTask: a task's record", responses=responses("TaskInfo", statuses))
    async def get_task(request: Request, task_id: str) -> Any:
        return await call(request, service.GetTask, pb.GetTaskRequest(task_id=task_id))

    @app.delete("/v1/tasks/{task_id}", operation_id="DeleteTask", summary="DeleteTask", responses=responses("DeleteTaskResponse", statuses))
    async def delete_task(request: Request, task_id: str) -> Any:
        return await call(request, service.DeleteTask, pb.DeleteTaskRequest(task_id=task_id))

    @app.get(
        "/v1/tasks",
        operation_id="ListTasks",
        summary="ListTasks: the caller's live tasks, oldest first, a page at a time (page_size, page_token)",
        responses=responses("ListTasksResponse", statuses),
        openapi_extra={
            "parameters": [
                {"name": "page_size", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "maximum": 1000}},
                {"name": "page_token", "in": "query", "required": False, "schema": {"type": "string"}},
            ]
        },
    )
    async def list_tasks(request: Request) -> Any:
        size = request.query_params.get("page_size", "0")
        if not size.isdigit() or len(size) > 6:
            return _error(400, "INVALID_ARGUMENT", f"page_size {size[:16]!r} is not a whole number of tasks (0..1000)")
        message = pb.ListTasksRequest(page_size=int(size), page_token=request.query_params.get("page_token", "")[:4096])
        return await call(request, service.ListTasks, message)

    @app.get(
        "/v1/tasks/{task_id}/export",
        operation_id="ExportTask",
        summary="ExportTask: the task as one blob (base64 in JSON) that ImportTask takes on another deployment",
        responses=responses("ExportTaskResponse", statuses),
    )
    async def export_task(request: Request, task_id: str) -> Any:
        return await call(request, service.ExportTask, pb.ExportTaskRequest(task_id=task_id))

    @app.post(
        "/v1/tasks:import",
        operation_id="ImportTask",
        summary="ImportTask: a task from an ExportTask blob, under a new id",
        responses=responses("AdaptResponse", statuses),
        openapi_extra=json_body("ImportTaskRequest"),
    )
    async def import_task(request: Request) -> Any:
        return (await guarded(request, service.ImportTask, pb.ImportTaskRequest))[1]

    def admin_route(handler: Callable[[bytes, Any], Awaitable[Message]]) -> Callable[..., Awaitable[Any]]:
        async def route(request: Request, model: str, version: str) -> Any:
            return await call(request, handler, pb.ModelVersionRequest(model=model, version=version))

        return route

    if admin is not None:

        @app.post(
            "/v1/admin/models/{model}/canary",
            operation_id="SetCanary",
            summary="SetCanary (admin token): send a share of new Adapts (percent, or all of tenants) to a candidate version",
            responses=responses("ModelAdminResponse", statuses),
            openapi_extra=json_body("CanaryBody"),
        )
        async def set_canary(request: Request, model: str) -> Any:
            return (await guarded(request, admin.SetCanary, pb.CanaryRequest, model=model))[1]

        for action, rpc, summary in (
            ("load", "LoadModel", "verify and load a version from the model directory"),
            ("unload", "UnloadModel", "stop serving a version (its tasks answer 412 until it is loaded again)"),
            ("default", "SetDefaultVersion", "make a loaded version the one Adapt uses when a request names none"),
            ("migrate", "MigrateTasks", "re-adapt the model's stored tasks onto a loaded version in the background (again: progress)"),
        ):
            app.post(
                f"/v1/admin/models/{{model}}/versions/{{version}}/{action}",
                operation_id=rpc,
                summary=f"{rpc} (admin token): {summary}",
                responses=responses("ModelAdminResponse", statuses),
            )(admin_route(getattr(admin, rpc)))

    console = (Path(__file__).parent / "console" / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def web_console() -> HTMLResponse:
        """The web console: one page over this API (``server/console/index.html``, no build step)."""
        return HTMLResponse(console)

    @app.get(
        "/healthz",
        operation_id="Health",
        summary="200 while serving; 503 while saturated or stopping",
        responses={
            200: {"description": "serving", "content": {"application/json": {"schema": _HEALTH}}},
            503: {"description": "saturated or stopping", "content": {"application/json": {"schema": _HEALTH}}},
        },
    )
    async def health() -> Any:
        ok = serving()
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown paths (404) and methods (405) in the service's error body; a 405's ``Allow`` lists every
        method of the path (Starlette's names only the first route that matched it)."""
        if exc.status_code != 405:
            return _error(exc.status_code, "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT", str(exc.detail))
        allowed = set()
        for route in app.router.routes:
            if route.matches({"type": "http", "path": request.url.path, "method": ""})[0] != Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        allowed.discard("HEAD")
        response = _error(
            405, "UNIMPLEMENTED", f"{request.method[:16]} is not a method of {request.url.path[:128]}: use {', '.join(sorted(allowed))}"
        )
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    def document() -> dict[str, Any]:
        """FastAPI's document of the routes, with the message schemas, the task id's pattern, and without the
        422 FastAPI adds (its own validation never runs: every body is read and checked by the service)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in doc["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
                    for parameter in operation.get("parameters", []):
                        if parameter["name"] == "task_id":
                            parameter["schema"] = {"type": "string", "pattern": f"^{TASK_ID.pattern}$", "maxLength": MAX_TASK_ID}
            # the task an Adapt answers with is what the task routes take (OpenAPI links: clients and testers follow them)
            doc["paths"]["/v1/tasks"]["post"]["responses"]["200"]["links"] = {
                op: {"operationId": op, "parameters": {"task_id": "$response.body#/task_id"}}
                for op in ("Classify", "UpdateTask", "GetTask", "DeleteTask")
            }
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None), schemas.pop("ValidationError", None)
            schemas.update(message_schemas(MESSAGES))
            schemas["AdaptSettings"]["properties"]["values"] = settings
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    return app


#: The messages of the document: the routes' bodies (the path's task id left out) and answers.
MESSAGES = [
    (pb.AdaptRequest.DESCRIPTOR, (), "AdaptRequest"),
    (pb.ClassifyRequest.DESCRIPTOR, ("task_id",), "ClassifyBody"),
    (pb.UpdateTaskRequest.DESCRIPTOR, ("task_id",), "UpdateTaskBody"),
    (pb.AdaptResponse.DESCRIPTOR, (), "AdaptResponse"),
    (pb.ClassifyResponse.DESCRIPTOR, (), "ClassifyResponse"),
    (pb.UpdateTaskResponse.DESCRIPTOR, (), "UpdateTaskResponse"),
    (pb.TaskInfo.DESCRIPTOR, (), "TaskInfo"),
    (pb.DeleteTaskResponse.DESCRIPTOR, (), "DeleteTaskResponse"),
    (pb.ListModelsResponse.DESCRIPTOR, (), "ListModelsResponse"),
    (pb.ModelAdminResponse.DESCRIPTOR, (), "ModelAdminResponse"),
    (pb.ListTasksResponse.DESCRIPTOR, (), "ListTasksResponse"),
    (pb.ExportTaskResponse.DESCRIPTOR, (), "ExportTaskResponse"),
    (pb.ImportTaskRequest.DESCRIPTOR, (), "ImportTaskRequest"),
    (pb.CanaryRequest.DESCRIPTOR, ("model",), "CanaryBody"),
]
_HEALTH = {
    "type": "object",
    "required": ["status"],
    "additionalProperties": False,
    "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}},
}


class HttpServer:
    """uvicorn serving :func:`http_app` inside the gRPC server's event loop (signals stay the server's)."""

    def __init__(self, app: FastAPI, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # the gRPC server owns SIGINT/SIGTERM
                pass

            def capture_signals(self):
                import contextlib

                return contextlib.nullcontext()

        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", access_log=False, ssl_certfile=tls_cert, ssl_keyfile=tls_key
        )
        self.server = Quiet(config)
        self.task: Any = None

    async def start(self) -> int:
        """Serve in the background; returns the bound port once listening."""
        import asyncio

        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise OSError("the HTTP server stopped before it started")
            await asyncio.sleep(0.02)
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
