"""Per-task settings a request may give (LaplacianShot's lambda, the inner-loop steps, ...).

A head or a model family declares each setting it accepts as a :class:`Setting`: the name the API and
the CLI use, the keyword its adapter takes, and its bounds or choices. The family validates a request
against them (:meth:`fewshot.models.family.Family.check_settings`), so the gRPC service, the Triton
models and ``fewshot eval`` refuse the same values with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fewshot.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One setting: ``api`` name, adapter ``keyword``, numeric bounds ``lo..hi`` (``integer`` when it
    counts something) or, for a text setting, its ``choices``."""

    api: str
    keyword: str
    lo: float = 0.0
    hi: float = 0.0
    integer: bool = False
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> Any:
        """``value`` as the adapter takes it; :class:`ConfigError` naming the allowed range otherwise."""
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{self.api} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.api} must be a number in {self.lo:g}..{self.hi:g}, got {value!r}") from None
        if not (math.isfinite(number) and self.lo <= number <= self.hi) or (self.integer and number != int(number)):
            kind = "an integer" if self.integer else "a number"
            raise ConfigError(f"{self.api} must be {kind} in {self.lo:g}..{self.hi:g}, got {value}")
        return int(number) if self.integer else number


def check_settings(accepted: Mapping[str, Setting], given: Mapping[str, Any], method: str, model: str) -> dict[str, Any]:
    """``given`` settings by API name (``None``: not given) -> adapter keyword arguments."""
    out: dict[str, Any] = {}
    for api, value in given.items():
        if value is None:
            continue
        if api not in accepted:
            takes = ", ".join(sorted(accepted)) or "no settings"
            raise ConfigError(f"{api} does not apply to method {method} of model {model} (it takes {takes})")
        out[accepted[api].keyword] = accepted[api].check(value)
    return out
