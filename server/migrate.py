"""Moving stored tasks to another version of their model (issue 36): ``fewshot migrate``.

Each live task of the model that is not on the target version is re-adapted from the support pixels its stored state
keeps (as UpdateTask does), with its own method and settings, on the target version, and committed by compare and
set under the same task id (its update version + 1). Until that commit the task answers on its old version; after
it, on the new one (servers re-read a task changed elsewhere: PostgreSQL notifies them, SQLite stores are re-read
within 0.5 s). What is left is always a query of the store, so a migration killed at any point resumes by running it
again: nothing else is kept. Tasks stored without their support images (adapted by an older server) cannot be
re-adapted and are counted as failed, with the reason.

A dry run changes nothing: for each task it reports how many of its own support images would change their predicted
label between the task's version and the target, each image held out of the support set (where its class has at
least 2 images; otherwise predicted by the whole task).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fewshot.models.family import Family
from fewshot.server.errors import Conflict, ServiceError
from fewshot.server.state import StateError, load_support
from fewshot.server.store import TaskStore
from fewshot.server.store_schema import TaskRecord
from fewshot.server.tasks import AdaptRequest
from fewshot.server.versions import describe

log = logging.getLogger("fewshot.server")

#: Compare-and-set attempts per task before it is counted as failed (a task updated concurrently each time).
ATTEMPTS = 5


@dataclass
class Progress:
    """Tasks migrated, left and failed (with the reason of each failure), updated as the migration goes."""

    total: int
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def left(self) -> int:
        return self.total - self.done - len(self.failed)

    def line(self) -> str:
        return f"{self.done} migrated, {self.left} left, {len(self.failed)} failed ({time.monotonic() - self.started:.1f} s)"


class NotMigratable(ServiceError):
    """A task that cannot be re-adapted (no stored support images, or a state that does not restore)."""


def _support(record: TaskRecord) -> Any:
    try:
        support = load_support(record.state)
    except StateError as exc:
        raise NotMigratable(f"its state cannot be restored: {exc}") from None
    if support is None:
        raise NotMigratable("it was stored without its support images (adapted by an older server): adapt it again")
    return support


def migrate_task(store: TaskStore, target: Family, task_id: str, tenant: str) -> bool:
    """Re-adapt one task on ``target`` and commit it under its id; ``False`` when there was nothing to do (already on
    ``target``, deleted or expired). Raises :class:`NotMigratable`, or :class:`ServiceError` from the adaptation."""
    for _ in range(ATTEMPTS):
        record = store.record(task_id, tenant)
        if record is None or record.model_digest == target.digest:
            return False
        support = _support(record)
        request = AdaptRequest.check(target, record.method, support.names, support.settings, 0, None, tenant)
        request.pixels = support.pixels
        new, task, _ = request.run(target.spec.normalize(support.pixels))
        new = dataclasses.replace(
            new, task_id=record.task_id, created_at=record.created_at, expires_at=record.expires_at, version=record.version + 1
        )
        if store.update(new, task):
            return True
    raise NotMigratable(f"it was updated by {ATTEMPTS} other calls while it was being migrated: run the migration again")


def migrate(
    store: TaskStore,
    target: Family,
    concurrency: int = 2,
    on_progress: Callable[[Progress], None] | None = None,
    progress: Progress | None = None,
) -> Progress:
    """Migrate every live task of ``target.name`` not on ``target`` (``concurrency`` at once), counting into
    ``progress`` (a new one by default); the final progress."""
    pending = store.not_on(target.name, target.digest)
    progress, lock = progress or Progress(0), threading.Lock()
    progress.total = len(pending)

    def one(item: tuple[str, str]) -> None:
        task_id, tenant = item
        try:
            migrate_task(store, target, task_id, tenant)
            outcome = None
        except ServiceError as exc:
            outcome = str(exc)
        with lock:
            if outcome is None:
                progress.done += 1
            else:
                progress.failed[task_id] = outcome
            if on_progress is not None:
                on_progress(progress)

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="fewshot-migrate") as pool:
        list(pool.map(one, pending))
    return progress


class Migrations:
    """Migrations the server runs in the background (the admin call ``MigrateTasks``): one per model at a time,
    ``concurrency`` tasks at once beside the serving; ``on_progress(name, version, progress)`` after each task."""

    def __init__(self, store: TaskStore, on_progress: Callable[[str, str, Progress], None], concurrency: int = 2) -> None:
        self.store, self.on_progress, self.concurrency = store, on_progress, concurrency
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[str, Progress, threading.Thread]] = {}

    def start(self, target: Family) -> tuple[Progress, bool]:
        """Start migrating ``target.name``'s tasks onto ``target`` unless a migration of that model runs: ``(its
        progress, whether it runs)``. :class:`Conflict` when the running one goes to another version."""
        with self._lock:
            run = self._runs.get(target.name)
            if run is not None and run[2].is_alive():
                if run[0] != target.version:
                    raise Conflict(f"a migration of {target.name} to version {run[0]} runs: wait for it to end")
                return run[1], True
            progress = Progress(0)
            thread = threading.Thread(target=self._run, args=(target, progress), name=f"fewshot-migrate-{target.name}", daemon=True)
            self._runs[target.name] = (target.version, progress, thread)
            thread.start()
            return progress, True

    def _run(self, target: Family, progress: Progress) -> None:
        try:
            migrate(self.store, target, self.concurrency, lambda p: self.on_progress(target.name, target.version, p), progress)
        except Exception:  # the database away, or a bug: logged; running it again resumes
            log.exception("migration of %s to version %s stopped", target.name, target.version)
        self.on_progress(target.name, target.version, progress)
        log.warning(json.dumps({"event": "migration ended", "model": target.name, "version": target.version, "progress": progress.line()}))


def held_out_predictions(model: Family, method: str, names: list[str], settings: dict[str, Any], pixels: np.ndarray) -> list[str]:
    """The label ``model`` predicts for each support image, held out of the support set where its class keeps at least
    one other image (else predicted by the task adapted on the whole set)."""
    x = model.spec.normalize(pixels)
    whole = AdaptRequest.check(model, method, names, settings, 0)
    whole_task, _ = whole.adapter.adapt_scored(x, whole.targets)
    counts = {n: names.count(n) for n in names}
    out = []
    for i, name in enumerate(names):
        if counts[name] >= 2:
            keep = [j for j in range(len(names)) if j != i]
            request = AdaptRequest.check(model, method, [names[j] for j in keep], settings, 0)
            task, _ = request.adapter.adapt_scored(x[keep], request.targets)
            labels = request.labels
        else:
            task, labels = whole_task, whole.labels
        out.append(labels[int(task.classify(x[i : i + 1]).argmax(1)[0])])
    return out


def dry_run_task(store: TaskStore, versions: dict[str, Family], target: Family, task_id: str, tenant: str) -> dict[str, Any]:
    """What migrating one task to ``target`` would change: ``{"task_id", "from", "images", "changed"}`` (``changed``:
    support images whose held-out predicted label differs between the task's version, found in ``versions`` by digest,
    and ``target``), or ``{"task_id", "error"}``."""
    record = store.record(task_id, tenant)
    if record is None:
        return {"task_id": task_id, "error": "deleted or expired"}
    current = versions.get(record.model_digest)
    if current is None:
        return {"task_id": task_id, "error": f"its {describe(record.model_version, record.model_digest)} is not in the model directory"}
    try:
        support = _support(record)
    except NotMigratable as exc:
        return {"task_id": task_id, "error": str(exc)}
    before = held_out_predictions(current, record.method, support.names, support.settings, support.pixels)
    after = held_out_predictions(target, record.method, support.names, support.settings, support.pixels)
    return {
        "task_id": task_id,
        "from": record.model_version,
        "images": len(before),
        "changed": sum(a != b for a, b in zip(before, after)),
    }
