"""Settings of ``fewshot serve`` (kept free of heavy imports so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeConfig:
    """Settings of ``fewshot serve`` (see its ``--help``)."""

    models: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    state_dir: Path = Path(".fewshot-state")
    #: The task database when not ``state_dir``'s SQLite file: ``postgresql://...`` or ``sqlite:PATH``.
    store: str | None = None
    metrics_port: int = 0
    #: The HTTP/JSON API's port (``None``: off; 0 picks a free one, printed at start).
    http_port: int | None = None
    token: str | None = None
    #: ``tenant: sha256 [max_tasks=N] [rps=R]`` lines, reloaded on SIGHUP (see ``fewshot.server.auth``).
    tokens_file: Path | None = None
    tenant_max_tasks: int = 0
    tenant_rps: float = 0.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With a client CA, clients must present a certificate it signed (mutual TLS).
    tls_client_ca: Path | None = None
    threads: int = 0
    workers: int = 4
    batch_delay_ms: float = 2.0
    max_batch: int = 256
    cache_mb: int = 256
    max_message_mb: int = 64
    max_image_mb: float = 8.0
    max_support: int = 2500
    max_queries: int = 1024
    max_call_megapixels: float = 256.0
    max_image_steps: int = 20000
    max_request_mb: int = 256
    #: Bytes of request bodies all calls in flight hold together (unary messages count twice: bytes and parsed copy).
    max_inflight_body_mb: int = 512
    #: Heavy calls (Adapt, Classify) running at once, and waiting beyond those (then RESOURCE_EXHAUSTED).
    max_inflight: int = 16
    max_queue: int = 64
    default_ttl: int = 24 * 3600
    purge_every: float = 60.0
    #: Synthetic tasks per model and method run before the port opens (0: none; ``server/warmup.py``).
    warmup_tasks: int = 1
    #: Merge Classify requests of different inner-loop tasks into one stacked call: ``auto`` (on CUDA,
    #: where it wins; off on CPU, where one call per task is as fast: BENCHMARKS.md), ``on`` or ``off``.
    merge_tasks: str = "auto"
    #: Concurrent Adapts of one inner-loop model and support shape as one stacked inner loop: ``auto``
    #: (on CUDA), ``on`` or ``off``.
    batch_adapts: str = "auto"
    #: What inner-loop tasks' adapted weights are held and stored in: ``float32`` or ``float16`` (half the memory).
    task_dtype: str = "float32"
    #: What the inner loop computes in: ``float32`` or ``bfloat16`` (autocast; CPUs with native bfloat16, or CUDA).
    inner_precision: str = "float32"
    #: ``onnxruntime`` (in process) or ``triton`` (backbone and adapted-network inference over gRPC).
    feature_backend: str = "onnxruntime"
    triton_url: str = "127.0.0.1:8001"
    triton_timeout: float = 30.0
