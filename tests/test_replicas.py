"""Replicas on one PostgreSQL (issue 17): three real ``fewshot serve`` processes sharing a real database.
Adapt on one and Classify on the others gives identical predictions; a delete on one is NOT_FOUND on the
others within 1 s; a replica SIGKILLed under load leaves the others serving every acknowledged task; a
database restart under load answers UNAVAILABLE, then recovers, with no acknowledged task lost; the SDK
spreads calls over the replicas and retries UNAVAILABLE on another."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from fixtures.postgres import PostgresServer
from support import SMALL

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot.tools.launch import ServerProcess
from fewshot_client import FewShotClient
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI, CXGRAD = "omniglot-conv4-directsum", "omniglot-conv4-cxgrad"


@pytest.fixture(scope="module")
def database():
    """This module's own PostgreSQL (the outage test restarts it)."""
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="module")
def replicas(omni_bundles, database, tmp_path_factory):
    """Three replicas on one database, each with its own (unused) state folder."""
    url = database.create_database("replicas")
    procs = [ServerProcess(omni_bundles, tmp_path_factory.mktemp(f"replica{i}"), *SMALL, "--store", url) for i in range(3)]
    for p in procs:
        p.start()
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def episode(omniglot_test):
    ep = EpisodeSampler(omniglot_test, 5, 1, 4, seed=21).episode(0)
    support = [
        pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[i])), label=f"c{c}") for i, c in zip(ep.support, ep.support_labels)
    ]
    return support, [pb.Image(encoded=png(omniglot_test.images[i])) for i in ep.query]


def _stubs(procs):
    channels = [grpc.insecure_channel(p.target) for p in procs]
    return channels, [pb_grpc.FewShotStub(c) for c in channels]


def test_a_task_adapted_on_one_replica_is_served_identically_by_the_others(replicas, episode):
    support, queries = episode
    channels, (a, b, c) = _stubs(replicas)
    try:
        for model in (OMNI, CXGRAD):
            task = a.Adapt(pb.AdaptRequest(model=model, support=support))
            answers = [s.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries, top_k=3)) for s in (a, b, c)]
            assert answers[0] == answers[1] == answers[2], model
            assert b.GetTask(pb.GetTaskRequest(task_id=task.task_id)).labels == task.labels
    finally:
        for ch in channels:
            ch.close()


def test_a_delete_on_one_replica_is_not_found_on_the_others_within_a_second(replicas, episode):
    support, queries = episode
    channels, (a, b, c) = _stubs(replicas)
    try:
        for model in (OMNI, CXGRAD):
            task = a.Adapt(pb.AdaptRequest(model=model, support=support))
            for s in (a, b):  # cached on both
                s.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries[:1]))
            assert c.DeleteTask(pb.DeleteTaskRequest(task_id=task.task_id)).deleted
            gone = time.monotonic()
            for s in (a, b):
                while True:
                    try:
                        s.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries[:1]))
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND
                        break
                    assert time.monotonic() - gone < 1.0, f"{model}: still served a second after the delete"
                    time.sleep(0.01)
    finally:
        for ch in channels:
            ch.close()


class _Load:
    """Threads adapting and classifying through ``targets`` (the SDK over the replicas) until stopped;
    every task whose Adapt returned is recorded (acknowledged), every error counted by status."""

    def __init__(self, targets, support, queries, threads: int = 3) -> None:
        self.targets, self.support, self.queries = targets, support, queries
        self.acknowledged: list[str] = []
        self.errors: dict[str, int] = {}
        self.ok = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        images, labels = [s.image.encoded for s in self.support], [s.label for s in self.support]
        with FewShotClient(self.targets, timeout=10, retries=1, backoff=0.05) as client:
            while not self._stop.is_set():
                try:
                    task = client.adapt(images, labels, OMNI)
                    self.acknowledged.append(task.id)
                    task.classify([q.encoded for q in self.queries[:2]])
                    self.ok += 1
                except Exception as e:
                    name = getattr(e, "code", type(e).__name__)
                    self.errors[str(name)] = self.errors.get(str(name), 0) + 1
                    time.sleep(0.05)

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _all_classifiable(target: str, task_ids: list[str], queries) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        for task_id in task_ids:
            assert len(stub.Classify(pb.ClassifyRequest(task_id=task_id, queries=queries[:1])).predictions) == 1


def test_a_database_restart_under_load_is_unavailable_then_recovers_losing_nothing(replicas, database, episode):
    support, queries = episode
    with _Load([p.target for p in replicas], support, queries) as load:
        time.sleep(2.0)
        before = load.ok
        database.stop()
        time.sleep(7.0)  # past the connect timeout (3 s) of a call and of its one retry: they have answered
        during = dict(load.errors)
        database.start()
        deadline = time.monotonic() + 20
        recovered = load.ok
        while load.ok < recovered + 5:
            assert time.monotonic() < deadline, f"no recovery 20 s after the database came back: {load.errors}"
            time.sleep(0.1)
    assert before > 0 and any("UNAVAILABLE" in k or "Unavailable" in k for k in during), during
    assert set(load.errors) <= {k for k in load.errors if "UNAVAILABLE" in k or "Unavailable" in k}, load.errors
    _all_classifiable(replicas[0].target, load.acknowledged, queries)


def test_a_replica_killed_under_load_leaves_the_others_serving_every_acknowledged_task(replicas, episode):
    """Runs last: it kills replica 2. The SDK spreads the load over all three; after the SIGKILL its
    calls go to the other two (UNAVAILABLE retried elsewhere)."""
    support, queries = episode
    with _Load([p.target for p in replicas], support, queries) as load:
        time.sleep(2.0)
        replicas[2].kill()
        killed_at_ok = load.ok
        deadline = time.monotonic() + 20
        while load.ok < killed_at_ok + 10:
            assert time.monotonic() < deadline, f"the two survivors stopped serving: {load.errors}"
            time.sleep(0.1)
    assert len(load.acknowledged) >= 10
    for survivor in replicas[:2]:
        _all_classifiable(survivor.target, load.acknowledged, queries)


def test_the_sdk_spreads_calls_over_replicas():
    from fewshot_client.messages import channel_target

    assert channel_target("127.0.0.1:1") == ("127.0.0.1:1", [])
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == ("ipv4:127.0.0.1:1,127.0.0.1:2", [("grpc.lb_policy_name", "round_robin")])
    assert channel_target("dns:///fewshot:50051")[1] == [("grpc.lb_policy_name", "round_robin")]
    for bad, message in ((["fewshot-a:1", "fewshot-b:1"], "not IP:PORT"), ([], "no target"), (["127.0.0.1:1", "[::1]:2"], "mix")):
        with pytest.raises(ValueError, match=message):
            channel_target(bad)
