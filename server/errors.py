"""The service's error hierarchy: each error carries the gRPC status it answers with."""

from __future__ import annotations

import grpc

from fewshot.errors import FewShotError


class ServiceError(FewShotError):
    """A request the service refuses; ``code`` is the gRPC status, the message says what was wrong and what is allowed."""

    code = grpc.StatusCode.INTERNAL
    #: The HTTP status of the same refusal (the HTTP/JSON API, ``server/http_api.py``).
    http_status = 500


class InvalidRequest(ServiceError):
    """Malformed input: undecodable images, bad labels, settings out of bounds, unknown method."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(ServiceError):
    """Unknown model, or a task that is unknown, deleted or expired."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class TooLarge(ServiceError):
    """A request past the server's size limits (support set, query batch)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class BackendUnavailable(ServiceError):
    """The inference backend (Triton) cannot be reached or failed the call; nothing was stored or
    changed, so the client may retry the same request once the backend is back."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class QuotaExceeded(TooLarge):
    """A tenant's quota (live tasks, requests per second) is used up; the message says which."""

    http_status = 429


class Overloaded(TooLarge):
    """The server's admission queue is full; nothing was done, retry after a short back-off."""

    http_status = 429


class Unauthenticated(ServiceError):
    """No valid bearer token (``--token``, ``--token-file`` or ``--tokens``)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class Conflict(ServiceError):
    """UpdateTask lost to concurrent updates of the same task (or the task is not at the version the
    request expected); nothing was changed: read the task's version and retry."""

    code = grpc.StatusCode.ABORTED
    http_status = 409


class NotUpdatable(ServiceError):
    """A task that cannot be updated: it was stored without its support set (adapted before UpdateTask existed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 412


class VersionNotLoaded(ServiceError):
    """A task pinned to a model version this server does not load now: its state is valid only for that
    version's backbone, so it is never answered with another (load the version again, or migrate the task)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 412


class PermissionDenied(ServiceError):
    """An admin call (load, unload, set the default version) without the admin credential."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class CallAbandoned(ServiceError):
    """The client cancelled the call or its deadline passed; the work stopped at the next stage boundary."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


def quoted(value: str, limit: int = 64) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said, so error messages and
    log lines never echo unbounded input."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
