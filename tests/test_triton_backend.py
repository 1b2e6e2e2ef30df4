"""``fewshot serve --feature-backend triton`` against a real Triton server (the ``tritonserver`` binary of
the nvidia-pytriton wheel, python-backend repository) and real ``fewshot serve`` processes: the same
predictions as the in-process backend, UNAVAILABLE while Triton is away and recovery once it is back,
and the start-up check."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from fixtures.tritonserver import TritonProcess
from support import SHIPPED, SMALL

from fewshot.export.triton import backbone_model_name, write_onnx_model
from fewshot.models.data import load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import methods_of
from fewshot.models.preprocess import encode_png as png
from fewshot.models.zoo import load_model
from fewshot.server.store import TaskStore
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI = "omniglot-conv4-directsum"
TASKS = 20


def _cases() -> list[tuple[str, str]]:
    """Omniglot and Tiny ImageNet metric models with both heads (backbones in Triton), and every
    inner-loop model shipped (adapted networks in Triton)."""
    cases = [
        (OMNI, "centroid"),
        (OMNI, "laplacianshot"),
        ("tinyimagenet-conv4-sce-nca-directsum", "centroid"),
        ("tinyimagenet-conv4-sce-nca-directsum", "laplacianshot"),
    ]
    return cases + [(name, "inner_loop") for name in SHIPPED if "inner_loop" in methods_of(load_model(name).card)]


CASES = _cases()
#: Tasks per case, so that the cases together cover at least TASKS real tasks.
TASKS_PER_CASE = -(-TASKS // len(CASES))


def _serve_triton(bundles, state_dir, url: str, *args: str) -> ServerProcess:
    return ServerProcess(bundles, state_dir, *SMALL, "--feature-backend", "triton", "--triton-url", url, "--triton-timeout", "10", *args)


def _stub(channel: grpc.Channel) -> pb_grpc.FewShotStub:
    return pb_grpc.FewShotStub(channel)


def _encoded(images) -> list[pb.Image]:
    return [pb.Image(encoded=png(x)) for x in images]


def _task(data, ways: int, shots: int, index: int, seed: int = 0, queries: int = 15):
    ep = EpisodeSampler(data, ways, shots, queries, seed=seed).episode(index)
    support = [pb.LabelledImage(image=im, label=f"class-{c}") for im, c in zip(_encoded(data.images[ep.support]), ep.support_labels)]
    return support, _encoded(data.images[ep.query])


def _adapt_and_classify(stub, model: str, method: str, support, queries) -> tuple[pb.AdaptResponse, pb.ClassifyResponse]:
    task = stub.Adapt(pb.AdaptRequest(model=model, method=method, support=support))
    return task, stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries, top_k=len(task.labels)))


def _same(a: tuple[pb.AdaptResponse, pb.ClassifyResponse], b: tuple[pb.AdaptResponse, pb.ClassifyResponse], what: str) -> None:
    assert a[0].labels == b[0].labels and a[0].support_accuracy == b[0].support_accuracy, what
    assert [[r.label for r in p.ranked] for p in a[1].predictions] == [[r.label for r in p.ranked] for p in b[1].predictions], what
    np.testing.assert_allclose(
        [p.probabilities for p in a[1].predictions], [p.probabilities for p in b[1].predictions], rtol=0, atol=1e-6, err_msg=what
    )


@pytest.fixture(scope="module")
def triton_service(exported, triton, tmp_path_factory):
    """``fewshot serve`` over every shipped bundle with the session's Triton as its feature backend."""
    with _serve_triton(
        exported[0], tmp_path_factory.mktemp("state-triton"), triton.grpc_url, "--max-support", "300", "--max-queries", "200"
    ) as proc:
        yield proc


@pytest.mark.parametrize("model,method", CASES)
def test_triton_backend_predicts_what_the_in_process_backend_predicts(server, triton_service, model, method):
    """Adapt + Classify on the same real tasks through both services (the in-process one is the
    ``server`` fixture of test_server.py); Classify calls go out concurrently so they merge in the
    batcher and in Triton's dynamic batching."""
    data = load_dataset(load_model(model).card.dataset, "test")
    tasks = [_task(data, 5, 1, i) for i in range(TASKS_PER_CASE)]
    with grpc.insecure_channel(server.target) as a, grpc.insecure_channel(triton_service.target) as b, ThreadPoolExecutor(4) as pool:
        local = list(pool.map(lambda t: _adapt_and_classify(_stub(a), model, method, *t), tasks))
        remote = list(pool.map(lambda t: _adapt_and_classify(_stub(b), model, method, *t), tasks))
    for i, (x, y) in enumerate(zip(local, remote)):
        _same(x, y, f"{model} {method} task {i}")


def test_a_support_set_larger_than_tritons_max_batch_is_split(server, triton_service, omniglot_test):
    """300 support images (20-way 15-shot) > the backbone's max_batch_size of 256: sent in parts, same task."""
    support, queries = _task(omniglot_test, 20, 15, 0, seed=3, queries=5)
    with grpc.insecure_channel(server.target) as a, grpc.insecure_channel(triton_service.target) as b:
        _same(
            _adapt_and_classify(_stub(a), OMNI, "centroid", support, queries),
            _adapt_and_classify(_stub(b), OMNI, "centroid", support, queries),
            "300-image support set",
        )


@pytest.fixture()
def own_triton(exported, triton, tmp_path):
    """A Triton of this test's own (omniglot backbone only), on the session repository, so stopping it
    disturbs no other test."""
    with TritonProcess(triton.repo, models=[backbone_model_name(OMNI)], log=tmp_path / "triton.log") as proc:
        yield proc


def _bundles_of(exported, tmp_path, *names: str):
    root = tmp_path / "bundles"
    root.mkdir()
    for name in names:
        (root / name).symlink_to(exported[0] / name, target_is_directory=True)
    return root


def test_triton_away_answers_unavailable_then_recovers(exported, own_triton, tmp_path, omniglot_test):
    state = tmp_path / "state"
    support, queries = _task(omniglot_test, 5, 1, 0, seed=11)
    other_support, _ = _task(omniglot_test, 5, 1, 1, seed=11)
    with (
        _serve_triton(_bundles_of(exported, tmp_path, OMNI), state, own_triton.grpc_url) as service,
        grpc.insecure_channel(service.target) as channel,
    ):
        stub = _stub(channel)
        task, before = _adapt_and_classify(stub, OMNI, "laplacianshot", support, queries)
        own_triton.stop()
        for call in (
            lambda: stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries)),
            lambda: stub.Adapt(pb.AdaptRequest(model=OMNI, support=other_support)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in err.value.details(), err.value.details()
        assert TaskStore(state).count() == 1, "the Adapt that failed stored nothing"
        assert stub.GetTask(pb.GetTaskRequest(task_id=task.task_id)).labels == task.labels, "task-store calls still work"
        own_triton.start()
        after = _until_recovered(lambda: stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries, top_k=len(task.labels))))
        _same((task, before), (task, after), "the task classifies as before the outage")
        assert stub.Adapt(pb.AdaptRequest(model=OMNI, support=other_support)).task_id
        assert TaskStore(state).count() == 2


def _until_recovered(call, seconds: float = 10.0):
    """``call()`` once Triton is reachable again: the service's channel to Triton reconnects with a
    capped backoff (1 s), so calls in that window answer UNAVAILABLE, as a client that retries expects."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _serve_and_fail(exported, tmp_path, url: str, *names: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "fewshot.cli",
        "serve",
        "--models",
        str(_bundles_of(exported, tmp_path, *names)),
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(free_port()),
        *SMALL,
        "--feature-backend",
        "triton",
        "--triton-url",
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_start_up_check_refuses_a_missing_model_with_one_clear_message(exported, own_triton, tmp_path):
    ti = "tinyimagenet-conv4-sce-nca-directsum"
    result = _serve_and_fail(exported, tmp_path, own_triton.grpc_url, OMNI, ti)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("fewshot serve: error: "), message
    assert f"model '{backbone_model_name(ti)}' is not ready" in message and "fewshot export --triton-repo" in message
    assert backbone_model_name(OMNI) not in message, "the model Triton does serve is not blamed"


def test_start_up_check_refuses_a_model_with_other_tensors(exported, triton, tmp_path):
    """Triton serves ``<omniglot>_backbone``, but built from the Tiny ImageNet backbone (3x64x64 images)."""
    repo = tmp_path / "repo"
    ti = exported[0] / "tinyimagenet-conv4-sce-nca-directsum" / "backbone.onnx"
    write_onnx_model(repo, backbone_model_name(OMNI), ti, batched=True, backend="python")
    with TritonProcess(repo, venv=triton.venv, models=[backbone_model_name(OMNI)], log=tmp_path / "triton.log") as wrong:
        result = _serve_and_fail(exported, tmp_path, wrong.grpc_url, OMNI)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert (
        f"{backbone_model_name(OMNI)} input is images FP32 [-1, 3, 64, 64], the bundle needs images FP32 [-1, 1, 28, 28]" in result.stderr
    ), result.stderr
    assert "output is features FP32" in result.stderr


def test_start_up_check_refuses_a_triton_that_is_not_there(exported, tmp_path):
    result = _serve_and_fail(exported, tmp_path, f"127.0.0.1:{free_port()}", OMNI)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "Triton is not live at" in result.stderr and "--triton-url" in result.stderr
