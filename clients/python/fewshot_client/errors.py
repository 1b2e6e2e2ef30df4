"""Typed exceptions for the status codes the service returns."""

from __future__ import annotations

import grpc


class FewShotError(Exception):
    """A failed call: ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"FEWSHOT {code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(FewShotError):
    """The request was rejected: bad images, labels, model, method or settings."""


class NotFound(FewShotError):
    """The task (or model) does not exist, or has expired."""


class ResourceExhausted(FewShotError):
    """A size or capacity limit was hit (message size, task store, rate)."""


class Unauthenticated(FewShotError):
    """The token is missing or wrong."""


class Unavailable(FewShotError):
    """The server cannot be reached (after the client's retries)."""


class DeadlineExceeded(FewShotError):
    """The call did not finish within the client's timeout."""


class Aborted(FewShotError):
    """An update lost to concurrent updates of the task (or it was not at the expected version): retry."""


class FailedPrecondition(FewShotError):
    """The task cannot do this now: its model version is not loaded (adapted with a version since unloaded or
    replaced), or an update of a task stored without its support images."""


class PermissionDenied(FewShotError):
    """An admin call without the admin token (tenant tokens do not grant it)."""


class ServiceError(FewShotError):
    """Any other status code (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[FewShotError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(err: grpc.RpcError) -> FewShotError:
    """The typed exception for a ``grpc.RpcError`` (``grpc.aio.AioRpcError`` included)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _BY_CODE.get(code, ServiceError)(code, details or "")
