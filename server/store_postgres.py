"""The networked task database: PostgreSQL through psycopg 3 and its connection pool
(``fewshot serve --store postgresql://USER@HOST:PORT/DB``), shared by replicas on any number of hosts.

- **Schema** created and migrated by the service in one transaction under an advisory lock (replicas
  starting together take turns); ``fewshot_schema`` holds the version. The adapted state is ``bytea``.
- **Acknowledged means committed**: every write is one transaction, committed before the method returns.
- **Changes are pushed**: a delete or update sends ``NOTIFY fewshot_tasks, 'TASK_ID VERSION'`` in its
  own transaction (delivered at commit, never for a rolled-back write); each process LISTENs on a
  dedicated connection and drops the entry from its cache. When that connection is lost the listener
  reconnects with back-off and tells the cache that notifications may have been missed (every entry
  re-reads its row at its next hit; the cache's ``recheck`` bounds staleness in any case).
- **Expiry** is purged by any replica in batches of :data:`PURGE_BATCH` rows with ``FOR UPDATE SKIP
  LOCKED``: replicas purging at once take different rows, none deletes a row twice.
- **The database going away**: a call that needs it raises :class:`StoreUnavailable` (UNAVAILABLE, the
  message names the database) after at most :data:`CONNECT_TIMEOUT` seconds; the pool reconnects with
  back-off and the next call succeeds once the database is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from fewshot.server.errors import QuotaExceeded
from fewshot.server.store_schema import (
    COLUMNS,
    SUMMARY,
    UPDATED,
    StoreUnavailable,
    StoreVersionError,
    TaskRecord,
    record_of,
    row_values,
    updated_values,
)

#: This schema's version (``fewshot_schema.version``); migrations from older versions go in :func:`_migrate`.
#: 2 adds ``model_version``, ``model_digest`` (tasks pinned to a model version) and ``updated_at``, and the
#: ``model_control`` table (admin changes shared by replicas).
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS fewshot_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    support_size INTEGER NOT NULL,
    state BYTEA NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    shots TEXT NOT NULL DEFAULT '[]'
);
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS model_version TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS model_digest TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS updated_at DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at);
CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks (tenant, expires_at);
CREATE TABLE IF NOT EXISTS model_control (model TEXT PRIMARY KEY, state TEXT NOT NULL, generation BIGINT NOT NULL);
"""
#: The notification channel of deletes and updates.
CHANNEL = "fewshot_tasks"
#: Key of the advisory lock the migration holds (any constant shared by every replica).
MIGRATION_LOCK = 0x66657773
#: Expired rows deleted per statement by :meth:`PostgresDatabase.purge_expired`.
PURGE_BATCH = 500
#: Seconds a call waits for a connection before answering UNAVAILABLE.
CONNECT_TIMEOUT = 3.0
#: Connections of the pool (the service's worker threads share them).
POOL_SIZE = 8

log = logging.getLogger(__name__)
# the pool logs every failed reconnection attempt; an outage is reported once here, and each call that
# needed the database answers UNAVAILABLE with the reason
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def _scalar(cursor: Any) -> Any:
    """The one value of a query that always answers one row (``SELECT max(...)``, ``COUNT(*)``)."""
    row = cursor.fetchone()
    assert row is not None, "an aggregate query answered no row"
    return row[0]


def _reason(error: BaseException) -> str:
    """The first line of a psycopg error, cut to 200 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"postgresql://{parts.username + '@' if parts.username else ''}{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


class PostgresDatabase:
    """The tasks table in PostgreSQL at ``url`` (libpq URL; a password in it is never logged)."""

    pushes_changes = True

    def __init__(self, url: str, pool_size: int = POOL_SIZE, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.url, self.where, self.connect_timeout = url, _redacted(url), connect_timeout
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            name="fewshot-tasks",
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
            check=ConnectionPool.check_connection,
        )
        self._pool.open(wait=False)
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._migrate()

    def __str__(self) -> str:
        return self.where

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; connection failures become :class:`StoreUnavailable` with the database named."""
        try:
            with self._pool.connection(timeout=self.connect_timeout) as conn:
                yield conn
        except PoolTimeout as e:
            raise StoreUnavailable(
                f"the task database {self.where} cannot be reached (no connection within "
                f"{self.connect_timeout:g} s); nothing was stored: retry when it is back"
            ) from e
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise StoreUnavailable(
                f"the task database {self.where} failed the call ({_reason(e)}); nothing of this call was acknowledged: retry"
            ) from e

    def _migrate(self) -> None:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            exists = _scalar(conn.execute("SELECT to_regclass('fewshot_schema') IS NOT NULL"))
            version = _scalar(conn.execute("SELECT max(version) FROM fewshot_schema")) if exists else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"task database {self.where} has schema version {version}; this server knows "
                    f"{SCHEMA_VERSION}: upgrade the server or use another database"
                )
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)
            if version is None:
                conn.execute("INSERT INTO fewshot_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE fewshot_schema SET version = %s", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self._connection() as conn:
            return _scalar(conn.execute("SELECT max(version) FROM fewshot_schema"))

    # -- writes -----------------------------------------------------------------------------------
    def insert(self, record: TaskRecord, max_live: int | None) -> None:
        with self._connection() as conn, conn.transaction():
            if max_live is not None:
                # one tenant's inserts take turns (transaction lock), so the count and the insert are one step
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"tenant:{record.tenant}",))
                live = _scalar(
                    conn.execute("SELECT COUNT(*) FROM tasks WHERE tenant = %s AND expires_at > %s", (record.tenant, time.time()))
                )
                if live >= max_live:
                    raise QuotaExceeded(f"this tenant has {live} live tasks, its quota: delete tasks or let them expire, then adapt again")
            conn.execute(f"INSERT INTO tasks ({COLUMNS}) VALUES ({', '.join(['%s'] * len(COLUMNS.split(',')))})", row_values(record))

    def compare_and_set(self, record: TaskRecord) -> bool:
        with self._connection() as conn, conn.transaction():
            changed = conn.execute(
                f"UPDATE tasks SET {', '.join(f'{c} = %s' for c in UPDATED)} WHERE task_id = %s AND tenant = %s AND version = %s AND expires_at > %s",
                (*updated_values(record), record.task_id, record.tenant, record.version - 1, time.time()),
            ).rowcount
            if changed:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{record.task_id} {record.version}"))
        return bool(changed)

    def delete(self, task_id: str, tenant: str) -> float | None:
        with self._connection() as conn, conn.transaction():
            row = conn.execute("DELETE FROM tasks WHERE task_id = %s AND tenant = %s RETURNING expires_at", (task_id, tenant)).fetchone()
            if row is not None:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{task_id} 0"))
        return None if row is None else row[0]

    def purge_expired(self, now: float) -> int:
        total = 0
        while True:
            with self._connection() as conn:
                gone = conn.execute(
                    "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks WHERE expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED)",
                    (now, PURGE_BATCH),
                ).rowcount
            total += gone
            if gone < PURGE_BATCH:
                return total

    # -- reads ------------------------------------------------------------------------------------
    def fetch(self, task_id: str, tenant: str) -> TaskRecord | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = %s AND tenant = %s", (task_id, tenant)).fetchone()
        return None if row is None else record_of(row)

    def version_of(self, task_id: str) -> tuple[float, int] | None:
        with self._connection() as conn:
            row = conn.execute("SELECT expires_at, version FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def count(self, now: float) -> int:
        with self._connection() as conn:
            return _scalar(conn.execute("SELECT COUNT(*) FROM tasks WHERE expires_at > %s", (now,)))

    def live_by_version(self, now: float) -> dict[tuple[str, str], int]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT model, model_digest, COUNT(*) FROM tasks WHERE expires_at > %s GROUP BY model, model_digest", (now,)
            )
            return {(m, d): n for m, d, n in rows}

    def not_on(self, model: str, digest: str, now: float) -> list[tuple[str, str]]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT task_id, tenant FROM tasks WHERE model = %s AND model_digest != %s AND expires_at > %s ORDER BY created_at, task_id",
                (model, digest, now),
            )
            return [(t, n) for t, n in rows]

    def pin_unversioned(self, model: str, version: str, digest: str) -> int:
        with self._connection() as conn, conn.transaction():
            return conn.execute(
                "UPDATE tasks SET model_version = %s, model_digest = %s WHERE model = %s AND model_digest = ''", (version, digest, model)
            ).rowcount

    def list_tasks(self, tenant: str, now: float, after: tuple[float, str], limit: int) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(
                f"SELECT {SUMMARY.format(size='octet_length(state)')} FROM tasks WHERE tenant = %s AND expires_at > %s "
                "AND (created_at > %s OR (created_at = %s AND task_id > %s)) ORDER BY created_at, task_id LIMIT %s",
                (tenant, now, after[0], after[0], after[1], limit),
            ).fetchall()

    def set_control(self, model: str, state: str) -> int:
        with self._connection() as conn, conn.transaction():
            conn.execute("LOCK TABLE model_control IN EXCLUSIVE MODE")  # generations in commit order
            generation = _scalar(conn.execute("SELECT COALESCE(MAX(generation), 0) + 1 FROM model_control"))
            conn.execute(
                "INSERT INTO model_control (model, state, generation) VALUES (%s, %s, %s) "
                "ON CONFLICT (model) DO UPDATE SET state = excluded.state, generation = excluded.generation",
                (model, state, generation),
            )
        return generation

    def control_since(self, generation: int) -> list[tuple[str, str, int]]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT model, state, generation FROM model_control WHERE generation > %s ORDER BY generation", (generation,)
            )
            return [(m, s, g) for m, s, g in rows]

    # -- notifications ----------------------------------------------------------------------------
    def listen(self, on_change: Callable[..., Any]) -> None:
        """Call ``on_change(task_id, version)`` for every delete (version 0) and update committed by any
        process, and ``on_change(None)`` after the listening connection was lost and is back."""
        self._listener = threading.Thread(target=self._listen, args=(on_change,), name="fewshot-store-listen", daemon=True)
        self._listener.start()

    def _listen(self, on_change: Callable[..., Any]) -> None:
        backoff, connected_before, reported = 0.1, False, False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if connected_before:
                        on_change(None)  # what happened while we were away is unknown
                    connected_before, backoff, reported = True, 0.1, False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            task_id, _, version = note.payload.partition(" ")
                            on_change(task_id, int(version or 0))
            except psycopg.Error as e:
                if self._stop.is_set():
                    return
                if not reported:  # once per outage
                    log.warning("task database %s: notifications lost (%s); reconnecting with back-off", self.where, _reason(e))
                    reported = True
                connected_before = True
                self._stop.wait(backoff)
                backoff = min(2 * backoff, 2.0)

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self._pool.close()
