"""A task as one portable blob: what ``ExportTask`` answers and ``ImportTask`` takes (issue 37), so a task moves
between deployments (another store, another region) without its images being sent again.

Layout: ``MAGIC``, a 4-byte big-endian header length, the JSON header, then the task's stored state (the bytes the
task store keeps: the adapted state and the support pixels UpdateTask needs). The header names the format version,
the model, the exact model version (name and digest) the state was computed with, the task's labels, shots and
method, and the sha256 and length of the state. An import is refused with a one-line message when the blob is not
one (INVALID_ARGUMENT), is of a newer format (INVALID_ARGUMENT), does not match its checksum (INVALID_ARGUMENT), or
needs a model version this server does not load (FAILED_PRECONDITION, as a stored task of that version would).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from typing import Any

from fewshot.server.errors import InvalidRequest
from fewshot.server.state import StateError, load_task
from fewshot.server.store_schema import TaskRecord
from fewshot.server.versions import ServedModels

MAGIC = b"FEWSHOT-TASK\n"
#: The blob format this server writes and the newest it reads.
FORMAT = 1
#: The header is a few hundred bytes plus the labels; past this the blob is refused before parsing.
MAX_HEADER = 1 << 20
REQUIRED = ("format", "model", "model_version", "model_digest", "method", "labels", "shots", "support_size", "state_sha256", "state_bytes")


def export_blob(record: TaskRecord) -> bytes:
    """``record`` (a stored task) as a blob."""
    header = {
        "format": FORMAT,
        "model": record.model,
        "model_version": record.model_version,
        "model_digest": record.model_digest,
        "method": record.method,
        "labels": record.labels,
        "shots": record.shots,
        "support_size": record.support_size,
        "task_version": record.version,
        "created_at": record.created_at,
        "state_sha256": hashlib.sha256(record.state).hexdigest(),
        "state_bytes": len(record.state),
    }
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + record.state


def read_blob(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, state)`` of a blob, its format and checksum verified (:class:`InvalidRequest` otherwise)."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise InvalidRequest("the blob is not a task exported by ExportTask (it does not start with the task blob's mark)")
    (size,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if size > MAX_HEADER or start + size > len(blob):
        raise InvalidRequest("the task blob is truncated or corrupt (its header runs past its end)")
    try:
        header = json.loads(blob[start : start + size])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the task blob is corrupt (its header is not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("format"), int):
        raise InvalidRequest("the task blob is corrupt (its header has no format version)")
    if header["format"] > FORMAT:
        raise InvalidRequest(f"the task blob is of format {header['format']}, from a newer server; this one reads format {FORMAT}")
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise InvalidRequest(f"the task blob is corrupt (its header lacks {', '.join(missing)})")
    state = blob[start + size :]
    if len(state) != header["state_bytes"] or hashlib.sha256(state).hexdigest() != header["state_sha256"]:
        raise InvalidRequest("the task blob is corrupt: its state does not match its sha256 (export the task again)")
    return header, state


def import_blob(blob: bytes, models: ServedModels, tenant: str, ttl: int) -> tuple[TaskRecord, Any]:
    """The record to store (a new id of ``tenant``, expiring in ``ttl`` seconds) and the ready task of a blob;
    :class:`VersionNotLoaded` when its model version is not loaded here."""
    header, state = read_blob(blob)
    now = time.time()
    record = TaskRecord(
        secrets.token_hex(16),
        str(header["model"]),
        str(header["method"]),
        [str(label) for label in header["labels"]],
        now,
        now + ttl,
        int(header["support_size"]),
        state,
        tenant,
        1,
        [int(n) for n in header["shots"]],
        str(header["model_version"]),
        str(header["model_digest"]),
        now,
    )
    family = models.pinned(record)  # the exact version, or FAILED_PRECONDITION naming both
    try:
        task = load_task(state, family)
    except StateError as exc:
        raise InvalidRequest(f"the task blob's state cannot be restored: {exc}") from None
    return record, task
