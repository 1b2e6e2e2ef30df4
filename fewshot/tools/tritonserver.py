"""A real ``tritonserver`` child process on loopback, from the nvidia-pytriton wheel of a virtual
environment (``scripts/triton-env.sh`` makes ``.venv-triton``): the tests run Triton this way, and
so can anyone without a Triton container.

That binary carries only the python backend (no ``onnxruntime_onnx``), so it serves the python
variant of the repository (``fewshot export --triton-backend python``). What it needs
(``../shared/ENVIRONMENT.md``): a backends folder holding the python backend plus the stub built for
the venv's Python, the venv's Python library folder first on ``LD_LIBRARY_PATH`` (else the stub links
an older system libpython and model loading fails), the wheel's bundled libraries, and the venv's
``bin`` first on ``PATH`` (the python backend imports packages from that interpreter's environment).

:class:`TritonProcess` starts it in explicit model-control mode with the requested models loading (in
parallel; ``--exit-on-error=false``, so a model that fails to load is reported by name with Triton's
reason instead of the server exiting), waits until each is ready, and stops it by PID: SIGTERM, then
SIGKILL. It can be started again on the same repository, on the same ports, so clients reconnect.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fewshot.errors import FewShotError
from fewshot.tools.process import free_port

#: ``scripts/triton-env.sh`` makes it in the checkout (``$FEWSHOT_TRITON_VENV`` points elsewhere).
DEFAULT_VENV = Path(os.environ.get("FEWSHOT_TRITON_VENV", Path(__file__).resolve().parents[2] / ".venv-triton"))


class TritonUnavailable(FewShotError, RuntimeError):
    """The ``tritonserver`` binary cannot run on this machine (the venv or wheel is missing, or the binary
    does not execute: wrong glibc, missing libraries); the message says why and what to do. The tests
    skip on this, and only on this."""


class TritonStartError(FewShotError, RuntimeError):
    """The binary runs, but the server did not come up serving the models: it exited, timed out, or a
    model failed to load (the message carries Triton's reason and its log)."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a venv's nvidia-pytriton keeps ``tritonserver``, and the paths it needs to run."""

    venv: Path
    binary: Path
    python_backend: Path
    stub: Path
    library_path: list[Path]

    @staticmethod
    def locate(venv: Path = DEFAULT_VENV) -> "TritonInstall":
        """Find the binary inside ``venv`` (:class:`TritonUnavailable` when the venv or wheel is missing)."""
        python = Path(venv) / "bin" / "python"
        if not python.exists():
            raise TritonUnavailable(f"{venv} does not exist: run scripts/triton-env.sh (or `make test-triton`) to create it")
        probe = ("import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], "
                 "sysconfig.get_config_var('LIBDIR'), '%d.%d' % sys.version_info[:2]]))")
        site, libdir, version = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout)
        root = Path(site) / "pytriton" / "tritonserver"
        install = TritonInstall(Path(venv), root / "bin" / "tritonserver", root / "backends" / "python",
                                root / "python_backend_stubs" / version / "triton_python_backend_stub",
                                [Path(libdir), Path(site) / "nvidia_pytriton.libs"])
        for what, path in (("tritonserver binary", install.binary), ("python backend", install.python_backend),
                           (f"python backend stub for Python {version}", install.stub)):
            if not path.exists():
                raise TritonUnavailable(f"no {what} at {path}: install nvidia-pytriton==0.7.0 into {venv} (scripts/triton-env.sh)")
        return install

    def check_runs(self) -> None:
        """Execute the binary once (``--help``): :class:`TritonUnavailable` unless it prints its usage."""
        try:
            probe = subprocess.run([str(self.binary), "--help"], capture_output=True, text=True, timeout=60,
                                   env=self.environment())
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TritonUnavailable(f"cannot execute {self.binary}: {exc}") from None
        if "Usage: tritonserver" not in probe.stdout + probe.stderr:
            raise TritonUnavailable(f"{self.binary} does not run on this machine (exit {probe.returncode}): "
                                    f"{(probe.stderr or probe.stdout).strip()[-2000:]}")

    def backends(self) -> Path:
        """A backends folder for ``--backend-directory``: the python backend with the stub beside it,
        prepared once per venv (built in a temporary folder and renamed, so concurrent callers agree)."""
        target = self.venv / "triton-backends"
        if (target / "python" / self.stub.name).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".triton-backends-", dir=self.venv))
        shutil.copytree(self.python_backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.stub, tmp / "python" / self.stub.name)
        try:
            tmp.rename(target)
        except OSError:  # another process prepared it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def environment(self) -> dict[str, str]:
        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.library_path), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env.pop("PYTHONPATH", None)  # the stub must import the venv's packages, not the caller's
        return env


class TritonProcess:
    """``tritonserver --model-repository=REPO`` on 127.0.0.1 with free ports, ``models`` loaded.

    Example::

        with TritonProcess(repo, models=["fewshot_adapt", ...]) as triton:
            client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
    """

    def __init__(self, repo: Path, venv: Path = DEFAULT_VENV, models: Sequence[str] = (), log: Path | None = None) -> None:
        self.repo, self.venv, self.models = Path(repo), Path(venv), list(models)
        self.log = log or Path(tempfile.gettempdir()) / f"tritonserver-{os.getpid()}-{id(self):x}.log"
        self.proc: subprocess.Popen | None = None
        self.grpc_port = self.http_port = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def start(self, timeout: float = 120.0) -> "TritonProcess":
        """Start with every model loading (in parallel), wait until live, check each model is ready.
        :class:`TritonUnavailable` when the binary cannot run here; otherwise :class:`TritonStartError`
        (naming each model that failed to load, with Triton's reason) when it does not come up."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"tritonserver (pid {self.proc.pid}) is already running on {self.grpc_url}: stop() it first")
        install = TritonInstall.locate(self.venv)
        install.check_runs()
        if not self.grpc_port:  # started again: same ports, so clients reconnect to the same address
            self.grpc_port = self.http_port = free_port()
            while self.http_port == self.grpc_port:
                self.http_port = free_port()
        cmd = [str(install.binary), f"--model-repository={self.repo}", f"--backend-directory={install.backends()}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
               f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--allow-gpu-metrics=false",
               "--model-control-mode=explicit", "--exit-on-error=false", *(f"--load-model={m}" for m in self.models)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=install.environment())
        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while not self._live(client, InferenceServerException):
                if self.proc.poll() is not None:
                    raise TritonStartError(f"tritonserver exited with {self.proc.returncode} before serving:\n{self._log_tail()}")
                if time.monotonic() > deadline:
                    raise TritonStartError(f"tritonserver did not become live in {timeout:.0f} s:\n{self._log_tail()}")
                time.sleep(0.2)
            failed = [m for m in self.models if not client.is_model_ready(m)]
            if failed:
                reasons = {m["name"]: m.get("reason", "") for m in client.get_model_repository_index(as_json=True).get("models", [])}
                raise TritonStartError(f"Triton (repository {self.repo}) did not load "
                                       + "; ".join(f"{m}: {reasons.get(m) or 'not in the repository'}" for m in failed)
                                       + f"\n{self._log_tail()}")
        except BaseException:
            self.kill()
            raise
        finally:
            client.close()
        return self

    @staticmethod
    def _live(client, error: type[Exception]) -> bool:
        try:
            return client.is_server_live()
        except error:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL if it has not gone in ``timeout``."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: Triton's python-backend stubs notice their parent is gone and exit on their own."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> "TritonProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
