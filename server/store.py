"""Task state: a byte-budgeted in-memory LRU cache over a persistent SQLite store (WAL mode).

``put`` commits the task to disk before it returns, so an acknowledged Adapt survives a crash or a
restart; ``get`` serves from memory and reloads an evicted (or another process's) task from disk.
Several server processes (and Triton model instances) can share one ``--state-dir``: SQLite in WAL
mode lets readers and one writer work concurrently, and every row is immutable once written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    support_size INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at);
"""


@dataclass
class TaskRecord:
    """One stored task: what GetTask reports plus the serialised adapted state."""

    task_id: str
    model: str
    method: str
    labels: list[str]
    created_at: float
    expires_at: float
    support_size: int
    state: bytes = field(repr=False)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class TaskStore:
    """Persistent tasks with an LRU cache of decoded states holding at most ``cache_bytes``.

    ``decode(record) -> object`` turns a record into a ready-to-classify task; cached objects are
    charged the size of their serialised state. ``on_event(name)`` is called with ``hit``, ``miss``
    and ``eviction`` (metrics).
    """

    def __init__(self, state_dir: str | Path, cache_bytes: int = 256 << 20,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.path = Path(state_dir) / "tasks.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_bytes, self.on_event = cache_bytes, on_event or (lambda _: None)
        self.stats = CacheStats()
        self._cache: OrderedDict[str, tuple[TaskRecord, Any, int]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged task survives a power cut too
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    # -- writes ---------------------------------------------------------------------------------
    def put(self, record: TaskRecord, task: Any = None) -> None:
        """Write ``record`` durably, then cache ``task`` (its decoded form) if given."""
        db = self._db()
        db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (record.task_id, record.model, record.method, json.dumps(record.labels), record.created_at,
                    record.expires_at, record.support_size, sqlite3.Binary(record.state)))
        if task is not None:
            self._remember(record, task)

    def delete(self, task_id: str) -> bool:
        """Remove a task; ``False`` when there was none (or it had expired)."""
        with self._lock:
            entry = self._cache.pop(task_id, None)
            if entry:
                self._cached_bytes -= entry[2]
        cur = self._db().execute("DELETE FROM tasks WHERE task_id = ? RETURNING expires_at", (task_id,))
        row = cur.fetchone()
        return row is not None and row[0] > time.time()

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every expired task (memory and disk); returns how many rows went."""
        now = time.time() if now is None else now
        with self._lock:
            for task_id in [k for k, (rec, _, _) in self._cache.items() if rec.expired(now)]:
                self._cached_bytes -= self._cache.pop(task_id)[2]
        return self._db().execute("DELETE FROM tasks WHERE expires_at <= ?", (now,)).rowcount

    # -- reads ----------------------------------------------------------------------------------
    def record(self, task_id: str) -> TaskRecord | None:
        """The stored record of a live task, from disk (``None``: unknown, deleted or expired)."""
        row = self._db().execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        rec = TaskRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], bytes(row[7]))
        return None if rec.expired() else rec

    def get(self, task_id: str, decode: Callable[[TaskRecord], Any]) -> tuple[TaskRecord, Any] | None:
        """``(record, decoded task)`` of a live task, from the cache or reloaded from disk."""
        with self._lock:
            entry = self._cache.get(task_id)
            if entry is not None and not entry[0].expired():
                self._cache.move_to_end(task_id)
                self.stats.hits += 1
                hit = entry
            else:
                hit = None
        if hit is not None:
            self.on_event("hit")
            return hit[0], hit[1]
        self.stats.misses += 1
        self.on_event("miss")
        rec = self.record(task_id)
        if rec is None:
            return None
        task = decode(rec)
        self._remember(rec, task)
        return rec, task

    def count(self) -> int:
        """Live tasks on disk (all processes sharing the store)."""
        return self._db().execute("SELECT COUNT(*) FROM tasks WHERE expires_at > ?", (time.time(),)).fetchone()[0]

    def _remember(self, record: TaskRecord, task: Any) -> None:
        size = len(record.state)
        if size > self.cache_bytes:
            return
        evicted = 0
        with self._lock:
            old = self._cache.pop(record.task_id, None)
            if old:
                self._cached_bytes -= old[2]
            self._cache[record.task_id] = (record, task, size)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, (_, _, freed) = self._cache.popitem(last=False)
                self._cached_bytes -= freed
                evicted += 1
            self.stats.evictions += evicted
        for _ in range(evicted):
            self.on_event("eviction")

    @property
    def cached(self) -> int:
        return len(self._cache)
