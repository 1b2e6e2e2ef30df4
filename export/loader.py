"""Models loaded from a verified bundle alone (what the server runs): the bundle's family object
(:mod:`fewshot.models.family`) with its parts in ONNX Runtime (in process, the default) or in whatever
``engines`` the caller gives (the Triton feature backend, Triton's BLS).

``fewshot eval`` builds the same family object from the shipped model
(:func:`fewshot.models.family.open_shipped`), so a bundle's predictions equal the shipped model's.
"""

from __future__ import annotations

from typing import Any

from safetensors.torch import load_file

from fewshot.export.registry import Bundle
from fewshot.models.family import Adapter, Family, family_of, parts_in
from fewshot.models.runtime import Engines, OnnxEngines


def open_bundle(bundle: Bundle, device: str = "auto", threads: int = 0, engines: Engines | None = None) -> Family:
    """The family object of ``bundle``; its parts (``<part>.onnx``) run in ONNX Runtime on ``device`` with
    ``threads`` intra-op threads unless ``engines`` runs them. ONNX Runtime sessions are made when the
    family first needs a part (an inner-loop model never opens its backbone)."""
    cls = family_of(bundle.manifest)
    engines = engines or OnnxEngines({p.name: bundle.file(f"{p.name}.onnx") for p in parts_in(bundle.manifest)}, device, threads)
    return cls(bundle.manifest, load_file(str(bundle.file("meta.safetensors"))), engines, device)


def bundle_adapter(bundle: Bundle, method: str | None = None, device: str = "auto", shots: int = 1, **settings: Any) -> Adapter:
    """The adapter of ``bundle`` for ``method`` (default: the model's own) and adapter keywords."""
    return open_bundle(bundle, device).adapter(method, shots, **settings)
