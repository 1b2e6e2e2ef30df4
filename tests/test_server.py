"""The gRPC service end to end: a real ``fewshot serve`` process on loopback, real test tasks as PNG bytes."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from support import SHIPPED, SMALL

from fewshot.cli import main as fewshot_main
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import methods_of
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot.tools.launch import ServerProcess
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI, CXGRAD = "omniglot-conv4-directsum", "omniglot-conv4-cxgrad"
TASKS = 12  # per (model, method): 900 queries each, every shipped model and method


def _served_cases() -> list[tuple[str, str]]:
    cases = []
    for name in SHIPPED:
        card = load_model(name).card
        cases += [(name, m) for m in methods_of(card)]
    return cases


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.FewShotStub(channel)


@pytest.fixture(scope="module")
def omni_task(omniglot_test):
    ep = EpisodeSampler(omniglot_test, 5, 1, 15, seed=7).episode(0)
    support = [
        pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[i])), label=f"char-{c}")
        for i, c in zip(ep.support, ep.support_labels)
    ]
    queries = [pb.Image(encoded=png(omniglot_test.images[i])) for i in ep.query]
    return support, queries, [f"char-{c}" for c in ep.query_labels]


def _adapt_request(support, model=OMNI, **kw) -> pb.AdaptRequest:
    return pb.AdaptRequest(model=model, support=support, **kw)


def _labels(response: pb.ClassifyResponse) -> list[str]:
    return [p.ranked[0].label for p in response.predictions]


def _assert_still_serves(stub, omni_task) -> None:
    support, queries, truth = omni_task
    task = stub.Adapt(_adapt_request(support))
    predicted = _labels(stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries)))
    assert np.mean([p == t for p, t in zip(predicted, truth)]) >= 0.8


@pytest.mark.parametrize("name,method", _served_cases())
def test_served_predictions_equal_fewshot_eval(server, stub, tmp_path, name, method):
    card = load_model(name).card
    ways = 5
    out = tmp_path / "eval.json"
    args = [
        "eval",
        "--model",
        name,
        "--tasks",
        str(TASKS),
        "--ways",
        str(ways),
        "--shots",
        "1",
        "--seed",
        "0",
        "--predictions",
        str(out),
        "--head",
        method,
    ]
    assert fewshot_main(args) == 0
    expected = json.loads(out.read_text())["predictions"]
    data = load_dataset(card.dataset, "test")
    sampler = EpisodeSampler(data, ways, 1, 15, seed=0)
    for i in range(TASKS):
        ep = sampler.episode(i)
        support = [
            pb.LabelledImage(image=pb.Image(encoded=png(data.images[j])), label=f"class-{c}") for j, c in zip(ep.support, ep.support_labels)
        ]
        task = stub.Adapt(_adapt_request(support, name, method=method))
        assert task.method == method and task.labels == [f"class-{c}" for c in range(ways)]
        response = stub.Classify(
            pb.ClassifyRequest(task_id=task.task_id, queries=[pb.Image(encoded=png(data.images[j])) for j in ep.query])
        )
        served = [int(label.removeprefix("class-")) for label in _labels(response)]
        assert served == expected[i], (name, method, i)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # 36 M pixels, ~35 KB compressed
    return buf.getvalue()


def _raw(array: np.ndarray, dtype: str) -> pb.Image:
    return pb.Image(tensor=pb.RawTensor(shape=list(array.shape), dtype=dtype, data=array.tobytes()))


def _bad_requests(support, queries):
    """(name, rpc, request, expected status) for every kind of bad input."""
    one = support[0]
    adapt, classify = "Adapt", "Classify"
    nan = np.full((28, 28), np.nan, dtype=np.float32)
    many_ways = [pb.LabelledImage(image=one.image, label=f"c{i}") for i in range(51)]
    many_shots = [pb.LabelledImage(image=one.image, label="a") for _ in range(51)] + [support[1]]
    too_many = [pb.LabelledImage(image=one.image, label=f"c{i % 5}") for i in range(301)]
    huge = [pb.LabelledImage(image=pb.Image(encoded=b"\x89PNG" + bytes(5 << 20)), label="a"), support[1]]
    return [
        (
            "undecodable image",
            adapt,
            _adapt_request([pb.LabelledImage(image=pb.Image(encoded=b"not an image"), label="a"), support[1]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "oversized image",
            adapt,
            _adapt_request([pb.LabelledImage(image=pb.Image(encoded=bytes(2 << 20)), label="a"), support[1]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "decompression bomb",
            adapt,
            _adapt_request([pb.LabelledImage(image=pb.Image(encoded=_bomb()), label="a"), support[1]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "wrong channel count",
            adapt,
            _adapt_request([pb.LabelledImage(image=_raw(np.zeros((28, 28, 3), np.uint8), "uint8"), label="a"), support[1]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("one class", adapt, _adapt_request(support[:1]), grpc.StatusCode.INVALID_ARGUMENT),
        ("class without an image", adapt, _adapt_request([pb.LabelledImage(label="a"), *support[1:]]), grpc.StatusCode.INVALID_ARGUMENT),
        (
            "empty label",
            adapt,
            _adapt_request([pb.LabelledImage(image=one.image, label=""), *support[1:]]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("too many ways", adapt, _adapt_request(many_ways), grpc.StatusCode.INVALID_ARGUMENT),
        ("too many shots", adapt, _adapt_request(many_shots), grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown method", adapt, _adapt_request(support, method="svm"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            "setting of another method",
            adapt,
            _adapt_request(support, settings=pb.AdaptSettings(inner_steps=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "lambda out of bounds",
            adapt,
            _adapt_request(support, method="laplacianshot", settings=pb.AdaptSettings(**{"lambda": -1.0})),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("NaN raw tensor", classify, None, grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown model", adapt, _adapt_request(support, model="resnet-9000"), grpc.StatusCode.NOT_FOUND),
        ("unknown task", classify, pb.ClassifyRequest(task_id="0" * 32, queries=queries[:1]), grpc.StatusCode.NOT_FOUND),
        ("support past the server's limit", adapt, _adapt_request(too_many), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("message past the size limit", adapt, _adapt_request(huge), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("queries past the server's limit", classify, None, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ], nan


def test_bad_input_gets_its_status_and_harms_nothing(stub, omni_task):
    support, queries, _ = omni_task
    live = stub.Adapt(_adapt_request(support)).task_id
    cases, nan = _bad_requests(support, queries)
    for name, rpc, request, code in cases:
        if name == "NaN raw tensor":
            request = pb.ClassifyRequest(task_id=live, queries=[_raw(nan, "float32")])
        elif name == "queries past the server's limit":
            request = pb.ClassifyRequest(task_id=live, queries=queries[:1] * 201)
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, rpc)(request)
        assert err.value.code() == code, (name, err.value.code(), err.value.details())
        assert err.value.details(), name
        _assert_still_serves(stub, omni_task)
    # the task adapted before the bad requests is intact
    assert len(stub.Classify(pb.ClassifyRequest(task_id=live, queries=queries)).predictions) == len(queries)


def test_deleted_and_expired_tasks_are_not_found(stub, omni_task):
    support, queries, _ = omni_task
    task = stub.Adapt(_adapt_request(support))
    assert stub.GetTask(pb.GetTaskRequest(task_id=task.task_id)).support_size == len(support)
    assert stub.DeleteTask(pb.DeleteTaskRequest(task_id=task.task_id)).deleted
    short = stub.Adapt(_adapt_request(support, ttl_seconds=1))
    time.sleep(1.2)
    for task_id in (task.task_id, short.task_id):
        for call in (
            lambda: stub.Classify(pb.ClassifyRequest(task_id=task_id, queries=queries[:1])),
            lambda: stub.GetTask(pb.GetTaskRequest(task_id=task_id)),
            lambda: stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_raw_tensors_and_encoded_images_agree(stub, omniglot_test, omni_task):
    support, queries, _ = omni_task
    task = stub.Adapt(_adapt_request(support)).task_id
    ep = EpisodeSampler(omniglot_test, 5, 1, 15, seed=7).episode(0)
    arrays = [omniglot_test.images[i][..., 0] for i in ep.query]
    as_uint8 = [_raw(a, "uint8") for a in arrays]
    as_float = [_raw((a / 255.0).astype(np.float32), "float32") for a in arrays]
    ref = stub.Classify(pb.ClassifyRequest(task_id=task, queries=queries))
    for raw in (as_uint8, as_float):
        got = stub.Classify(pb.ClassifyRequest(task_id=task, queries=raw))
        assert _labels(got) == _labels(ref)
        np.testing.assert_allclose([p.probabilities for p in got.predictions], [p.probabilities for p in ref.predictions], atol=1e-5)


def test_a_query_is_classified_the_same_alone_and_merged(server, stub, omniglot_test):
    sampler = EpisodeSampler(omniglot_test, 5, 1, 4, seed=21)
    tasks = []
    for i in range(8):
        ep = sampler.episode(i)
        support = [
            pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=str(c))
            for j, c in zip(ep.support, ep.support_labels)
        ]
        method = "laplacianshot" if i % 2 else "centroid"
        tasks.append(
            (stub.Adapt(_adapt_request(support, method=method)).task_id, [pb.Image(encoded=png(omniglot_test.images[j])) for j in ep.query])
        )
    requests = [pb.ClassifyRequest(task_id=t, queries=q) for t, q in tasks]
    alone = [[list(p.probabilities) for p in stub.Classify(r).predictions] for r in requests]
    before = _batch_histogram(server)
    rounds = 3  # each request 3 times from 24 threads: those that find the model's key busy merge
    with ThreadPoolExecutor(rounds * len(requests)) as pool:
        merged = list(pool.map(lambda r: [list(p.probabilities) for p in stub.Classify(r).predictions], requests * rounds))
    calls = {le: n - before.get(le, 0.0) for le, n in _batch_histogram(server).items()}
    # 24 requests of 4 queries: fewer than 24 backbone calls, at least one with more than 4 images
    assert calls["+Inf"] < rounds * len(requests) and calls["4.0"] < calls["+Inf"], calls
    np.testing.assert_allclose(np.array(merged), np.array(alone * rounds), rtol=0, atol=1e-6)


def test_merged_classify_of_different_inner_loop_tasks_equals_per_task(server, stub, omni_bundles, tmp_path, omniglot_test):
    """``--merge-tasks on``: concurrent one-query Classify calls of 8 different CxGrad tasks run as
    stacked calls; each answer equals the per-task network call of the session server (merging off)."""
    from fewshot.tools.launch import free_port

    sampler = EpisodeSampler(omniglot_test, 5, 1, 1, seed=23)
    episodes = [sampler.episode(i) for i in range(8)]
    supports = [
        [
            pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=str(c))
            for j, c in zip(ep.support, ep.support_labels)
        ]
        for ep in episodes
    ]
    queries = [[pb.Image(encoded=png(omniglot_test.images[ep.query[0]]))] for ep in episodes]

    def probabilities(target_stub, task_id, q):
        return [list(p.probabilities) for p in target_stub.Classify(pb.ClassifyRequest(task_id=task_id, queries=q)).predictions]

    alone = [probabilities(stub, stub.Adapt(_adapt_request(s, CXGRAD)).task_id, q) for s, q in zip(supports, queries)]
    port = free_port()
    # 4 workers: a request merges when it finds its key busy, so it needs a worker while another runs
    merging = ServerProcess(
        omni_bundles,
        tmp_path / "state",
        "--workers",
        "4",
        "--warmup-tasks",
        "0",
        "--merge-tasks",
        "on",
        "--batch-delay-ms",
        "30",
        "--metrics-port",
        str(port),
    )  # torch's own thread count (--threads 0)
    merging.metrics_url = f"http://127.0.0.1:{port}/metrics"
    with merging, grpc.insecure_channel(merging.target) as channel:
        merged_stub = pb_grpc.FewShotStub(channel)
        ids = [merged_stub.Adapt(_adapt_request(s, CXGRAD)).task_id for s in supports]
        rounds, merged = 4, []  # each task 4 times from 32 threads per burst: requests that find their key busy merge
        for _ in range(5):  # whether one does is timing: burst again (up to 5 times) until some call held several tasks
            before = _batch_histogram(merging)
            with ThreadPoolExecutor(rounds * len(ids)) as pool:
                burst = list(
                    pool.map(lambda i: probabilities(merged_stub, ids[i % len(ids)], queries[i % len(ids)]), range(rounds * len(ids)))
                )
            merged += burst
            calls = {le: n - before.get(le, 0.0) for le, n in _batch_histogram(merging).items()}
            if calls["1.0"] < calls["+Inf"]:
                break
    assert calls["+Inf"] < rounds * len(ids) and calls["1.0"] < calls["+Inf"], calls  # some calls held several tasks
    # merged queries run through other batch sizes: float rounding (1.2e-5 measured on the ways-range CxGrad)
    np.testing.assert_allclose(np.array(merged), np.array(alone * (len(merged) // len(alone))), rtol=0, atol=5e-5)


def _batch_histogram(server) -> dict[str, float]:
    """Cumulative counts of backbone-call sizes (bucket bound -> calls), from the server's Prometheus metrics."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fewshot_batch_images_bucket")
    }


def test_an_acknowledged_task_survives_sigkill(exported, tmp_path, omni_task):
    support, queries, _ = omni_task
    state = tmp_path / "state"
    first = ServerProcess(exported[0], state, *SMALL).start()
    try:
        with grpc.insecure_channel(first.target) as channel:
            stub = pb_grpc.FewShotStub(channel)
            tasks = [stub.Adapt(_adapt_request(support, method=m)).task_id for m in methods_of(load_model(OMNI).card)]
            before = [stub.Classify(pb.ClassifyRequest(task_id=t, queries=queries, top_k=3)) for t in tasks]
    finally:
        first.kill()
    with ServerProcess(exported[0], state, *SMALL) as second, grpc.insecure_channel(second.target) as channel:
        after = [pb_grpc.FewShotStub(channel).Classify(pb.ClassifyRequest(task_id=t, queries=queries, top_k=3)) for t in tasks]
    assert len(tasks) >= 3 and after == before  # every head's task, restored from the store


def test_an_inner_loop_tasks_open_set_answers_are_identical_after_a_restart(omni_bundles, tmp_path, omni_task):
    """The inner-loop model's open-set score (its card's calibrated score, temperature and threshold, stored
    with each task) is restored with the task: every answer with rejection asked for is the same after SIGKILL."""
    support, queries, _ = omni_task
    state = tmp_path / "state"
    first = ServerProcess(omni_bundles, state, *SMALL).start()
    try:
        with grpc.insecure_channel(first.target) as channel:
            stub = pb_grpc.FewShotStub(channel)
            task = stub.Adapt(_adapt_request(support, model=CXGRAD)).task_id
            before = stub.Classify(pb.ClassifyRequest(task_id=task, queries=queries, top_k=3, reject_unknown=True))
    finally:
        first.kill()
    with ServerProcess(omni_bundles, state, *SMALL) as second, grpc.insecure_channel(second.target) as channel:
        after = pb_grpc.FewShotStub(channel).Classify(pb.ClassifyRequest(task_id=task, queries=queries, top_k=3, reject_unknown=True))
    assert all(p.score_name and p.threshold for p in before.predictions)
    assert after == before


def test_token_is_required_when_set(token_server, omni_task):
    support, _, _ = omni_task
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "secret-token"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Adapt(_adapt_request(support), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Adapt(_adapt_request(support), metadata=(("authorization", "Bearer secret-token"),))
        assert len(ok.task_id) == 32
        # load balancers probe without credentials
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_health_reflection_and_model_listing(server, stub):
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fewshot.v1.FewShot"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflected = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for r in reflected for s in r.list_services_response.service}
    assert {"fewshot.v1.FewShot", "grpc.health.v1.Health"} <= services
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == set(SHIPPED)
    assert models[OMNI].input.channels == 1 and models[OMNI].input.size == 28
    assert set(models[OMNI].methods) == {"centroid", "laplacianshot", "logreg"} and models[OMNI].max_ways == 50
    # every model was warmed up (each method run on a synthetic task) before the port opened
    warmed = [json.loads(line) for line in server.log.read_text().splitlines() if '"warmed up"' in line]
    assert len(warmed) == 1 and set(warmed[0]["seconds"]) == set(SHIPPED)


def test_adapt_stream_equals_adapt(stub, omni_task):
    support, queries, _ = omni_task
    chunks = [pb.AdaptChunk(model=OMNI, method="laplacianshot", support=support[:2])] + [pb.AdaptChunk(support=[s]) for s in support[2:]]
    streamed = stub.AdaptStream(iter(chunks))
    unary = stub.Adapt(_adapt_request(support, method="laplacianshot"))
    a = stub.Classify(pb.ClassifyRequest(task_id=streamed.task_id, queries=queries))
    b = stub.Classify(pb.ClassifyRequest(task_id=unary.task_id, queries=queries))
    assert streamed.labels == unary.labels and a.predictions == b.predictions


def test_concurrent_adapts_with_batching_on_equal_adapts_one_by_one(stub, omni_bundles, tmp_path, omniglot_test):
    """``--batch-adapts on``: 8 concurrent CxGrad Adapts of one shape. The shipped CxGrad (from a metric backbone,
    issue 33: frozen statistics, a fixed stem, a centroid head) does not stack (``InnerLoopAdapter.stacks``), so
    the server runs each task alone (the histogram of stacked calls stays empty) and every task classifies
    exactly as the same task adapted by the session server. The stacked loop itself: tests/test_stacked.py."""
    from fewshot.tools.launch import free_port

    sampler = EpisodeSampler(omniglot_test, 5, 1, 2, seed=29)
    episodes = [sampler.episode(i) for i in range(8)]
    supports = [
        [
            pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=str(c))
            for j, c in zip(ep.support, ep.support_labels)
        ]
        for ep in episodes
    ]
    queries = [[pb.Image(encoded=png(omniglot_test.images[j])) for j in ep.query] for ep in episodes]

    def probabilities(target_stub, task_id, q):
        return [list(p.probabilities) for p in target_stub.Classify(pb.ClassifyRequest(task_id=task_id, queries=q)).predictions]

    alone = [probabilities(stub, stub.Adapt(_adapt_request(s, CXGRAD)).task_id, q) for s, q in zip(supports, queries)]
    port = free_port()
    batching = ServerProcess(
        omni_bundles, tmp_path / "state", *SMALL, "--batch-adapts", "on", "--batch-delay-ms", "50", "--metrics-port", str(port)
    )
    with batching, grpc.insecure_channel(batching.target) as channel:
        batched_stub = pb_grpc.FewShotStub(channel)
        with ThreadPoolExecutor(len(supports)) as pool:
            ids = list(pool.map(lambda s: batched_stub.Adapt(_adapt_request(s, CXGRAD)).task_id, supports))
        batched = [probabilities(batched_stub, t, q) for t, q in zip(ids, queries)]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    calls = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fewshot_adapt_batch_tasks_bucket")
    }
    assert calls.get("+Inf", 0.0) == 0.0, calls  # no stacked call: each task ran its own loop
    assert np.array_equal(np.array(batched).argmax(-1), np.array(alone).argmax(-1))
    np.testing.assert_allclose(np.array(batched), np.array(alone), rtol=0, atol=1e-5)
