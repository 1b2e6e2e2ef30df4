"""TLS, mutual TLS and tenants over real gRPC: certificates made at test time, a tokens file, quotas,
SIGHUP reload, failed-attempt limits, and what the logs keep out."""

from __future__ import annotations

import http.client
import signal
import threading
import time

import grpc
import pytest
from certs import make_certificates
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import SMALL

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot.server.auth import TokensFileError, parse_tokens, token_hash
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_client import FewShotClient
from fewshot_client.cli import main as client_main
from fewshot_client.errors import NotFound, ResourceExhausted, Unauthenticated, Unavailable
from fewshot_proto import fewshot_pb2 as pb
from fewshot_proto import fewshot_pb2_grpc as pb_grpc

OMNI = "omniglot-conv4-directsum"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def episode(omniglot_test):
    ep = EpisodeSampler(omniglot_test, 5, 1, 2, seed=5).episode(0)
    support = [png(omniglot_test.images[i]) for i in ep.support]
    return support, [f"c{c}" for c in ep.support_labels], [png(omniglot_test.images[i]) for i in ep.query]


def _credentials(certs, client: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        certs.ca_cert.read_bytes(), certs.client_key.read_bytes() if client else None, certs.client_cert.read_bytes() if client else None
    )


def test_tls_serves_the_api_health_and_reflection(omni_bundles, tmp_path, certs, episode):
    support, labels, queries = episode
    with ServerProcess(
        omni_bundles,
        tmp_path,
        *SMALL,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        credentials=_credentials(certs),
    ) as proc:
        with FewShotClient(proc.target, root_certificates=certs.ca_cert) as client:
            task = client.adapt(support, labels, model=OMNI)
            assert len(task.classify(queries)) == len(queries)
        with proc.channel() as channel:
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
            reflected = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            assert "fewshot.v1.FewShot" in {s.name for r in reflected for s in r.list_services_response.service}
        with FewShotClient(proc.target, retries=0, timeout=5) as plaintext, pytest.raises(Unavailable):
            plaintext.models()
        with (
            FewShotClient(proc.target, root_certificates=certs.other_ca_cert, retries=0, timeout=5) as untrusted,
            pytest.raises(Unavailable),
        ):
            untrusted.models()


def test_mutual_tls_requires_a_client_certificate_of_the_ca(omni_bundles, tmp_path, certs, capsys):
    with ServerProcess(
        omni_bundles,
        tmp_path,
        *SMALL,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca_cert),
        credentials=_credentials(certs, client=True),
    ) as proc:
        with FewShotClient(
            proc.target, root_certificates=certs.ca_cert, client_certificate=certs.client_cert, client_key=certs.client_key
        ) as client:
            assert OMNI in {m.name for m in client.models()}
        for cert, key in [(None, None), (certs.other_client_cert, certs.other_client_key)]:
            with (
                FewShotClient(
                    proc.target, root_certificates=certs.ca_cert, client_certificate=cert, client_key=key, retries=0, timeout=5
                ) as client,
                pytest.raises(Unavailable),
            ):
                client.models()
        assert (
            client_main(
                [
                    "--target",
                    proc.target,
                    "--ca-cert",
                    str(certs.ca_cert),
                    "--client-cert",
                    str(certs.client_cert),
                    "--client-key",
                    str(certs.client_key),
                    "models",
                ]
            )
            == 0
        )
        assert OMNI in capsys.readouterr().out


TOKENS = {
    "acme": "acme-token-0123456789",
    "globex": "globex-token-9876543210",
    "small": "small-token-aaaaaaaa",
    "slow": "slow-token-bbbbbbbbbb",
}


@pytest.fixture(scope="module")
def tenants(omni_bundles, tmp_path_factory):
    state = tmp_path_factory.mktemp("tenants")
    tokens = state / "tokens.txt"
    tokens.write_text(
        "# tenant: sha256 [max_tasks=N] [rps=R]\n"
        f"acme: {token_hash(TOKENS['acme'])}\n"
        f"globex: sha256:{token_hash(TOKENS['globex'])}\n"
        f"small: {token_hash(TOKENS['small'])} max_tasks=2\n"
        f"slow: {token_hash(TOKENS['slow'])} rps=1\n"
    )
    proc = ServerProcess(omni_bundles, state, *SMALL, "--tokens", str(tokens))
    proc.tokens = tokens
    with proc:
        yield proc


def _client(proc, tenant: str | None, **kw) -> FewShotClient:
    return FewShotClient(proc.target, token=TOKENS.get(tenant, tenant), retries=0, **kw)


def test_tenants_never_see_each_others_tasks(tenants, episode):
    support, labels, queries = episode
    with _client(tenants, "acme") as acme, _client(tenants, "globex") as globex:
        task = acme.adapt(support, labels, model=OMNI)
        assert len(acme.classify(task.id, queries)) == len(queries)
        unknown = "0" * 32
        for call in (
            lambda t: globex.classify(t, queries),
            globex.task_info,
            lambda t: globex.update(t, remove=labels[:1]),
            lambda t: globex.update(t, support[:1], labels[:1]),
            globex.delete,
        ):
            with pytest.raises(NotFound) as theirs:
                call(task.id)
            with pytest.raises(NotFound) as nobodys:
                call(unknown)
            assert theirs.value.details.replace(task.id, unknown) == nobodys.value.details  # no hint it exists
        assert acme.task_info(task.id).task_id == task.id  # untouched by globex's delete
        assert acme.delete(task.id)
    log = tenants.log.read_text()
    assert task.id not in log and TOKENS["acme"] not in log and '"tenant": "acme"' in log


def test_calls_without_a_valid_token_are_refused_before_parsing(tenants):
    with grpc.insecure_channel(tenants.target) as channel:
        adapt = channel.unary_unary("/fewshot.v1.FewShot/Adapt")
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", TOKENS["acme"]),)):
            with pytest.raises(grpc.RpcError) as err:
                adapt(b"\xff\xff not a message", metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = channel.stream_unary("/fewshot.v1.FewShot/AdaptStream")
        with pytest.raises(grpc.RpcError) as err:
            stream(iter([b"\xff"] * 3))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        )  # probes stay open


def test_tenant_quotas(tenants, episode):
    support, labels, _ = episode
    with _client(tenants, "small") as small, _client(tenants, "acme") as acme:
        kept = [small.adapt(support, labels, model=OMNI) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="quota"):
            small.adapt(support, labels, model=OMNI)
        acme.adapt(support, labels, model=OMNI)  # another tenant is not limited by it
        kept[0].delete()
        small.adapt(support, labels, model=OMNI)  # room again
    with _client(tenants, "slow") as slow:
        codes = []
        for _ in range(6):
            try:
                slow.models()
                codes.append("OK")
            except ResourceExhausted as err:
                assert "rate" in err.details
                codes.append("RESOURCE_EXHAUSTED")
        assert codes[0] == "OK" and "RESOURCE_EXHAUSTED" in codes


def test_the_tokens_file_is_reloaded_on_sighup(tenants):
    with _client(tenants, "new-token-cccccccccc") as new:
        with pytest.raises(Unauthenticated):
            new.models()
        tenants.tokens.write_text(tenants.tokens.read_text() + f"newcomer: {token_hash('new-token-cccccccccc')}\n")
        tenants.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                new.models()
                break
            except Unauthenticated:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tokens file"
                time.sleep(0.1)


def _http_status(port: int, headers: list[tuple[str, str]]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("GET", "/v1/models")
    for key, value in headers:
        connection.putheader(key, value)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_failed_authentications_are_throttled_without_locking_out_valid_tokens(omni_bundles, tmp_path):
    """Issue 34: an attacker on the same address as a valid client (NAT, proxy, ingress) sends 40 wrong tokens
    and then one a second; its failures are throttled (RESOURCE_EXHAUSTED, gRPC and HTTP sharing the count),
    while the valid client's calls, 4 a second, all succeed."""
    port = free_port()
    with (
        ServerProcess(omni_bundles, tmp_path, *SMALL, "--token", "valid-token-aaaaaaaa", "--http-port", str(port)) as proc,
        FewShotClient(proc.target, token="valid-token-aaaaaaaa", retries=0) as valid,
        FewShotClient(proc.target, token="wrong-token", retries=0) as wrong,
    ):
        codes = []
        for i in range(40):  # every other one over HTTP
            if i % 2:
                codes.append(
                    {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}[_http_status(port, [("authorization", "Bearer wrong-token")])]
                )
                continue
            try:
                wrong.models()
            except (Unauthenticated, ResourceExhausted) as err:
                codes.append(err.code.name)
        assert codes.count("UNAUTHENTICATED") == 30 and codes[-1] == "RESOURCE_EXHAUSTED"  # 30 a minute, one count
        assert _http_status(port, [("authorization", "Bearer wrong-token")]) == 429
        assert _http_status(port, [("authorization", "Bearer valid-token-aaaaaaaa")]) == 200
        ok, refused, stop = [0], [], threading.Event()

        def attack() -> None:
            while not stop.wait(1.0):
                try:
                    wrong.models()
                except (Unauthenticated, ResourceExhausted) as err:
                    refused.append(err.code.name)

        attacker = threading.Thread(target=attack)
        attacker.start()
        try:
            for _ in range(20):  # 4 a second for 5 s
                assert OMNI in {m.name for m in valid.models()}
                ok[0] += 1
                time.sleep(0.25)
        finally:
            stop.set()
            attacker.join()
        assert ok[0] == 20
        # the attacker's count refills at 30 a minute: about every other failure of one a second is throttled
        assert "RESOURCE_EXHAUSTED" in refused and refused.count("UNAUTHENTICATED") <= len(refused) // 2 + 1


def test_two_authorization_headers_are_unauthenticated(omni_bundles, tmp_path):
    """Which of two tokens counts is never guessed: gRPC metadata and HTTP headers with two are refused."""
    port = free_port()
    token = "valid-token-aaaaaaaa"
    with (
        ServerProcess(omni_bundles, tmp_path, *SMALL, "--token", token, "--http-port", str(port)) as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = pb_grpc.FewShotStub(channel)
        assert stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}")]).models
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}"), ("authorization", "Bearer other")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "2 authorization headers" in err.value.details()
        assert _http_status(port, [("authorization", f"Bearer {token}")]) == 200
        assert _http_status(port, [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]) == 401


def test_single_token_from_a_file_or_the_environment(omni_bundles, tmp_path, episode):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-dddddddd\n")
    for args, env, token in [
        (("--token-file", str(token_file)), {}, "file-token-dddddddd"),
        ((), {"FEWSHOT_TOKEN": "env-token-eeeeeeee"}, "env-token-eeeeeeee"),
    ]:
        with ServerProcess(omni_bundles, tmp_path / "state", *SMALL, *args, env=env) as proc:
            with FewShotClient(proc.target, token=token, retries=0) as ok:
                assert OMNI in {m.name for m in ok.models()}
            with FewShotClient(proc.target, token="wrong", retries=0) as bad, pytest.raises(Unauthenticated):
                bad.models()
            assert token not in " ".join(proc.proc.args)


def test_tokens_file_errors_name_the_line():
    assert parse_tokens(f"a: {'0' * 64} max_tasks=3 rps=2.5\n")["0" * 64].max_tasks == 3
    for text, message in [
        ("no-colon\n", "line 1"),
        (f"a: {'0' * 63}\n", "64 hex digits"),
        (f"a: {'0' * 64} burst=3\n", "unknown option"),
        (f"a: {'0' * 64}\nb: {'0' * 64}\n", "line 2"),
    ]:
        with pytest.raises(TokensFileError, match=message):
            parse_tokens(text)
