"""What a task row holds, in both task databases (:mod:`~fewshot.server.store_sqlite`,
:mod:`~fewshot.server.store_postgres`), and the errors a database answers with."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from fewshot.errors import FewShotError
from fewshot.server.errors import ServiceError

COLUMNS = "task_id, model, method, labels, created_at, expires_at, support_size, state, tenant, version, shots, model_version, model_digest, updated_at"
#: What ``compare_and_set`` rewrites (a committed UpdateTask, a migration to another model version).
UPDATED = ("labels", "support_size", "state", "version", "shots", "model_version", "model_digest", "updated_at")
#: What ListTasks reads of a row (the state's size, not the state).
SUMMARY = "task_id, model, model_version, model_digest, method, labels, support_size, created_at, updated_at, expires_at, {size}, version"


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
    #: The model version the state was computed with: its name and the digest of its weights
    #: (:func:`fewshot.models.card.version_digest`); ``""`` for a row stored before versions were recorded,
    #: until the server that opens the store pins it (:meth:`TaskStore.pin_unversioned`).
    model_version: str = ""
    model_digest: str = ""
    #: When the state was last written (adapted, updated, migrated); 0 for a row stored before it was recorded.
    updated_at: float = 0.0

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def row_values(record: TaskRecord, binary: Any = bytes) -> tuple[Any, ...]:
    """``record`` as the values of :data:`COLUMNS`, in order (``binary`` wraps the state for the driver)."""
    return (
        record.task_id,
        record.model,
        record.method,
        json.dumps(record.labels),
        record.created_at,
        record.expires_at,
        record.support_size,
        binary(record.state),
        record.tenant,
        record.version,
        json.dumps(record.shots),
        record.model_version,
        record.model_digest,
        record.updated_at,
    )


def updated_values(record: TaskRecord, binary: Any = bytes) -> tuple[Any, ...]:
    """``record``'s values of :data:`UPDATED`, in order."""
    return (
        json.dumps(record.labels),
        record.support_size,
        binary(record.state),
        record.version,
        json.dumps(record.shots),
        record.model_version,
        record.model_digest,
        record.updated_at,
    )


def record_of(row: Sequence[Any]) -> TaskRecord:
    """A row of :data:`COLUMNS` as a record."""
    return TaskRecord(
        row[0],
        row[1],
        row[2],
        json.loads(row[3]),
        row[4],
        row[5],
        row[6],
        bytes(row[7]),
        row[8],
        row[9],
        json.loads(row[10]),
        row[11],
        row[12],
        row[13],
    )
