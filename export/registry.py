"""The model registry: loads exported bundles from a directory and refuses any bundle whose manifest
is unreadable, of an unknown schema, or whose files are missing, truncated or modified.

Every refusal is a :class:`BundleError` whose message names the bundle, the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.errors import ConfigError, FewShotError
from fewshot.export.bundle import SCHEMA_VERSION, sha256
from fewshot.models.family import family_of

REQUIRED_KEYS = ("schema_version", "name", "version", "family", "method", "input", "files", "limits", "default_head", "heads")


class UnknownBundle(FewShotError, KeyError):
    """A model name the registry has no bundle for (also a ``KeyError``, as a mapping lookup is)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BundleError(FewShotError, ValueError):
    """Raised when a bundle is corrupt, truncated, incomplete or of an unknown schema."""


@dataclass
class Bundle:
    """A verified bundle: its folder and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def file(self, name: str) -> Path:
        return self.path / name


def load_bundle(path: str | Path) -> Bundle:
    """Verify and load one bundle folder."""
    path = Path(path)
    where = f"bundle {path.name}"
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{where}: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: manifest.json has unknown schema_version {version!r} (this server reads {SCHEMA_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: manifest.json lacks {', '.join(missing)}")
    try:
        family = family_of(manifest)
    except ConfigError as exc:
        raise BundleError(f"{where}: manifest.json: {exc}") from None
    for required in [f"{p.name}.onnx" for p in family.parts] + ["meta.safetensors"]:
        if required not in manifest["files"]:
            raise BundleError(f"{where}: manifest.json does not list {required}, required for {family.family} models")
    for fname, info in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            raise BundleError(f"{where}: {fname} is missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise BundleError(f"{where}: {fname} has {size} bytes, manifest says {info.get('bytes')} (truncated or replaced)")
        if sha256(f) != info.get("sha256"):
            raise BundleError(f"{where}: {fname} does not match its sha256 in manifest.json (corrupt or modified)")
    return Bundle(path, manifest)


@dataclass
class Registry:
    """All bundles of a model directory, by name."""

    root: Path
    bundles: dict[str, Bundle] = field(default_factory=dict)

    @staticmethod
    def load(root: str | Path) -> Registry:
        """Load every bundle under ``root``; the first bad one raises :class:`BundleError`."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"model directory {root} does not exist (run `fewshot export` first)")
        reg = Registry(root)
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()):
            bundle = load_bundle(folder)
            reg.bundles[bundle.name] = bundle
        if not reg.bundles:
            raise BundleError(f"model directory {root} holds no bundle (no */manifest.json)")
        return reg

    def get(self, name: str) -> Bundle:
        if name not in self.bundles:
            raise UnknownBundle(f"unknown model {name!r}: this server has {', '.join(sorted(self.bundles))}")
        return self.bundles[name]
