"""A setting declared once reaches every path (issue 35): a plugin module, named in ``$FEWSHOT_PLUGINS`` and
touching no file of this repository, adds ``knn`` (LaplacianShot's neighbour count, an integer in 1..10) to the
LaplacianShot head. ``ListModels``, the OpenAPI document and ``fewshot-client models`` list it; gRPC, HTTP (JSON
and multipart), the SDK (sync and asyncio), ``fewshot-client adapt --set``, ``fewshot eval --set`` and the Triton
``fewshot_adapt`` model accept it within its bounds and refuse it outside them with the same message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from fixtures.transports import b64, http_call
from google.protobuf import struct_pb2
from support import SMALL

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_client import AsyncFewShotClient, FewShotClient, InvalidArgument
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI = "omniglot-conv4-directsum"
PLUGIN = '''"""LaplacianShot's neighbour count as a per-request setting: one declaration, nothing else edited."""
from fewshot.models.heads.laplacian_shot import LaplacianShotHead
from fewshot.models.settings import Setting

_from_card = LaplacianShotHead.from_card.__func__


def _from_card_with_knn(cls, cfg, shots, center, knn=None, **settings):
    head = _from_card(cls, cfg, shots, center, **settings)
    if knn is not None:
        head.knn = knn
    return head


LaplacianShotHead.settings = {**LaplacianShotHead.settings, "knn": Setting("knn", "knn", 1, 10, integer=True)}
LaplacianShotHead.from_card = classmethod(_from_card_with_knn)
'''
#: What every path answers to knn=50.
OUT_OF_BOUNDS = "knn must be an integer in 1..10, got 50"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "knn_setting.py").write_text(PLUGIN)
    return {"FEWSHOT_PLUGINS": "knn_setting", "PYTHONPATH": str(folder)}


@pytest.fixture(scope="module")
def knn_server(omni_bundles, tmp_path_factory, plugin_env):
    port = free_port()
    with ServerProcess(omni_bundles, tmp_path_factory.mktemp("knn-state"), *SMALL, "--http-port", str(port), env=plugin_env) as proc:
        proc.http_url = f"http://127.0.0.1:{port}"
        yield proc


@pytest.fixture(scope="module")
def task(omniglot_test) -> tuple[list[bytes], list[str], list[bytes]]:
    """A real 5-way 2-shot Omniglot task: (support PNGs, labels, query PNGs)."""
    ep = EpisodeSampler(omniglot_test, 5, 2, 2, seed=11).episode(0)
    return (
        [png(omniglot_test.images[i]) for i in ep.support],
        [f"c{c}" for c in ep.support_labels],
        [png(omniglot_test.images[i]) for i in ep.query],
    )


def _grpc_adapt(stub, task, method: str, value: struct_pb2.Value) -> pb.AdaptResponse:
    images, labels, _ = task
    return stub.Adapt(
        pb.AdaptRequest(
            model=OMNI,
            method=method,
            settings=pb.AdaptSettings(values={"knn": value}),
            support=[pb.LabelledImage(image=pb.Image(encoded=b), label=y) for b, y in zip(images, labels)],
        )
    )


def test_grpc_lists_accepts_and_bounds_the_new_setting(knn_server, task):
    with knn_server.channel() as channel:
        stub = pb_grpc.FewShotStub(channel)
        model = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}[OMNI]
        knn = {s.name: s for s in model.settings}["knn"]
        assert (knn.kind, knn.min, knn.max, list(knn.methods)) == ("integer", 1, 10, ["laplacianshot"])
        adapted = _grpc_adapt(stub, task, "laplacianshot", struct_pb2.Value(number_value=5))
        answer = stub.Classify(pb.ClassifyRequest(task_id=adapted.task_id, queries=[pb.Image(encoded=b) for b in task[2]]))
        assert len(answer.predictions) == len(task[2])
        # an old client's request (the field that predates `values`) still adapts
        images, labels, _ = task
        old = pb.AdaptRequest(
            model=OMNI,
            method="laplacianshot",
            settings=pb.AdaptSettings(**{"lambda": 0.5}),
            support=[pb.LabelledImage(image=pb.Image(encoded=b), label=y) for b, y in zip(images, labels)],
        )
        assert stub.Adapt(old).method == "laplacianshot"
        for method, value, says in [
            ("laplacianshot", struct_pb2.Value(number_value=50), OUT_OF_BOUNDS),
            ("laplacianshot", struct_pb2.Value(number_value=2.5), "knn must be an integer in 1..10, got 2.5"),
            ("laplacianshot", struct_pb2.Value(string_value="five"), "knn must be a number in 1..10"),
            ("centroid", struct_pb2.Value(number_value=5), "knn does not apply to method centroid"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                _grpc_adapt(stub, task, method, value)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details(), err.value.details()


def test_http_json_multipart_and_the_openapi_document(knn_server, task):
    images, labels, _ = task
    base = knn_server.http_url
    support = [{"image": {"encoded": b64(b)}, "label": y} for b, y in zip(images, labels)]
    for knn, status in ((5, 200), (50, 400)):
        got, answer = http_call(
            "POST", f"{base}/v1/tasks", {"model": OMNI, "method": "laplacianshot", "support": support, "settings": {"values": {"knn": knn}}}
        )
        assert got == status, answer
        got, answer = http_call(
            "POST",
            f"{base}/v1/tasks",
            files=[("images", b) for b in images],
            fields=[("model", OMNI), ("method", "laplacianshot"), ("knn", str(knn))] + [("labels", y) for y in labels],
        )
        assert got == status, answer
    assert answer["code"] == "INVALID_ARGUMENT" and OUT_OF_BOUNDS in answer["message"]
    doc = http_call("GET", f"{base}/openapi.json")[1]
    values = doc["components"]["schemas"]["AdaptSettings"]["properties"]["values"]["properties"]
    assert {k: values["knn"][k] for k in ("type", "minimum", "maximum")} == {"type": "integer", "minimum": 1, "maximum": 10}
    form = doc["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["knn"]["type"] == "integer"


def test_the_sdk_sync_and_asyncio(knn_server, task):
    images, labels, queries = task
    with FewShotClient(knn_server.target) as client:
        info = {m.name: m for m in client.models()}[OMNI]
        assert {s.name: (s.kind, s.min, s.max) for s in info.settings}["knn"] == ("integer", 1, 10)
        adapted = client.adapt(images, labels, OMNI, method="laplacianshot", settings={"knn": 5})
        assert len(adapted.classify(queries)) == len(queries)
        with pytest.raises(InvalidArgument, match=OUT_OF_BOUNDS):
            client.adapt(images, labels, OMNI, method="laplacianshot", settings={"knn": 50})

    async def run() -> None:
        client = AsyncFewShotClient(knn_server.target)
        try:
            adapted = await client.adapt(images, labels, OMNI, method="laplacianshot", settings={"knn": 5})
            assert len(await adapted.classify(queries)) == len(queries)
            with pytest.raises(InvalidArgument, match=OUT_OF_BOUNDS):
                await client.adapt(images, labels, OMNI, method="laplacianshot", settings={"knn": 50})
        finally:
            await client.close()

    asyncio.run(run())


def _cli(tool: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / tool), *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_both_command_lines(knn_server, task, tmp_path, plugin_env):
    images, labels, _ = task
    for i, (content, label) in enumerate(zip(images, labels)):
        (tmp_path / "support" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "support" / label / f"{i}.png").write_bytes(content)
    target = ("--target", knn_server.target)
    listed = _cli("fewshot-client", *target, "models")
    assert listed.returncode == 0 and "knn" in listed.stdout, listed.stderr
    adapt = (*target, "adapt", "--model", OMNI, "--method", "laplacianshot", "--support", str(tmp_path / "support"))
    ok = _cli("fewshot-client", *adapt, "--set", "knn=5")
    assert ok.returncode == 0 and len(ok.stdout.strip()) == 32, ok.stderr
    refused = _cli("fewshot-client", *adapt, "--set", "knn=50")
    assert refused.returncode != 0 and OUT_OF_BOUNDS in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    evaluate = ("eval", "--model", OMNI, "--head", "laplacianshot", "--ways", "5", "--shots", "1", "--tasks", "2", "--json")
    ok = _cli("fewshot", *evaluate, "--set", "knn=5", env=plugin_env)
    assert ok.returncode == 0 and '"accuracy"' in ok.stdout, ok.stderr
    refused = _cli("fewshot", *evaluate, "--set", "knn=50", env=plugin_env)
    assert refused.returncode != 0 and OUT_OF_BOUNDS in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_triton_accepts_and_bounds_it_as_the_service_does(exported, tmp_path, plugin_env, task):
    import tritonclient.grpc as grpcclient
    from fixtures.transports import triton_adapt, triton_classify
    from fixtures.tritonserver import TritonProcess, TritonUnavailable
    from tritonclient.utils import InferenceServerException

    from fewshot.export.registry import Registry
    from fewshot.export.triton import write_bundle_models

    images, labels, queries = task
    repo, state = tmp_path / "repo", tmp_path / "state"
    write_bundle_models(repo, Registry.load(exported[0]).bundles[OMNI], "python", state)
    # Triton's python-backend stub keeps its own import path: the plugin named by its file
    plugin = {"FEWSHOT_PLUGINS": str(Path(plugin_env["PYTHONPATH"]) / "knn_setting.py")}
    proc = TritonProcess(repo, models=sorted(p.name for p in repo.iterdir()), log=tmp_path / "tritonserver.log", env=plugin)
    try:
        proc.start()
    except TritonUnavailable as exc:
        pytest.skip(f"the tritonserver binary cannot run here: {exc}")
    try:
        client = grpcclient.InferenceServerClient(proc.grpc_url)
        task_id, classes = triton_adapt(client, OMNI, labels, images, "laplacianshot", {"knn": 5})
        assert triton_classify(client, task_id, queries)[0].shape == (len(queries), len(classes))
        with pytest.raises(InferenceServerException) as err:
            triton_adapt(client, OMNI, labels, images, "laplacianshot", {"knn": 50})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and OUT_OF_BOUNDS in err.value.message()
        client.close()
    finally:
        proc.stop()
