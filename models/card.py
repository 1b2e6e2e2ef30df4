"""The model card (``models/zoo/<name>/card.json``) as a typed, schema-versioned record, and the bundle
manifest built from it.

:class:`ModelCard` names every field a card has; ``family_blocks`` holds what only one family has
(``inner_loop`` settings, the ``center`` record, ``head_tuning``) and the open-set calibration
(``open_set``: :mod:`fewshot.models.calibration`) and the support-set report's settings (``report``:
:mod:`fewshot.models.report`), copied into the manifest as they
are, so a family reads the same block from a card and from a bundle. Reading a card checks its schema
version and required fields and says which are wrong; writing puts the fields in the order of
:class:`ModelCard`, the family blocks last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.errors import ConfigError
from fewshot.models.preprocess import InputSpec

#: Version of the card layout this code reads and writes.
CARD_SCHEMA = 1
#: Version of the bundle manifest layout (``manifest.json``).
MANIFEST_SCHEMA = 1
#: Blocks that only some families' cards carry.
FAMILY_BLOCKS = ("inner_loop", "center", "head_tuning", "open_set", "report")


@dataclass
class ModelCard:
    """What a shipped model is: how it was trained, what it takes, how it adapts, how accurate it is."""

    name: str
    family: str
    method: str
    architecture: dict[str, Any]
    input: dict[str, Any]
    feature_dim: int | None
    training: dict[str, Any]
    data: dict[str, Any]
    default_head: str
    heads: dict[str, Any]
    limits: dict[str, Any]
    accuracy: dict[str, Any] = field(default_factory=dict)
    family_blocks: dict[str, Any] = field(default_factory=dict)
    schema: int = CARD_SCHEMA

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.input)

    @property
    def dataset(self) -> str:
        return self.data["dataset"]

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "card.json") -> ModelCard:
        """A card from its JSON form (:class:`ConfigError` naming the problem when it is not one)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must hold a JSON object")
        if d.get("schema") != CARD_SCHEMA:
            raise ConfigError(f"{where} has card schema {d.get('schema')!r}; this version reads {CARD_SCHEMA}")
        names = [f.name for f in dataclasses.fields(ModelCard) if f.name not in ("family_blocks", "schema")]
        required = [
            f.name for f in dataclasses.fields(ModelCard) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(names) - set(FAMILY_BLOCKS) - {"schema"})
        if unknown:
            raise ConfigError(f"{where} has unknown fields {', '.join(unknown)}")
        return ModelCard(**{k: d[k] for k in names if k in d}, family_blocks={k: d[k] for k in FAMILY_BLOCKS if k in d})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (family blocks at the top level, as in the file)."""
        out: dict[str, Any] = {"schema": self.schema}
        for f in dataclasses.fields(self):
            if f.name not in ("family_blocks", "schema"):
                out[f.name] = getattr(self, f.name)
        return out | self.family_blocks

    @staticmethod
    def load(path: Path) -> ModelCard:
        file = Path(path) / "card.json"
        try:
            return ModelCard.from_dict(json.loads(file.read_text()), str(file))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON ({exc})") from None

    def save(self, path: Path) -> None:
        (Path(path) / "card.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def manifest(
        self,
        feature_dim: int,
        files: dict[str, dict[str, Any]],
        parity: dict[str, Any],
        precision: str,
        opset: int,
        source: dict[str, str],
        version: str,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The bundle manifest: the card's description of the model and its family blocks, the files
        with their sha256 and size, the export's parity figures and ``extra`` (e.g. the network inputs)."""
        return {
            "schema_version": MANIFEST_SCHEMA,
            "name": self.name,
            "version": version,
            "family": self.family,
            "method": self.method,
            "architecture": self.architecture,
            "input": self.input,
            "feature_dim": feature_dim,
            "precision": precision,
            "opset": opset,
            "default_head": self.default_head,
            "heads": self.heads,
            "limits": self.limits,
            "accuracy": self.accuracy,
            "parity": parity,
            "data": self.data,
            "training": {"command": self.training["command"], "seed": self.training["seed"]},
            "files": files,
            "source": source,
            **{k: v for k, v in self.family_blocks.items() if k in ("inner_loop", "open_set", "report")},
            **(extra or {}),
        }


def accuracy_key(ways: int, shots: int, head: str, bn: str | None = None) -> str:
    """Key of a measured accuracy in a card's ``accuracy`` (written by ``fewshot/tools/results.py``, ``make
    results``), e.g. ``5way_1shot_centroid`` or, for inner-loop models, ``5way_1shot_cxgrad_support``."""
    return f"{ways}way_{shots}shot_{head}" + (f"_{bn}" if bn else "")


def version_digest(manifest: Mapping[str, Any]) -> str:
    """The identity of a bundle's weights: sha256 (hex) over its files and their sha256, as the manifest lists
    them (``""`` for a manifest without files: a model card, what ``fewshot eval`` runs)."""
    files = {name: info.get("sha256", "") for name, info in manifest.get("files", {}).items()}
    if not files:
        return ""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
