"""Task state: a byte-budgeted in-memory LRU cache over a persistent SQLite store (WAL mode).

``put`` commits the task to disk before it returns, so an acknowledged Adapt survives a crash or a
restart; ``get`` serves from memory and reloads an evicted (or another process's) task from disk.
Several server processes (and Triton model instances) can share one ``--state-dir``: SQLite in WAL
mode lets readers and one writer work concurrently. A row changes only by :meth:`TaskStore.update`
(UpdateTask), which commits a new version by compare-and-set: of concurrent updates one wins, the
others see ``False`` and retry on the new version.

Consistency of deletes (README, "Task state"):

- In the process that deleted a task, no lookup that starts after :meth:`TaskStore.delete` returned
  finds it: the row goes first, then the cache entry, and a concurrent reload that read the row before
  the delete re-checks the row before caching (a generation counter of deletes and updates tells it one
  happened; after an update it loads the new version).
  :meth:`TaskStore.deleted_since` lets a caller that found a task before the delete refuse to answer
  for it afterwards.
- In every other process sharing the file, a cache hit re-reads the row when the entry was last
  checked more than ``recheck`` seconds ago (default 0.5 s), so a task deleted (or expired) elsewhere
  stops being served within ``recheck`` seconds plus one query, and one updated elsewhere is served at
  its new version within that bound (the row's version differs from the cached one: it is reloaded).
  In the process that updated it, every lookup after :meth:`TaskStore.update` returned gets the new version.

The cache charges each entry what it holds in memory: every tensor and array of the decoded task
(unique storages, counted once) plus :data:`ENTRY_OVERHEAD` bytes for the Python objects; the
serialised state is not kept once decoded.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fewshot.errors import FewShotError
from fewshot.server.errors import QuotaExceeded

#: Schema versions (``PRAGMA user_version``): 1 = the first release, 2 adds ``tenant``, 3 adds ``version``
#: and ``shots`` (UpdateTask).
SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    support_size INTEGER NOT NULL,
    state BLOB NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    shots TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at);
CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks (tenant, expires_at);
"""
COLUMNS = "task_id, model, method, labels, created_at, expires_at, support_size, state, tenant, version, shots"
#: Bytes charged per cache entry on top of its tensors: the record, labels and Python objects.
ENTRY_OVERHEAD = 4096
#: How long this process remembers its own deletes (far longer than any lookup takes).
TOMBSTONE_SECONDS = 300.0


class StoreVersionError(FewShotError, RuntimeError):
    """A task store written by a newer server (its schema version is unknown here)."""


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


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class _Entry:
    record: TaskRecord  # state dropped: the decoded task is what is kept
    task: Any
    charge: int
    checked: float  # time.monotonic() of the last row check


def resident_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor and array reachable from ``obj`` through dataclass fields, dicts, lists
    and tuples (shared storages counted once). Other objects (ONNX sessions, network definitions,
    extractors) belong to the served model, not to the task, and count 0."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        base = obj.base if obj.base is not None else obj
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return base.nbytes if isinstance(base, np.ndarray) else obj.nbytes
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(resident_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(resident_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(resident_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


class TaskStore:
    """Persistent tasks with an LRU cache of decoded tasks holding at most ``cache_bytes``.

    ``decode(record) -> object`` turns a record into a ready-to-classify task. ``on_event(name)`` is
    called with ``hit``, ``miss`` and ``eviction`` (metrics). ``recheck``: seconds a cache hit trusts
    its entry before re-reading the row (the bound on serving a task another process deleted).
    """

    def __init__(self, state_dir: str | Path, cache_bytes: int = 256 << 20,
                 on_event: Callable[[str], None] | None = None, recheck: float = 0.5) -> None:
        self.path = Path(state_dir) / "tasks.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_bytes, self.on_event, self.recheck = cache_bytes, on_event or (lambda _: None), recheck
        self.stats = CacheStats()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._changes = 0  # generation: bumped (under the lock) after each delete or update of this process
        self._tombstones: dict[str, float] = {}  # task id -> time.monotonic() of its delete here
        self._migrate()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged task survives a power cut too
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def _migrate(self) -> None:
        """Switch the file to WAL, create the schema or bring an older store up to :data:`SCHEMA_VERSION`
        (in one transaction). Processes opening one store at once (Triton loads its models in parallel)
        take turns on an advisory lock beside the file: changing the journal mode does not wait for
        SQLite's busy timeout, it fails with "database is locked"."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._migrate_locked()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _migrate_locked(self) -> None:
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")  # persistent in the file: later connections need not set it
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(f"task store {self.path} has schema version {version}; this server knows "
                                   f"{SCHEMA_VERSION}: upgrade the server or use another --state-dir")
            columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            if columns and "tenant" not in columns:  # version 1
                db.execute("ALTER TABLE tasks ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
            if columns and "version" not in columns:  # version 2
                db.execute("ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
                db.execute("ALTER TABLE tasks ADD COLUMN shots TEXT NOT NULL DEFAULT '[]'")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writes ---------------------------------------------------------------------------------
    def put(self, record: TaskRecord, task: Any = None, max_live: int | None = None) -> None:
        """Write ``record`` durably, then cache ``task`` (its decoded form) if given. ``max_live``: the
        tenant's quota of live tasks, checked in the same transaction as the insert
        (:class:`QuotaExceeded` when it is reached)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            if max_live is not None:
                live = db.execute("SELECT COUNT(*) FROM tasks WHERE tenant = ? AND expires_at > ?",
                                  (record.tenant, time.time())).fetchone()[0]
                if live >= max_live:
                    raise QuotaExceeded(f"this tenant has {live} live tasks, its quota: delete tasks or let them "
                                        "expire, then adapt again")
            db.execute(f"INSERT INTO tasks ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.task_id, record.model, record.method, json.dumps(record.labels), record.created_at,
                        record.expires_at, record.support_size, sqlite3.Binary(record.state), record.tenant,
                        record.version, json.dumps(record.shots)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if task is not None:
            self._remember(record, task)

    def update(self, record: TaskRecord, task: Any = None) -> bool:
        """Commit ``record`` as version ``record.version`` of its task if the stored one is still version
        ``record.version - 1`` (compare and set, in one transaction); then cache ``task``. ``False``: the
        task changed meanwhile (another update won) or is gone; nothing was written."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = db.execute("UPDATE tasks SET labels = ?, support_size = ?, state = ?, version = ?, shots = ? "
                                 "WHERE task_id = ? AND tenant = ? AND version = ? AND expires_at > ?",
                                 (json.dumps(record.labels), record.support_size, sqlite3.Binary(record.state),
                                  record.version, json.dumps(record.shots), record.task_id, record.tenant,
                                  record.version - 1, time.time())).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        with self._lock:
            self._changes += 1
            self._drop(record.task_id)  # the old version (or, when we lost, whatever we held) is stale
            if changed and task is not None:
                self._remember_locked(record, task, time.monotonic())
        return bool(changed)

    def delete(self, task_id: str, tenant: str = "") -> bool:
        """Remove ``tenant``'s task; ``False`` when there was none (or it had expired, or belongs to
        another tenant). Once this returns, no lookup of this process finds the task."""
        row = self._db().execute("DELETE FROM tasks WHERE task_id = ? AND tenant = ? RETURNING expires_at",
                                 (task_id, tenant)).fetchone()
        if row is not None:
            with self._lock:
                self._changes += 1
                now = time.monotonic()
                self._tombstones[task_id] = now
                if len(self._tombstones) > 4096:
                    self._tombstones = {k: t for k, t in self._tombstones.items() if now - t < TOMBSTONE_SECONDS}
                self._drop(task_id)
        return row is not None and row[0] > time.time()

    def deleted_since(self, task_id: str, since: float) -> bool:
        """Whether this process deleted ``task_id`` at or after ``since`` (``time.monotonic()``)."""
        with self._lock:
            at = self._tombstones.get(task_id)
        return at is not None and at >= since

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every expired task (memory and disk); returns how many rows went."""
        now = time.time() if now is None else now
        with self._lock:
            for task_id in [k for k, e in self._cache.items() if e.record.expired(now)]:
                self._drop(task_id)
        return self._db().execute("DELETE FROM tasks WHERE expires_at <= ?", (now,)).rowcount

    # -- reads ----------------------------------------------------------------------------------
    def record(self, task_id: str, tenant: str = "") -> TaskRecord | None:
        """The stored record of ``tenant``'s live task, from disk (``None``: unknown, deleted, expired,
        or another tenant's: the caller cannot tell which)."""
        row = self._db().execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ? AND tenant = ?",
                                 (task_id, tenant)).fetchone()
        if row is None:
            return None
        rec = TaskRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], bytes(row[7]), row[8],
                         row[9], json.loads(row[10]))
        return None if rec.expired() else rec

    def _row_version(self, task_id: str) -> int | None:
        """The stored version of a live task, ``None`` when it is gone or expired."""
        row = self._db().execute("SELECT expires_at, version FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return row[1] if row is not None and row[0] > time.time() else None

    def _row_live(self, task_id: str) -> bool:
        return self._row_version(task_id) is not None

    def get(self, task_id: str, decode: Callable[[TaskRecord], Any], tenant: str = "") -> tuple[TaskRecord, Any] | None:
        """``(record, decoded task)`` of ``tenant``'s live task, from the cache or reloaded from disk.
        The cached record's ``state`` is empty (the decoded task is what is kept)."""
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(task_id)
            if entry is not None and entry.record.expired():
                self._drop(task_id)
                entry = None
            if entry is not None and entry.record.tenant != tenant:
                entry = None  # another tenant's: answered as unknown, from the disk lookup below
            if entry is not None:
                self._cache.move_to_end(task_id)
            generation = self._changes
        if entry is not None and now - entry.checked > self.recheck:
            # another process may have deleted or updated it: re-read the row (at most once per `recheck` s)
            version = self._row_version(task_id)
            if version is None:
                with self._lock:
                    self._drop(task_id)
                entry = None
                self.stats.misses += 1
                self.on_event("miss")
                return None
            if version != entry.record.version:  # updated elsewhere: reload below
                with self._lock:
                    self._drop(task_id)
                entry = None
            else:
                entry.checked = now
        if entry is not None:
            self.stats.hits += 1
            self.on_event("hit")
            return entry.record, entry.task
        self.stats.misses += 1
        self.on_event("miss")
        rec = self.record(task_id, tenant)
        while rec is not None:
            task = decode(rec)
            while True:
                with self._lock:
                    if self._changes == generation:
                        self._remember_locked(rec, task, now)
                        return dataclasses.replace(rec, state=b""), task
                    generation = self._changes
                if task_id in self._tombstones:  # deleted while we decoded
                    return None
                version = self._row_version(task_id)
                if version is None:
                    return None
                if version != rec.version:  # updated while we decoded: load the new version
                    break
            rec = self.record(task_id, tenant)
        return None

    def count(self) -> int:
        """Live tasks on disk (all processes sharing the store)."""
        return self._db().execute("SELECT COUNT(*) FROM tasks WHERE expires_at > ?", (time.time(),)).fetchone()[0]

    def _remember(self, record: TaskRecord, task: Any) -> None:
        with self._lock:
            self._remember_locked(record, task, time.monotonic())

    def _remember_locked(self, record: TaskRecord, task: Any, checked: float) -> None:
        charge = resident_bytes(task) + ENTRY_OVERHEAD + sum(len(label) for label in record.labels)
        self._drop(record.task_id)
        if charge > self.cache_bytes:
            return
        self._cache[record.task_id] = _Entry(dataclasses.replace(record, state=b""), task, charge, checked)
        self._cached_bytes += charge
        evicted = 0
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.charge
            evicted += 1
        self.stats.evictions += evicted
        for _ in range(evicted):
            self.on_event("eviction")

    def _drop(self, task_id: str) -> None:
        """Remove a cache entry (the caller holds the lock)."""
        entry = self._cache.pop(task_id, None)
        if entry is not None:
            self._cached_bytes -= entry.charge

    @property
    def cached(self) -> int:
        return len(self._cache)

    @property
    def cached_bytes(self) -> int:
        """What the cache is charged now (at most ``cache_bytes``)."""
        return self._cached_bytes
