"""Shared fixtures: real data from ../shared/data (or $FEWSHOT_DATA) and the shipped models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support import SHIPPED, SMALL

from fewshot.models.data import load_omniglot

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def omniglot_test():
    return load_omniglot("test")


@pytest.fixture(scope="session")
def omniglot_model():
    from fewshot.models.zoo import load_model

    return load_model("omniglot-conv4-directsum")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, worker_id):
    """Every shipped model exported once: ``(bundle dir, Triton repository)``, read-only to the tests. Under
    pytest-xdist (``make test``) the workers share one export: the first to get the lock writes it into the
    run's common temporary folder, the others wait for it and read it."""
    from filelock import FileLock

    from fewshot.export.bundle import export_model

    def export(out: Path, repo: Path) -> tuple[Path, Path]:
        for name in SHIPPED:
            export_model(name, out, triton_repo=repo, log=lambda *_: None)
        return out, repo

    if worker_id == "master":  # one process: its own temporary folders
        return export(tmp_path_factory.mktemp("bundles"), tmp_path_factory.mktemp("triton"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    out, repo, done = shared / "bundles", shared / "triton", shared / "exported.done"
    with FileLock(str(shared / "exported.lock")):
        if not done.exists():
            for d in (out, repo):
                shutil.rmtree(d, ignore_errors=True)  # a worker that died half-way
                d.mkdir()
            export(out, repo)
            done.touch()
    return out, repo


@pytest.fixture(scope="session")
def omni_bundles(exported, tmp_path_factory):
    """A bundle directory with only the Omniglot direct-sum and CxGrad models (a server starts quickly on it)."""
    root = tmp_path_factory.mktemp("omni-bundles")
    for name in ("omniglot-conv4-directsum", "omniglot-conv4-cxgrad"):
        (root / name).symlink_to(exported[0] / name, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    """A real ``fewshot serve`` on loopback over every shipped bundle; small limits so the
    RESOURCE_EXHAUSTED cases stay cheap, a longer batching window so concurrent calls merge."""
    from fewshot.tools.launch import ServerProcess, free_port

    metrics_port, http_port = free_port(), free_port()
    proc = ServerProcess(
        exported[0],
        tmp_path_factory.mktemp("state"),
        *SMALL,
        "--max-message-mb",
        "4",
        "--max-image-mb",
        "1",
        "--max-support",
        "300",
        "--max-queries",
        "200",
        "--batch-delay-ms",
        "30",
        "--metrics-port",
        str(metrics_port),
        "--warmup-tasks",
        "1",
        "--http-port",
        str(http_port),
    )
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    proc.http_url = f"http://127.0.0.1:{http_port}"  # the HTTP/JSON API of the same process
    with proc:
        yield proc


@pytest.fixture(scope="session")
def token_server(exported, tmp_path_factory):
    """The same bundles behind ``--token secret-token``."""
    from fewshot.tools.launch import ServerProcess, free_port

    http_port = free_port()
    with ServerProcess(
        exported[0], tmp_path_factory.mktemp("state-token"), *SMALL, "--token", "secret-token", "--http-port", str(http_port)
    ) as proc:
        proc.http_url = f"http://127.0.0.1:{http_port}"
        yield proc


@pytest.fixture(scope="session")
def triton(exported, tmp_path_factory):
    """A real ``tritonserver`` (the nvidia-pytriton binary of ``.venv-triton``, ``scripts/triton-env.sh``)
    on the python-backend variant of the repository built from the ``exported`` bundles, every model
    loaded, ``fewshot_adapt``/``fewshot_classify`` keeping tasks in ``triton.state_dir``. Skipped, with
    the reason, only where the binary cannot run."""
    from fixtures.tritonserver import TritonProcess, TritonUnavailable

    from fewshot.export.registry import Registry
    from fewshot.export.triton import write_bundle_models

    repo, state = tmp_path_factory.mktemp("triton-python"), tmp_path_factory.mktemp("triton-state")
    for bundle in Registry.load(exported[0]).bundles.values():
        write_bundle_models(repo, bundle, "python", state)
    proc = TritonProcess(repo, models=sorted(p.name for p in repo.iterdir()), log=state / "tritonserver.log")
    proc.state_dir = state
    try:
        proc.start()
    except TritonUnavailable as exc:
        pytest.skip(f"the tritonserver binary cannot run here: {exc}")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server from the machine's packages, in a temporary folder on a loopback port
    (as ``nobody`` when the tests run as root), for the whole session."""
    from fixtures.postgres import PostgresServer

    with PostgresServer() as pg:
        yield pg


_databases = iter(range(1 << 30))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Where a test's task stores live, once per backend: a fresh SQLite folder, or a fresh database
    in the session's PostgreSQL. Every store test runs against both."""
    if request.param == "sqlite":
        return tmp_path
    return request.getfixturevalue("postgres").create_database(f"t{next(_databases)}")
