"""The HTTP/JSON API (issue 18): every RPC's HTTP twin on real tasks answers as gRPC does (the same process,
the same service core), bad input gets the mapped HTTP status with the service's message, and the README's
curl examples run as written."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.postgres import PostgresServer
from fixtures.transports import b64, http_call
from support import SHIPPED

from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import methods_of
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OMNI = "omniglot-conv4-directsum"


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.FewShotStub(channel)


def _grpc_json(message) -> dict:
    from fewshot.server.http_api import _as_json

    return _as_json(message)


def _cases() -> list[tuple[str, str]]:
    return [(name, method) for name in SHIPPED for method in methods_of(load_model(name).card)]


@pytest.mark.parametrize("name,method", _cases())
def test_every_rpc_over_http_answers_as_grpc_does(server, stub, name, method):
    """Adapt (JSON), Classify (multipart, with and without rejection), UpdateTask (multipart), GetTask,
    DeleteTask over HTTP against the same calls over gRPC, on a real test episode: the same labels,
    probabilities (bit for bit: one engine), open-set answers, versions and records."""
    data = load_dataset(load_model(name).card.dataset, "test")
    ways = 7
    ep = EpisodeSampler(data, ways, 2, 2, seed=5).episode(0)
    first = [i for i, c in enumerate(ep.support_labels) if i % 2 == 0][:5]  # one image of 5 classes
    images = [png(data.images[j]) for j in ep.support]
    labels = [f"c{c}" for c in ep.support_labels]
    queries = [png(data.images[j]) for j in ep.query]
    base = server.http_url
    status, adapted = http_call(
        "POST",
        f"{base}/v1/tasks",
        {"model": name, "method": method, "support": [{"image": {"encoded": b64(images[i])}, "label": labels[i]} for i in first]},
    )
    assert status == 200, adapted
    twin = stub.Adapt(
        pb.AdaptRequest(
            model=name, method=method, support=[pb.LabelledImage(image=pb.Image(encoded=images[i]), label=labels[i]) for i in first]
        )
    )
    assert adapted["labels"] == list(twin.labels) and adapted["method"] == twin.method
    task_id = adapted["task_id"]
    for reject in (False, True):
        fields = [("reject_unknown", "true")] if reject else []
        status, answer = http_call(
            "POST", f"{base}/v1/tasks/{task_id}/classify", files=[("images", q) for q in queries], fields=fields + [("top_k", "3")]
        )
        assert status == 200, answer
        expected = _grpc_json(
            stub.Classify(
                pb.ClassifyRequest(task_id=twin.task_id, queries=[pb.Image(encoded=q) for q in queries], top_k=3, reject_unknown=reject)
            )
        )
        for p in expected["predictions"]:
            p.pop("nearest")  # only with explain, over either transport
            if not reject:
                for key in ("unknown", "score", "threshold", "score_name"):
                    p.pop(key)
        assert answer == expected
    rest = [i for i in range(len(labels)) if i not in first]
    if load_model(name).card.limits.get("max_ways", 5) < ways:
        rest = [i for i in rest if labels[i] in adapted["labels"]]
    status, updated = http_call(
        "PATCH", f"{base}/v1/tasks/{task_id}", files=[("images", images[i]) for i in rest], fields=[("labels", labels[i]) for i in rest]
    )
    assert status == 200, updated
    grpc_updated = stub.UpdateTask(
        pb.UpdateTaskRequest(task_id=twin.task_id, add=[pb.LabelledImage(image=pb.Image(encoded=images[i]), label=labels[i]) for i in rest])
    )
    assert updated["version"] == grpc_updated.version == 2 and updated["labels"] == list(grpc_updated.labels)
    assert updated["shots"] == list(grpc_updated.shots)
    status, info = http_call("GET", f"{base}/v1/tasks/{task_id}")
    expected = _grpc_json(stub.GetTask(pb.GetTaskRequest(task_id=twin.task_id)))
    assert status == 200 and {k: v for k, v in info.items() if k not in ("task_id", "created_at", "expires_at")} == {
        k: v for k, v in expected.items() if k not in ("task_id", "created_at", "expires_at")
    }
    assert http_call("DELETE", f"{base}/v1/tasks/{task_id}") == (200, {"deleted": True})
    assert http_call("GET", f"{base}/v1/tasks/{task_id}")[0] == 404


def test_list_models_and_health_and_the_openapi_document(server, stub):
    status, models = http_call("GET", f"{server.http_url}/v1/models")
    assert status == 200 and models == _grpc_json(stub.ListModels(pb.ListModelsRequest()))
    assert http_call("GET", f"{server.http_url}/healthz") == (200, {"status": "SERVING"})
    status, spec = http_call("GET", f"{server.http_url}/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    paths = spec["paths"]
    assert {"/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/classify", "/v1/models", "/healthz"} <= set(paths)
    assert {"post"} <= set(paths["/v1/tasks"]) and {"get", "patch", "delete"} <= set(paths["/v1/tasks/{task_id}"])


def test_bad_input_gets_the_mapped_status_and_the_services_message(server, stub, omniglot_test):
    base = server.http_url
    one = png(omniglot_test.images[0])
    support = [{"image": {"encoded": b64(png(omniglot_test.images[i]))}, "label": f"c{i}"} for i in range(3)]
    _, task = http_call("POST", f"{base}/v1/tasks", {"model": OMNI, "support": support})
    cases = [
        ("JSON that does not parse", "POST", "/v1/tasks", {"body": b"{not json"}, 400, "not a AdaptRequest in JSON"),
        ("unknown field", "POST", "/v1/tasks", {"body": {"model": OMNI, "colour": 1}}, 400, "colour"),
        (
            "undecodable image",
            "POST",
            "/v1/tasks",
            {"body": {"model": OMNI, "support": [{"image": {"encoded": b64(b"not an image")}, "label": "a"}, support[1]]}},
            400,
            "image 0",
        ),
        ("one class", "POST", "/v1/tasks", {"body": {"model": OMNI, "support": support[:1]}}, 400, "at least 2"),
        (
            "files and labels of different counts",
            "POST",
            "/v1/tasks",
            {"files": [("images", one)] * 2, "fields": [("model", OMNI), ("labels", "a")]},
            400,
            "2 `images` files but 1 labels",
        ),
        (
            "an uploaded image past --max-image-mb",
            "POST",
            "/v1/tasks",  # a part past 1 MB reaches the service's check
            {"files": [("images", bytes(2 << 20)), ("images", one)], "fields": [("model", OMNI), ("labels", "a"), ("labels", "b")]},
            400,
            "at most 1048576 are allowed",
        ),
        ("unknown model", "POST", "/v1/tasks", {"body": {"model": "resnet-9000", "support": support}}, 404, "resnet-9000"),
        ("unknown task", "GET", "/v1/tasks/" + "0" * 32, {}, 404, "unknown"),
        (
            "queries past the server's limit",
            "POST",
            f"/v1/tasks/{task['task_id']}/classify",
            {"files": [("images", one)] * 201},
            413,
            "200",
        ),
        (
            "a stale expected version",
            "PATCH",
            f"/v1/tasks/{task['task_id']}",
            {"files": [("images", one)], "fields": [("labels", "c0"), ("expected_version", "7")]},
            409,
            "version 1",
        ),
    ]
    for what, method, path, kw, status, message in cases:
        got, answer = http_call(method, base + path, **kw)
        assert got == status and message in answer["message"], (what, got, answer)
        assert answer["code"] == {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 409: "ABORTED"}[status]
    # the same refusal over gRPC carries the same message
    with pytest.raises(grpc.RpcError) as err:
        stub.Adapt(pb.AdaptRequest(model="resnet-9000", support=[pb.LabelledImage(image=pb.Image(encoded=one), label="a")] * 2))
    assert (
        err.value.details()
        == http_call("POST", f"{base}/v1/tasks", {"model": "resnet-9000", "support": [{"image": {"encoded": b64(one)}, "label": "a"}] * 2})[
            1
        ]["message"]
    )
    # a body claiming more than the server takes is refused before it is read
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/tasks")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(300 << 20))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "at most" in json.loads(answer.read())["message"]
    conn.close()
    assert http_call("GET", f"{base}/healthz")[0] == 200  # and it keeps serving


def test_tokens_rates_and_a_database_outage_map_to_401_429_and_503(omni_bundles, tmp_path, omniglot_test):
    support = [{"image": {"encoded": b64(png(omniglot_test.images[i]))}, "label": f"c{i}"} for i in range(3)]
    port = free_port()
    with (
        PostgresServer() as pg,
        ServerProcess(
            omni_bundles,
            tmp_path / "state",
            "--warmup-tasks",
            "0",
            "--store",
            pg.url,
            "--token",
            "tok",
            "--tenant-rps",
            "2",
            "--http-port",
            str(port),
        ),
    ):
        base, auth = f"http://127.0.0.1:{port}", {"authorization": "Bearer tok"}
        status, answer = http_call("GET", f"{base}/v1/models")
        assert status == 401 and answer["code"] == "UNAUTHENTICATED"
        assert http_call("GET", f"{base}/v1/models", headers={"authorization": "Bearer wrong"})[0] == 401
        statuses = [http_call("GET", f"{base}/v1/models", headers=auth)[0] for _ in range(8)]
        assert statuses[0] == 200 and 429 in statuses, statuses
        time.sleep(1.5)
        status, task = http_call("POST", f"{base}/v1/tasks", {"model": OMNI, "support": support}, headers=auth)
        assert status == 200, task
        pg.stop()
        status, answer = http_call("GET", f"{base}/v1/tasks/{task['task_id']}", headers=auth)
        assert status == 503 and answer["code"] == "UNAVAILABLE" and "task database" in answer["message"]
        pg.start()


def test_the_readme_curl_examples_run_as_written(server, omniglot_test, tmp_path):
    """The README's HTTP block, run by bash against the test server (its port for 8080), on real PNGs."""
    block = re.search(r"```bash\n(# HTTP/JSON API.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    ep = EpisodeSampler(omniglot_test, 3, 1, 1, seed=8).episode(0)
    for name, index in zip(("a1", "b1", "c1"), ep.support):
        (tmp_path / f"{name}.png").write_bytes(png(omniglot_test.images[index]))
    (tmp_path / "q1.png").write_bytes(png(omniglot_test.images[ep.query[0]]))
    script = block.replace("http://127.0.0.1:8080", server.http_url)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert any("predictions" in a and a["predictions"][0]["ranked"][0]["label"] in ("alpha", "beta", "gamma") for a in answers)
    assert {"deleted": True} in answers and any(a.get("version") == 2 for a in answers)
    assert np.isfinite([a["predictions"][0]["score"] for a in answers if "predictions" in a]).all()


def test_the_openapi_document_describes_every_body_answer_and_status(server):
    """Issue 34: request bodies (JSON and multipart) from the protobuf messages, typed answers, every status the
    service answers with its error body and never FastAPI's 422; a 405 names every method of the path."""
    with urllib.request.urlopen(server.http_url + "/openapi.json", timeout=30) as answer:
        doc = json.loads(answer.read())
    adapt = doc["paths"]["/v1/tasks"]["post"]
    assert set(adapt["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert adapt["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AdaptRequest"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["AdaptRequest"]["properties"]) == {f.name for f in pb.AdaptRequest.DESCRIPTOR.fields}
    assert "task_id" not in schemas["ClassifyBody"]["properties"]
    for path in doc["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"]
    for status in ("400", "401", "404", "409", "412", "413", "429", "500", "503", "504"):
        assert adapt["responses"][status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    request = urllib.request.Request(server.http_url + "/v1/tasks/abc", method="OPTIONS")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 405 and err.value.headers["Allow"] == "DELETE, GET, PATCH"
    assert json.loads(err.value.read())["code"] == "UNIMPLEMENTED"
    status, answer = http_call("POST", f"{server.http_url}/v1/tasks/{'a' * 32}/classify", {"task_id": "b" * 32, "queries": []})
    assert status == 400 and "comes from the path" in answer["message"]


def test_schemathesis_finds_nothing_on_the_live_document(server, tmp_path):
    """Every schemathesis check (pinned in the test extra) on the live document, a bounded number of examples per
    operation: no server error, no undocumented status, answers and headers as documented
    (tests/schemathesis.toml says which statuses a schema-valid body may still get)."""
    st = Path(__import__("sys").executable).with_name("st")
    run = subprocess.run(
        [
            str(st),
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            server.http_url + "/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "10",
            "--seed",
            "0",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    tail = run.stdout[-4000:]
    assert run.returncode == 0, tail
    assert re.search(r"\d+ generated, \d+ passed", tail) and "failure" not in tail.split("SUMMARY")[-1].lower(), tail
