"""Feature transforms of SimpleShot (Wang et al. 2019): UN, L2N and CL2N."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError

Transform = Literal["UN", "L2N", "CL2N"]
TRANSFORMS: tuple[str, ...] = ("UN", "L2N", "CL2N")


def transform_features(x: torch.Tensor, kind: str, center: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a feature transform to ``(n, d)`` features.

    Args:
        kind: ``UN`` (unchanged), ``L2N`` (``x / ||x||``) or ``CL2N`` (``(x - m) / ||x - m||`` with ``m``
            the mean feature of the training classes, stored with the model).
        center: ``(d,)``, required for CL2N.
    """
    if kind == "UN":
        return x
    if kind == "L2N":
        return F.normalize(x, dim=1)
    if kind == "CL2N":
        if center is None:
            raise ConfigError("CL2N needs the model's centering vector (mean training-class feature)")
        return F.normalize(x - center.to(x.dtype), dim=1)
    raise ConfigError(f"unknown feature transform {kind!r}: use one of {', '.join(TRANSFORMS)}")
