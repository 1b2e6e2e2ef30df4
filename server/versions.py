"""The models a server serves: every loaded version of each model, the default version of each name, and the
pin of a stored task to the exact version it was adapted with (issue 36).

A task's state (prototypes, support features, adapted weights) is valid only for the backbone that computed
it, so a task is answered only by the version whose digest (:func:`fewshot.models.card.version_digest`) it
records, never by another version of the same name. Versions are loaded, unloaded and made the default at
runtime; each change replaces the maps whole (copy on write, under a lock), so a call holds the
:class:`~fewshot.models.family.Family` object it looked up and finishes on that version whatever changes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from fewshot.export.registry import version_key
from fewshot.models.family import Family
from fewshot.server.errors import InvalidRequest, NotFound, VersionNotLoaded, quoted
from fewshot.server.store import TaskStore
from fewshot.server.store_schema import TaskRecord


def describe(version: str, digest: str) -> str:
    """``version 2 (sha256 3f2a9c1b8e7d)``: how messages name a version."""
    return f"version {version} (sha256 {digest[:12]})" if digest else f"version {version}"


@dataclass(frozen=True)
class Canary:
    """A candidate version that gets ``percent`` of a model's new Adapts naming no version, and all of ``tenants``'."""

    version: str
    percent: float = 0.0
    tenants: frozenset[str] = field(default_factory=frozenset)


class ServedModels(Mapping[str, Family]):
    """Loaded model versions. As a mapping: model name -> its default version (what an Adapt naming no version
    gets). The default of a name is the highest version loaded, unless :meth:`set_default` chose one."""

    def __init__(self, families: Iterable[Family] = ()) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, Family]] = {}
        self._defaults: dict[str, str] = {}
        self._chosen: set[str] = set()  # names whose default an operator set
        self._canaries: dict[str, Canary] = {}
        self._random = random.Random()
        for family in families:
            self.load(family)

    # -- the mapping: names to default versions ---------------------------------------------------
    def __getitem__(self, name: str) -> Family:
        versions = self._versions[name]  # KeyError for an unknown name, as a mapping does
        return versions[self._defaults[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._versions))

    def __len__(self) -> int:
        return len(self._versions)

    # -- versions -----------------------------------------------------------------------------------
    def versions(self, name: str) -> list[Family]:
        """The loaded versions of ``name``, oldest first (empty when none)."""
        found = self._versions.get(name, {})
        return [found[v] for v in sorted(found, key=version_key)]

    def default_version(self, name: str) -> str:
        return self._defaults[name]

    def loaded(self, name: str) -> str:
        """The loaded versions of ``name`` as messages name them (``"none"`` when none)."""
        return ", ".join(describe(f.version, f.digest) for f in self.versions(name)) or "none"

    def version(self, name: str, version: str) -> Family:
        """``name`` at ``version`` (empty: the default); :class:`NotFound` when that version is not loaded."""
        if name not in self._versions:
            raise NotFound(f"unknown model {quoted(name)}: this server has {', '.join(self) or 'no model'}")
        if not version:
            return self[name]
        found = self._versions[name].get(version)
        if found is None:
            raise NotFound(f"model {name} has no loaded version {quoted(version, 32)}: it serves {self.loaded(name)}")
        return found

    def canary(self, name: str) -> Canary | None:
        return self._canaries.get(name)

    def for_adapt(self, name: str, version: str = "", tenant: str = "") -> Family:
        """The version an Adapt of ``name`` runs on: ``version`` if named; else the canary's version for the canary's
        tenants and its share of the others; else the default."""
        if version or name not in self._canaries:
            return self.version(name, version)
        canary = self._canaries[name]
        if tenant in canary.tenants or self._random.random() * 100 < canary.percent:
            return self.version(name, canary.version)
        return self[name]

    def pinned(self, record: TaskRecord) -> Family:
        """The loaded version ``record`` was adapted with; :class:`VersionNotLoaded` when it is not loaded (a row
        stored before versions were recorded and not yet pinned is answered by the default version)."""
        if not record.model_digest and record.model in self._versions:
            return self[record.model]
        for family in self._versions.get(record.model, {}).values():
            if family.digest == record.model_digest:
                return family
        raise VersionNotLoaded(
            f"task {record.task_id} was adapted with model {record.model} {describe(record.model_version, record.model_digest)}, "
            f"which this server does not load (it loads {self.loaded(record.model)}): load that version again, or adapt the task anew"
        )

    def pin_old_rows(self, store: TaskStore) -> dict[str, int]:
        """Pin the stored rows of each served model that predate version records to its default version (the one
        the old server served for that name): the store's migration of old rows. Returns the rows pinned by name."""
        pinned = {name: store.pin_unversioned(name, self[name].version, self[name].digest) for name in self}
        return {name: n for name, n in pinned.items() if n}

    # -- changes --------------------------------------------------------------------------------------
    def load(self, family: Family, default: bool = False) -> None:
        """Serve ``family`` (replacing a loaded version of the same name and version); ``default``: make it the
        name's default."""
        with self._lock:
            versions = {**self._versions.get(family.name, {}), family.version: family}
            self._versions = {**self._versions, family.name: versions}
            if default:
                self._chosen.add(family.name)
            if default or family.name not in self._chosen or self._defaults.get(family.name) not in versions:
                self._set_default(family.name, family.version if default else None)

    def unload(self, name: str, version: str) -> Family:
        """Stop serving ``name`` at ``version`` (calls holding it finish); :class:`NotFound` when not loaded.
        Unloading the default makes the highest remaining version the default."""
        with self._lock:
            family = self.version(name, version)
            versions = {v: f for v, f in self._versions[name].items() if v != version}
            if name in self._canaries and self._canaries[name].version == version:
                self._canaries = {n: c for n, c in self._canaries.items() if n != name}
            if versions:
                self._versions = {**self._versions, name: versions}
                if self._defaults[name] == version:
                    self._chosen.discard(name)
                    self._set_default(name, None)
            else:
                self._versions = {n: v for n, v in self._versions.items() if n != name}
                self._defaults = {n: v for n, v in self._defaults.items() if n != name}
                self._chosen.discard(name)
            return family

    def set_default(self, name: str, version: str) -> Family:
        """Make the loaded ``version`` of ``name`` its default; :class:`NotFound` when not loaded."""
        with self._lock:
            family = self.version(name, version)
            self._chosen.add(name)
            self._set_default(name, version)
            return family

    def set_canary(self, name: str, canary: Canary | None) -> Family:
        """Send ``canary.percent`` of ``name``'s Adapts naming no version (and all of ``canary.tenants``') to
        ``canary.version``, a loaded version other than the default; ``None`` ends it. Returns the candidate (or the
        default)."""
        with self._lock:
            if canary is None or not canary.version:
                self._canaries = {n: c for n, c in self._canaries.items() if n != name}
                return self.version(name, "")
            if not 0 <= canary.percent <= 100:
                raise InvalidRequest(f"canary percent {canary.percent:g} is not in 0..100")
            family = self.version(name, canary.version)
            if canary.version == self._defaults[name]:
                raise InvalidRequest(f"version {canary.version} is the default of {name}: a canary is another loaded version")
            self._canaries = {**self._canaries, name: canary}
            return family

    def _set_default(self, name: str, version: str | None) -> None:
        """(Under the lock.) ``version``, or the highest loaded one, as ``name``'s default."""
        versions = self._versions[name]
        self._defaults = {**self._defaults, name: version or max(versions, key=version_key)}
        canary = self._canaries.get(name)
        if canary is not None and canary.version == self._defaults[name]:  # the candidate became the default: done
            self._canaries = {n: c for n, c in self._canaries.items() if n != name}
