"""A real Triton server (nvidia-pytriton's ``tritonserver``, python backend) on the python-backend
variant of the repository: backbone parity with in-process ONNX Runtime, ``fewshot_adapt`` +
``fewshot_classify`` against the gRPC service on real tasks, tasks shared with the service both ways,
bad input, and the process harness itself."""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from fixtures.transports import triton_adapt, triton_adapt_inputs, triton_classify, triton_scalar, triton_strings
from fixtures.tritonserver import TritonProcess, TritonStartError, TritonUnavailable
from support import SHIPPED, SMALL
from tritonclient.utils import InferenceServerException

from fewshot.export.registry import Registry
from fewshot.export.triton import backbone_model_name, network_model_name, write_onnx_model
from fewshot.models.data import ImageSet, load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import family_of, methods_of
from fewshot.models.features import OnnxFeatures
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot.tools.launch import ServerProcess
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI, TINY, CXGRAD = "omniglot-conv4-directsum", "tinyimagenet-conv4-sce-nca-directsum", "omniglot-conv4-cxgrad"
TASKS = 20


@functools.cache
def _data(dataset: str) -> ImageSet:
    return load_dataset(dataset, "test")


@pytest.fixture(scope="module")
def client(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.FewShotStub(channel)


def service_adapt(stub, model: str, labels: list[str], images: list[bytes], method: str = "") -> pb.AdaptResponse:
    support = [pb.LabelledImage(image=pb.Image(encoded=b), label=label) for b, label in zip(images, labels)]
    return stub.Adapt(pb.AdaptRequest(model=model, method=method, support=support))


def service_classify(stub, task_id: str, images: list[bytes]) -> np.ndarray:
    """The service's Classify -> (Q, N) probabilities in the task's label order."""
    response = stub.Classify(pb.ClassifyRequest(task_id=task_id, queries=[pb.Image(encoded=b) for b in images]))
    return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)


def _task(data: ImageSet, episode) -> tuple[list[str], list[bytes], list[bytes], list[str]]:
    """A real episode as PNG bytes: (support labels, support images, query images, query labels)."""
    return (
        [f"class-{c}" for c in episode.support_labels],
        [png(data.images[i]) for i in episode.support],
        [png(data.images[i]) for i in episode.query],
        [f"class-{c}" for c in episode.query_labels],
    )


def _first_of_each_family() -> list[str]:
    families: dict[str, str] = {}
    for name in SHIPPED:
        families.setdefault(family_of(load_model(name).card), name)
    return sorted(families.values())


# -- tests --------------------------------------------------------------------------------------------
def test_backbone_features_equal_in_process_onnx_runtime(triton, client, exported):
    for name, bundle in Registry.load(exported[0]).bundles.items():
        m = bundle.manifest
        data = _data(m["data"]["dataset"])
        idx = np.sort(np.random.default_rng(0).choice(len(data.images), 100, replace=False))
        spec = load_model(name).spec
        x = spec.normalize(data.images[idx]).numpy()
        images = grpcclient.InferInput("images", list(x.shape), "FP32")
        images.set_data_from_numpy(x)
        got = client.infer(backbone_model_name(name), [images]).as_numpy("features")
        ref = OnnxFeatures(str(bundle.file("backbone.onnx")), int(m["feature_dim"]), "cpu", threads=1)(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5, (name, np.abs(got - ref).max())
        if "network.onnx" in m["files"]:  # the adapted network: meta-initial weights, unit BatchNorm statistics
            from fewshot.export.loader import open_bundle
            from fewshot.models.inner_loop.onnx_network import network_inputs

            model = open_bundle(bundle, "cpu", 1)
            width = model.net.width
            feeds = {
                k: v.numpy()
                for k, v in network_inputs(
                    model.net, model.params, [(torch.zeros(width), torch.ones(width))] * 4, model.loop["steps"]
                ).items()
            } | {"images": x}
            inputs = []
            for k, v in feeds.items():
                inputs.append(grpcclient.InferInput(k, list(v.shape), "FP32"))
                inputs[-1].set_data_from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            logits = client.infer(network_model_name(name), inputs).as_numpy("logits")
            assert np.abs(logits - model.session.run(None, feeds)[0]).max() <= 1e-5, name


@pytest.mark.parametrize("name,method", [(n, m) for n in (OMNI, TINY) for m in methods_of(load_model(n).card)])
def test_triton_predictions_equal_the_service(client, stub, name, method):
    data = _data(load_model(name).card.dataset)
    sampler = EpisodeSampler(data, 5, 1, 15, seed=0)
    for i in range(TASKS):
        labels, support, queries, _ = _task(data, sampler.episode(i))
        task_id, classes = triton_adapt(client, name, labels, support, method)
        probs, classes_again = triton_classify(client, task_id, queries)
        served = service_adapt(stub, name, labels, support, method)
        expected = service_classify(stub, served.task_id, queries)
        assert classes == classes_again == list(served.labels)
        assert probs.shape == expected.shape == (len(queries), 5)
        assert np.array_equal(probs.argmax(1), expected.argmax(1)), (name, method, i)
        np.testing.assert_allclose(probs, expected, atol=1e-4)


@pytest.mark.parametrize("ways", [3, 10])
def test_triton_serves_inner_loop_tasks_of_any_number_of_classes(client, stub, ways):
    """The network model's head rows are dynamic: a 3- and a 10-way CxGrad task through Triton's
    ``fewshot_adapt``/``fewshot_classify`` answer as the service does."""
    data = _data(load_model(CXGRAD).card.dataset)
    labels, support, queries, _ = _task(data, EpisodeSampler(data, ways, 1, 3, seed=ways).episode(0))
    task_id, classes = triton_adapt(client, CXGRAD, labels, support)
    probs, _ = triton_classify(client, task_id, queries)
    served = service_adapt(stub, CXGRAD, labels, support)
    expected = service_classify(stub, served.task_id, queries)
    assert classes == list(served.labels) and probs.shape == expected.shape == (len(queries), ways)
    assert np.array_equal(probs.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(probs, expected, atol=1e-4)


@pytest.mark.parametrize("name", _first_of_each_family())
def test_tasks_are_shared_with_the_service_both_ways(triton, client, exported, name):
    card = load_model(name).card
    data = _data(card.dataset)
    labels, support, queries, _ = _task(data, EpisodeSampler(data, 5, 1, 15, seed=11).episode(0))
    methods = methods_of(card)
    with ServerProcess(exported[0], triton.state_dir, *SMALL) as service, grpc.insecure_channel(service.target) as channel:
        stub = pb_grpc.FewShotStub(channel)
        for method in methods:
            task_id, classes = triton_adapt(client, name, labels, support, method)
            probs, _ = triton_classify(client, task_id, queries)
            np.testing.assert_allclose(service_classify(stub, task_id, queries), probs, atol=1e-5)  # adapted in Triton
            served = service_adapt(stub, name, labels, support, method)
            probs, classes = triton_classify(client, served.task_id, queries)  # adapted by the service
            assert classes == list(served.labels)
            np.testing.assert_allclose(probs, service_classify(stub, served.task_id, queries), atol=1e-5)


def _bomb() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # 36 M pixels, ~35 KB compressed
    return buf.getvalue()


def test_bad_input_is_an_error_and_triton_keeps_serving(client, omniglot_test):
    labels, support, queries, truth = _task(omniglot_test, EpisodeSampler(omniglot_test, 5, 1, 15, seed=7).episode(0))
    live, _ = triton_adapt(client, OMNI, labels, support)
    cases = [
        ("undecodable image", "fewshot_adapt", triton_adapt_inputs(OMNI, labels, [b"not an image", *support[1:]]), "INVALID_ARGUMENT"),
        ("decompression bomb", "fewshot_adapt", triton_adapt_inputs(OMNI, labels, [_bomb(), *support[1:]]), "INVALID_ARGUMENT"),
        ("one class", "fewshot_adapt", triton_adapt_inputs(OMNI, ["a"] * len(support), support), "INVALID_ARGUMENT"),
        ("empty label", "fewshot_adapt", triton_adapt_inputs(OMNI, ["", *labels[1:]], support), "INVALID_ARGUMENT"),
        ("label not UTF-8", "fewshot_adapt", triton_adapt_inputs(OMNI, [b"\xff\xfe", *labels[1:]], support), "INVALID_ARGUMENT"),
        ("fewer labels than images", "fewshot_adapt", triton_adapt_inputs(OMNI, labels[:-1], support), "INVALID_ARGUMENT"),
        ("unknown method", "fewshot_adapt", triton_adapt_inputs(OMNI, labels, support, "svm"), "INVALID_ARGUMENT"),
        ("unknown model", "fewshot_adapt", triton_adapt_inputs("resnet-9000", labels, support), "NOT_FOUND"),
        ("missing input", "fewshot_adapt", triton_adapt_inputs(OMNI, labels, support)[1:], "INVALID_ARGUMENT"),
        ("unknown task", "fewshot_classify", [triton_strings("task_id", ["0" * 32]), triton_strings("images", queries[:1])], "NOT_FOUND"),
        (
            "undecodable query",
            "fewshot_classify",
            [triton_strings("task_id", [live]), triton_strings("images", [b"GIF89a"])],
            "INVALID_ARGUMENT",
        ),
    ]
    for name, model, inputs, status in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs)
        assert err.value.status() == f"StatusCode.{status}", (name, err.value.status(), err.value.message())
        assert err.value.message(), name
        task_id, _ = triton_adapt(client, OMNI, labels, support)  # still serving, and still right
        probs, classes = triton_classify(client, task_id, queries)
        assert np.mean([classes[j] == t for j, t in zip(probs.argmax(1), truth)]) >= 0.8, name
    assert client.is_server_live() and client.is_model_ready("fewshot_adapt") and client.is_model_ready("fewshot_classify")
    assert triton_classify(client, live, queries)[0].shape == (len(queries), 5)  # the task adapted first is intact


@pytest.mark.parametrize("name", [OMNI, CXGRAD])
def test_triton_rejects_unknown_queries_as_the_service_does(client, stub, name):
    """fewshot_classify's reject_unknown (and target_recall) option: the same unknown flags, scores and
    threshold as the service's Classify of the same task; bad options are INVALID_ARGUMENT."""
    from fewshot.models.openset import OpenSetSampler

    data = _data("omniglot")
    ep = OpenSetSampler(data, 5, 1, 5, seed=2).episode(0)
    labels = [f"c{c}" for c in ep.known.support_labels]
    support = [png(data.images[i]) for i in ep.known.support]
    queries = [png(data.images[i]) for i in np.concatenate([ep.known.query, ep.unknown])]
    task_id, _ = triton_adapt(client, name, labels, support)
    service_task = service_adapt(stub, name, labels, support).task_id  # the same support, adapted by the service
    for option in ([], [triton_scalar("target_recall", 0.8)]):
        result = client.infer(
            "fewshot_classify",
            [triton_strings("task_id", [task_id]), triton_strings("images", queries), triton_scalar("reject_unknown", True), *option],
        )
        recall = {"target_recall": 0.8} if option else {}
        served = stub.Classify(
            pb.ClassifyRequest(task_id=service_task, queries=[pb.Image(encoded=b) for b in queries], reject_unknown=True, **recall)
        )
        assert list(result.as_numpy("unknown")) == [p.unknown for p in served.predictions]
        np.testing.assert_allclose(result.as_numpy("scores"), [p.score for p in served.predictions], rtol=1e-6, atol=1e-6)
        assert result.as_numpy("threshold")[0] == pytest.approx(served.predictions[0].threshold)
        flags, n = result.as_numpy("unknown"), len(ep.known.query)
        assert flags[n:].mean() > flags[:n].mean() + 0.2  # unseen classes are told apart
    plain = client.infer("fewshot_classify", [triton_strings("task_id", [task_id]), triton_strings("images", queries)])
    assert plain.as_numpy("unknown") is None  # without the option: the outputs of before
    with pytest.raises(InferenceServerException) as err:
        client.infer(
            "fewshot_classify",
            [
                triton_strings("task_id", [task_id]),
                triton_strings("images", queries[:1]),
                triton_scalar("reject_unknown", True),
                triton_scalar("target_recall", 2.0),
            ],
        )
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "0.5..0.99" in err.value.message()


def test_a_backbone_triton_has_not_loaded_answers_unavailable(client, omniglot_test):
    labels, support, _, _ = _task(omniglot_test, EpisodeSampler(omniglot_test, 5, 1, 15, seed=7).episode(0))
    backbone = backbone_model_name(OMNI)
    client.unload_model(backbone)
    try:
        with pytest.raises(InferenceServerException) as err:
            triton_adapt(client, OMNI, labels, support)
        assert err.value.status() == "StatusCode.UNAVAILABLE" and f"--load-model={backbone}" in err.value.message()
    finally:
        client.load_model(backbone)
    assert triton_adapt(client, OMNI, labels, support)[1] == list(dict.fromkeys(labels))  # serving again


def test_a_model_that_fails_to_load_is_named_with_the_reason(triton, tmp_path):
    """``triton`` only makes this skip where the binary cannot run; this test runs its own server."""
    folder = tmp_path / "repo" / "broken"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (folder / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no weights here')\n"
    )
    proc = TritonProcess(tmp_path / "repo", models=["broken"], log=tmp_path / "tritonserver.log")
    with pytest.raises(TritonStartError, match=r"(?s)did not load broken: .*no weights here"):
        proc.start()
    assert proc.proc.poll() is not None  # not left running


def test_triton_process_stops_and_starts_again_on_the_same_repository(triton, exported, tmp_path):
    """``triton`` only makes this skip where the binary cannot run; this test runs its own server."""
    bundle = Registry.load(exported[0]).get(OMNI)
    model = backbone_model_name(OMNI)
    write_onnx_model(tmp_path / "repo", model, bundle.file("backbone.onnx"), batched=True, backend="python")
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    images = grpcclient.InferInput("images", list(x.shape), "FP32")
    images.set_data_from_numpy(x)
    proc = TritonProcess(tmp_path / "repo", models=[model], log=tmp_path / "tritonserver.log")
    runs = []
    for _ in range(2):
        with proc:
            c = grpcclient.InferenceServerClient(proc.grpc_url)
            runs.append(c.infer(model, [images]).as_numpy("features"))
            c.close()
        assert proc.proc.poll() is not None  # stopped by PID
    np.testing.assert_array_equal(runs[0], runs[1])


def test_a_missing_triton_environment_says_what_to_do(tmp_path):
    with pytest.raises(TritonUnavailable, match="scripts/triton-env.sh"):
        TritonProcess(tmp_path, venv=tmp_path / "nowhere").start()


@pytest.mark.parametrize("name", [OMNI, CXGRAD])
def test_triton_explains_answers_as_the_service_does(client, stub, name):
    """fewshot_classify's explain option: the same nearest support images, labels and similarities as the
    service's Classify of a task adapted on the same support set; a support image's nearest is itself."""
    data = _data("omniglot")
    labels, support, queries, _ = _task(data, EpisodeSampler(data, 5, 2, 2, seed=9).episode(0))
    task_id, _ = triton_adapt(client, name, labels, support)
    service_task = service_adapt(stub, name, labels, support).task_id
    asked = [support[3], *queries]
    explain = grpcclient.InferInput("explain", [1], "INT32")
    explain.set_data_from_numpy(np.array([3], dtype=np.int32))
    result = client.infer("fewshot_classify", [triton_strings("task_id", [task_id]), triton_strings("images", asked), explain])
    served = stub.Classify(pb.ClassifyRequest(task_id=service_task, queries=[pb.Image(encoded=b) for b in asked], explain=3))
    assert result.as_numpy("nearest_index").tolist() == [[m.index for m in p.nearest] for p in served.predictions]
    assert [[v.decode() for v in row] for row in result.as_numpy("nearest_label")] == [
        [m.label for m in p.nearest] for p in served.predictions
    ]
    np.testing.assert_allclose(
        result.as_numpy("nearest_similarity"), [[m.similarity for m in p.nearest] for p in served.predictions], rtol=1e-5, atol=1e-5
    )
    assert result.as_numpy("nearest_index")[0, 0] == 3
