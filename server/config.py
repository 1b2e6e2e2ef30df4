"""Settings of ``fewshot serve``, declared once: each field's default, help, choices and environment variable.

``fewshot serve``'s flags are generated from these fields (:func:`add_arguments`, :func:`from_arguments`), so a
default or a help text is written here and nowhere else. Kept free of heavy imports so the CLI starts fast.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, env: str | None = None, flag: str | None = None) -> Any:
    """A :class:`ServeConfig` field: ``help`` for ``--help``; ``env`` names an environment variable that sets it
    when the flag is not given (secrets and what the container sets); ``flag`` when it is not ``--field-name``."""
    return field(default=default, metadata={"help": help, "choices": choices, "env": env, "flag": flag})


@dataclass
class ServeConfig:
    """Settings of ``fewshot serve`` (see its ``--help``)."""

    models: Path | None = option(None, "bundle directory (default: $FEWSHOT_BUNDLES, else bundles/ in the working directory)")
    host: str = option("127.0.0.1", "listen address (0.0.0.0 in a container)")
    port: int = option(50051, "gRPC port; 0 picks a free port (printed at start)")
    device: str = option("auto", "where models run", choices=("auto", "cpu", "cuda"))
    state_dir: Path = option(
        Path(".fewshot-state"), "persistent task store (SQLite, WAL), shareable by the processes of one host (the embedded default)"
    )
    store: str | None = option(
        None,
        "task database instead of --state-dir: postgresql://USER[:PASSWORD]@HOST:PORT/DB "
        "(replicas on any number of hosts share it) or sqlite:PATH (prefer $FEWSHOT_STORE for a "
        "password)",
        env="FEWSHOT_STORE",
    )
    metrics_port: int = option(0, "Prometheus metrics port (0: off)")
    http_port: int | None = option(
        None, "also serve the HTTP/JSON API and the web console on this port (0 picks a free one, printed at start; default: off)"
    )
    token: str | None = option(
        None,
        "require `authorization: Bearer TOKEN` (prefer $FEWSHOT_TOKEN or --token-file: a command line is visible to other users)",
        env="FEWSHOT_TOKEN",
    )
    tokens_file: Path | None = option(
        None,
        "tenants file: one `tenant: sha256-of-token [max_tasks=N] [rps=R]` per line, "
        "reloaded on SIGHUP (`fewshot token-hash` prints a token's hash)",
        flag="--tokens",
    )
    admin_token: str | None = option(
        None,
        "the admin token: `authorization: Bearer ADMIN_TOKEN` on FewShotAdmin calls and /v1/admin routes (load, unload, "
        "default version); no tenant token grants it; without it admin calls are refused (prefer --admin-token-file)",
        env="FEWSHOT_ADMIN_TOKEN",
    )
    model_control: str = option(
        "explicit",
        "how the served model versions change at runtime: explicit (admin calls: fewshot-client models load|unload|default), "
        "poll (also watch the model directory every --poll-seconds: new or changed versions loaded, removed ones unloaded)",
        choices=("explicit", "poll"),
    )
    poll_seconds: float = option(5.0, "seconds between looks at the model directory with --model-control poll")
    sync_seconds: float = option(
        1.0,
        "with --model-control explicit: seconds between looks at the admin changes other replicas recorded in the "
        "shared task database (a load, an unload, a default version), applied here from this replica's model directory",
    )
    tenant_max_tasks: int = option(0, "live tasks per tenant (0: unlimited)")
    tenant_rps: float = option(0.0, "requests per second per tenant (0: unlimited)")
    tls_cert: Path | None = option(None, "PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(None, "PEM CA certificate(s): require client certificates signed by it (mutual TLS)")
    threads: int = option(0, "torch / ONNX Runtime threads per call (0: library default)")
    workers: int = option(4, "worker threads for decoding, adaptation, inference")
    batch_delay_ms: float = option(2.0, "how long Classify waits to merge requests")
    max_batch: int = option(256, "images per merged backbone call")
    cache_mb: int = option(256, "memory budget of the task cache")
    max_message_mb: int = option(64, "gRPC message size limit")
    max_image_mb: float = option(8.0, "encoded size limit per image")
    max_support: int = option(2500, "images per support set")
    max_queries: int = option(1024, "images per Classify call")
    max_call_megapixels: float = option(256.0, "decoded pixels per call, all its images together (2**20 pixels each)")
    max_image_steps: int = option(20000, "support images x inner steps per Adapt")
    max_request_mb: int = option(256, "bytes per Adapt or AdaptStream, all chunks")
    max_inflight_body_mb: int = option(
        512, "bytes of request bodies all calls in flight hold together, unary messages counted twice (past it, RESOURCE_EXHAUSTED)"
    )
    max_inflight: int = option(16, "Adapt/Classify calls running at once")
    max_queue: int = option(64, "calls waiting beyond --max-inflight; past it, RESOURCE_EXHAUSTED and readiness NOT_SERVING")
    default_ttl: int = option(24 * 3600, "task time-to-live in seconds when Adapt sets none")
    purge_every: float = option(60.0, "seconds between purges of expired tasks")
    warmup_tasks: int = option(
        1, "synthetic tasks per model and method run before the port opens, so the first call is fast (0: none; server/warmup.py)"
    )
    merge_tasks: str = option(
        "auto",
        "merge Classify requests of different inner-loop tasks into one stacked call "
        "(auto: on CUDA, where it wins; off on CPU: BENCHMARKS.md)",
        choices=("auto", "on", "off"),
    )
    batch_adapts: str = option(
        "auto",
        "run concurrent Adapts of one inner-loop model and support shape as one stacked "
        "inner loop (auto: on CUDA only; on a CPU it wins for small images, BENCHMARKS.md)",
        choices=("auto", "on", "off"),
    )
    task_dtype: str = option(
        "float32",
        "what inner-loop tasks' adapted weights are held and stored in (float16: half the memory per task)",
        choices=("float32", "float16"),
    )
    inner_precision: str = option(
        "float32",
        "what the inner loop computes in (bfloat16: autocast, on CPUs with native bfloat16 or CUDA)",
        choices=("float32", "bfloat16"),
    )
    feature_backend: str = option(
        "onnxruntime",
        "where backbone and adapted-network inference run: in-process ONNX "
        "Runtime, or a Triton server serving the repository of `fewshot export --triton-repo`",
        choices=("onnxruntime", "triton"),
    )
    triton_url: str = option("127.0.0.1:8001", "Triton's gRPC HOST:PORT")
    triton_timeout: float = option(30.0, "seconds one Triton call may take before the request fails with UNAVAILABLE")


def _kind(hint: Any) -> type:
    """``int`` of ``int``, ``Path`` of ``Path | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_arguments(parser: argparse.ArgumentParser, cls: type = ServeConfig) -> None:
    """One flag per field of ``cls`` (``--field-name``, or its ``flag``): its type, choices, help and default; a
    field with ``env`` takes that variable's value when set."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind, meta = _kind(hints[f.name]), f.metadata
        default = None if f.default is MISSING else f.default
        if meta.get("env") and os.environ.get(meta["env"]):
            default = kind(os.environ[meta["env"]])
        shown = f" (default: {f.default})" if f.default not in (None, MISSING) else ""
        env = f"; ${meta['env']}" if meta.get("env") else ""
        parser.add_argument(
            meta.get("flag") or "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            choices=meta.get("choices"),
            help=f"{meta.get('help', '')}{shown}{env}",
        )


def from_arguments(args: argparse.Namespace, cls: type = ServeConfig, **overrides: Any) -> Any:
    """``cls`` from the flags :func:`add_arguments` added (``overrides`` replace fields)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
