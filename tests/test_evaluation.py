"""The evaluator and the `fewshot eval` command on real tasks."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fewshot.models.evaluation import evaluate, summarize
from fewshot.models.family import open_shipped

pytestmark = pytest.mark.unit


def test_confidence_interval_formula():
    acc = [0.2, 0.4, 0.6, 0.8]
    res = summarize(acc)
    a = np.array(acc) * 100
    assert math.isclose(res.accuracy, 50.0)
    assert math.isclose(res.ci95, 1.96 * a.std() / math.sqrt(4))


def test_same_seed_same_numbers(omniglot_model, omniglot_test):
    adapter = open_shipped(omniglot_model, "onnxruntime", "cpu").adapter("centroid")
    runs = [evaluate(adapter, omniglot_test, omniglot_model.spec.normalize, 5, 1, 15, 30, seed=5) for _ in range(2)]
    assert runs[0].per_task == runs[1].per_task
    other = evaluate(adapter, omniglot_test, omniglot_model.spec.normalize, 5, 1, 15, 30, seed=6)
    assert other.per_task != runs[0].per_task


def test_torch_and_onnxruntime_backends_agree(omniglot_model, omniglot_test):
    res = [
        evaluate(
            open_shipped(omniglot_model, b, "cpu").adapter("centroid"), omniglot_test, omniglot_model.spec.normalize, 5, 1, 15, 20, seed=0
        )
        for b in ("torch", "onnxruntime")
    ]
    assert res[0].per_task == res[1].per_task


def _fewshot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("head", ["centroid", "laplacianshot"])
def test_eval_cli_prints_one_json_object(head):
    proc = _fewshot(
        "eval",
        "--model",
        "omniglot-conv4-directsum",
        "--dataset",
        "omniglot",
        "--ways",
        "5",
        "--shots",
        "1",
        "--tasks",
        "20",
        "--head",
        head,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    for key in ("model", "dataset", "ways", "shots", "head", "tasks", "accuracy", "ci95", "seconds"):
        assert key in row
    assert row["tasks"] == 20 and row["head"] == head and 80 < row["accuracy"] <= 100


def test_eval_cli_errors_are_one_line():
    proc = _fewshot("eval", "--model", "no-such-model", "--tasks", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model 'no-such-model'" in proc.stderr
