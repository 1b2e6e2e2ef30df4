"""`fewshot bench --sweep` (the latency-throughput curve) against a real server, and the queue-wait histogram."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from fewshot.tools.sweep import _level, mark_knees

ROOT = Path(__file__).resolve().parents[1]


def test_a_level_counts_refusals_and_errors_apart_from_latency():
    results = [(0.010, "ok"), (0.020, "ok"), (0.001, "refused"), (0.002, "refused"), (5.0, "DeadlineExceeded: too slow")]
    level = _level("m", "centroid", "classify", "open", 40.0, results, 2.0, None)
    assert (level.sent, level.answered, level.refused, level.errors) == (5, 2, 2, 1)
    assert level.p50_ms == 15.0 and level.p99_ms is not None and level.p99_ms <= 20.0  # refused and failed calls are no latency
    assert level.achieved_per_s == 1.0 and level.offered_per_s == 40.0 and level.concurrency is None
    assert level.error_examples == ["DeadlineExceeded: too slow"]


def test_the_knee_is_the_level_of_highest_power():
    levels = [
        _level("m", "x", "adapt", "closed", c, [(ms / 1e3, "ok")] * n, 1.0, None) for c, n, ms in ((1, 10, 100), (2, 18, 110), (4, 20, 200))
    ]
    mark_knees(levels)
    assert [lv.knee for lv in levels] == [False, True, False]  # 18/110 > 10/100 > 20/200


def test_the_sweep_drives_a_real_server_and_writes_its_table_and_plot(server, tmp_path):
    out = tmp_path / "sweep"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewshot.cli",
            "bench",
            "--target",
            server.target,
            "--sweep",
            "--model",
            "omniglot-conv4-directsum",
            "--seconds",
            "0.6",
            "--concurrency",
            "1",
            "4",
            "--rates",
            "5",
            "40",
            "--metrics-url",
            server.metrics_url,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    levels = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert {(lv["rpc"], lv["mode"]) for lv in levels} == {(r, m) for r in ("adapt", "classify") for m in ("closed", "open")}
    assert len(levels) == 2 * (2 + 2)
    for lv in levels:
        assert lv["sent"] == lv["answered"] + lv["refused"] + lv["errors"] and lv["answered"] > 0, lv
        assert lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"] and lv["queue_ms"] is not None, lv
    assert sum(lv["knee"] for lv in levels) == 4  # one per curve
    table = (out / "sweep.md").read_text()
    assert table.count("(knee)") == 4 and table.count("| omniglot-conv4-directsum | adapt | ") == 4
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for queue in ("admission", "worker"):
        count = [line for line in metrics.splitlines() if line.startswith(f'fewshot_queue_seconds_count{{queue="{queue}"}}')]
        assert count and float(count[0].split()[-1]) > 0, queue


def test_the_gpu_bench_script_runs_end_to_end_on_cpu(omni_bundles, tmp_path):
    """scripts/gpu-bench.sh --device cpu (on bundles exported already): every section writes its rows, none fails,
    and the CUDA-only one says why it did not run."""
    run = subprocess.run(
        ["bash", "scripts/gpu-bench.sh", "--device", "cpu", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GPU_BENCH_BUNDLES": str(omni_bundles)},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    sections = report["sections"]
    assert sections["graphs"] == {"skipped": "CUDA graphs need a CUDA device"}
    for name in ("onnxruntime", "adapt", "many"):
        assert "error" not in sections[name] and sections[name]["rows"], (name, sections[name].get("error"))
    assert {r["model"] for r in sections["onnxruntime"]["rows"]} == {"omniglot-conv4-directsum", "omniglot-conv4-cxgrad"}
    (adapt,) = sections["adapt"]["rows"]
    assert adapt["model"] == "omniglot-conv4-cxgrad" and adapt["max_abs_probability_diff"] < 1e-4
    assert {r["tasks"] for r in sections["many"]["rows"] if r["section"] == "engine adapt"} == {1, 8}


def test_the_classify_stages_script_times_every_stage_of_the_served_path(omni_bundles):
    """scripts/classify_stages.py on both Omniglot bundles (a metric head and an adapted network), three calls
    each: every stage timed, the shares adding up (no timing asserted)."""
    run = subprocess.run(
        [
            sys.executable,
            "scripts/classify_stages.py",
            "--bundles",
            str(omni_bundles),
            "--model",
            "omniglot-conv4-directsum",
            "--model",
            "omniglot-conv4-cxgrad",
            "--queries",
            "8",
            "--calls",
            "3",
            "--warmup",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["omniglot-conv4-directsum", "omniglot-conv4-cxgrad"]
    for row in rows:
        stages = row["stages"]
        assert list(stages) == ["parse", "decode", "normalize", "engine", "head", "response", "sdk request", "sdk answer"]
        assert all(s["p50_ms"] > 0 and s["p10_ms"] <= s["p90_ms"] for s in stages.values()), stages
        assert abs(sum(s["share"] for s in stages.values() if s["share"] is not None) - 1) < 0.01
        assert stages["sdk request"]["share"] is None and stages["sdk answer"]["share"] is None


def test_the_adapt_profile_script_names_the_operators_of_an_inner_loop(omni_bundles):
    """scripts/adapt_profile.py on the Omniglot CxGrad bundle, two tasks: the Adapt time and the operators with
    their shares, which add up to the whole; a metric model is refused with a one-line reason."""
    run = subprocess.run(
        [sys.executable, "scripts/adapt_profile.py", "--bundles", str(omni_bundles), "--model", "omniglot-conv4-cxgrad"]
        + ["--tasks", "2", "--warmup", "1", "--top", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("omniglot-conv4-cxgrad: Adapt 5-way 5-shot, 2 tasks under the profiler, p50 ")
    shares = [float(line.split("%")[0].split()[-1]) for line in lines[1:]]
    assert len(shares) == 6 and abs(sum(shares) - 100) < 1.0, lines
    assert "aten::" in lines[1]
    refused = subprocess.run(
        [sys.executable, "scripts/adapt_profile.py", "--bundles", str(omni_bundles), "--model", "omniglot-conv4-directsum"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert refused.returncode != 0 and "is not an inner-loop model" in refused.stderr
