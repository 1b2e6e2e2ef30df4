"""Container health check: exit 0 when ``fewshot serve`` answers SERVING on the standard gRPC health
service (``grpc.health.v1``, open even with ``--token``), else exit 1 with the reason on stderr.

Usage: ``python healthcheck.py [HOST:PORT]`` (default ``127.0.0.1:$FEWSHOT_PORT``, port 50051).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout: float = 3.0) -> str | None:
    """``None`` when ``target`` is SERVING, else why not."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str]) -> int:
    target = argv[0] if argv else f"127.0.0.1:{os.environ.get('FEWSHOT_PORT', '50051')}"
    problem = check(target)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
