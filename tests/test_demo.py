"""`fewshot demo` (what `make demo` runs): a real server, the client SDK, real test tasks; each row's
accuracy equals `fewshot eval` on the same tasks and is compared with the RESULTS.md figure."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from fewshot.export.registry import Registry
from fewshot.models.family import family_of, methods_of
from fewshot.tools.demo import DEMO_MODELS

ROW = re.compile(r"^(\S+)\s+(\d+)-way (\d+)-shot (\S+)\s+([\d.]+) \+- ([\d.]+)\s+adapt p50.*RESULTS\.md \((\d+) tasks\)")
TASKS = 3


def _fewshot(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fewshot.cli", *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_demo_serves_every_flagship_row_and_matches_fewshot_eval(exported):
    bundles, _ = exported
    out = _fewshot("demo", "--bundles", str(bundles), "--tasks", str(TASKS))
    rows = [m.groups() for line in out.splitlines() if (m := ROW.match(line))]
    # Every printed row has a RESULTS.md figure: the metric models at 1 and 5 shots with every head
    # they offer, the inner-loop models (one method) at the setting they were meta-trained (and measured) for.
    manifests = {b.name: b.manifest for b in Registry.load(bundles).bundles.values()}
    methods = {name: methods_of(manifests[name]) for name in DEMO_MODELS}
    ways = {r[0]: int(r[1]) for r in rows}
    figures = {
        (n, k, m)
        for n, ms in methods.items()
        for m in ms
        for k in (1, 5)
        if family_of(manifests[n]).accuracy_key(manifests[n], ways.get(n, 5), k, m) in manifests[n]["accuracy"]
    }
    assert {r[0] for r in rows} == set(DEMO_MODELS), out
    assert sorted((r[0], int(r[2]), r[3]) for r in rows) == sorted(figures), out
    assert all(len(methods[n]) >= 3 for n in DEMO_MODELS[:2]), methods  # the metric flagships: centroid, laplacianshot, logreg
    assert "[no RESULTS.md figure]" not in out
    samples = [line for line in out.splitlines() if line.startswith("    served: query of class-")]
    assert len(samples) == 3 * len(DEMO_MODELS), out  # three served predictions under each model's first row
    for name, ways, shots, method, accuracy, *_ in rows:
        if method != "centroid" and method != "inner_loop":
            continue
        head = [] if method == "inner_loop" else ["--head", method]
        measured = json.loads(
            _fewshot(
                "eval",
                "--model",
                name,
                "--ways",
                ways,
                "--shots",
                shots,
                "--queries",
                "15",
                "--tasks",
                str(TASKS),
                "--seed",
                "0",
                *head,
                "--json",
            ).splitlines()[-1]
        )
        assert abs(measured["accuracy"] - float(accuracy)) < 0.01, (name, shots, method, measured, accuracy)
