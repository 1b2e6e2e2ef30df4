"""The support-set report (issue 37): held-out predictions and what they are read into, on real data and models, then
over a real ``fewshot serve`` (gRPC, HTTP, the CLI): a planted mislabel and duplicates are flagged, the report is
stored with the task, returned by GetTask and recomputed by UpdateTask."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures.transports import http_call

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.family import open_shipped
from fewshot.models.heads.centroid import CentroidHead
from fewshot.models.report import (
    HeldOut,
    build_report,
    centroid_distances,
    k_fold,
    mislabel_scores,
    pixel_duplicates,
)
from fewshot.models.zoo import load_model
from fewshot.tools.report_check import jpeg90
from fewshot_client import FewShotClient

OMNI, OMNI_INNER = "omniglot-conv4-directsum", "omniglot-conv4-cxgrad"


def _log_likelihood(e: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> float:
    """The held-out nearest-centroid log-likelihood of a whole support set, by brute force."""
    n = int(labels.max()) + 1
    dist = centroid_distances(torch.nn.functional.normalize(e.double(), dim=1), labels, n)
    rows = ~torch.isnan(dist).any(1)
    return float(torch.log_softmax(-dist[rows] / temperature, 1)[torch.arange(int(rows.sum())), labels[rows]].sum())


@pytest.mark.unit
def test_closed_form_leave_one_out_equals_refitting_the_centroid_without_each_image():
    torch.manual_seed(0)
    features, labels = torch.randn(13, 6), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0, 3])
    head = CentroidHead("L2N")
    logits, fits = head.held_out_logits(features, labels)
    assert fits == 0
    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        expected = head.fit(features[keep], labels[keep]).logits(features[i : i + 1])[0]
        torch.testing.assert_close(logits[i], expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_mislabel_score_is_the_exact_gain_of_relabelling_each_image():
    """The incremental gain equals recomputing the whole held-out likelihood with the image relabelled, for tasks
    whose classes have 1, 2 or many images (a class emptied to one image stops being held out)."""
    torch.manual_seed(1)
    for trial in range(12):
        n = 2 + trial % 4
        labels = torch.cat([torch.arange(n), torch.randint(0, n, (trial,))])
        e = torch.randn(len(labels), 5)
        scores, looks_like = mislabel_scores(e, labels)
        base = _log_likelihood(e, labels)
        for k in range(len(labels)):
            if torch.isnan(scores[k]):
                assert (labels == labels[k]).sum() == 1  # only the image of a 1-image class is left out
                continue
            moved = labels.clone()
            moved[k] = looks_like[k]
            assert moved[k] != labels[k]
            assert float(scores[k]) == pytest.approx(_log_likelihood(e, moved) - base, abs=1e-9)


@pytest.mark.unit
def test_k_fold_holds_out_every_image_of_a_class_with_two_or_more_once():
    class Recorder:
        def __init__(self):
            self.seen = []

        def adapt(self, support, labels):
            self.seen.append(set(support[:, 0].tolist()))
            n = int(labels.max()) + 1
            assert set(labels.tolist()) == set(range(n))  # every fold keeps every class

            class Task:
                def classify(self, query):
                    return torch.full((len(query), n), 1.0 / n)

            return Task()

    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1, 0])  # class 2 has one image: never held out
    support = torch.arange(len(labels), dtype=torch.float32)[:, None].repeat(1, 3)
    recorder = Recorder()
    held = k_fold(recorder, support, labels, 2)
    assert held.scheme == "2-fold" and held.adaptations == 2
    assert held.held.tolist() == [True, True, False, True, True, True, True, True]
    assert all(2.0 in s for s in recorder.seen)  # the 1-image class is in every fold's support


@pytest.mark.unit
def test_one_shot_tasks_say_plainly_that_there_is_no_estimate():
    labels = torch.arange(5)
    held = HeldOut(torch.full((5, 5), float("nan")), "leave-one-out", 0)
    report = build_report(held, labels)
    assert report.estimate is None and report.held_out == 0 and "every class has 1 image" in report.note


@pytest.mark.unit
def test_duplicates_exact_and_jpeg_reencoded_are_found_and_distinct_photos_are_not():
    from fewshot.models.data import load_tinyimagenet

    tiny = load_tinyimagenet("test")
    rng = np.random.default_rng(0)
    for _ in range(20):
        pixels = tiny.images[rng.choice(len(tiny.images), 25, replace=False)].copy()
        labels = torch.arange(5).repeat_interleave(5)
        assert pixel_duplicates(pixels, labels) == []  # 25 different photos
        pixels[7], pixels[19] = pixels[3], jpeg90(pixels[12])
        flags = {(f.index, f.kind, f.other) for f in pixel_duplicates(pixels, labels)}
        assert flags == {(7, "duplicate", 3), (19, "near_duplicate", 12)}


@pytest.fixture(scope="module")
def omniglot_tasks(omniglot_test):
    """Six real 5-way 5-shot Omniglot tasks: (uint8 support (25, 28, 28, 1), labels (25,))."""
    sampler = EpisodeSampler(omniglot_test, 5, 5, 1, seed=11)
    return [(omniglot_test.images[ep.support], torch.as_tensor(ep.support_labels)) for ep in map(sampler.episode, range(6))]


@pytest.mark.parametrize("name", [OMNI, OMNI_INNER])
def test_a_planted_mislabel_is_flagged_with_the_class_it_looks_like(name, omniglot_tasks):
    """With the shipped model and its card's settings: in each task one image is given another class's label; the
    report flags that image as a mislabel that looks like its true class, and clean tasks get a high estimate."""
    from fewshot.models.report import adapt_with_report

    family = open_shipped(load_model(name), threads=1)
    method = family.default_method
    adapter = family.adapter(method, shots=5)
    settings = family.report_settings(method, 5)
    for pixels, labels in omniglot_tasks[:4]:
        x = family.spec.normalize(pixels)
        _, _, clean = adapt_with_report(adapter, x, labels, pixels, settings)
        assert clean.estimate is not None and clean.low <= clean.estimate <= clean.high and clean.estimate > 80
        assert not [f for f in clean.flags if f.kind in ("mislabel", "duplicate", "near_duplicate")]
        changed = labels.clone()
        changed[7] = (labels[7] + 2) % 5
        _, _, report = adapt_with_report(adapter, x, changed, pixels, settings)
        mislabels = [f for f in report.flags if f.kind == "mislabel"]
        assert [(f.index, f.looks_like) for f in mislabels] == [(7, int(labels[7]))], report.flags


def _png(image: np.ndarray) -> bytes:
    from fewshot.models.preprocess import encode_png

    return encode_png(image)


def test_adapt_with_a_report_over_grpc_http_and_the_cli(server, omniglot_tasks, tmp_path):
    """Over a real server: Adapt(report) flags a planted mislabel and a duplicate and stores the report (GetTask);
    an Adapt without it carries none; UpdateTask recomputes it; the HTTP API and the CLI show the same report."""
    pixels, labels = omniglot_tasks[4]
    names = [f"c{int(y)}" for y in labels]
    names[7] = f"c{(int(labels[7]) + 2) % 5}"  # a mislabel
    images = [_png(p) for p in pixels]
    first, copy = [i for i in range(len(labels)) if i != 7 and int(labels[i]) == int(labels[-1])][:2]
    images[copy] = images[first]  # an exact duplicate
    with FewShotClient(server.target) as client:
        plain = client.adapt(images, names, OMNI)
        assert plain.report is None and client.task_info(plain.id).report is None
        task = client.adapt(images, names, OMNI, report=True)
        report = task.report
        assert report is not None and report.scheme == "leave-one-out" and report.held_out == 25 and report.extra_adaptations == 0
        assert report.estimate is not None and report.low <= report.estimate <= report.high
        flags = {(f.index, f.kind) for f in report.flags}
        assert (7, "mislabel") in flags
        mislabel = next(f for f in report.flags if f.kind == "mislabel")
        assert mislabel.label == names[7] and mislabel.looks_like == f"c{int(labels[7])}"
        duplicate = next(f for f in report.flags if f.kind == "duplicate")
        assert (duplicate.index, duplicate.other) == (copy, first)
        assert client.task_info(task.id).report == report  # stored with the task
        assert all(a in task.labels and b in task.labels and 0 <= p <= 100 for a, b, p in report.confusions)
        # UpdateTask: the mislabelled image's class removed; the report follows the new support set
        task.update(remove=[names[7]])
        assert task.report is not None and task.report.held_out == 25 - names.count(names[7])
        assert client.task_info(task.id).report == task.report
    # HTTP: the same request as JSON, the report in the answer's JSON
    body = {
        "model": OMNI,
        "report": True,
        "support": [{"image": {"encoded": base64.b64encode(b).decode()}, "label": n} for b, n in zip(images, names)],
    }
    status, answer = http_call("POST", f"{server.http_url}/v1/tasks", body)
    assert status == 200, answer
    assert any(f["kind"] == "mislabel" and f["index"] == 7 for f in answer["report"]["flags"])
    status, info = http_call("GET", f"{server.http_url}/v1/tasks/{answer['task_id']}")
    assert status == 200 and info["report"] == answer["report"]
    # the CLI prints it, naming the file
    support = tmp_path / "support"
    for i, (image, name) in enumerate(zip(images, names)):
        (support / name).mkdir(parents=True, exist_ok=True)
        (support / name / f"{i:02d}.png").write_bytes(image)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewshot_client.cli",
            "--target",
            server.target,
            "adapt",
            "--model",
            OMNI,
            "--support",
            str(support),
            "--report",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "expected accuracy on new images:" in run.stderr
    assert f"mislabel: {support / names[7] / '07.png'}: labelled {names[7]!r} but looks like 'c{int(labels[7])}'" in run.stderr


def test_report_json_round_trips():
    from fewshot.models.report import Flag, Report

    report = Report(91.5, 85.0, 97.0, "leave-one-out", 25, 0, "", [(0, 3, 12.5)], [Flag(7, "mislabel", 4.2, 1, looks_like=3)], 0.9, 0.92)
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report


@pytest.mark.parametrize("model", [OMNI, OMNI_INNER])
def test_a_support_image_as_a_query_is_explained_by_itself(server, omniglot_tasks, model):
    """Classify(explain=3) of support images: the nearest support image of each is itself (similarity 1), the
    matches are ranked and labelled; over HTTP the same; without explain there is no ``nearest``; more than 10 is
    INVALID_ARGUMENT."""
    from fewshot_client import InvalidArgument

    pixels, labels = omniglot_tasks[5]
    names = [f"c{int(y)}" for y in labels]
    images = [_png(p) for p in pixels]
    with FewShotClient(server.target) as client:
        task = client.adapt(images, names, model)
        picked = [0, 6, 13, 24]
        answers = task.classify([images[i] for i in picked], explain=3)
        for i, p in zip(picked, answers):
            assert len(p.nearest) == 3 and p.nearest[0][0] == i and p.nearest[0][1] == names[i]
            assert p.nearest[0][2] == pytest.approx(1.0, abs=1e-4)
            assert all(a[2] >= b[2] for a, b in zip(p.nearest, p.nearest[1:]))
        plain = task.classify([images[i] for i in picked])
        assert [p.nearest for p in plain] == [[]] * len(picked)
        assert [p.scores for p in plain] == [p.scores for p in answers]  # explaining changes no answer
        with pytest.raises(InvalidArgument, match="at most 10"):
            task.classify([images[0]], explain=11)
        status, answer = http_call(
            "POST",
            f"{server.http_url}/v1/tasks/{task.id}/classify",
            {"queries": [{"encoded": base64.b64encode(images[6]).decode()}], "explain": 2},
        )
        assert status == 200 and [m["index"] for m in answer["predictions"][0]["nearest"]][0] == 6
        status, answer = http_call(
            "POST", f"{server.http_url}/v1/tasks/{task.id}/classify", {"queries": [{"encoded": base64.b64encode(images[6]).decode()}]}
        )
        assert status == 200 and "nearest" not in answer["predictions"][0]


@pytest.mark.unit
def test_nearest_support_ranks_by_cosine_and_breaks_ties_by_index():
    from fewshot.server.errors import InvalidRequest
    from fewshot.server.explain import MAX_EXPLAIN, check_explain, nearest

    support = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sims, order = nearest(torch.tensor([[3.0, 0.1], [0.0, -1.0]]), support, 3)
    assert order[0].tolist() == [0, 1, 3] and sims[0, 0] == pytest.approx(sims[0, 1])  # equal cosines: the lower index first
    assert order[1].tolist() == [0, 1, 3] and sims[1, -1] == pytest.approx(-(0.5**0.5))  # image 2, opposite, is not among the 3
    assert nearest(torch.ones(1, 2), support, 10)[1].shape == (1, 4)  # k past the support size: all of it
    assert check_explain(MAX_EXPLAIN) == MAX_EXPLAIN
    with pytest.raises(InvalidRequest, match="at most 10"):
        check_explain(MAX_EXPLAIN + 1)


def test_fewshot_report_measures_a_model_and_refuses_bad_options_in_one_line(capsys, tmp_path):
    """``fewshot report`` end to end on a few tasks (the figures RESULTS.md quotes come from the same code at 600), and
    its refusals."""
    from fewshot.cli import main

    assert main(["report", "--model", OMNI, "--method", "centroid", "--tasks", "4", "--fit-tasks", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model"] == OMNI and row["tasks"] == 4 and row["duplicates"] == {"exact_found": 100.0, "jpeg90_found": 100.0}
    assert 0.0 <= row["mislabel"]["auroc"] <= 1.0 and row["estimate"]["mad"] >= 0.0
    for args, message in (
        (["--shots", "1"], "--shots must be at least 2"),
        (["--tasks", "1"], "--tasks and --fit-tasks must be at least 2"),
    ):
        assert main(["report", "--model", OMNI, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def _held_out_log_likelihood(e: torch.Tensor, labels: torch.Tensor, usum: torch.Tensor, ucount: torch.Tensor, n: int) -> float:
    """By brute force: the held-out nearest-centroid log-likelihood at temperature 0.1 of unit-normalised ``e`` with
    the class means also holding fixed soft members ``(usum, ucount)``; rows of 1-image classes left out."""
    e = torch.nn.functional.normalize(e.double(), dim=1)
    total = 0.0
    for i in range(len(labels)):
        y = int(labels[i])
        if int((labels == y).sum()) < 2:
            continue
        means = []
        for c in range(n):
            members = (labels == c) & (torch.arange(len(labels)) != i)
            means.append((e[members].sum(0) + usum[c]) / (members.sum() + ucount[c]))
        dist = ((e[i] - torch.stack(means)) ** 2).sum(1)
        total += float(torch.log_softmax(-dist / 0.1, 0)[y])
    return total


@pytest.mark.unit
def test_mislabel_score_with_unlabeled_members_is_the_exact_relabelling_gain():
    """With unlabeled images as soft members of the class means (fixed while an image is relabelled), the incremental
    score still equals recomputing the whole held-out likelihood with the image relabelled."""
    from fewshot.models.report import unlabeled_members

    torch.manual_seed(2)
    for trial in range(6):
        n = 2 + trial % 3
        labels = torch.cat([torch.arange(n), torch.arange(n), torch.randint(0, n, (trial,))])
        e, u = torch.randn(len(labels), 5), torch.randn(7 + trial, 5)
        usum, ucount = unlabeled_members(e, labels, u)
        assert ucount.sum() == pytest.approx(len(u)) and (ucount > 0).all()
        scores, looks_like = mislabel_scores(e, labels, unlabeled=u)
        base = _held_out_log_likelihood(e, labels, usum, ucount, n)
        for k in range(len(labels)):
            moved = labels.clone()
            moved[k] = looks_like[k]
            expected = _held_out_log_likelihood(e, moved, usum, ucount, n) - base
            assert float(scores[k]) == pytest.approx(expected, abs=1e-9)
        assert not torch.equal(scores, mislabel_scores(e, labels)[0])  # the unlabeled members do move the means


@pytest.mark.unit
def test_unlabeled_images_feed_the_estimate_through_the_cards_map():
    """A report given unlabeled images uses the card's map fitted with them (its confidence term) and threshold;
    without such a map it says it used them for the flags only; the stored form keeps their count and confidence."""
    from fewshot.models.report import EstimateMap, Report, ReportSettings, Unlabeled

    rng = np.random.default_rng(0)
    p, loo, conf = rng.uniform(0.3, 0.9, 50), rng.uniform(0.3, 0.9, 50), rng.uniform(0.3, 0.9, 50)
    fitted = EstimateMap.fit(p, loo, 0.1 * p + 0.2 * loo + 0.6 * conf + 0.05, conf)
    assert (fitted.a, fitted.b, fitted.u, fitted.c) == pytest.approx((0.1, 0.2, 0.6, 0.05), abs=1e-9)
    assert EstimateMap.from_dict(fitted.to_dict()) == fitted and "u" not in EstimateMap.fit(p, loo, conf).to_dict()
    card = {
        "report": {
            "methods": {
                "centroid": {
                    "by_shots": {"5": EstimateMap(0.0, 1.0, 0.0, 0.01, 9).to_dict()},
                    "mislabel_gain": 2.5,
                    "by_shots_unlabeled": {"5": EstimateMap(0.0, 0.0, 0.1, 0.01, 9, u=0.5).to_dict()},
                    "mislabel_gain_unlabeled": 3.5,
                }
            }
        }
    }
    settings = ReportSettings.for_manifest(card, "centroid", 5)
    assert settings.mislabel_gain == 2.5 and settings.unlabeled is not None and settings.unlabeled.mislabel_gain == 3.5
    labels = torch.arange(3).repeat(3)
    held = HeldOut(torch.eye(3)[labels], "leave-one-out", 0)  # every image held out and right
    seen = Unlabeled(torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]]), torch.randn(2, 4))
    report = build_report(held, labels, settings=settings, unlabeled=seen)
    assert report.unlabeled == 2 and report.confidence == pytest.approx(0.7)
    assert report.estimate == pytest.approx(100 * (0.1 + 0.5 * 0.7))  # the unlabeled map, not the support one (100%)
    assert build_report(held, labels, settings=settings).estimate == pytest.approx(100.0)
    stored = Report.from_dict(json.loads(json.dumps(report.to_dict())))  # the stored form, rounded to 4 digits
    assert stored.unlabeled == 2 and stored.confidence == pytest.approx(0.7) and stored.to_dict() == report.to_dict()
    plain = build_report(held, labels, settings=ReportSettings(), unlabeled=seen)
    assert plain.estimate == pytest.approx(100.0) and "flags only" in plain.note and plain.unlabeled == 2


def test_unlabeled_images_reach_the_report_over_grpc_streams_http_and_the_cli(server, omniglot_tasks, tmp_path):
    """Adapt(report, unlabeled): the report says how many it read and the task's confidence on them; they are
    stored with the task (UpdateTask's report reads them again); AdaptStream, the HTTP form and the CLI carry them;
    unlabeled images without report are INVALID_ARGUMENT (gRPC, SDK, CLI), in one line."""
    pixels, labels = omniglot_tasks[3]
    names = [f"c{int(y)}" for y in labels]
    images = [_png(p) for p in pixels]
    unlabeled = [_png(np.ascontiguousarray(p[:, ::-1])) for p in pixels[::3]]  # mirrored support images: 9 of them
    with FewShotClient(server.target) as client:
        task = client.adapt(images, names, OMNI, report=True, unlabeled=unlabeled)
        report = task.report
        assert report is not None and report.unlabeled == len(unlabeled) and report.estimate is not None
        assert report.unlabeled_confidence is not None and 20.0 <= report.unlabeled_confidence <= 100.0
        assert client.task_info(task.id).report == report
        task.update(images[:2], names[:2])
        assert task.report is not None and task.report.unlabeled == len(unlabeled)  # stored with the task
        streamed = client.adapt(images, names, OMNI, report=True, unlabeled=unlabeled, stream=True)
        assert streamed.report is not None and streamed.report.unlabeled == len(unlabeled)
        with pytest.raises(ValueError, match="report=True"):
            client.adapt(images, names, OMNI, unlabeled=unlabeled)
        # the raw request (no SDK check): the server refuses it itself
        import grpc

        from fewshot_proto import fewshot_pb2, fewshot_pb2_grpc

        request = fewshot_pb2.AdaptRequest(
            model=OMNI,
            support=[fewshot_pb2.LabelledImage(image=fewshot_pb2.Image(encoded=b), label=n) for b, n in zip(images, names)],
            unlabeled=[fewshot_pb2.Image(encoded=b) for b in unlabeled],
        )
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
            fewshot_pb2_grpc.FewShotStub(channel).Adapt(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "set report" in refused.value.details()
        assert "\n" not in refused.value.details()
    # the HTTP form: image files, labels, report and unlabeled files
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    parts = [("model", None, OMNI.encode()), ("report", None, b"true")]
    parts += [("images", f"{i}.png", b) for i, b in enumerate(images)] + [("labels", None, n.encode()) for n in names]
    parts += [("unlabeled", f"u{i}.png", b) for i, b in enumerate(unlabeled)]
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
            + (f'; filename="{filename}"\r\nContent-Type: image/png'.encode() if filename else b"")
            + b"\r\n\r\n"
            + value
            + b"\r\n"
            for name, filename, value in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server.http_url}/v1/tasks", data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert json.loads(answer.read())["report"]["unlabeled"] == len(unlabeled)
    # the CLI: --unlabeled DIR with --report; without --report, one error line
    support, extra = tmp_path / "support", tmp_path / "unlabeled"
    extra.mkdir()
    for i, (image, name) in enumerate(zip(images, names)):
        (support / name).mkdir(parents=True, exist_ok=True)
        (support / name / f"{i:02d}.png").write_bytes(image)
    for i, image in enumerate(unlabeled):
        (extra / f"u{i}.png").write_bytes(image)
    cli = [sys.executable, "-m", "fewshot_client.cli", "--target", server.target, "adapt", "--model", OMNI, "--support", str(support)]
    run = subprocess.run([*cli, "--report", "--unlabeled", str(extra)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"read {len(unlabeled)} unlabeled images: mean confidence" in run.stderr
    run = subprocess.run([*cli, "--unlabeled", str(extra)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "add --report" in run.stderr and run.stderr.count("\n") == 1, run.stderr


@pytest.mark.unit
def test_the_standardised_mislabel_score_compares_each_image_with_the_others_and_flags_only_real_gains():
    from fewshot.models.report import ReportSettings, mislabel_evidence, standardized

    gains = torch.tensor([0.5, -1.0, float("nan"), 0.0, 6.0], dtype=torch.float64)
    z = standardized(gains)
    for i in (0, 1, 3, 4):
        others = torch.tensor([g for j, g in enumerate(gains.tolist()) if j != i and j != 2], dtype=torch.float64)
        assert float(z[i]) == pytest.approx((float(gains[i]) - float(others.mean())) / float(others.std(unbiased=False)))
    assert torch.isnan(z[2]) and torch.isnan(standardized(torch.tensor([1.0, 2.0]))).all()
    torch.manual_seed(3)
    labels = torch.arange(4).repeat(4)
    e = torch.nn.functional.one_hot(labels, 8).double() + 0.05 * torch.randn(16, 8, dtype=torch.float64)
    e[5] = torch.nn.functional.one_hot(torch.tensor(3), 8).double()  # image 5 (class 1) looks like class 3
    score, flagged, looks_like = mislabel_evidence(e, labels, ReportSettings(mislabel_gain=3.0, standardize=True))
    assert flagged.nonzero().flatten().tolist() == [5] and int(looks_like[5]) == 3 and float(score[5]) > 3.0
    clean = labels.clone()
    clean[5] = 3
    assert not mislabel_evidence(e, clean, ReportSettings(mislabel_gain=3.0, standardize=True))[1].any()  # no real gain: no flag
