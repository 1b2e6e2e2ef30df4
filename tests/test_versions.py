"""Model versions (issue 36) against real ``fewshot serve`` processes on loopback: a task answers only on the exact
version it was adapted with (FAILED_PRECONDITION naming both versions otherwise, over gRPC and HTTP); versions side
by side in the NAME/VERSION/ layout; load, unload and set the default at runtime under concurrent Classify load;
bundles that do not verify are never served; the poll mode follows the model directory."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support import SMALL

from fewshot.export.bundle import export_model
from fewshot.export.registry import load_bundle
from fewshot.models.data import cache_dir, data_root, load_dataset
from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png
from fewshot.tools.launch import ServerProcess, free_port
from fewshot_client import FailedPrecondition, FewShotClient, InvalidArgument, NotFound, PermissionDenied

TINY = "tinyimagenet-conv4-sce-nca-directsum"
#: The "retrained" model: another shipped Tiny ImageNet backbone of the same input and feature size, exported
#: under TINY's name (what an operator does when shipping a retrained model).
RETRAINED = "tinyimagenet-conv4-sce"
ADMIN = "admin-secret"


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def episodes():
    """Three real 5-way 5-shot Tiny ImageNet tasks: (support, labels, queries)."""
    data = load_dataset("tinyimagenet", "test")
    sampler = EpisodeSampler(data, 5, 5, 3, seed=7)
    out = []
    for i in range(3):
        ep = sampler.episode(i)
        out.append((list(data.images[ep.support]), [f"c{ep.classes[j]}" for j in ep.support_labels], list(data.images[ep.query])))
    return out


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """The retrained bundle, exported once under TINY's name as version 2 (``DIR/TINY/2/``)."""
    out = tmp_path_factory.mktemp("retrained")
    export_model(RETRAINED, out, log=quiet, version="2", served_as=TINY)
    return out / TINY / "2"


def scores(predictions) -> np.ndarray:
    return np.array([[p.scores[k] for k in sorted(p.scores)] for p in predictions])


def digest(bundle) -> str:
    return load_bundle(bundle).digest


def test_a_task_answers_only_on_the_version_it_was_adapted_with(exported, retrained, episodes, tmp_path):
    """Adapt on version 1; replace the model with another under the same name and version and restart: Classify and
    UpdateTask answer FAILED_PRECONDITION naming both (gRPC and HTTP 412), GetTask says which version the task
    needs. With both side by side (TINY/1, TINY/2): old tasks answer exactly as before, new ones use version 2."""
    original, root, state = exported[0] / TINY, tmp_path / "models", tmp_path / "state"
    root.mkdir()
    (root / TINY).symlink_to(original, target_is_directory=True)
    v1 = digest(original)
    with ServerProcess(root, state, *SMALL) as proc, FewShotClient(proc.target) as client:
        tasks = [client.adapt(support, labels, TINY) for support, labels, _ in episodes]
        before = [scores(client.classify(t.id, queries)) for t, (_, _, queries) in zip(tasks, episodes)]
        assert {t.model_version for t in tasks} == {"1"} and client.task_info(tasks[0].id).model_digest == v1

    (root / TINY).unlink()  # the retrained model exported under the same name, and the server restarted
    flat = shutil.copytree(retrained, root / TINY)
    (flat / "manifest.json").write_text(json.dumps({**json.loads((flat / "manifest.json").read_text()), "version": "1"}))
    v2 = digest(retrained)
    http_port = free_port()
    with ServerProcess(root, state, *SMALL, "--http-port", str(http_port)) as proc, FewShotClient(proc.target) as client:
        for task, (support, labels, queries) in zip(tasks, episodes):
            with pytest.raises(FailedPrecondition) as err:
                client.classify(task.id, queries[:2])
            message = str(err.value)
            assert f"sha256 {v1[:12]}" in message and f"sha256 {v2[:12]}" in message, message
            with pytest.raises(FailedPrecondition):
                client.update(task.id, support[:1], labels[:1])
        info = client.task_info(tasks[0].id)
        assert (info.model_version, info.model_digest, info.model_version_loaded) == ("1", v1, False)
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/tasks/{tasks[0].id}/classify",
            data=json.dumps({"queries": [{"encoded": base64.b64encode(encode_png(episodes[0][2][0])).decode()}]}).encode(),
            headers={"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(request, timeout=60)
        body = json.loads(http_err.value.read())
        assert http_err.value.code == 412 and body["code"] == "FAILED_PRECONDITION" and v1[:12] in body["message"]

    shutil.rmtree(root / TINY)  # both side by side: the original as version 1, the retrained as version 2
    (root / TINY).mkdir()
    (root / TINY / "1").symlink_to(original, target_is_directory=True)
    shutil.copytree(retrained, root / TINY / "2")
    with ServerProcess(root, state, *SMALL) as proc, FewShotClient(proc.target) as client:
        after = [scores(client.classify(t.id, queries)) for t, (_, _, queries) in zip(tasks, episodes)]
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)  # identical scores: the same backbone, the same state
        support, labels, queries = episodes[0]
        new = client.adapt(support, labels, TINY)
        assert new.model_version == "2" and client.task_info(new.id).model_digest == v2
        again = client.adapt(support, labels, TINY, model_version="1")  # a version named: the original backbone
        np.testing.assert_allclose(scores(client.classify(again.id, queries)), before[0], atol=1e-6)
        (model,) = [m for m in client.models() if m.name == TINY]
        assert [(v.version, v.digest, v.default, v.live_tasks) for v in model.versions] == [("1", v1, False, 4), ("2", v2, True, 1)]
        with pytest.raises(NotFound, match="no loaded version '7'"):
            client.adapt(support, labels, TINY, model_version="7")


def _classify_load(client: FewShotClient, task_ids: dict[str, str], queries, stop: threading.Event) -> Counter:
    """Classify each task of ``task_ids`` (name -> id) in turn until ``stop``; outcomes by (name, result)."""
    outcomes: Counter = Counter()
    while not stop.is_set():
        for name, task_id in list(task_ids.items()):
            try:
                client.classify(task_id, queries)
                outcomes[name, "ok"] += 1
            except FailedPrecondition:
                outcomes[name, "failed_precondition"] += 1
            except Exception as exc:  # anything else is a failure the test reports
                outcomes[name, type(exc).__name__] += 1
    return outcomes


def test_load_unload_and_default_at_runtime_under_load(exported, retrained, episodes, tmp_path):
    """Under concurrent Classify: load version 2, make 1 the default again, refuse a corrupt and an incomplete
    version (the served ones go on), unload 2. No call fails except those on the unloaded version, which get
    FAILED_PRECONDITION. Admin calls need the admin token: a tenant token or none is PERMISSION_DENIED."""
    root = tmp_path / "models"
    (root / TINY).mkdir(parents=True)
    (root / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    (tmp_path / "admin").write_text(ADMIN + "\n")
    support, labels, queries = episodes[0]
    with (
        ServerProcess(root, tmp_path / "state", *SMALL, "--admin-token-file", str(tmp_path / "admin"), "--token", "tenant") as proc,
        FewShotClient(proc.target, token="tenant") as client,
    ):
        for token in ("", "tenant", "wrong"):
            with pytest.raises((PermissionDenied, ValueError)):
                client.load_model(TINY, "1", token)
        tasks = {"v1": client.adapt(support, labels, TINY).id}
        stop = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            loads = [pool.submit(_classify_load, client, tasks, queries[:5], stop) for _ in range(2)]
            shutil.copytree(retrained, root / TINY / "2")
            info = client.load_model(TINY, "2", ADMIN)
            assert [(v.version, v.default) for v in info.versions] == [("1", False), ("2", True)]
            tasks["v2"] = client.adapt(support, labels, TINY).id
            assert client.task_info(tasks["v2"]).model_version == "2"
            assert client.set_default_version(TINY, "1", ADMIN).default_version == "1"
            assert client.adapt(support, labels, TINY).model_version == "1"
            corrupt = shutil.copytree(retrained, root / TINY / "3")
            with open(corrupt / "meta.safetensors", "r+b") as f:  # one byte changed: the sha256 no longer matches
                f.seek(200)
                byte = f.read(1)
                f.seek(200)
                f.write(bytes([byte[0] ^ 0xFF]))
            with pytest.raises(FailedPrecondition, match="does not match its sha256"):
                client.load_model(TINY, "3", ADMIN)
            incomplete = shutil.copytree(retrained, root / TINY / "4")
            (incomplete / "backbone.onnx").unlink()
            with pytest.raises(FailedPrecondition, match="backbone.onnx is missing"):
                client.load_model(TINY, "4", ADMIN)
            with pytest.raises(NotFound):
                client.load_model(TINY, "5", ADMIN)
            time.sleep(1)
            client.unload_model(TINY, "2", ADMIN)
            time.sleep(2)
            stop.set()
            outcomes = sum((f.result() for f in loads), Counter())
        assert set(outcomes) <= {("v1", "ok"), ("v2", "ok"), ("v2", "failed_precondition")}, outcomes
        assert outcomes["v1", "ok"] > 0 and outcomes["v2", "ok"] > 0 and outcomes["v2", "failed_precondition"] > 0, outcomes
        (model,) = client.models()
        assert [(v.version, v.default) for v in model.versions] == [("1", True)]
        with pytest.raises(FailedPrecondition, match="version 2"):
            client.classify(tasks["v2"], queries[:1])
        client.load_model(TINY, "2", ADMIN)  # loaded again: its tasks answer again
        assert len(client.classify(tasks["v2"], queries[:1])) == 1


def _versions(client: FewShotClient) -> list[str]:
    return [v.version for m in client.models() if m.name == TINY for v in m.versions]


def _until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_poll_mode_follows_the_model_directory_and_skips_half_copied_versions(exported, retrained, tmp_path):
    """``--model-control poll``: a version folder copied in half (manifest first, a file missing) is not served;
    once complete it is; a removed folder is unloaded."""
    root = tmp_path / "models"
    (root / TINY).mkdir(parents=True)
    (root / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    with (
        ServerProcess(root, tmp_path / "state", *SMALL, "--model-control", "poll", "--poll-seconds", "0.5") as proc,
        FewShotClient(proc.target) as client,
    ):
        half = root / TINY / "2"
        half.mkdir()
        shutil.copy(retrained / "manifest.json", half)
        shutil.copy(retrained / "meta.safetensors", half)
        time.sleep(2)
        assert _versions(client) == ["1"]
        assert "bundle skipped" in proc.log.read_text()
        shutil.copy(retrained / "backbone.onnx", half)
        assert _until(lambda: _versions(client) == ["1", "2"]), _versions(client)
        shutil.rmtree(root / TINY / "2")
        assert _until(lambda: _versions(client) == ["1"]), _versions(client)


def test_the_upgrading_walkthrough_runs_as_written(exported, episodes, tmp_path):
    """The "Upgrade a model" block of docs/upgrading.md, run by bash against a server on its ``bundles`` folder."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from fewshot.models.preprocess import encode_png as png

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```bash\n(# Upgrade a model.*?)```", (root / "docs/upgrading.md").read_text(), re.S).group(1)
    (tmp_path / "bundles" / TINY).mkdir(parents=True)
    (tmp_path / "bundles" / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    (tmp_path / "admin.token").write_text(ADMIN)
    support, labels, _ = episodes[0]
    for i, (image, label) in enumerate(zip(support, labels)):
        (tmp_path / "my-support" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "my-support" / label / f"{i}.png").write_bytes(png(image))
    state = tmp_path / ".fewshot-state"  # fewshot serve's and fewshot migrate's default, in the folder the block runs in
    with ServerProcess(tmp_path / "bundles", state, *SMALL, "--admin-token-file", str(tmp_path / "admin.token")) as proc:
        with FewShotClient(proc.target) as client:
            old = client.adapt(support, labels, TINY).id
            before = scores(client.classify(old, support))
        env = {
            **os.environ,
            "FEWSHOT_TARGET": proc.target,
            "FEWSHOT_DATA": str(data_root().resolve()),  # the export checks parity on real images
            "FEWSHOT_CACHE": str(cache_dir().resolve()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        listed = [line for line in run.stdout.splitlines() if line.startswith(TINY + "\t")]  # `fewshot-client models`
        assert "versions 1 (" in listed[0] and "2* (" in listed[0]  # step 2: both loaded, 2 the default
        assert "versions 2* (" in listed[-1] and "1 (" not in listed[-1]  # step 4: version 1 unloaded
        dry = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"task_id"')]
        assert [(r["task_id"], r["from"], r["images"]) for r in dry] == [(old, "1", 25)]  # step 3: the dry run...
        assert 0 <= dry[0]["changed"] <= 25 and "would change their label" in run.stderr  # ...changed nothing: then 1 migrated
        assert "1 migrated, 0 left, 0 failed" in run.stderr
        with FewShotClient(proc.target) as client:
            info = client.task_info(old)
            assert (info.model_version, info.version, info.model_version_loaded) == ("2", 2, True)
            moved = scores(client.classify(old, support))
            fresh = client.adapt(support, labels, TINY)
            np.testing.assert_allclose(moved, scores(client.classify(fresh.id, support)), atol=1e-6)
            assert not np.allclose(moved, before)  # another backbone


def test_migrating_200_tasks_survives_a_sigkill_and_resumes(exported, retrained, tmp_path):
    """200 tasks adapted on version 1 move to version 2 with ``fewshot migrate``, killed (SIGKILL) half way and run
    again: every task ends on version 2, none lost, each answering as a fresh Adapt of its support on version 2;
    the tasks not yet migrated answer on version 1, exactly as before, while the first run works."""
    import os
    import signal
    import subprocess
    import sys

    from fewshot.server.store import TaskStore

    root, state = tmp_path / "models", tmp_path / "state"
    (root / TINY).mkdir(parents=True)
    (root / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    shutil.copytree(retrained, root / TINY / "2")
    data = load_dataset("tinyimagenet", "test")
    sampler = EpisodeSampler(data, 5, 1, 1, seed=11)
    supports = []
    for i in range(200):
        ep = sampler.episode(i)
        supports.append((list(data.images[ep.support]), [f"c{ep.classes[j]}" for j in ep.support_labels]))
    migrate = [
        sys.executable,
        "-m",
        "fewshot.cli",
        "migrate",
        "--model",
        TINY,
        "--to",
        "2",
        "--models",
        str(root),
        "--state-dir",
        str(state),
    ]
    with ServerProcess(root, state, *SMALL) as proc, FewShotClient(proc.target) as client:
        tasks = [client.adapt(support, labels, TINY, model_version="1").id for support, labels in supports]
        watched = tasks[-10:]  # migrated last (oldest first): answered on version 1 while the first run works
        before = {t: scores(client.classify(t, supports[tasks.index(t)][0])) for t in watched}
        store = TaskStore(state)
        first = subprocess.Popen([*migrate, "--concurrency", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        checked = 0
        while len(store.not_on(TINY, digest(retrained))) > 100:
            for t in watched:
                np.testing.assert_array_equal(scores(client.classify(t, supports[tasks.index(t)][0])), before[t])
                checked += 1
            assert first.poll() is None, first.communicate()[1][-2000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        left = len(store.not_on(TINY, digest(retrained)))
        assert 0 < left <= 100 and checked > 0, (left, checked)
        for t in watched:  # still on version 1 after the kill
            assert client.task_info(t).model_version == "1"
        resumed = subprocess.run(migrate, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"model": TINY, "to": "2", "migrated": left, "failed": 0, "left": 0}
        assert store.not_on(TINY, digest(retrained)) == []
        store.close()
        time.sleep(1)  # servers re-read tasks changed elsewhere within 0.5 s
        for task, (support, labels) in zip(tasks, supports):
            info = client.task_info(task)
            assert (info.model_version, info.version) == ("2", 2)
            fresh = client.adapt(support, labels, TINY, model_version="2")
            np.testing.assert_allclose(scores(client.classify(task, support)), scores(client.classify(fresh.id, support)), atol=1e-6)


#: Seconds within which a replica applies an admin change made on another replica sharing its task database: the
#: sync interval (--sync-seconds, 1 s) plus verifying and opening the bundle (docs/upgrading.md states it).
CONVERGENCE_S = 5.0


def _default(client: FewShotClient) -> str:
    return next(m.default_version for m in client.models() if m.name == TINY)


def test_two_replicas_on_one_postgresql_store_converge_on_admin_changes(exported, retrained, postgres, tmp_path):
    """An admin load, default change and unload on one replica are applied by another sharing its PostgreSQL store
    within CONVERGENCE_S; a replica started afterwards starts on the recorded versions."""
    url = postgres.create_database("versions")
    root, admin = tmp_path / "models", tmp_path / "admin"
    (root / TINY).mkdir(parents=True)
    (root / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    admin.write_text(ADMIN)
    flags = (*SMALL, "--store", url, "--admin-token-file", str(admin), "--sync-seconds", "1")
    with (
        ServerProcess(root, tmp_path / "a", *flags) as a,
        ServerProcess(root, tmp_path / "b", *flags) as b,
        FewShotClient(a.target) as ca,
        FewShotClient(b.target) as cb,
    ):
        shutil.copytree(retrained, root / TINY / "2")
        ca.load_model(TINY, "2", ADMIN)
        assert _until(lambda: _versions(cb) == ["1", "2"] and _default(cb) == "2", CONVERGENCE_S), (_versions(cb), _default(cb))
        ca.set_default_version(TINY, "1", ADMIN)
        assert _until(lambda: _default(cb) == "1", CONVERGENCE_S), _default(cb)
        ca.unload_model(TINY, "2", ADMIN)
        assert _until(lambda: _versions(cb) == ["1"], CONVERGENCE_S), _versions(cb)
        cb.load_model(TINY, "2", ADMIN)  # either replica takes admin calls
        assert _until(lambda: _versions(ca) == ["1", "2"], CONVERGENCE_S), _versions(ca)
        with ServerProcess(root, tmp_path / "c", *flags) as c, FewShotClient(c.target) as cc:
            assert _versions(cc) == ["1", "2"] and _default(cc) == "1"  # started on what was recorded


def _gauge(metrics_port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " ")), None)


def test_a_canary_then_a_background_migration(exported, retrained, episodes, tmp_path):
    """A canary on version 1 beside default version 2: about its percent of Adapts naming no version, and every Adapt
    of its tenants, run on it; the Prometheus metrics count calls by version; ending it sends all to the default.
    Then ``MigrateTasks`` (``fewshot-client models migrate``) moves the version-1 tasks of every tenant onto version 2
    in the server's background, ``fewshot_migration_tasks{state}`` counting them."""
    from fewshot.server.auth import token_hash

    root = tmp_path / "models"
    (root / TINY).mkdir(parents=True)
    (root / TINY / "1").symlink_to(exported[0] / TINY, target_is_directory=True)
    shutil.copytree(retrained, root / TINY / "2")
    (tmp_path / "admin").write_text(ADMIN)
    (tmp_path / "tokens").write_text(f"alice: {token_hash('alice-token')}\nbob: {token_hash('bob-token')}\n")
    metrics_port = free_port()
    flags = ("--admin-token-file", str(tmp_path / "admin"), "--tokens", str(tmp_path / "tokens"), "--metrics-port", str(metrics_port))
    support, labels, _ = episodes[0]
    with (
        ServerProcess(root, tmp_path / "state", *SMALL, *flags) as proc,
        FewShotClient(proc.target, token="alice-token") as alice,
        FewShotClient(proc.target, token="bob-token") as bob,
    ):
        info = alice.set_canary(TINY, "1", ADMIN, percent=50)
        assert [(v.version, v.default, v.canary_percent) for v in info.versions] == [("1", False, 50.0), ("2", True, 0.0)]
        on = Counter(bob.adapt(support, labels, TINY).model_version for _ in range(40))
        assert 5 <= on["1"] <= 35 and on["1"] + on["2"] == 40, on  # binomial(40, 0.5): outside 5..35 with p < 1e-6
        assert bob.adapt(support, labels, TINY, model_version="2").model_version == "2"  # a version named: no canary
        alice.set_canary(TINY, "1", ADMIN, tenants=["alice"])
        assert {alice.adapt(support, labels, TINY).model_version for _ in range(5)} == {"1"}
        assert {bob.adapt(support, labels, TINY).model_version for _ in range(5)} == {"2"}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as answer:
            metrics = answer.read().decode()
        for version, count in (("1", on["1"] + 5), ("2", on["2"] + 6)):
            line = f'fewshot_model_requests_total{{code="OK",model="{TINY}",rpc="Adapt",version="{version}"}} {float(count)}'
            assert line in metrics, [m for m in metrics.splitlines() if m.startswith("fewshot_model_requests_total")]
        alice.set_canary(TINY, None, ADMIN)
        assert alice.adapt(support, labels, TINY).model_version == "2"
        with pytest.raises(InvalidArgument, match="is the default"):
            alice.set_canary(TINY, "2", ADMIN, percent=10)

        on_1 = [t for c in (alice, bob) for t in c.list_tasks(1000).tasks if t.model_version == "1"]
        status = alice.migrate_tasks(TINY, "2", ADMIN)
        assert status.model == TINY and status.version == "2" and status.running and len(on_1) == on["1"] + 5
        labels_2 = {"model": TINY, "version": "2"}
        assert _until(lambda: _gauge(metrics_port, "fewshot_migration_tasks", state="done", **labels_2) == len(on_1), 60)
        assert _gauge(metrics_port, "fewshot_migration_tasks", state="failed", **labels_2) == 0
        assert {t.model_version for c in (alice, bob) for t in c.list_tasks(1000).tasks} == {"2"}
        with pytest.raises(NotFound):
            alice.migrate_tasks(TINY, "3", ADMIN)  # a version that is not loaded
