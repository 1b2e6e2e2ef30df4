"""A ``fewshot serve`` child process on loopback: started, probed through the standard health
service, stopped (SIGTERM) or killed (SIGKILL) by PID. ``fewshot demo``, ``fewshot bench`` and the
tests run the real server this way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fewshot.errors import FewShotError


class ServerStartError(FewShotError, RuntimeError):
    """``fewshot serve`` exited or did not become healthy in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``fewshot serve --models DIR --state-dir DIR --port P [args]`` as a child process (output in ``log``)."""

    def __init__(self, models: Path, state_dir: Path, *args: str, log: Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None, env: dict[str, str] | None = None) -> None:
        """``credentials``: the TLS channel credentials the health probe uses (a server given
        ``--tls-cert``); ``env``: extra environment variables of the child."""
        self.models, self.state_dir, self.args = Path(models), Path(state_dir), list(args)
        self.credentials, self.env = credentials, env or {}
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = log or self.state_dir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fewshot.cli", "serve", "--models", str(self.models), "--state-dir",
               str(self.state_dir), "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"fewshot serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    time.sleep(0.2)
        self.kill()
        raise ServerStartError(f"fewshot serve did not become healthy in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def channel(self, **kw) -> grpc.Channel:
        """A channel to the server (TLS when the process was given ``credentials``)."""
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, **kw)
        return grpc.insecure_channel(self.target, **kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash-safety case)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def resident_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (``/proc``, Linux)."""
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


class ResidentMemory:
    """Samples a process's resident memory every ``every`` seconds in a thread while the block runs:
    ``peak`` (MB) since the start or :meth:`reset`, ``samples`` taken."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        import threading

        self.pid, self.every, self.peak, self.samples = pid, every, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                value = resident_mb(self.pid)
            except (OSError, IndexError):
                return
            self.peak, self.samples = max(self.peak, value), self.samples + 1

    def reset(self) -> None:
        self.peak = resident_mb(self.pid)

    def __enter__(self) -> "ResidentMemory":
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def adapt_load(target: str, pid: int, model: str, supports: list[tuple[list, list]], clients: int, warm: int,
               tasks: int) -> dict[str, float]:
    """``clients`` threads adapt centroid tasks of ``model`` from ``supports`` (``(support, queries)`` messages,
    cycled) and classify each task's queries, ``tasks`` in all; the first ``warm`` are warm-up. Returns the
    server's resident memory after warm-up and its peak over the rest (MB, sampled every 100 ms), the samples
    taken and the seconds the load took."""
    from concurrent.futures import ThreadPoolExecutor

    from fewshot_proto import fewshot_pb2 as pb
    from fewshot_proto import fewshot_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.FewShotStub(channel)

        def one(i: int) -> None:
            support, queries = supports[i % len(supports)]
            task = stub.Adapt(pb.AdaptRequest(model=model, method="centroid", support=support), timeout=120)
            stub.Classify(pb.ClassifyRequest(task_id=task.task_id, queries=queries), timeout=120)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(warm)))
            after_warmup, started = resident_mb(pid), time.monotonic()
            with ResidentMemory(pid) as rss:
                list(pool.map(one, range(warm, tasks)))
    return {"rss_after_warmup_mb": after_warmup, "rss_peak_mb": rss.peak, "samples": rss.samples,
            "seconds": time.monotonic() - started}
