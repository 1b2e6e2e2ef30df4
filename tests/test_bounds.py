"""What all clients together can cost (issue 34), against real ``fewshot serve`` processes on loopback: one budget
for request bodies in flight over streams, unary calls and HTTP; resident memory sampled every 100 ms within the
bound at the peak (docs/serving.md), under oversized concurrent streams and under a sustained concurrent Adapt load; the
idle process back near its start-up size; later AdaptStream chunks that name another model refused."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from fixtures.memory import ResidentMemory, adapt_load, resident_mb
from support import SMALL

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot.server.memory import peak_bound_mb
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI = "omniglot-conv4-directsum"
#: What the idle process may keep over its start-up size after refused streams (issue 34).
IDLE_MB = 100


def _stream(target: str, chunks: int, chunk_mb: float) -> grpc.RpcError | None:
    blob = np.random.default_rng(0).integers(0, 256, int(chunk_mb * 2**20), dtype=np.uint8).tobytes()

    def messages():
        for k in range(chunks):
            yield pb.AdaptChunk(model=OMNI if k == 0 else "", support=[pb.LabelledImage(image=pb.Image(encoded=blob), label=f"c{k}")])

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        try:
            pb_grpc.FewShotStub(channel).AdaptStream(messages(), timeout=120)
        except grpc.RpcError as err:
            return err
    return None


def _settle(pid: int, start: float, within: float, seconds: float = 30.0) -> float:
    """Resident memory once it is within ``within`` MB of ``start`` (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while resident_mb(pid) > start + within and time.monotonic() < deadline:
        time.sleep(0.25)
    return resident_mb(pid)


def test_concurrent_oversized_streams_share_one_body_budget(omni_bundles, tmp_path):
    """Six clients at once each stream 30 chunks of 4 MB (each past --max-request-mb 64): all refused, most by the
    process-wide budget of 96 MB; memory stays within the peak bound (docs/serving.md), and the idle process comes back
    within ``IDLE_MB`` (100 MB, issue 34) of its start-up size. Start-up is measured once the server has answered six small concurrent
    streams (refused at decoding): gRPC's per-stream machinery and the decode path are then made, and what is left
    over the level is what the large streams held; the allocator returns it within the 30 s the check waits."""
    budget_mb, streams, chunk_mb = 96, 6, 4.0
    with ServerProcess(
        omni_bundles, tmp_path / "state", *SMALL, "--max-request-mb", "64", "--max-inflight-body-mb", str(budget_mb)
    ) as proc:
        with ThreadPoolExecutor(streams) as pool:  # warm: small streams that reach decoding and are refused there
            warm = list(pool.map(lambda _: _stream(proc.target, 1, 0.01), range(streams)))
        assert all(e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in warm)
        time.sleep(1)
        start = resident_mb(proc.pid)
        with ResidentMemory(proc.pid) as rss, ThreadPoolExecutor(streams) as pool:
            errors = list(pool.map(lambda _: _stream(proc.target, 30, chunk_mb), range(streams)))
            peak = rss.peak
        assert all(e is not None and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert any("--max-inflight-body-mb" in e.details() for e in errors), [e.details() for e in errors]
        # each open stream may hold one more chunk in gRPC's receive path, not yet charged
        bound = peak_bound_mb(cache_mb=0, body_mb=budget_mb, receiving_mb=streams * chunk_mb)
        assert peak - start <= bound, f"peak {peak - start:.0f} MB over start-up, bound {bound:.0f} MB"
        idle = _settle(proc.pid, start, IDLE_MB)
        assert idle - start <= IDLE_MB, f"idle {idle - start:.0f} MB over start-up"
        # and the budget was given back: a small Adapt stream still gets through to decoding
        err = _stream(proc.target, 1, 0.01)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unary_and_http_bodies_are_charged_to_the_same_budget(omni_bundles, tmp_path):
    """With a 1 MB budget, a 0.6 MB Adapt (charged twice: bytes and parsed copy) and a 1.5 MB HTTP body are
    refused naming the flag; small calls pass."""
    port = free_port()
    with (
        ServerProcess(omni_bundles, tmp_path / "state", *SMALL, "--max-inflight-body-mb", "1", "--http-port", str(port)) as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = pb_grpc.FewShotStub(channel)
        big = pb.AdaptRequest(model=OMNI, support=[pb.LabelledImage(image=pb.Image(encoded=b"x" * 600_000), label="a")])
        with pytest.raises(grpc.RpcError) as err:
            stub.Adapt(big)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-inflight-body-mb" in err.value.details()
        assert stub.ListModels(pb.ListModelsRequest()).models
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/tasks", data=b" " * 1_500_000, method="POST", headers={"content-type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(request, timeout=60)
        body = json.loads(http_err.value.read())
        assert http_err.value.code == 429 and body["code"] == "RESOURCE_EXHAUSTED" and "--max-inflight-body-mb" in body["message"]


def test_a_later_chunk_naming_another_model_or_method_is_invalid(server):
    for first, later in [
        ({"model": OMNI}, {"model": "another-model"}),
        ({"model": OMNI, "method": "centroid"}, {"method": "laplacianshot"}),
    ]:

        def messages():
            yield pb.AdaptChunk(**first, support=[pb.LabelledImage(image=pb.Image(encoded=b"x"), label="a")])
            yield pb.AdaptChunk(**later, support=[pb.LabelledImage(image=pb.Image(encoded=b"y"), label="b")])

        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.FewShotStub(channel).AdaptStream(messages(), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first chunk only" in err.value.details()

    def repeated():  # the same model again is fine (then the images are what is wrong)
        yield pb.AdaptChunk(model=OMNI, support=[pb.LabelledImage(image=pb.Image(encoded=b"x"), label="a")])
        yield pb.AdaptChunk(model=OMNI, support=[pb.LabelledImage(image=pb.Image(encoded=b"y"), label="b")])

    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.FewShotStub(channel).AdaptStream(repeated(), timeout=60)
    assert "first chunk only" not in err.value.details()


def test_memory_stays_within_its_peak_bound_under_sustained_concurrent_adapts(omni_bundles, tmp_path, omniglot_test):
    """Three clients adapt 20-way 5-shot centroid tasks (and classify one query each) past what --cache-mb 16
    holds; resident memory sampled every 100 ms over the load stays within the peak bound (docs/serving.md)."""
    cache_mb, clients, tasks = 16, 3, 360
    sampler = EpisodeSampler(omniglot_test, 20, 5, 1, seed=11)
    supports = []
    for e in range(6):
        ep = sampler.episode(e)
        supports.append(
            (
                [
                    pb.LabelledImage(image=pb.Image(encoded=png(omniglot_test.images[j])), label=f"c{c}")
                    for j, c in zip(ep.support, ep.support_labels)
                ],
                [pb.Image(encoded=png(omniglot_test.images[ep.query[0]]))],
            )
        )
    with ServerProcess(omni_bundles, tmp_path / "state", *SMALL, "--cache-mb", str(cache_mb)) as proc:
        load = adapt_load(proc.target, proc.pid, OMNI, supports, clients, 30, tasks)
    warm, peak, samples = load["rss_after_warmup_mb"], load["rss_peak_mb"], load["samples"]
    bound = peak_bound_mb(cache_mb=cache_mb, body_mb=clients * 2 * sum(len(s.SerializeToString()) for s in supports[0][0]) / 2**20)
    print(f"resident memory after warm-up {warm:.0f} MB, peak +{peak - warm:.0f} MB over {samples} samples (bound {bound:.0f} MB)")
    assert samples >= 20
    assert peak - warm <= bound, f"peak {peak - warm:.0f} MB over warm-up, bound {bound:.0f} MB"


@pytest.mark.unit
def test_the_body_budget_refuses_past_its_limit_and_gives_back_what_a_call_held():
    from fewshot.server.budget import BodyBudget
    from fewshot.server.errors import Overloaded

    released = []
    budget = BodyBudget(100, on_release=released.append)
    with budget.hold() as a, budget.hold() as b:
        a.charge(60)
        with pytest.raises(Overloaded, match="--max-inflight-body-mb"):
            b.charge(41)
        b.charge(40)
        assert budget.held == 100
    assert budget.held == 0 and sorted(released) == [40, 60]
    with budget.hold() as c:
        c.charge(100)  # all of it again once given back


@pytest.mark.unit
def test_serve_flags_are_generated_from_the_config_with_its_defaults(monkeypatch):
    """Issue 35 (server options written once): every ServeConfig field is a `fewshot serve` flag with the field's
    default; a field with an environment variable takes it; the service limits' defaults are the config's."""
    import argparse
    from dataclasses import fields

    from fewshot.server.config import ServeConfig, add_arguments, from_arguments
    from fewshot.server.tasks import ServiceLimits

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args([])) == ServeConfig()
    cfg = from_arguments(parser.parse_args(["--cache-mb", "32", "--tokens", "t.txt", "--http-port", "0"]))
    assert (cfg.cache_mb, str(cfg.tokens_file), cfg.http_port) == (32, "t.txt", 0)
    assert len(parser._actions) == len(fields(ServeConfig)) + 1  # and -h
    monkeypatch.setenv("FEWSHOT_STORE", "sqlite:/tmp/x.db")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args([])).store == "sqlite:/tmp/x.db"
    limits, defaults = ServiceLimits.default(), ServeConfig()
    assert (limits.max_support, limits.max_request_bytes) == (defaults.max_support, defaults.max_request_mb << 20)
