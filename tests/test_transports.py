"""One Adapt/Classify core for every transport (issue 35): the same bad requests, sent over gRPC, the HTTP/JSON
API and the Triton models (``fewshot_adapt``/``fewshot_classify`` in a real ``tritonserver``), are refused with
the same status and the same message, because all three call ``server/requests.py``.

Triton's python backend has no RESOURCE_EXHAUSTED; the Triton models answer INVALID_ARG there (docs/triton.md)."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient
from fixtures.transports import http_call, triton_adapt, triton_adapt_inputs, triton_scalar, triton_strings
from google.protobuf import json_format, struct_pb2
from tritonclient.utils import InferenceServerException

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI, CXGRAD = "omniglot-conv4-directsum", "omniglot-conv4-cxgrad"
UNKNOWN_TASK = "0" * 32
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 412}
#: A placeholder for the id of a live task of the transport a case is sent over.
LIVE = "live"


@pytest.fixture(scope="module")
def support(omniglot_test) -> tuple[list[pb.LabelledImage], list[bytes]]:
    """A real 5-way 1-shot Omniglot task: (support, query PNGs)."""
    ep = EpisodeSampler(omniglot_test, 5, 1, 1, seed=3).episode(0)
    return (
        [
            pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[i])), label=f"c{c}")
            for i, c in zip(ep.support, ep.support_labels)
        ],
        [png(omniglot_test.images[i]) for i in ep.query],
    )


def _adapt_cases(support: list[pb.LabelledImage]) -> list[tuple[str, pb.AdaptRequest, str]]:
    def adapt(model: str = OMNI, method: str = "", items=None, **values) -> pb.AdaptRequest:
        settings = pb.AdaptSettings(values={k: json_format.ParseDict(v, struct_pb2.Value()) for k, v in values.items()})
        return pb.AdaptRequest(model=model, method=method, support=support if items is None else items, settings=settings)

    relabelled = [pb.LabelledImage(image=s.image, label=label) for s, label in zip(support, ["", *[s.label for s in support[1:]]])]
    broken = [pb.LabelledImage(image=pb.Image(encoded=b"not an image"), label=support[0].label), *support[1:]]
    one_class = [pb.LabelledImage(image=s.image, label="a") for s in support]
    return [
        ("unknown model", adapt(model="resnet-9000"), "NOT_FOUND"),
        ("no model", adapt(model=""), "INVALID_ARGUMENT"),
        ("one class", adapt(items=one_class), "INVALID_ARGUMENT"),
        ("empty label", adapt(items=relabelled), "INVALID_ARGUMENT"),
        ("undecodable image", adapt(items=broken), "INVALID_ARGUMENT"),
        ("unknown method", adapt(method="svm"), "INVALID_ARGUMENT"),
        ("setting out of bounds", adapt(model=CXGRAD, inner_steps=1000), "INVALID_ARGUMENT"),
        ("setting not a number", adapt(model=CXGRAD, inner_steps="many"), "INVALID_ARGUMENT"),
        ("setting of another method", adapt(method="centroid", **{"lambda": 0.5}), "INVALID_ARGUMENT"),
        ("unknown setting", adapt(colour=3), "INVALID_ARGUMENT"),
    ]


def _classify_cases(queries: list[bytes]) -> list[tuple[str, pb.ClassifyRequest, str]]:
    images = [pb.Image(encoded=b) for b in queries]
    return [
        ("unknown task", pb.ClassifyRequest(task_id=UNKNOWN_TASK, queries=images), "NOT_FOUND"),
        ("malformed task id", pb.ClassifyRequest(task_id="not-a-task", queries=images), "NOT_FOUND"),
        (
            "threshold and target recall",
            pb.ClassifyRequest(task_id=LIVE, queries=images, reject_unknown=True, threshold=0.5, target_recall=0.9),
            "INVALID_ARGUMENT",
        ),
        (
            "target recall out of range",
            pb.ClassifyRequest(task_id=LIVE, queries=images, reject_unknown=True, target_recall=1.5),
            "INVALID_ARGUMENT",
        ),
        ("undecodable query", pb.ClassifyRequest(task_id=LIVE, queries=[pb.Image(encoded=b"GIF89a")]), "INVALID_ARGUMENT"),
        ("no queries", pb.ClassifyRequest(task_id=LIVE), "INVALID_ARGUMENT"),
    ]


# -- each transport: a request -> (status name, message) ------------------------------------------------------
def _grpc(stub, request) -> tuple[str, str]:
    call = stub.Adapt if isinstance(request, pb.AdaptRequest) else stub.Classify
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value.code().name, err.value.details()


def _http(base: str, request) -> tuple[str, str]:
    body = json_format.MessageToDict(request, preserving_proto_field_name=True)
    if isinstance(request, pb.AdaptRequest):
        status, answer = http_call("POST", f"{base}/v1/tasks", body)
    else:
        status, answer = http_call("POST", f"{base}/v1/tasks/{body.pop('task_id', '')}/classify", body)
    assert status == HTTP_STATUS[answer["code"]], (status, answer)
    return answer["code"], answer["message"]


def _triton(client, request) -> tuple[str, str]:
    if isinstance(request, pb.AdaptRequest):
        settings = json_format.MessageToDict(request.settings).get("values") if request.settings.values else None
        name, inputs = (
            "fewshot_adapt",
            triton_adapt_inputs(
                request.model,
                [s.label for s in request.support],
                [s.image.encoded for s in request.support],
                request.method or None,
                settings,
            ),
        )
    else:
        name = "fewshot_classify"
        inputs = [triton_strings("task_id", [request.task_id]), triton_strings("images", [q.encoded for q in request.queries])]
        inputs += [triton_scalar("reject_unknown", True)] if request.reject_unknown else []
        inputs += [triton_scalar(f, getattr(request, f)) for f in ("threshold", "target_recall") if request.HasField(f)]
    with pytest.raises(InferenceServerException) as err:
        client.infer(name, inputs)
    return err.value.status().removeprefix("StatusCode."), err.value.message()


def _with_task(request, task_id: str):
    """``request`` with :data:`LIVE` replaced by ``task_id``."""
    if isinstance(request, pb.ClassifyRequest) and request.task_id == LIVE:
        copy = pb.ClassifyRequest()
        copy.CopyFrom(request)
        copy.task_id = task_id
        return copy
    return request


def test_the_same_bad_requests_are_refused_alike_on_grpc_http_and_triton(server, triton, support):
    items, queries = support
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        served = stub.Adapt(pb.AdaptRequest(model=OMNI, support=items)).task_id
        in_triton, _ = triton_adapt(client, OMNI, [s.label for s in items], [s.image.encoded for s in items])
        for what, request, status in _adapt_cases(items) + _classify_cases(queries):
            over_grpc = _grpc(stub, _with_task(request, served))
            over_http = _http(server.http_url, _with_task(request, served))
            in_triton_status, in_triton_message = _triton(client, _with_task(request, in_triton))
            assert over_grpc[0] == status, (what, over_grpc)
            assert over_http == over_grpc, (what, over_http, over_grpc)
            assert in_triton_status == status, (what, in_triton_status, in_triton_message)
            # the messages agree up to the task's own id (each transport classifies its own live task)
            assert over_grpc[1].replace(served, LIVE) in in_triton_message.replace(in_triton, LIVE), (what, over_grpc, in_triton_message)
    client.close()


def test_a_task_of_a_model_version_not_loaded_is_refused_alike_on_grpc_http_and_triton(server, triton, support):
    """A stored task pinned to a version no server loads (as after its model was replaced: issue 36) is
    FAILED_PRECONDITION over gRPC, 412 over HTTP and, Triton having no such code, INVALID_ARG with the message
    starting ``FAILED_PRECONDITION:`` from the Triton models: the same message, naming both versions."""
    import dataclasses

    from fewshot.server.store import TaskStore

    items, queries = support
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    gone = "f" * 64
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        served = stub.Adapt(pb.AdaptRequest(model=OMNI, support=items)).task_id
        in_triton, _ = triton_adapt(client, OMNI, [s.label for s in items], [s.image.encoded for s in items])
        pinned = "a1" * 16  # the same id in both stores, pinned to a version that is not loaded
        for state_dir, task_id in ((server.state_dir, served), (triton.state_dir, in_triton)):
            store = TaskStore(state_dir)
            store.put(dataclasses.replace(store.record(task_id), task_id=pinned, model_version="0", model_digest=gone))
            store.close()
        request = pb.ClassifyRequest(task_id=pinned, queries=[pb.Image(encoded=q) for q in queries])
        answers = {"grpc": _grpc(stub, request), "http": _http(server.http_url, request), "triton": _triton(client, request)}
    code, message = answers["grpc"]
    assert code == "FAILED_PRECONDITION" and "version 0 (sha256 ffffffffffff)" in message and "it loads version 1 (sha256" in message
    assert answers["http"] == (code, message)
    assert answers["triton"] == ("INVALID_ARGUMENT", f"FAILED_PRECONDITION: {message}")
