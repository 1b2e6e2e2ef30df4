"""`fewshot demo` (what `make demo` runs): a real server, the client SDK, real test tasks; each row's
accuracy equals `fewshot eval` on the same tasks and is compared with the RESULTS.md figure."""

from __future__ import annotations

import json
import re
import subprocess
import sys

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
    # Every printed row has a RESULTS.md figure: the metric models at 1 and 5 shots with both heads,
    # the inner-loop models at the setting they were meta-trained (and measured) for.
    assert {r[0] for r in rows} == set(DEMO_MODELS), out
    assert len(rows) == 2 * 2 * 2 + 2, out
    assert "[no RESULTS.md figure]" not in out
    for name, ways, shots, method, accuracy, *_ in rows:
        if method != "centroid" and method != "inner_loop":
            continue
        head = [] if method == "inner_loop" else ["--head", method]
        measured = json.loads(_fewshot("eval", "--model", name, "--ways", ways, "--shots", shots, "--queries", "15",
                                       "--tasks", str(TASKS), "--seed", "0", *head, "--json").splitlines()[-1])
        assert abs(measured["accuracy"] - float(accuracy)) < 0.01, (name, shots, method, measured, accuracy)
