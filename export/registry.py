"""The model registry: loads exported bundles from a directory and refuses any bundle whose manifest
is unreadable, of an unknown schema, or whose files are missing, truncated or modified.

A model directory holds bundles in either layout, side by side:

- ``DIR/NAME/manifest.json`` (what ``fewshot export`` writes by default): one version, the manifest's
  ``version``;
- ``DIR/NAME/VERSION/manifest.json`` (Triton's layout, ``fewshot export --version V``): any number of
  versions, each named by its folder (a positive integer; the folder wins over the manifest's ``version``).

Every version has an identity (:func:`version_digest`): the sha256 over its files' sha256 in the manifest,
so a retrained model exported under the same name and version is told apart from the one it replaces.

Every refusal is a :class:`BundleError` whose message names the bundle, the file and the problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.errors import ConfigError, FewShotError
from fewshot.export.bundle import SCHEMA_VERSION, sha256
from fewshot.models.card import version_digest
from fewshot.models.family import family_of

__all__ = ["Bundle", "BundleError", "Registry", "UnknownBundle", "load_bundle", "version_digest", "version_key"]

log = logging.getLogger("fewshot.registry")

REQUIRED_KEYS = ("schema_version", "name", "version", "family", "method", "input", "files", "limits", "default_head", "heads")


class UnknownBundle(FewShotError, KeyError):
    """A model name the registry has no bundle for (also a ``KeyError``, as a mapping lookup is)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BundleError(FewShotError, ValueError):
    """Raised when a bundle is corrupt, truncated, incomplete or of an unknown schema."""


def version_key(version: str) -> tuple[int, int | str]:
    """Sort key of version names: numbers in numeric order, after any other name."""
    return (1, int(version)) if version.isdigit() else (0, version)


@dataclass
class Bundle:
    """A verified bundle: its folder and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def digest(self) -> str:
        return version_digest(self.manifest)

    def file(self, name: str) -> Path:
        return self.path / name


def load_bundle(path: str | Path, version: str | None = None) -> Bundle:
    """Verify and load one bundle folder; ``version``: its folder's name in the ``NAME/VERSION/`` layout (it
    replaces the manifest's ``version``)."""
    path = Path(path)
    where = f"bundle {path.name}" if version is None else f"bundle {path.parent.name}/{path.name}"
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{where}: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json must hold a JSON object")
    schema = manifest.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise BundleError(f"{where}: manifest.json has unknown schema_version {schema!r} (this server reads {SCHEMA_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: manifest.json lacks {', '.join(missing)}")
    try:
        family = family_of(manifest)
    except ConfigError as exc:
        raise BundleError(f"{where}: manifest.json: {exc}") from None
    for required in [f"{p.name}.onnx" for p in family.parts if not p.optional] + ["meta.safetensors"]:
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
    if version is not None:
        if path.parent.name != manifest["name"]:
            raise BundleError(f"{where}: manifest.json names the model {manifest['name']!r}, its folder {path.parent.name!r}")
        manifest["version"] = version
    return Bundle(path, manifest)


def bundle_folders(root: Path) -> list[tuple[Path, str | None]]:
    """Every bundle folder under ``root`` with its version folder's name (``None`` in the flat layout)."""
    found: list[tuple[Path, str | None]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # .NAME.*: an export being written
        if (folder / "manifest.json").exists():
            found.append((folder, None))
        else:
            found.extend(
                (v, v.name) for v in sorted(folder.iterdir(), key=lambda v: version_key(v.name)) if v.is_dir() and v.name.isdigit()
            )
    return found


@dataclass
class Registry:
    """All bundles of a model directory: ``versions`` by name and version, ``bundles`` the latest version of
    each name (the highest number)."""

    root: Path
    bundles: dict[str, Bundle] = field(default_factory=dict)
    versions: dict[str, dict[str, Bundle]] = field(default_factory=dict)

    @staticmethod
    def load(root: str | Path, skip: Callable[[BundleError], None] | None = None) -> Registry:
        """Load every bundle under ``root``; the first bad one raises :class:`BundleError`, or with ``skip``
        is passed to it and left out (what a watcher of the directory does: a half-copied version is not
        served, the others are)."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"model directory {root} does not exist (run `fewshot export` first)")
        reg = Registry(root)
        for folder, version in bundle_folders(root):
            try:
                bundle = load_bundle(folder, version)
                if bundle.version in reg.versions.get(bundle.name, {}):
                    other = reg.versions[bundle.name][bundle.version].path
                    raise BundleError(f"bundles {other} and {folder} are both version {bundle.version} of model {bundle.name}")
            except BundleError as exc:
                if skip is None:
                    raise
                skip(exc)
                continue
            reg.versions.setdefault(bundle.name, {})[bundle.version] = bundle
        for name, versions in reg.versions.items():
            reg.bundles[name] = versions[max(versions, key=version_key)]
        if not reg.bundles and skip is None:
            raise BundleError(f"model directory {root} holds no bundle (no */manifest.json or */VERSION/manifest.json)")
        return reg

    def version(self, name: str, version: str) -> Bundle:
        """The bundle of ``name`` at ``version`` (:class:`UnknownBundle` when the directory holds none)."""
        found = self.versions.get(name, {}).get(version)
        if found is None:
            held = ", ".join(sorted(self.versions.get(name, {}), key=version_key)) or "none"
            raise UnknownBundle(f"model directory {self.root} holds no version {version!r} of model {name!r} (it holds: {held})")
        return found

    def get(self, name: str) -> Bundle:
        if name not in self.bundles:
            raise UnknownBundle(f"unknown model {name!r}: this server has {', '.join(sorted(self.bundles))}")
        return self.bundles[name]
