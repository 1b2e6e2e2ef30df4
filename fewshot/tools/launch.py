"""Launching ``fewshot serve`` as a child process on loopback: started, probed through the standard
health service, stopped (SIGTERM) or killed (SIGKILL) by PID. ``fewshot demo`` and ``fewshot bench
--compare`` run the real server this way, and so do the tests and ``scripts/``."""

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


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of process ``pid`` (``os.getpid()``: this one) onto ``cores`` (``taskset -a -p``'s call);
    threads made later inherit their creator's set."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


class ServerStartError(FewShotError, RuntimeError):
    """``fewshot serve`` exited or did not become healthy in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``fewshot serve --models DIR --state-dir DIR --port P [args]`` as a child process (output in ``log``)."""

    def __init__(
        self,
        models: Path,
        state_dir: Path,
        *args: str,
        log: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``credentials``: the TLS channel credentials the health probe uses (a server given
        ``--tls-cert``); ``env``: extra environment variables of the child."""
        self.models, self.state_dir, self.args = Path(models), Path(state_dir), list(args)
        self.credentials, self.env = credentials, env or {}
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = log or self.state_dir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fewshot.cli",
            "serve",
            "--models",
            str(self.models),
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, **self.env})
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

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
