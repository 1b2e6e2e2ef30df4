"""The embedded task database: one SQLite file in WAL mode (``--state-dir DIR`` or ``--store sqlite:PATH``).

Several processes on one host (server replicas, Triton model instances) share the file: WAL lets
readers and one writer work at once. Every write is one transaction with ``synchronous=FULL``, so
what a method returned has reached the disk.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from pathlib import Path

from fewshot.server.errors import QuotaExceeded
from fewshot.server.store_schema import COLUMNS, SUMMARY, UPDATED, StoreVersionError, TaskRecord, record_of, row_values, updated_values

#: Schema versions (``PRAGMA user_version``): 1 = the first release, 2 adds ``tenant``, 3 adds ``version``
#: and ``shots`` (UpdateTask), 4 adds ``model_version``, ``model_digest`` (tasks pinned to a model version) and
#: ``updated_at``, and the ``model_control`` table (admin changes shared by replicas).
SCHEMA_VERSION = 4
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
    shots TEXT NOT NULL DEFAULT '[]',
    model_version TEXT NOT NULL DEFAULT '',
    model_digest TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at);
CREATE INDEX IF NOT EXISTS tasks_tenant ON tasks (tenant, expires_at);
CREATE TABLE IF NOT EXISTS model_control (model TEXT PRIMARY KEY, state TEXT NOT NULL, generation INTEGER NOT NULL);
"""


class SQLiteDatabase:
    """The tasks table in one SQLite file (``path``), one connection per thread."""

    #: Changes of other processes are seen by re-reading rows (no push): see :class:`~fewshot.server.store.TaskStore`.
    pushes_changes = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def __str__(self) -> str:
        return f"sqlite:{self.path}"

    def db(self) -> sqlite3.Connection:
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
        db = self.db()
        db.execute("PRAGMA journal_mode=WAL")  # persistent in the file: later connections need not set it
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"task store {self.path} has schema version {version}; this server knows "
                    f"{SCHEMA_VERSION}: upgrade the server or use another --state-dir"
                )
            columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            if columns and "tenant" not in columns:  # version 1
                db.execute("ALTER TABLE tasks ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
            if columns and "version" not in columns:  # version 2
                db.execute("ALTER TABLE tasks ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
                db.execute("ALTER TABLE tasks ADD COLUMN shots TEXT NOT NULL DEFAULT '[]'")
            if columns and "model_digest" not in columns:  # version 3
                db.execute("ALTER TABLE tasks ADD COLUMN model_version TEXT NOT NULL DEFAULT ''")
                db.execute("ALTER TABLE tasks ADD COLUMN model_digest TEXT NOT NULL DEFAULT ''")
                db.execute("ALTER TABLE tasks ADD COLUMN updated_at REAL NOT NULL DEFAULT 0")
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def insert(self, record: TaskRecord, max_live: int | None) -> None:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: the quota count and the insert are one step
        try:
            if max_live is not None:
                live = db.execute(
                    "SELECT COUNT(*) FROM tasks WHERE tenant = ? AND expires_at > ?", (record.tenant, time.time())
                ).fetchone()[0]
                if live >= max_live:
                    raise QuotaExceeded(f"this tenant has {live} live tasks, its quota: delete tasks or let them expire, then adapt again")
            db.execute(
                f"INSERT INTO tasks ({COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS.split(',')))})", row_values(record, sqlite3.Binary)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def compare_and_set(self, record: TaskRecord) -> bool:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = db.execute(
                f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in UPDATED)} WHERE task_id = ? AND tenant = ? AND version = ? AND expires_at > ?",
                (*updated_values(record, sqlite3.Binary), record.task_id, record.tenant, record.version - 1, time.time()),
            ).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return bool(changed)

    def delete(self, task_id: str, tenant: str) -> float | None:
        row = self.db().execute("DELETE FROM tasks WHERE task_id = ? AND tenant = ? RETURNING expires_at", (task_id, tenant)).fetchone()
        return None if row is None else row[0]

    def purge_expired(self, now: float) -> int:
        return self.db().execute("DELETE FROM tasks WHERE expires_at <= ?", (now,)).rowcount

    def fetch(self, task_id: str, tenant: str) -> TaskRecord | None:
        row = self.db().execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ? AND tenant = ?", (task_id, tenant)).fetchone()
        return None if row is None else record_of(row)

    def version_of(self, task_id: str) -> tuple[float, int] | None:
        row = self.db().execute("SELECT expires_at, version FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def count(self, now: float) -> int:
        return self.db().execute("SELECT COUNT(*) FROM tasks WHERE expires_at > ?", (now,)).fetchone()[0]

    def live_by_version(self, now: float) -> dict[tuple[str, str], int]:
        rows = self.db().execute(
            "SELECT model, model_digest, COUNT(*) FROM tasks WHERE expires_at > ? GROUP BY model, model_digest", (now,)
        )
        return {(m, d): n for m, d, n in rows}

    def not_on(self, model: str, digest: str, now: float) -> list[tuple[str, str]]:
        rows = self.db().execute(
            "SELECT task_id, tenant FROM tasks WHERE model = ? AND model_digest != ? AND expires_at > ? ORDER BY created_at, task_id",
            (model, digest, now),
        )
        return [(t, n) for t, n in rows]

    def pin_unversioned(self, model: str, version: str, digest: str) -> int:
        return (
            self.db()
            .execute("UPDATE tasks SET model_version = ?, model_digest = ? WHERE model = ? AND model_digest = ''", (version, digest, model))
            .rowcount
        )

    def list_tasks(self, tenant: str, now: float, after: tuple[float, str], limit: int) -> list[tuple]:
        return (
            self.db()
            .execute(
                f"SELECT {SUMMARY.format(size='length(state)')} FROM tasks WHERE tenant = ? AND expires_at > ? "
                "AND (created_at > ? OR (created_at = ? AND task_id > ?)) ORDER BY created_at, task_id LIMIT ?",
                (tenant, now, after[0], after[0], after[1], limit),
            )
            .fetchall()
        )

    def set_control(self, model: str, state: str) -> int:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            generation = db.execute("SELECT COALESCE(MAX(generation), 0) + 1 FROM model_control").fetchone()[0]
            db.execute(
                "INSERT INTO model_control (model, state, generation) VALUES (?, ?, ?) "
                "ON CONFLICT (model) DO UPDATE SET state = excluded.state, generation = excluded.generation",
                (model, state, generation),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return generation

    def control_since(self, generation: int) -> list[tuple[str, str, int]]:
        rows = self.db().execute(
            "SELECT model, state, generation FROM model_control WHERE generation > ? ORDER BY generation", (generation,)
        )
        return [(m, s, g) for m, s, g in rows]

    def listen(self, on_change) -> None:
        """SQLite has no notifications: other processes' changes are seen by re-reading rows."""

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
