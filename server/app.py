"""``fewshot serve``: the gRPC server process (grpc.aio) with health, reflection, auth and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fewshot.export.loader import BundleModel
from fewshot.export.registry import Registry
from fewshot.server.config import ServeConfig
from fewshot.server.images import ImageLimits
from fewshot.server.metrics import ServiceMetrics
from fewshot.server.service import FewShotService, ServiceLimits
from fewshot.server.store import TaskStore
from fewshot.server.triton_backend import TritonBackend, expected_signature
from fewshot_client._proto import fewshot_pb2 as pb
from fewshot_client._proto import fewshot_pb2_grpc as pb_grpc

log = logging.getLogger("fewshot.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FewShot"].full_name
#: Calls that stay open without a token, so load balancers and grpcurl can probe the server.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health and reflection stay open)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self.expected):
            return handler
        message = "missing or wrong token: send metadata `authorization: Bearer <token>`"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


def load_models(root: Path, device: str, threads: int, triton: TritonBackend | None = None) -> dict[str, BundleModel]:
    """Every bundle of ``root``, verified by the registry and loaded once; with ``triton``, backbone
    and adapted-network inference go to that Triton server instead of in-process ONNX Runtime."""
    models = {}
    for name, bundle in Registry.load(root).bundles.items():
        extract = network = None
        if triton is not None:
            extract, network = triton.features(name, int(bundle.manifest["feature_dim"])), triton.network(name)
        models[name] = BundleModel(bundle, device, threads, extract, network)
    return models


async def connect_triton(cfg: ServeConfig) -> tuple[TritonBackend, dict[str, BundleModel]]:
    """The Triton backend of ``--feature-backend triton`` and the models that use it, once Triton is
    live and serves every model they need (else :class:`TritonNotReady`, one message for all)."""
    triton = TritonBackend(cfg.triton_url, cfg.triton_timeout)
    try:
        models = load_models(cfg.models, cfg.device, cfg.threads, triton)
        await triton.check(expected_signature(m) for m in models.values())
    except BaseException:
        await triton.close()
        raise
    return triton, models


async def serve(cfg: ServeConfig, ready: asyncio.Event | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (graceful stop: in-flight calls get 5 s)."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    triton = None
    if cfg.feature_backend == "triton":
        triton, models = await connect_triton(cfg)
    else:
        models = load_models(cfg.models, cfg.device, cfg.threads)
    metrics = ServiceMetrics()
    store = TaskStore(cfg.state_dir, cfg.cache_mb << 20, on_event=lambda e: metrics.cache.labels(e).inc())
    metrics.count_tasks_with(store.count)
    executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="fewshot-work")
    limits = ServiceLimits(max_support=cfg.max_support, max_queries=cfg.max_queries, default_ttl=cfg.default_ttl,
                           image=ImageLimits(max_bytes=int(cfg.max_image_mb * (1 << 20))))
    service = FewShotService(models, store, executor, metrics, limits, cfg.batch_delay_ms / 1e3, cfg.max_batch)
    size = cfg.max_message_mb << 20
    server = grpc.aio.server(interceptors=[TokenAuth(cfg.token)] if cfg.token else [],
                             options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)])
    pb_grpc.add_FewShotServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port} (port in use or not allowed)")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def purge() -> None:
        while True:
            await asyncio.sleep(cfg.purge_every)
            await loop.run_in_executor(executor, store.purge_expired)

    purger = loop.create_task(purge())
    backend = f"Triton at {cfg.triton_url}" if triton else "ONNX Runtime in process"
    print(f"fewshot serve: listening on {cfg.host}:{port} with {', '.join(sorted(models))} ({backend}); "
          f"state in {cfg.state_dir}; pid {os.getpid()}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    purger.cancel()
    await server.stop(grace=5.0)
    # Off the loop: a worker still waiting on Triton needs the loop to finish its call.
    await loop.run_in_executor(None, executor.shutdown)
    if triton is not None:
        await triton.close()
    print("fewshot serve: stopped", flush=True)


def run(cfg: ServeConfig) -> None:
    """Blocking entry point of ``fewshot serve``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    asyncio.run(serve(cfg))
