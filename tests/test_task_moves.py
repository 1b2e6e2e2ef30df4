"""Tasks you can list and move (issue 37), against real ``fewshot serve`` processes: ListTasks pages a tenant's live
tasks (never another tenant's, never a deleted one) over gRPC, HTTP and the CLI; ExportTask / ImportTask move a task
from a SQLite store to a PostgreSQL store with identical predictions; corrupt, foreign and future blobs are refused."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from fixtures.transports import http_call
from support import SMALL

from fewshot.models.episodes import EpisodeSampler
from fewshot.server.auth import token_hash
from fewshot.server.task_blob import MAGIC
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_client import FailedPrecondition, FewShotClient, InvalidArgument

OMNI = "omniglot-conv4-directsum"


@pytest.fixture(scope="module")
def tasks_data(omniglot_test):
    """Four real 5-way 1-shot Omniglot tasks: (support, labels, queries)."""
    sampler = EpisodeSampler(omniglot_test, 5, 1, 3, seed=5)
    out = []
    for i in range(4):
        ep = sampler.episode(i)
        out.append(
            (list(omniglot_test.images[ep.support]), [f"c{ep.classes[j]}" for j in ep.support_labels], list(omniglot_test.images[ep.query]))
        )
    return out


def _scores(predictions) -> np.ndarray:
    return np.array([[p.scores[k] for k in sorted(p.scores)] for p in predictions])


def test_list_tasks_pages_one_tenants_live_tasks(omni_bundles, tasks_data, tmp_path):
    """Pages of 2 over 4 live tasks of alice (a fifth deleted), oldest first; bob sees his own only; HTTP and the CLI
    list the same; a bad page token or size is INVALID_ARGUMENT."""
    (tmp_path / "tokens").write_text(f"alice: {token_hash('alice-token')}\nbob: {token_hash('bob-token')}\n")
    port = free_port()
    with (
        ServerProcess(omni_bundles, tmp_path / "state", *SMALL, "--tokens", str(tmp_path / "tokens"), "--http-port", str(port)) as proc,
        FewShotClient(proc.target, token="alice-token") as alice,
        FewShotClient(proc.target, token="bob-token") as bob,
    ):
        mine = [alice.adapt(s, labels, OMNI).id for s, labels, _ in tasks_data]
        gone = alice.adapt(tasks_data[0][0], tasks_data[0][1], OMNI).id
        alice.delete(gone)
        theirs = bob.adapt(tasks_data[1][0], tasks_data[1][1], OMNI).id
        pages, token = [], ""
        while True:
            page = alice.list_tasks(2, token)
            pages.append([t.task_id for t in page.tasks])
            token = page.next_page_token
            if not token:
                break
        assert pages == [mine[:2], mine[2:]]
        first = alice.list_tasks(10).tasks[0]
        assert (first.model, first.model_version, first.method, first.ways, first.support_size, first.version) == (
            OMNI,
            "1",
            "centroid",
            5,
            5,
            1,
        )
        assert first.size_bytes > 0 and first.created_at <= first.updated_at < first.expires_at
        assert [t.task_id for t in bob.list_tasks().tasks] == [theirs]
        status, answer = http_call("GET", f"http://127.0.0.1:{port}/v1/tasks?page_size=3", headers={"authorization": "Bearer alice-token"})
        assert status == 200 and [t["task_id"] for t in answer["tasks"]] == mine[:3] and answer["next_page_token"]
        status, answer = http_call(
            "GET", f"http://127.0.0.1:{port}/v1/tasks?page_size=many", headers={"authorization": "Bearer alice-token"}
        )
        assert status == 400 and answer["code"] == "INVALID_ARGUMENT"
        with pytest.raises(InvalidArgument, match="page_token"):
            alice.list_tasks(2, "not-a-token")
        with pytest.raises(InvalidArgument, match="page_size"):
            alice.list_tasks(5000)
        run = subprocess.run(
            [sys.executable, "-m", "fewshot_client.cli", "--target", proc.target, "--token", "bob-token", "tasks", "--all"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0 and run.stdout.split("\t")[0] == theirs, run.stderr


def _repack(blob: bytes, **changes) -> bytes:
    """``blob`` with its header's fields changed (the state and its checksum kept)."""
    start = len(MAGIC) + 4
    (size,) = struct.unpack(">I", blob[len(MAGIC) : start])
    header = json.loads(blob[start : start + size]) | changes
    text = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + blob[start + size :]


def test_a_task_moves_from_sqlite_to_postgresql_with_identical_predictions(server, omni_bundles, postgres, tasks_data, tmp_path):
    """ExportTask on the SQLite-backed server, ImportTask on a PostgreSQL-backed one (through the CLI too): the same
    labels and identical scores. A corrupted blob, one of a model or model version not loaded, and one of a newer
    format are refused with one-line messages."""
    url = postgres.create_database("moves")
    with (
        FewShotClient(server.target) as source,
        ServerProcess(omni_bundles, tmp_path / "b", *SMALL, "--store", url) as other,
        FewShotClient(other.target) as target,
    ):
        for support, labels, queries in tasks_data:
            task = source.adapt(support, labels, OMNI)
            moved = target.import_task(source.export_task(task.id))
            assert moved.id != task.id and moved.labels == task.labels and moved.model_version == task.model_version
            np.testing.assert_array_equal(_scores(source.classify(task.id, queries)), _scores(target.classify(moved.id, queries)))
        blob = source.export_task(task.id)
        (tmp_path / "task.blob").write_bytes(blob)
        run = subprocess.run(
            [sys.executable, "-m", "fewshot_client.cli", "--target", other.target, "import", str(tmp_path / "task.blob")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert target.task_info(run.stdout.strip()).labels == task.labels
        status, exported = http_call("GET", f"{server.http_url}/v1/tasks/{task.id}/export")  # and over HTTP (base64)
        assert status == 200
        status, imported = http_call("POST", f"{server.http_url}/v1/tasks:import", {"blob": exported["blob"]})
        assert status == 200 and imported["labels"] == task.labels and imported["model_version"]["version"] == task.model_version
        corrupt = bytearray(blob)
        corrupt[-100] ^= 0xFF
        with pytest.raises(InvalidArgument, match="does not match its sha256"):
            target.import_task(bytes(corrupt))
        with pytest.raises(FailedPrecondition, match="version 7 .sha256 ffffffffffff"):
            target.import_task(_repack(blob, model_version="7", model_digest="f" * 64))
        with pytest.raises(FailedPrecondition, match="no-such-model"):
            target.import_task(_repack(blob, model="no-such-model"))
        with pytest.raises(InvalidArgument, match="format 2, from a newer server"):
            target.import_task(_repack(blob, format=2))
        with pytest.raises(InvalidArgument, match="not a task exported"):
            target.import_task(b"hello")
