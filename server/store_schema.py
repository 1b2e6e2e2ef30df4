"""What a task row holds, in both task databases (:mod:`~fewshot.server.store_sqlite`,
:mod:`~fewshot.server.store_postgres`), and the errors a database answers with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from fewshot.errors import FewShotError
from fewshot.server.errors import ServiceError

COLUMNS = "task_id, model, method, labels, created_at, expires_at, support_size, state, tenant, version, shots"


class StoreVersionError(FewShotError, RuntimeError):
    """A task store written by a newer server (its schema version is unknown here)."""


class StoreUnavailable(ServiceError):
    """The task database cannot be reached (or lost the connection mid-call): nothing of this call was
    acknowledged, and nothing acknowledged before is lost; retry once the database is back."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


@dataclass
class TaskRecord:
    """One stored task: what GetTask reports plus the serialised adapted state; ``tenant`` owns it
    (``""``: the default tenant, the one without a tokens file)."""

    task_id: str
    model: str
    method: str
    labels: list[str]
    created_at: float
    expires_at: float
    support_size: int
    state: bytes = field(repr=False)
    tenant: str = ""
    #: 1 when adapted; each committed UpdateTask adds 1.
    version: int = 1
    #: Support images per class, in label order (empty for a task stored before version 3).
    shots: list[int] = field(default_factory=list)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at
