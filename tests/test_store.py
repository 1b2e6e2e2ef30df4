"""The task store alone, on both databases (the ``database`` fixture: SQLite and a real PostgreSQL):
delete consistency (one process, and two stores on one database), what the cache charges, tenants,
quotas, compare-and-set updates; SQLite's schema migration and WAL; PostgreSQL's notifications,
shared expiry purge and outage."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fewshot.models.heads.centroid import CentroidState
from fewshot.models.metric_adapter import MetricTask
from fewshot.server.errors import QuotaExceeded
from fewshot.server.state import dump_task
from fewshot.server.store import ENTRY_OVERHEAD, TaskRecord, TaskStore, resident_bytes
from fewshot.server.store_sqlite import SCHEMA_VERSION as SQLITE_SCHEMA

pytestmark = pytest.mark.unit


def _task(n: int = 5, d: int = 3136) -> MetricTask:
    return MetricTask(CentroidState(torch.randn(n, d), "L2N", torch.randn(d)), extract=lambda x: x)


def _record(task_id: str, task: MetricTask, tenant: str = "", ttl: float = 3600) -> TaskRecord:
    now = time.time()
    return TaskRecord(task_id, "m", "centroid", [f"c{i}" for i in range(5)], now, now + ttl, 5, dump_task(task), tenant)


def test_a_deleted_task_is_never_found_again_under_concurrent_reloads(database):
    """Defect 1: a lookup racing the delete must not re-cache the row it read before the delete."""
    store = TaskStore(database)
    slow = threading.Event()

    def decode(rec: TaskRecord):
        if slow.is_set():
            time.sleep(0.01)  # widen the window between reading the row and caching it
        return _task()

    for round_ in range(20):
        task_id = f"t{round_}"
        store.put(_record(task_id, _task()))
        stop, found_after = threading.Event(), []
        deleted_at: list[float] = []

        def lookups():
            while not stop.is_set():
                started = time.monotonic()
                if store.get(task_id, decode) is not None and deleted_at and started > deleted_at[0]:
                    found_after.append(started)
                if not deleted_at:
                    store._cache.pop(task_id, None)  # force reloads from disk, the racing path

        slow.set()
        threads = [threading.Thread(target=lookups) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        assert store.delete(task_id)
        deleted_at.append(time.monotonic())
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert store.get(task_id, decode) is None and store.record(task_id) is None
        assert not found_after, f"round {round_}: found {len(found_after)} times after the delete returned"


def test_a_task_deleted_by_another_store_stops_being_served_within_recheck(database):
    a, b = TaskStore(database, recheck=0.2), TaskStore(database, recheck=0.2)
    a.put(_record("x", _task()))
    assert b.get("x", lambda rec: _task()) is not None  # cached in b
    assert a.delete("x")
    deadline = time.monotonic() + 0.2 + 0.3
    while b.get("x", lambda rec: _task()) is not None:
        assert time.monotonic() < deadline, "b kept serving a task a deleted"
        time.sleep(0.01)


def test_the_cache_is_charged_what_its_entries_hold(database):
    """Defect 6: the charge covers every tensor an entry holds, and entries do not keep the state bytes."""
    store = TaskStore(database, cache_bytes=1 << 20)
    for i in range(40):
        task = _task()
        store.put(_record(f"t{i}", task), task)
    held = sum(resident_bytes(e.task) + len(e.record.state) for e in store._cache.values())
    assert 0 < store.cached <= 40 and held + ENTRY_OVERHEAD * store.cached <= store.cache_bytes
    assert store.cached_bytes == sum(e.charge for e in store._cache.values()) <= store.cache_bytes
    assert all(e.record.state == b"" for e in store._cache.values())


def test_resident_bytes_counts_shared_storage_once():
    x = torch.zeros(1000)
    assert resident_bytes({"a": x, "b": x[:10], "c": [x]}) == 4000


def test_tenants_see_only_their_own_tasks(database):
    store = TaskStore(database)
    store.put(_record("a-task", _task(), tenant="a"))
    assert store.record("a-task", "a") is not None
    assert store.record("a-task", "b") is None and store.get("a-task", lambda r: _task(), "b") is None
    assert not store.delete("a-task", "b") and store.record("a-task", "a") is not None
    assert store.delete("a-task", "a")


def test_the_live_task_quota_is_checked_with_the_insert(database):
    store = TaskStore(database)
    for i in range(3):
        store.put(_record(f"q{i}", _task(), tenant="a"), max_live=3)
    with pytest.raises(QuotaExceeded, match="3 live tasks"):
        store.put(_record("q3", _task(), tenant="a"), max_live=3)
    store.put(_record("other", _task(), tenant="b"), max_live=3)  # quotas are per tenant
    assert store.record("q3", "a") is None


def test_a_version_1_store_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "tasks.sqlite3")
    db.executescript("""CREATE TABLE tasks (task_id TEXT PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL,
        labels TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, support_size INTEGER NOT NULL,
        state BLOB NOT NULL);""")
    rec = _record("old", _task())
    db.execute(
        "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ("old", "m", "centroid", '["a", "b"]', rec.created_at, rec.expires_at, 5, rec.state),
    )
    db.commit()
    db.close()
    store = TaskStore(tmp_path)
    assert store.record("old").labels == ["a", "b"] and store.record("old").tenant == ""
    assert store.record("old").version == 1 and store.record("old").shots == []  # stored before UpdateTask
    assert store.record("old").model_digest == ""  # stored before versions were recorded
    assert store.database.db().execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA
    # the serving process pins such rows to the version it loads for their model; pinned rows stay
    assert store.pin_unversioned("m", "1", "d" * 64) == 1 and store.pin_unversioned("m", "2", "e" * 64) == 0
    assert (store.record("old").model_version, store.record("old").model_digest) == ("1", "d" * 64)
    assert store.live_by_version() == {("m", "d" * 64): 1}


def test_an_update_is_a_compare_and_set_seen_by_other_processes(database):
    """Version 2 commits only over version 1; a stale writer gets False and nothing changes. A store
    (another process) that cached version 1 serves version 2 after its recheck interval."""
    import dataclasses

    mine, theirs = TaskStore(database, recheck=0.05), TaskStore(database, recheck=0.05)
    v1 = _record("t", _task())
    mine.put(v1, "task v1")
    assert theirs.get("t", lambda r: f"task v{r.version}")[1] == "task v1"
    v2 = dataclasses.replace(v1, labels=v1.labels + ["new"], version=2, shots=[1] * 6)
    assert mine.update(v2, "task v2") and mine.get("t", lambda r: "reloaded")[1] == "task v2"
    assert not mine.update(dataclasses.replace(v1, version=2))  # lost: the task is already at version 2
    stored = mine.record("t")
    assert stored.version == 2 and stored.labels == v2.labels and stored.shots == [1] * 6
    time.sleep(0.06)
    assert theirs.get("t", lambda r: f"task v{r.version}")[1] == "task v2"
    assert not mine.update(dataclasses.replace(v2, task_id="missing", version=3))


def test_a_store_opened_while_another_is_migrating_waits_for_it(tmp_path):
    """Triton loads its models in parallel, each opening the store. Switching a fresh file to WAL does
    not wait for SQLite's busy timeout: it fails at once with "database is locked" (CI saw it). Here
    another opener holds the store mid-migration (its advisory lock and a write lock on the still
    rollback-journal file) for 0.5 s; this one must wait, then open."""
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    lock = open(tmp_path / "tasks.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    other = sqlite3.connect(tmp_path / "tasks.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE early (x)")

    def finish() -> None:
        time.sleep(0.5)
        other.execute("COMMIT")
        fcntl.flock(lock, fcntl.LOCK_UN)

    releaser = threading.Thread(target=finish)
    releaser.start()
    store = TaskStore(tmp_path)
    releaser.join()
    store.put(_record("t1", _task()))
    assert store.count() == 1
    assert store.database.db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_inner_loop_tasks_are_charged_exactly_the_buffer_each_holds(tmp_path, omniglot_test, dtype):
    """Real CxGrad tasks (shipped model, `--task-dtype` float32 or float16) in a cache that holds three:
    each task's weights and statistics are one buffer of its own (packed after the inner loop, not views
    of the loop's tensors), the charge is that buffer plus the entry overhead and labels, and the cache
    stays within its budget while it evicts (the resident-memory slope is BENCHMARKS.md's)."""
    from fewshot.models.episodes import EpisodeSampler
    from fewshot.models.family import open_shipped
    from fewshot.models.preprocess import InputSpec
    from fewshot.models.zoo import load_model

    model = open_shipped(load_model("omniglot-conv4-cxgrad"), "onnxruntime", "cpu")
    model.hold_tasks_in(dtype)
    adapter, spec = model.adapter(), InputSpec.for_dataset("omniglot")
    sampler = EpisodeSampler(omniglot_test, 5, 1, 1, seed=9)
    params = sum(v.numel() for v in model.params.values()) + 2 * 4 * model.net.width  # + frozen mean and var
    per_task = params * torch.finfo(dtype).bits // 8 + ENTRY_OVERHEAD + sum(len(f"c{i}") for i in range(5))
    store = TaskStore(tmp_path, cache_bytes=3 * per_task + per_task // 2)
    for i in range(6):
        ep = sampler.episode(i)
        task = adapter.adapt(spec.normalize(omniglot_test.images[ep.support]), torch.as_tensor(ep.support_labels))
        tensors = list(task.state.params.values()) + [t for pair in task.state.bn_stats for t in pair]
        assert {t.dtype for t in tensors} == {dtype} and len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        assert resident_bytes(task) == params * torch.finfo(dtype).bits // 8
        store.put(_record(f"t{i}", task), task)
    assert store.cached == 3 and store.cached_bytes == 3 * per_task <= store.cache_bytes


# -- PostgreSQL: what only the networked database does ---------------------------------------------
def test_postgres_pushes_deletes_and_updates_to_the_other_stores_at_once(postgres):
    """With a recheck interval of a minute, only the notification can make the other store drop its
    entry: a delete and an update made by one store reach the other's cache within 1 s."""
    import dataclasses

    url = postgres.create_database("pushed")
    a, b = TaskStore(url, recheck=60), TaskStore(url, recheck=60)
    try:
        v1 = _record("n", _task())
        a.put(v1)
        assert b.get("n", lambda r: f"v{r.version}")[1] == "v1"
        assert a.update(dataclasses.replace(v1, version=2), "v2")
        deadline = time.monotonic() + 1.0
        while b.get("n", lambda r: f"v{r.version}")[1] != "v2":
            assert time.monotonic() < deadline, "b still serves version 1 a second after a's update"
            time.sleep(0.01)
        assert a.delete("n")
        while b.get("n", lambda r: "found") is not None:
            assert time.monotonic() < deadline + 1.0, "b still serves a task a deleted a second ago"
            time.sleep(0.01)
    finally:
        a.close(), b.close()


def test_postgres_schema_is_created_once_with_its_version_and_state_as_bytea(postgres):
    import psycopg

    from fewshot.server.store_postgres import SCHEMA_VERSION

    url = postgres.create_database("schema")
    stores = [TaskStore(url) for _ in range(3)]  # replicas starting together: the migration takes turns
    try:
        assert stores[0].database.schema_version() == SCHEMA_VERSION
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM fewshot_schema").fetchone()[0] == 1
            kind = conn.execute(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'tasks' AND column_name = 'state'"
            ).fetchone()[0]
            assert kind == "bytea"
            conn.execute("UPDATE fewshot_schema SET version = 99")
        from fewshot.server.store import StoreVersionError

        with pytest.raises(StoreVersionError, match="schema version 99"):
            TaskStore(url)
    finally:
        for s in stores:
            s.close()


def test_postgres_expiry_is_purged_by_replicas_together_without_double_work(postgres):
    url = postgres.create_database("purge")
    stores = [TaskStore(url) for _ in range(3)]
    try:
        for i in range(1200):
            stores[0].put(_record(f"e{i}", _task(2, 8), ttl=-1 if i < 1100 else 3600))
        with ThreadPoolExecutor(3) as pool:
            purged = list(pool.map(lambda s: s.purge_expired(), stores))
        assert sum(purged) == 1100 and stores[1].count() == 100
    finally:
        for s in stores:
            s.close()


def test_postgres_outage_answers_unavailable_keeps_cached_tasks_and_loses_nothing():
    """The database stops: writes and uncached reads raise StoreUnavailable (UNAVAILABLE) within the
    connect timeout, a cached task is still served; once it is back, every acknowledged task is there
    and new writes succeed."""
    from fixtures.postgres import PostgresServer

    from fewshot.server.store import StoreUnavailable

    with PostgresServer() as pg:
        store = TaskStore(pg.url, recheck=0.0)
        try:
            for i in range(5):
                store.put(_record(f"k{i}", _task(2, 8)), f"task {i}" if i == 0 else None)
            pg.stop()
            with pytest.raises(StoreUnavailable, match="cannot be reached|failed the call"):
                store.put(_record("lost", _task(2, 8)))
            with pytest.raises(StoreUnavailable):
                store.get("k1", lambda r: "decoded")
            assert store.get("k0", lambda r: "decoded")[1] == "task 0"  # cached: still classifies
            pg.start()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert {store.record(f"k{i}") is not None for i in range(5)} == {True}
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the store did not reconnect within 10 s"
                    time.sleep(0.2)
            store.put(_record("after", _task(2, 8)))
            assert store.count() == 6 and store.record("lost") is None
        finally:
            store.close()
