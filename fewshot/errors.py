"""The one root of the errors this package raises on purpose.

Every deliberate error is a :class:`FewShotError`; the command line prints it as one line and exits 2,
while anything else is a bug and shows its traceback. Subclasses that reach the gRPC API carry their
status as ``code`` (``fewshot.server.errors``); the others say what was wrong and what is allowed.
Classes that replaced a built-in error keep it as a second base (``ConfigError`` is a ``ValueError``),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FewShotError(Exception):
    """Root: a request, setting, file or environment this package refuses, with a message to act on."""


class ConfigError(FewShotError, ValueError):
    """A flag, setting or argument outside its allowed values (the message names it and what is allowed)."""


class EnvironmentUnavailable(FewShotError, RuntimeError):
    """Something this machine lacks for the asked operation (e.g. ``--device cuda`` without a GPU)."""


def one_line(text: str, limit: int) -> str:
    """``text`` with its whitespace runs collapsed to single spaces, cut to ``limit`` characters (for
    messages and log lines that quote another library's error)."""
    return " ".join(text.split())[:limit]
