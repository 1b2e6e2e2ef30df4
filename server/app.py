"""``fewshot serve``: the gRPC server process (grpc.aio) with health, reflection, auth, TLS and metrics.

Health: the overall service (``""``) is SERVING while the process runs (liveness); ``fewshot.v1.FewShot``
is the readiness signal: NOT_SERVING while the admission queue is full and while stopping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fewshot.errors import ConfigError
from fewshot.export.bundle import DEFAULT_BUNDLE_DIR
from fewshot.export.loader import open_bundle
from fewshot.export.registry import Bundle, Registry
from fewshot.models.family import Family, parts_in
from fewshot.server import memory
from fewshot.server.admin import ADMIN_SERVICE_NAME, AdminAuth, AdminService, BundleRefused, ModelControl
from fewshot.server.admission import Admission
from fewshot.server.auth import Authenticator, TokensFileError
from fewshot.server.budget import BodyBudget
from fewshot.server.config import ServeConfig
from fewshot.server.metrics import ServiceMetrics
from fewshot.server.migrate import Migrations, Progress
from fewshot.server.service import SERVICE_NAME, FewShotService, ServiceLimits
from fewshot.server.store import TaskStore
from fewshot.server.triton_backend import TritonBackend
from fewshot.server.versions import ServedModels
from fewshot.server.warmup import warm_up

log = logging.getLogger("fewshot.server")


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``: mutual TLS), or ``None``."""
    if cfg.tls_cert is None and cfg.tls_key is None:
        if cfg.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")

    def read(path: Path, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None

    ca = read(cfg.tls_client_ca, "client CA certificate") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(cfg.tls_key, "TLS key"), read(cfg.tls_cert, "TLS certificate"))], root_certificates=ca, require_client_auth=ca is not None
    )


def load_models(root: Path | None, device: str, threads: int, triton: TritonBackend | None = None) -> ServedModels:
    """Every version of every bundle of ``root`` (``None``: ``$FEWSHOT_BUNDLES``, else ``bundles``), verified by
    the registry and loaded once; with ``triton``, backbone and adapted-network inference go to that Triton
    server instead of in-process ONNX Runtime (one version per model: Triton's models are named by model)."""
    registry = Registry.load(root or DEFAULT_BUNDLE_DIR)
    if triton is not None:
        return ServedModels(
            open_bundle(bundle, device, threads, triton.engines(name, parts_in(bundle.manifest)))
            for name, bundle in registry.bundles.items()
        )
    return ServedModels(open_bundle(b, device, threads) for versions in registry.versions.values() for b in versions.values())


def configure_model(model: Family, cfg: ServeConfig) -> Family:
    """Apply the server's task and inner-loop settings to a model loaded in process."""
    import torch

    model.hold_tasks_in(getattr(torch, cfg.task_dtype))
    model.adapt_in(getattr(torch, cfg.inner_precision))
    if cfg.merge_tasks != "auto":
        model.merge_tasks(cfg.merge_tasks == "on")
    if cfg.batch_adapts != "auto":
        model.batch_adapts(cfg.batch_adapts == "on")
    return model


def open_version(cfg: ServeConfig) -> Callable[[Bundle], Family]:
    """What loads a bundle at runtime (:class:`ModelControl`): in process, configured as the others."""

    def opened(bundle: Bundle) -> Family:
        if cfg.feature_backend == "triton":
            raise BundleRefused("versions are loaded at runtime with --feature-backend onnxruntime only: restart the server to change them")
        return configure_model(open_bundle(bundle, cfg.device, cfg.threads), cfg)

    return opened


async def connect_triton(cfg: ServeConfig) -> tuple[TritonBackend, ServedModels]:
    """The Triton backend of ``--feature-backend triton`` and the models that use it, once Triton is
    live and serves every model they need (else :class:`TritonNotReady`, one message for all)."""
    triton = TritonBackend(cfg.triton_url, cfg.triton_timeout)
    try:
        models = load_models(cfg.models, cfg.device, cfg.threads, triton)
        await triton.check(sig for m in models.values() for sig in m.signatures())
    except BaseException:
        await triton.close()
        raise
    return triton, models


async def serve(cfg: ServeConfig, ready: asyncio.Event | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (graceful stop: in-flight calls get 5 s)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    triton = None
    if cfg.feature_backend == "triton":
        triton, models = await connect_triton(cfg)
    else:
        models = load_models(cfg.models, cfg.device, cfg.threads)
        for name in models:
            for model in models.versions(name):
                configure_model(model, cfg)
    credentials = server_credentials(cfg)
    auth = Authenticator(cfg.token, cfg.tokens_file, cfg.tenant_max_tasks, cfg.tenant_rps)
    metrics = ServiceMetrics()
    store = TaskStore(cfg.store or cfg.state_dir, cfg.cache_mb << 20, on_event=lambda e: metrics.cache.labels(e).inc())
    for name, pinned in models.pin_old_rows(store).items():  # rows stored before versions were recorded
        log.warning(json.dumps({"event": "tasks pinned", "model": name, "version": models[name].version, "tasks": pinned}))
    metrics.count_tasks_with(store.count)
    metrics.cache_bytes.set_function(lambda: store.cached_bytes)
    executor = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="fewshot-work")
    limits = ServiceLimits.from_config(cfg)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # health.py imports aio in a version check mypy does not follow
    loop = asyncio.get_running_loop()
    stopping = False

    serving = {"now": False}  # what the health service says, for the HTTP API's /healthz

    def readiness(saturated: bool) -> None:
        if stopping:
            return
        serving["now"] = not saturated
        status = health_pb2.HealthCheckResponse.NOT_SERVING if saturated else health_pb2.HealthCheckResponse.SERVING
        loop.create_task(health_servicer.set(SERVICE_NAME, status))
        log.warning(json.dumps({"event": "saturated" if saturated else "drained", "queue": cfg.max_queue}))

    admission = Admission(cfg.max_inflight, cfg.max_queue, metrics.admission_changed, readiness, metrics.admission_waited)
    allocator = memory.configure()  # calls' memory goes back to the system when they end (server/memory.py)
    bodies = BodyBudget(cfg.max_inflight_body_mb << 20, on_release=memory.Trimmer().after if allocator else lambda size: None)
    metrics.body_bytes.set_function(lambda: bodies.held)
    service = FewShotService(models, store, executor, metrics, limits, cfg.batch_delay_ms / 1e3, cfg.max_batch, auth, admission, bodies)
    size = cfg.max_message_mb << 20
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)])
    service.add_to_server(server)
    # explicit control: admin changes are recorded in the task database and replayed by every process sharing it
    control = ModelControl(cfg.models or DEFAULT_BUNDLE_DIR, models, open_version(cfg), store if cfg.model_control == "explicit" else None)
    control.sync()  # what other replicas' admin calls recorded before this one started

    def migrated(name: str, version: str, progress: Progress) -> None:
        for state, count in (("done", progress.done), ("left", progress.left), ("failed", len(progress.failed))):
            metrics.migration.labels(name, version, state).set(count)

    migrations = Migrations(store, migrated)
    admin = AdminService(control, AdminAuth(cfg.admin_token, auth.digests()), lambda name: service.describe_model(name), migrations)
    admin.add_to_server(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port} (port in use or not allowed)")
    if cfg.warmup_tasks:
        warmed = await loop.run_in_executor(executor, warm_up, models, cfg.warmup_tasks)
        log.warning(json.dumps({"event": "warmed up", "tasks_per_method": cfg.warmup_tasks, "seconds": warmed}))
    await server.start()
    http = None
    if cfg.http_port is not None:
        from fewshot.server.http_api import HttpServer, http_app

        http = HttpServer(
            http_app(service, limits.max_request_bytes, lambda: serving["now"] and not stopping, admin),
            cfg.host,
            cfg.http_port,
            str(cfg.tls_cert) if cfg.tls_cert else None,
            str(cfg.tls_key) if cfg.tls_key else None,
        )
        http_port = await http.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    serving["now"] = True
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.host)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload_tokens() -> None:
        try:
            count = auth.reload()
            log.warning(json.dumps({"event": "tokens reloaded", "tenants": count}))
        except TokensFileError as exc:
            log.error(json.dumps({"event": "tokens reload failed; the previous tenants stay", "error": str(exc)}))

    if cfg.tokens_file is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_tokens)

    async def purge() -> None:
        while True:
            await asyncio.sleep(cfg.purge_every)
            await loop.run_in_executor(executor, store.purge_expired)

    purger = loop.create_task(purge())

    async def watch(every: float, look: Callable[[], int]) -> None:
        """--model-control poll: the model directory is what is served; explicit: what admin calls recorded."""
        while True:
            await asyncio.sleep(every)
            try:
                await loop.run_in_executor(None, look)
            except Exception:  # the database away, or a bug: logged, tried again next time; serving goes on
                log.exception("updating the served model versions failed")

    poll = cfg.model_control == "poll"
    watcher = loop.create_task(watch(cfg.poll_seconds, control.poll) if poll else watch(cfg.sync_seconds, control.sync))
    backend = f"Triton at {cfg.triton_url}" if triton else "ONNX Runtime in process"
    security = ("mutual TLS" if cfg.tls_client_ca else "TLS") if credentials else "plaintext"
    security += f", {'tokens of ' + str(len(list(auth.tenant_names()))) + ' tenants' if cfg.tokens_file else 'one token' if cfg.token else 'no token'}"
    print(
        f"fewshot serve: listening on {cfg.host}:{port} ({security}) with {', '.join(sorted(models))} ({backend}); "
        f"tasks in {store}; {f'HTTP/JSON on {cfg.host}:{http_port}; ' if http else ''}pid {os.getpid()}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    stopping = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    purger.cancel()
    watcher.cancel()
    if http is not None:
        await http.stop()
    await server.stop(grace=5.0)
    # Off the loop: a worker still waiting on Triton needs the loop to finish its call.
    await loop.run_in_executor(None, executor.shutdown)
    if triton is not None:
        await triton.close()
    store.close()
    print("fewshot serve: stopped", flush=True)


def run(cfg: ServeConfig) -> None:
    """Blocking entry point of ``fewshot serve``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # One access-log line per call is written on the event loop; its format is the message alone, so the record
    # need not find its caller's frame or name its thread and process (the logging docs' "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    memory.configure()  # before any thread of the server makes its malloc arena (serve() calls it again: idempotent)
    asyncio.run(serve(cfg))
