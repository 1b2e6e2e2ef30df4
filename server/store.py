"""Task state: a byte-budgeted in-memory LRU cache over a task database, the embedded SQLite file
(:mod:`~fewshot.server.store_sqlite`, WAL mode) or a networked PostgreSQL
(:mod:`~fewshot.server.store_postgres`).

``put`` commits the task before it returns, so an acknowledged Adapt survives a crash or a restart;
``get`` serves from memory and reloads an evicted (or another process's) task from the database.
Several server processes (and Triton model instances) share one database: on one host through the
SQLite file, on any number of hosts through PostgreSQL. A row changes only by :meth:`TaskStore.update`
(UpdateTask), which commits a new version by compare-and-set: of concurrent updates one wins, the
others see ``False`` and retry on the new version.

Consistency of deletes (docs/serving.md, "Task state"):

- In the process that deleted a task, no lookup that starts after :meth:`TaskStore.delete` returned
  finds it: the row goes first, then the cache entry, and a concurrent reload that read the row before
  the delete re-checks the row before caching (a generation counter of deletes and updates tells it one
  happened; after an update it loads the new version).
  :meth:`TaskStore.deleted_since` lets a caller that found a task before the delete refuse to answer
  for it afterwards.
- In every other process sharing the database, a cache hit re-reads the row when the entry was last
  checked more than ``recheck`` seconds ago (default 0.5 s), so a task deleted (or expired) elsewhere
  stops being served within ``recheck`` seconds plus one query, and one updated elsewhere is served at
  its new version within that bound (the row's version differs from the cached one: it is reloaded).
  PostgreSQL also pushes every delete and update (LISTEN/NOTIFY, sent in the writing transaction, so
  delivered at its commit): the other replicas drop the entry when the notification arrives
  (milliseconds); the re-read bounds what a missed notification could cost.
  In the process that updated it, every lookup after :meth:`TaskStore.update` returned gets the new version.
- While the database cannot be reached, a cache hit whose re-read fails is still served (the task
  was live when last checked); everything else that needs the database raises
  :class:`~fewshot.server.store_schema.StoreUnavailable` (UNAVAILABLE) and nothing is acknowledged.

The cache charges each entry what it holds in memory: every tensor and array of the decoded task
(unique storages, counted once) plus :data:`ENTRY_OVERHEAD` bytes for the Python objects; the
serialised state is not kept once decoded.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.errors import ConfigError
from fewshot.server.errors import QuotaExceeded  # noqa: F401 - raised by the databases' insert
from fewshot.server.store_schema import COLUMNS, StoreUnavailable, StoreVersionError, TaskRecord  # noqa: F401  (re-exported: callers import the row and its errors from the store)

#: Bytes charged per cache entry on top of its tensors: the record, labels and Python objects.
ENTRY_OVERHEAD = 4096
#: How long this process remembers its own deletes (far longer than any lookup takes).
TOMBSTONE_SECONDS = 300.0


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

    ``where``: a task database (:class:`~fewshot.server.store_sqlite.SQLiteDatabase`,
    :class:`~fewshot.server.store_postgres.PostgresDatabase`) or what :func:`open_database` opens
    (a ``--state-dir`` folder, ``sqlite:PATH``, ``postgresql://...``). ``decode(record) -> object``
    turns a record into a ready-to-classify task. ``on_event(name)`` is called with ``hit``, ``miss``
    and ``eviction`` (metrics). ``recheck``: seconds a cache hit trusts its entry before re-reading the
    row (the bound on serving a task another process deleted or updated, where no notification came).
    """

    def __init__(
        self, where: Any, cache_bytes: int = 256 << 20, on_event: Callable[[str], None] | None = None, recheck: float = 0.5
    ) -> None:
        self.database = where if hasattr(where, "compare_and_set") else open_database(where)
        self.cache_bytes, self.on_event, self.recheck = cache_bytes, on_event or (lambda _: None), recheck
        self.stats = CacheStats()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._changes = 0  # generation: bumped (under the lock) after each delete or update seen here
        self._tombstones: dict[str, float] = {}  # task id -> time.monotonic() of its delete here
        self.database.listen(self._changed_elsewhere)

    def __str__(self) -> str:
        return str(self.database)

    def close(self) -> None:
        self.database.close()

    def _changed_elsewhere(self, task_id: str | None, version: int = 0) -> None:
        """A database notification: ``task_id`` was deleted (``version`` 0) or committed at ``version``
        by some process (this one too); ``None``: notifications may have been missed (the listener
        reconnected), so every entry re-reads its row at its next hit."""
        with self._lock:
            self._changes += 1
            if task_id is None:
                for cached in self._cache.values():
                    cached.checked = float("-inf")
                return
            entry = self._cache.get(task_id)
            if entry is not None and (version == 0 or entry.record.version < version):
                self._drop(task_id)

    # -- writes ---------------------------------------------------------------------------------
    def put(self, record: TaskRecord, task: Any = None, max_live: int | None = None) -> None:
        """Write ``record`` durably (committed when this returns), then cache ``task`` (its decoded form)
        if given. ``max_live``: the tenant's quota of live tasks, checked in the same transaction as the
        insert (:class:`QuotaExceeded` when it is reached)."""
        self.database.insert(record, max_live)
        if task is not None:
            self._remember(record, task)

    def update(self, record: TaskRecord, task: Any = None) -> bool:
        """Commit ``record`` as version ``record.version`` of its task if the stored one is still version
        ``record.version - 1`` (compare and set, in one transaction); then cache ``task``. ``False``: the
        task changed meanwhile (another update won) or is gone; nothing was written."""
        changed = self.database.compare_and_set(record)
        with self._lock:
            self._changes += 1
            self._drop(record.task_id)  # the old version (or, when we lost, whatever we held) is stale
            if changed and task is not None:
                self._remember_locked(record, task, time.monotonic())
        return changed

    def delete(self, task_id: str, tenant: str = "") -> bool:
        """Remove ``tenant``'s task; ``False`` when there was none (or it had expired, or belongs to
        another tenant). Once this returns, no lookup of this process finds the task."""
        expires_at = self.database.delete(task_id, tenant)
        if expires_at is not None:
            with self._lock:
                self._changes += 1
                now = time.monotonic()
                self._tombstones[task_id] = now
                if len(self._tombstones) > 4096:
                    self._tombstones = {k: t for k, t in self._tombstones.items() if now - t < TOMBSTONE_SECONDS}
                self._drop(task_id)
        return expires_at is not None and expires_at > time.time()

    def deleted_since(self, task_id: str, since: float) -> bool:
        """Whether this process deleted ``task_id`` at or after ``since`` (``time.monotonic()``)."""
        with self._lock:
            at = self._tombstones.get(task_id)
        return at is not None and at >= since

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every expired task (memory and database); returns how many rows this call removed
        (replicas purging at once share the work: each row goes once)."""
        now = time.time() if now is None else now
        with self._lock:
            for task_id in [k for k, e in self._cache.items() if e.record.expired(now)]:
                self._drop(task_id)
        return self.database.purge_expired(now)

    # -- reads ----------------------------------------------------------------------------------
    def record(self, task_id: str, tenant: str = "") -> TaskRecord | None:
        """The stored record of ``tenant``'s live task, from the database (``None``: unknown, deleted,
        expired, or another tenant's: the caller cannot tell which)."""
        rec = self.database.fetch(task_id, tenant)
        return None if rec is None or rec.expired() else rec

    def _row_version(self, task_id: str) -> int | None:
        """The stored version of a live task, ``None`` when it is gone or expired."""
        row = self.database.version_of(task_id)
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
            try:
                version = self._row_version(task_id)
            except StoreUnavailable:  # the database is away: serve what was live when last checked
                version = entry.record.version
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
        """Live tasks in the database (all processes sharing it)."""
        return self.database.count(time.time())

    def live_by_version(self) -> dict[tuple[str, str], int]:
        """Live tasks in the database by ``(model, model digest)``."""
        return self.database.live_by_version(time.time())

    def list_tasks(self, tenant: str, after: tuple[float, str] = (0.0, ""), limit: int = 100) -> list[tuple]:
        """Up to ``limit`` live tasks of ``tenant`` after ``(created_at, task_id)``, oldest first, as rows of
        :data:`~fewshot.server.store_schema.SUMMARY` (never the state itself)."""
        return self.database.list_tasks(tenant, time.time(), after, limit)

    def set_control(self, model: str, state: str) -> int:
        """Record ``state`` (JSON: the versions served of ``model`` and its default) for every process sharing the
        database; returns its generation (:meth:`control_since`)."""
        return self.database.set_control(model, state)

    def control_since(self, generation: int) -> list[tuple[str, str, int]]:
        """``(model, state, generation)`` recorded after ``generation``, oldest first."""
        return self.database.control_since(generation)

    def not_on(self, model: str, digest: str) -> list[tuple[str, str]]:
        """``(task id, tenant)`` of every live task of ``model`` not pinned to the version ``digest``, oldest first."""
        return self.database.not_on(model, digest, time.time())

    def pin_unversioned(self, model: str, version: str, digest: str) -> int:
        """Pin the rows of ``model`` stored before versions were recorded to ``version`` (``digest``): the
        version the opening server loads for that name, the one the old server served (the store's
        migration of old rows). Returns the rows pinned."""
        return self.database.pin_unversioned(model, version, digest)

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


def open_database(where: str | Path) -> Any:
    """The task database ``where`` names: ``postgresql://...`` (or ``postgres://``), ``sqlite:PATH``
    (the file), or a folder (``--state-dir``: ``tasks.sqlite3`` in it)."""
    text = str(where)
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"unknown task database {text.split('://')[0]!r}: use postgresql://USER@HOST:PORT/DB, sqlite:PATH or a --state-dir folder"
        )
    if text.startswith(("postgresql://", "postgres://")):
        from fewshot.server.store_postgres import PostgresDatabase

        return PostgresDatabase(text)
    from fewshot.server.store_sqlite import SQLiteDatabase

    if text.startswith("sqlite:"):
        return SQLiteDatabase(Path(text.removeprefix("sqlite:")))
    return SQLiteDatabase(Path(text) / "tasks.sqlite3")
