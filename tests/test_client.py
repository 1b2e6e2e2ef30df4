"""The Python client SDK and CLI (clients/python): pure parts directly, the rest against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png_bytes
from fewshot.tools.launch import free_port as closed_port  # nothing listens on it
from fewshot_client import (
    AsyncFewShotClient,
    FewShotClient,
    InvalidArgument,
    NotFound,
    Prediction,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    errors,
    to_image_proto,
)
from fewshot_client.cli import main as cli_main
from fewshot_client.messages import RetryPolicy, adapt_chunks, adapt_request

OMNIGLOT = "omniglot-conv4-directsum"
TINY = "tinyimagenet-conv4-sce-nca-directsum"


# -- pure parts: image encoding -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_uint8_array_round_trips_as_raw_tensor(shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    tensor = to_image_proto(array).tensor
    assert tensor.dtype == "uint8" and list(tensor.shape) == list(shape)
    np.testing.assert_array_equal(np.frombuffer(tensor.data, np.uint8).reshape(shape), array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_float_arrays_are_sent_as_little_endian_float32_in_c_order(dtype):
    array = np.random.default_rng(1).random((4, 6, 3)).astype(dtype).transpose(1, 0, 2)  # not C-contiguous
    tensor = to_image_proto(array).tensor
    assert tensor.dtype == "float32" and list(tensor.shape) == [6, 4, 3]
    np.testing.assert_array_equal(np.frombuffer(tensor.data, "<f4").reshape(6, 4, 3), array.astype(np.float32))


def test_paths_and_bytes_are_sent_as_they_are(tmp_path):
    data = png_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4, 1))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    for x in (str(path), path, data, bytearray(data), memoryview(data)):
        assert to_image_proto(x).encoded == data


@pytest.mark.parametrize("mode,shape", [("L", (6, 5)), ("RGB", (6, 5, 3)), ("RGBA", (6, 5, 4))])
def test_pil_images_are_encoded_losslessly(mode, shape):
    array = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    encoded = to_image_proto(Image.fromarray(array, mode)).encoded
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == "PNG" and decoded.mode == mode
    np.testing.assert_array_equal(np.asarray(decoded), array)


@pytest.mark.parametrize("bad", [[[0, 1], [2, 3]], 3, None, np.zeros((2, 2), np.int64), np.zeros((2, 2), bool)])
def test_unsupported_inputs_raise_type_error_saying_what_is_accepted(bad):
    with pytest.raises(TypeError, match="file path.*PIL image.*numpy array"):
        to_image_proto(bad)


@pytest.mark.parametrize("shape", [(4,), (1, 2, 2, 3)])
def test_arrays_of_the_wrong_rank_raise_value_error(shape):
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, C\)"):
        to_image_proto(np.zeros(shape, np.uint8))


def test_missing_file_raises_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        to_image_proto(tmp_path / "missing.png")


# -- pure parts: requests, chunks, errors, retry policy -------------------------------------------


def test_adapt_request_checks_labels_and_sets_only_given_settings():
    images = [np.zeros((2, 2), np.uint8)] * 2
    request = adapt_request(images, ["a", "b"], "m", None, {"lambda": 0.5}, None)
    assert dict(request.settings.values) == {"lambda": struct_pb2.Value(number_value=0.5)}
    assert adapt_request(images, ["a", "b"], "m", None, {"bn": "support"}, None).settings.values["bn"].string_value == "support"
    assert request.method == "" and request.ttl_seconds == 0 and [s.label for s in request.support] == ["a", "b"]
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        adapt_request(images, ["a"], "m", None, {}, None)
    with pytest.raises(TypeError, match="labels must be strings"):
        adapt_request(images, ["a", 1], "m", None, {}, None)


def test_adapt_chunks_are_bounded_and_carry_settings_first():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(10)]
    request = adapt_request(images, [f"c{i % 3}" for i in range(10)], "m", "centroid", {"inner_steps": 2, "lambda": 0.1}, 60)
    chunks = adapt_chunks(request, 500)
    assert len(chunks) == 10 and all(len(c.support) == 1 for c in chunks)
    assert (chunks[0].model, chunks[0].method, chunks[0].ttl_seconds) == ("m", "centroid", 60)
    assert chunks[0].settings == request.settings and not chunks[1].model
    assert [s for c in chunks for s in c.support] == list(request.support)
    packed = adapt_chunks(request, 1000)
    assert len(packed) == 5 and all(c.ByteSize() <= 1000 for c in packed)
    assert len(adapt_chunks(request, 1 << 20)) == 1


@pytest.mark.parametrize(
    "code,cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, errors.ServiceError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.ABORTED, errors.Aborted),
        (grpc.StatusCode.UNKNOWN, errors.ServiceError),
    ],
)
def test_rpc_errors_map_to_typed_exceptions(code, cls):
    rpc_error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="what went wrong")
    error = errors.from_rpc_error(rpc_error)
    assert type(error) is cls and isinstance(error, errors.FewShotError)
    assert error.code == code and error.details == "what went wrong"
    assert str(error) == f"FEWSHOT {code.name}: what went wrong"


def test_retry_policy_retries_only_unavailable_with_exponential_backoff():
    policy = RetryPolicy(retries=3, backoff=0.5)
    unavailable = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
    assert [policy.delay_after(unavailable, i) for i in range(3)] == [0.5, 1.0, 2.0]
    with pytest.raises(Unavailable):
        policy.delay_after(unavailable, 3)
    not_found = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata())
    with pytest.raises(NotFound):
        policy.delay_after(not_found, 0)


# -- no server: retries against a closed port, CLI usage and connection errors --------------------


def test_closed_port_raises_unavailable_after_the_retries():
    client = FewShotClient(f"127.0.0.1:{closed_port()}", retries=3, backoff=0.05)
    start = time.monotonic()
    with client, pytest.raises(Unavailable) as info:
        client.models()
    assert time.monotonic() - start >= 0.05 + 0.1 + 0.2
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_async_closed_port_raises_unavailable_after_the_retries():
    async def run() -> float:
        start = time.monotonic()
        async with AsyncFewShotClient(f"127.0.0.1:{closed_port()}", retries=2, backoff=0.05) as client:
            with pytest.raises(Unavailable):
                await client.models()
        return time.monotonic() - start

    assert asyncio.run(run()) >= 0.05 + 0.1


def test_cli_usage_errors_exit_2(capsys):
    assert cli_main(["classify", "--task", "x"]) == 2
    assert cli_main(["frobnicate"]) == 2
    assert "usage: fewshot-client" in capsys.readouterr().err


def test_cli_unreachable_server_is_one_error_line_exit_1():
    result = run_cli("--target", f"127.0.0.1:{closed_port()}", "models")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("fewshot-client: error: FEWSHOT UNAVAILABLE: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# -- against a real server ------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot_client.cli", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def episode(omniglot_test):
    """A real 5-way 1-shot Omniglot task: support (5, 28, 28, 1), labels, queries (25, 28, 28, 1), truth."""
    ep = EpisodeSampler(omniglot_test, 5, 1, 5, seed=3).episode(0)
    names = [f"char-{c}" for c in ep.classes]
    return (
        omniglot_test.images[ep.support],
        [names[i] for i in ep.support_labels],
        omniglot_test.images[ep.query],
        [names[i] for i in ep.query_labels],
    )


@pytest.fixture(scope="module")
def client(server):
    with FewShotClient(server.target) as c:
        yield c


def as_form(images: np.ndarray, form: str, folder: Path) -> list:
    """The same images as numpy arrays, PNG files, PNG bytes or PIL images."""
    if form == "numpy":
        return list(images)
    if form == "float":
        return [x.astype(np.float64) / 255.0 for x in images]
    if form == "bytes":
        return [png_bytes(x) for x in images]
    if form == "pil":
        return [Image.fromarray(x[..., 0]) for x in images]
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(len(images))]
    for path, x in zip(paths, images):
        path.write_bytes(png_bytes(x))
    return paths


def assert_same(a: list[Prediction], b: list[Prediction], atol: float = 1e-5) -> None:
    assert [p.label for p in a] == [p.label for p in b]
    for p, q in zip(a, b):
        assert p.scores.keys() == q.scores.keys()
        np.testing.assert_allclose([p.scores[k] for k in p.scores], [q.scores[k] for k in p.scores], atol=atol)


def test_paths_bytes_pil_and_numpy_give_the_same_predictions(client, episode, tmp_path):
    support, labels, queries, truth = episode
    results = {}
    for form in ("numpy", "float", "paths", "bytes", "pil"):
        task = client.adapt(as_form(support, form, tmp_path / f"s-{form}"), labels, OMNIGLOT)
        assert task.labels == list(dict.fromkeys(labels)) and task.model == OMNIGLOT
        assert task.method in ("centroid", "laplacianshot")
        assert task.support_accuracy == 1.0 and task.adapt_seconds >= 0 and task.expires_at > time.time()
        results[form] = task.classify(as_form(queries, form, tmp_path / f"q-{form}"), top_k=3)
    reference = results["numpy"]
    assert np.mean([p.label == t for p, t in zip(reference, truth)]) >= 0.8
    for p in reference:
        assert p.scores.keys() == set(labels) and sum(p.scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert len(p.ranked) == 3 and p.ranked[0] == (p.label, p.score) and p.score == max(p.scores.values())
        assert [s for _, s in p.ranked] == sorted((s for _, s in p.ranked), reverse=True)
        assert all(p.scores[k] == pytest.approx(s) for k, s in p.ranked)
    for form, predictions in results.items():
        assert_same(predictions, reference, atol=1e-4 if form == "float" else 1e-5)


def test_stream_gives_the_same_predictions_as_unary(client, server, episode):
    support, labels, queries, _ = episode
    unary = client.adapt(list(support), labels, OMNIGLOT, method="laplacianshot", lam=0.5, ttl_seconds=600)
    streamed = client.adapt(list(support), labels, OMNIGLOT, method="laplacianshot", lam=0.5, ttl_seconds=600, stream=True)
    assert (streamed.labels, streamed.method) == (unary.labels, "laplacianshot")
    assert streamed.expires_at == pytest.approx(time.time() + 600, abs=60)
    assert_same(streamed.classify(list(queries)), unary.classify(list(queries)))
    # A tiny message limit makes the client stream on its own, one image per chunk.
    with FewShotClient(server.target, max_message_mb=0.004) as small:
        request = adapt_request(list(support), labels, OMNIGLOT, None, {}, None)
        assert len(adapt_chunks(request, int(0.004 * 2**20) // 4)) == 5
        chunked = small.adapt(list(support), labels, OMNIGLOT, method="laplacianshot", lam=0.5)
        with pytest.raises(ResourceExhausted):
            small.adapt(list(support) * 2, labels * 2, OMNIGLOT, stream=False)  # 8 KB in one message
    assert_same(client.classify(chunked.id, list(queries)), unary.classify(list(queries)))


def test_task_info_lookup_and_delete(client, episode):
    support, labels, queries, _ = episode
    task = client.adapt(list(support), labels, OMNIGLOT, ttl_seconds=300)
    info = task.info()
    assert (info.task_id, info.model, info.method, info.labels) == (task.id, OMNIGLOT, task.method, task.labels)
    assert info.support_size == 5 and info.created_at <= time.time() and info.expires_at == pytest.approx(task.expires_at)
    again = client.task(task.id)
    assert (again.id, again.labels, again.method, again.expires_at) == (task.id, task.labels, task.method, task.expires_at)
    assert again.support_accuracy is None
    assert_same(again.classify(list(queries[:3])), task.classify(list(queries[:3])))
    assert task.delete() is True
    with pytest.raises(NotFound, match=r"^FEWSHOT NOT_FOUND: "):
        task.classify(list(queries[:1]))
    with pytest.raises(NotFound):
        client.task(task.id)
    with pytest.raises(NotFound):
        task.delete()


def test_models_lists_both_models_with_input_specs(client):
    models = {m.name: m for m in client.models()}
    omniglot, tiny = models[OMNIGLOT], models[TINY]
    assert (omniglot.input.channels, omniglot.input.size) == (1, 28)
    assert (tiny.input.channels, tiny.input.size) == (3, 64)
    assert {"centroid", "laplacianshot"} <= set(omniglot.methods) and omniglot.default_method in omniglot.methods
    assert omniglot.family == "metric" and omniglot.min_ways >= 2 and omniglot.max_ways >= 20
    for m in (omniglot, tiny):
        assert len(m.input.mean) == len(m.input.std) == m.input.channels and m.input.resize


def test_server_errors_are_typed(client, server, episode):
    support, labels, _, _ = episode
    with pytest.raises(InvalidArgument, match="at least 2 classes"):
        client.adapt(list(support), ["same"] * 5, OMNIGLOT)
    with pytest.raises(InvalidArgument):
        client.adapt([b"not an image"] + list(support[1:]), labels, OMNIGLOT)
    with pytest.raises(InvalidArgument):
        client.adapt(list(support), labels, OMNIGLOT, method="no-such-method")
    with pytest.raises(NotFound):
        client.adapt(list(support), labels, "no-such-model")
    with pytest.raises(NotFound):
        client.classify("0" * 32, list(support[:1]))
    with pytest.raises(errors.DeadlineExceeded), FewShotClient(server.target, timeout=1e-4) as hurried:
        hurried.adapt(list(support), labels, OMNIGLOT)


def test_tinyimagenet_rgb_task(client):
    rng = np.random.default_rng(4)
    support = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    task = client.adapt(support, ["a", "b"], TINY, method="centroid")
    predictions = task.classify([Image.fromarray(support[0]), support[1]], top_k=2)
    assert [p.label for p in predictions] == ["a", "b"] and all(len(p.ranked) == 2 for p in predictions)


def test_async_client_gives_the_same_predictions(client, server, episode):
    support, labels, queries, _ = episode
    task = client.adapt(list(support), labels, OMNIGLOT)
    expected = task.classify(list(queries), top_k=2)

    async def run():
        async with AsyncFewShotClient(server.target) as aclient:
            atask = await aclient.adapt(list(support), labels, OMNIGLOT)
            streamed = await aclient.adapt(list(support), labels, OMNIGLOT, stream=True)
            results = await asyncio.gather(
                atask.classify(list(queries), top_k=2),
                streamed.classify(list(queries), top_k=2),
                aclient.classify(task.id, list(queries), top_k=2),
            )
            info = await atask.info()
            looked_up = await aclient.task(atask.id)
            models = await aclient.models()
            deleted = await atask.delete()
            with pytest.raises(NotFound):
                await atask.classify(list(queries[:1]))
            return results, info, looked_up, models, deleted

    results, info, looked_up, models, deleted = asyncio.run(run())
    for predictions in results:
        assert_same(predictions, expected)
        assert [p.ranked[1][0] for p in predictions] == [p.ranked[1][0] for p in expected]
    assert info.support_size == 5 and looked_up.labels == task.labels and deleted is True
    assert {OMNIGLOT, TINY} <= {m.name for m in models}


def test_cli_adapt_classify_models_delete(client, server, episode, tmp_path):
    support, labels, queries, _ = episode
    root = tmp_path / "support"
    for i, (x, label) in enumerate(zip(support, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.png").write_bytes(png_bytes(x))
    query_paths = as_form(queries[:6], "paths", tmp_path / "queries")
    target = ["--target", server.target]

    adapted = run_cli(
        *target, "adapt", "--model", OMNIGLOT, "--support", str(root), "--method", "laplacianshot", "--lam", "0.5", "--ttl", "600"
    )
    assert adapted.returncode == 0, adapted.stderr
    task_id = adapted.stdout.strip()
    assert adapted.stdout == task_id + "\n" and len(task_id) == 32
    assert adapted.stderr.count("\n") == 1 and OMNIGLOT in adapted.stderr
    task = client.task(task_id)
    assert sorted(task.labels) == sorted(set(labels)) and task.method == "laplacianshot"

    classified = run_cli(*target, "classify", "--task", task_id, *map(str, query_paths))
    assert classified.returncode == 0, classified.stderr
    rows = [line.split("\t") for line in classified.stdout.splitlines()]
    expected = task.classify(query_paths)
    assert [r[0] for r in rows] == list(map(str, query_paths))
    assert [r[1] for r in rows] == [p.label for p in expected]
    np.testing.assert_allclose([float(r[2]) for r in rows], [p.score for p in expected], atol=1e-5)

    as_json = run_cli(*target, "classify", "--task", task_id, "--top-k", "2", "--json", str(query_paths[0]))
    record = json.loads(as_json.stdout)
    assert record["label"] == expected[0].label and len(record["ranked"]) == 2 and len(record["scores"]) == 5

    listed = run_cli(*target, "models")
    assert listed.returncode == 0 and {line.split("\t")[0] for line in listed.stdout.splitlines()} >= {OMNIGLOT, TINY}

    assert run_cli(*target, "delete", "--task", task_id).returncode == 0
    gone = run_cli(*target, "classify", "--task", task_id, str(query_paths[0]))
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith("fewshot-client: error: FEWSHOT NOT_FOUND: ") and gone.stderr.count("\n") == 1

    missing = run_cli(*target, "adapt", "--model", OMNIGLOT, "--support", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_token_server_requires_the_token(token_server, episode):
    support, labels, queries, _ = episode
    for token in (None, "wrong-token"):
        with FewShotClient(token_server.target, token=token) as anonymous, pytest.raises(Unauthenticated):
            anonymous.models()
    with FewShotClient(token_server.target, token="secret-token") as authorised:
        assert OMNIGLOT in {m.name for m in authorised.models()}
        task = authorised.adapt(list(support), labels, OMNIGLOT, stream=True)
        assert len(task.classify(list(queries[:2]))) == 2 and task.delete()
    denied = run_cli("--target", token_server.target, "models")
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    assert run_cli("--target", token_server.target, "--token", "secret-token", "models").returncode == 0
