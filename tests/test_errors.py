"""One exception root: every error class of the package is a FewShotError; the CLI prints those as one
line (exit 2) and lets anything else show its traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from fewshot.cli import main
from fewshot.errors import FewShotError

pytestmark = pytest.mark.unit


PACKAGES = (
    "fewshot",
    "fewshot.tools",
    "fewshot.models",
    "fewshot.models.heads",
    "fewshot.models.inner_loop",
    "fewshot.export",
    "fewshot.server",
)


def _modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__, f"{name}."):
            if info.name.endswith(("triton_models", "triton_onnx_model")):  # import triton_python_backend_utils
                continue
            yield importlib.import_module(info.name)


def test_every_error_class_has_the_one_root():
    classes = {
        cls
        for module in _modules()
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__.startswith("fewshot.")
    }
    assert len(classes) >= 20
    assert [c.__qualname__ for c in classes if not issubclass(c, FewShotError)] == []
    assert all(c.__doc__ for c in classes), [c.__qualname__ for c in classes if not c.__doc__]


def test_the_cli_prints_refusals_as_one_line(capsys):
    assert main(["eval", "--model", "no-such-model", "--tasks", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewshot eval: error: unknown model") and err.count("\n") == 1


def test_the_cli_lets_bugs_show_their_traceback(monkeypatch):
    def bug(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr("fewshot.cli._run_token_hash", bug)
    with pytest.raises(KeyError):
        main(["token-hash"])
