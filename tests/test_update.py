"""UpdateTask end to end on a real ``fewshot serve``: equality with a fresh Adapt on the union support
set (every method), versions under concurrent updaters, a SIGKILL during updates, bad input, the SDK
and the CLI (issue 16)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support import SMALL

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot.tools.launch import ServerProcess
from fewshot_client import Aborted, FewShotClient, InvalidArgument, NotFound, ResourceExhausted
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI, CXGRAD = "omniglot-conv4-directsum", "omniglot-conv4-cxgrad"


@pytest.fixture(scope="module")
def data():
    return load_dataset("omniglot", "test")


@pytest.fixture(scope="module")
def client(server):
    with FewShotClient(server.target) as c:
        yield c


def _images(data, idx) -> list[bytes]:
    return [png(data.images[i]) for i in idx]


def _episode(data, ways: int, shots: int, seed: int):
    """(support images, support labels, query images) of a real test episode, labels ``c<class>``."""
    ep = EpisodeSampler(data, ways, shots, 5, seed=seed).episode(0)
    return _images(data, ep.support), [f"c{c}" for c in ep.support_labels], _images(data, ep.query)


def _probabilities(task, queries) -> np.ndarray:
    return np.array([[p.scores[label] for label in task.labels] for p in task.classify(queries)])


@pytest.mark.parametrize(
    "name,method,ways", [(OMNI, "centroid", 7), (OMNI, "laplacianshot", 7), (OMNI, "logreg", 7), (CXGRAD, "inner_loop", 7)]
)
def test_an_update_equals_a_fresh_adapt_on_the_union(client, data, name, method, ways):
    """Start from a 1-shot task; add shots (and, where the model allows more ways, new classes); then
    remove a class (metric heads). After each step the task predicts exactly as a fresh Adapt on the
    union support set, in the same order."""
    images, labels, queries = _episode(data, ways, 2, seed=11)
    first = [i for i in range(len(labels)) if i % 2 == 0][:5]  # one image of each of the first 5 classes
    task = client.adapt([images[i] for i in first], [labels[i] for i in first], name, method)
    assert client.task_info(task.id).version == 1 and set(client.task_info(task.id).shots.values()) == {1}
    union_images, union_labels = [images[i] for i in first], [labels[i] for i in first]
    rest = [i for i in range(len(labels)) if i not in first]
    steps = [rest[:3], rest[3:]]
    for version, add in enumerate(steps, start=2):
        task.update([images[i] for i in add], [labels[i] for i in add])
        union_images += [images[i] for i in add]
        union_labels += [labels[i] for i in add]
        fresh = client.adapt(union_images, union_labels, name, method)
        assert task.version == version and task.labels == fresh.labels
        assert task.support_accuracy == pytest.approx(fresh.support_accuracy)
        np.testing.assert_array_equal(_probabilities(task, queries), _probabilities(fresh, queries))
    info = client.task_info(task.id)
    assert info.version == 3 and info.support_size == len(union_labels)
    assert info.shots == {label: union_labels.count(label) for label in task.labels}
    if ways > 5:
        gone = task.labels[1]
        task.update(remove=[gone])
        keep = [i for i, label in enumerate(union_labels) if label != gone]
        fresh = client.adapt([union_images[i] for i in keep], [union_labels[i] for i in keep], name, method)
        assert task.version == 4 and gone not in task.labels and task.labels == fresh.labels
        np.testing.assert_array_equal(_probabilities(task, queries), _probabilities(fresh, queries))


def test_eight_concurrent_updaters_lose_no_update(client, data):
    images, labels, queries = _episode(data, 13, 1, seed=12)
    task = client.adapt(images[:5], labels[:5], OMNI)
    start = threading.Barrier(8)

    def add(k: int) -> int:
        start.wait()
        return client.update(task.id, [images[5 + k]], [labels[5 + k]]).version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(add, range(8)))
    assert sorted(versions) == list(range(2, 10))  # each committed exactly one version
    info = client.task_info(task.id)
    assert info.version == 9 and set(info.labels) == set(labels) and info.support_size == 13
    order = [labels.index(label) for label in info.labels]  # the union in the order the updates committed
    fresh = client.adapt([images[i] for i in order], [labels[i] for i in order], OMNI)
    np.testing.assert_array_equal(_probabilities(client.task(task.id), queries), _probabilities(fresh, queries))


def test_updates_of_two_servers_on_one_store_are_serialised(exported, tmp_path, data):
    """Two processes on one --state-dir: their updates of one task meet at the store's compare-and-set;
    the loser re-adapts on the new version, so none is lost."""
    images, labels, _ = _episode(data, 11, 1, seed=13)
    state = tmp_path / "shared-state"
    with (
        ServerProcess(exported[0], state, *SMALL) as a,
        ServerProcess(exported[0], state, *SMALL) as b,
        FewShotClient(a.target) as ca,
        FewShotClient(b.target) as cb,
    ):
        task = ca.adapt(images[:5], labels[:5], OMNI)
        start = threading.Barrier(6)

        def add(k: int) -> int:
            start.wait()
            return (ca if k % 2 else cb).update(task.id, [images[5 + k]], [labels[5 + k]]).version

        with ThreadPoolExecutor(6) as pool:
            versions = list(pool.map(add, range(6)))
        assert sorted(versions) == list(range(2, 8))
        time.sleep(0.6)  # past the cache's recheck interval: both serve the latest version
        assert ca.task_info(task.id).labels == cb.task_info(task.id).labels and len(cb.task_info(task.id).labels) == 11
        assert [p.label for p in ca.task(task.id).classify(images)] == [p.label for p in cb.task(task.id).classify(images)]


def test_a_sigkill_during_updates_leaves_one_whole_version(exported, tmp_path, data):
    images, labels, queries = _episode(data, 30, 1, seed=14)
    state = tmp_path / "state"
    server = ServerProcess(exported[0], state, *SMALL).start()
    acknowledged: list[int] = []
    try:
        with FewShotClient(server.target, retries=0) as c:
            task_id = c.adapt(images[:5], labels[:5], OMNI).id

            def keep_updating() -> None:
                for k in range(5, 30):
                    try:
                        acknowledged.append(c.update(task_id, [images[k]], [labels[k]]).version)
                    except Exception:
                        return

            worker = threading.Thread(target=keep_updating)
            worker.start()
            while len(acknowledged) < 3:
                time.sleep(0.01)
    finally:
        server.kill()
    worker.join()
    with ServerProcess(exported[0], state, *SMALL) as again, FewShotClient(again.target) as c:
        info = c.task_info(task_id)
        assert info.version >= max(acknowledged)  # nothing acknowledged is lost (one more may have committed)
        assert info.labels == labels[: 4 + info.version] and info.support_size == len(info.labels)
        fresh = c.adapt(images[: len(info.labels)], info.labels, OMNI)  # the version's own union, whole
        np.testing.assert_array_equal(_probabilities(c.task(task_id), queries), _probabilities(fresh, queries))


def test_bad_updates_get_clear_statuses_and_change_nothing(client, server, data):
    images, labels, _ = _episode(data, 5, 1, seed=15)
    task = client.adapt(images, labels, OMNI)
    cx = client.adapt(images, labels, CXGRAD)
    cases = [
        ("unknown task", lambda: client.update("0" * 32, images[:1], labels[:1]), NotFound, "unknown"),
        ("empty update", lambda: client.update(task.id), InvalidArgument, "adds no image"),
        ("remove an unknown class", lambda: client.update(task.id, remove=["nope"]), InvalidArgument, "cannot remove"),
        ("remove all but one class", lambda: client.update(task.id, remove=labels[1:]), InvalidArgument, "at least 2 classes"),
        ("add and remove one class", lambda: client.update(task.id, images[:1], labels[:1], remove=labels[:1]), InvalidArgument, "both"),
        ("empty label", lambda: client.update(task.id, images[:1], [""]), InvalidArgument, "empty label"),
        ("undecodable image", lambda: client.update(task.id, [b"not an image"], ["c0"]), InvalidArgument, "image 0"),
        ("past the support limit", lambda: client.update(task.id, images[:1] * 301, ["x"] * 301), ResourceExhausted, "at most 300"),
        ("union past the support limit", lambda: client.update(task.id, images[:1] * 296, ["x"] * 296), ResourceExhausted, "at most 300"),
        ("stale expected version", lambda: client.update(task.id, images[:1], labels[:1], expected_version=7), Aborted, "version 1"),
        (
            "past the model's most classes",
            lambda: client.update(cx.id, images[:1] * 46, [f"n{i}" for i in range(46)]),
            InvalidArgument,
            "at most 50",
        ),
    ]
    for name, call, error, message in cases:
        with pytest.raises(error) as err:
            call()
        assert message in err.value.details, (name, err.value.details)
    assert client.task_info(task.id).version == 1 and client.task_info(cx.id).version == 1
    assert client.update(task.id, images[:1], labels[:1], expected_version=1).version == 2  # and it still updates


def test_cli_update(client, server, data, tmp_path):
    images, labels, _ = _episode(data, 6, 1, seed=16)
    task = client.adapt(images[:5], labels[:5], OMNI)
    (tmp_path / labels[5]).mkdir()
    (tmp_path / labels[5] / "new.png").write_bytes(images[5])
    run = subprocess.run(
        [sys.executable, "-m", "fewshot_client.cli", "--target", server.target, "update", "--task", task.id, "--support", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "2\n" and "version 2" in run.stderr and run.stderr.count("\n") == 1
    assert client.task_info(task.id).labels == labels
    nothing = subprocess.run(
        [sys.executable, "-m", "fewshot_client.cli", "--target", server.target, "update", "--task", task.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nothing.returncode == 1 and "nothing to update" in nothing.stderr and nothing.stderr.count("\n") == 1


def test_raw_update_rpc_statuses(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        for request in (pb.UpdateTaskRequest(task_id="not a task id!"), pb.UpdateTaskRequest()):
            with pytest.raises(grpc.RpcError) as err:
                stub.UpdateTask(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
