"""Changing the served models at runtime (issue 36): load a version, unload one, set a model's default version,
and watch the model directory (``--model-control poll``), all without a restart.

:class:`ModelControl` does the work; the gRPC service ``fewshot.v1.FewShotAdmin`` (:class:`AdminService`), its
HTTP twin (``/v1/admin/models/...``) and ``fewshot-client models load|unload|default`` call it. Every admin call
needs the admin credential (``--admin-token-file`` or ``$FEWSHOT_ADMIN_TOKEN``), which no tenant token grants: a
server started without one refuses them all.

A version is served only once its bundle verifies (the manifest, then every file's size and sha256: a
half-copied folder fails and is skipped, never served) and its ONNX Runtime sessions are made; then it is
swapped into :class:`~fewshot.server.versions.ServedModels` whole, so calls in flight finish on the version they
looked up.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from fewshot.errors import ConfigError
from fewshot.export.registry import Bundle, BundleError, Registry, bundle_folders, load_bundle
from fewshot.models.family import Family
from fewshot.server.auth import token_hash
from fewshot.server.errors import InvalidRequest, NotFound, PermissionDenied, ServiceError, quoted
from fewshot.server.migrate import Migrations
from fewshot.server.tasks import MAX_MODEL_NAME
from fewshot.server.versions import Canary, ServedModels, describe
from fewshot_proto import fewshot_pb2 as pb

log = logging.getLogger("fewshot.server")

ADMIN_SERVICE_NAME = "fewshot.v1.FewShotAdmin"


class BundleRefused(ServiceError):
    """A version whose bundle does not verify (missing or modified files, a bad manifest): not loaded; what was
    served before goes on."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 412


class AdminAuth:
    """The admin credential: one token, compared in constant time by its sha256; ``None``: admin calls refused."""

    def __init__(self, token: str | None, tenant_digests: Iterable[str] = ()) -> None:
        self.digest = token_hash(token) if token else None
        if self.digest is not None and self.digest in set(tenant_digests):
            raise ConfigError("the admin token is also a tenant token: give the admin its own token")

    def check(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Raise :class:`PermissionDenied` unless the call carries ``authorization: Bearer <admin token>``."""
        if self.digest is None:
            raise PermissionDenied("admin calls are off: start the server with --admin-token-file (or $FEWSHOT_ADMIN_TOKEN)")
        given = [v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in metadata if k == "authorization"]
        scheme, _, token = (given[0] if len(given) == 1 else "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_hash(token.strip()), self.digest):
            raise PermissionDenied("this call needs the admin token (`authorization: Bearer <admin token>`); tenant tokens do not grant it")


class ModelControl:
    """Loads, unloads and sets the default version of the models in ``models`` from the model directory ``root``;
    ``open_version(bundle)`` makes a verified bundle's family object, configured as the server's others.

    With ``store``, every admin change is recorded in the task database (the model's served versions, by digest,
    and its default: :meth:`TaskStore.set_control`), and :meth:`sync` applies what other processes recorded, from
    their own model directory: replicas sharing one database converge on the same versions within one sync
    interval plus the time to verify and open a bundle."""

    def __init__(self, root: Path, models: ServedModels, open_version: Callable[[Bundle], Family], store: Any = None) -> None:
        self.root, self.models, self.open_version, self.store = Path(root), models, open_version, store
        self._lock = threading.Lock()  # one change at a time (loads are slow; lookups never wait on it)
        self._seen = 0  # the last generation of the shared state applied here

    def load(self, name: str, version: str, default: bool = False) -> Family:
        """Verify and serve ``name`` at ``version`` from the model directory (reloaded when its files changed)."""
        _check_name(name, version)
        with self._lock:
            bundle = self._bundle(name, version)
            loaded = self.models.version(name, version) if version in {f.version for f in self.models.versions(name)} else None
            if loaded is not None and loaded.digest == bundle.digest:
                if default:
                    self.models.set_default(name, version)
                return loaded
            family = self.open_version(bundle)
            self.models.load(family, default)
            self._share(name)
        _event("model loaded", family)
        return family

    def unload(self, name: str, version: str) -> Family:
        _check_name(name, version)
        with self._lock:
            family = self.models.unload(name, version)
            self._share(name)
        _event("model unloaded", family)
        return family

    def set_default(self, name: str, version: str) -> Family:
        _check_name(name, version)
        with self._lock:
            family = self.models.set_default(name, version)
            self._share(name)
        _event("default version set", family)
        return family

    def set_canary(self, name: str, version: str, percent: float, tenants: Iterable[str]) -> Family:
        """Send ``percent`` of ``name``'s Adapts naming no version, and all of ``tenants``', to ``version`` (empty:
        end the canary)."""
        tenants = sorted(tenants)
        if version:
            _check_name(name, version)
        with self._lock:
            family = self.models.set_canary(name, Canary(version, float(percent), frozenset(tenants)) if version else None)
            self._share(name)
        log.warning(json.dumps({"event": "canary set", "model": name, "version": version, "percent": percent, "tenants": tenants}))
        return family

    # -- replicas sharing one task database ------------------------------------------------------------
    def _share(self, name: str) -> None:
        """(Under the lock.) Record ``name``'s served versions and default for the other processes."""
        if self.store is None:
            return
        versions = {f.version: f.digest for f in self.models.versions(name)}
        state: dict[str, Any] = {"versions": versions, "default": self.models.default_version(name) if versions else None}
        canary = self.models.canary(name)
        if canary is not None:
            state["canary"] = {"version": canary.version, "percent": canary.percent, "tenants": sorted(canary.tenants)}
        generation = self.store.set_control(name, json.dumps(state, sort_keys=True))
        if generation == self._seen + 1:  # nothing recorded elsewhere in between: ours is applied already
            self._seen = generation

    def sync(self) -> int:
        """Apply what other processes recorded since the last sync (at start: everything recorded); the changes made.
        A version is loaded from this process's model directory only if its digest is the recorded one."""
        if self.store is None:
            return 0
        changes = 0
        with self._lock:
            for name, text, generation in self.store.control_since(self._seen):
                changes += self._apply(name, json.loads(text))
                self._seen = max(self._seen, generation)
        return changes

    def _apply(self, name: str, state: dict[str, Any]) -> int:
        """(Under the lock.) Make ``name``'s served versions and default those of ``state``."""
        wanted: dict[str, str] = state.get("versions", {})
        served = {f.version: f.digest for f in self.models.versions(name)}
        changes = 0
        for version, digest in wanted.items():
            if served.get(version) == digest:
                continue
            try:
                bundle = self._bundle(name, version)
                if bundle.digest != digest:
                    raise BundleRefused(f"this model directory holds another {describe(version, bundle.digest)} than the recorded one")
                family = self.open_version(bundle)
            except ServiceError as exc:
                log.warning(json.dumps({"event": "recorded version not loaded", "model": name, "version": version, "error": str(exc)}))
                continue
            self.models.load(family)
            _event("model loaded", family, "sync")
            changes += 1
        for version in served:
            if version not in wanted:
                _event("model unloaded", self.models.unload(name, version), "sync")
                changes += 1
        default = state.get("default")
        if (
            default
            and default in {f.version for f in self.models.versions(name)}
            and (name not in self.models or self.models.default_version(name) != default)
        ):
            _event("default version set", self.models.set_default(name, default), "sync")
            changes += 1
        canary = state.get("canary")
        wanted_canary = Canary(canary["version"], canary["percent"], frozenset(canary["tenants"])) if canary else None
        if name in self.models and self.models.canary(name) != wanted_canary:
            try:
                self.models.set_canary(name, wanted_canary)
                changes += 1
            except ServiceError as exc:
                log.warning(json.dumps({"event": "recorded canary not set", "model": name, "error": str(exc)}))
        return changes

    def _bundle(self, name: str, version: str) -> Bundle:
        """The verified bundle of ``name`` at ``version`` (:class:`NotFound`, :class:`BundleRefused`)."""
        if not self.root.is_dir():
            raise BundleRefused(f"model directory {self.root} does not exist")
        for folder, folder_version in bundle_folders(self.root):
            if folder_version is None and folder.name != name:
                continue
            if folder_version is not None and (folder.parent.name != name or folder_version != version):
                continue
            try:
                bundle = load_bundle(folder, folder_version)
            except BundleError as exc:
                raise BundleRefused(f"{exc}: not loaded; what this server served before goes on") from None
            if bundle.name == name and bundle.version == version:
                return bundle
        raise NotFound(f"model directory {self.root} holds no version {quoted(version, 32)} of model {quoted(name)}")

    def poll(self) -> int:
        """Make the served versions those of the model directory: load new or changed versions, unload versions
        whose folder is gone. A bundle that does not verify is skipped and logged (a half-copied version is not
        served; the one before it goes on). Returns the changes made."""
        try:
            registry = Registry.load(self.root, skip=lambda exc: log.warning(json.dumps({"event": "bundle skipped", "error": str(exc)})))
        except BundleError as exc:
            log.warning(json.dumps({"event": "model directory unreadable", "error": str(exc)}))
            return 0
        changes = 0
        with self._lock:
            for name, versions in registry.versions.items():
                served = {f.version: f.digest for f in self.models.versions(name)}
                for version, bundle in versions.items():
                    if served.get(version) != bundle.digest:
                        family = self.open_version(bundle)
                        self.models.load(family)
                        _event("model loaded", family, "poll")
                        changes += 1
            for name in list(self.models):
                for family in self.models.versions(name):
                    if family.version not in registry.versions.get(name, {}):
                        self.models.unload(name, family.version)
                        _event("model unloaded", family, "poll")
                        changes += 1
        return changes


def _check_name(name: str, version: str) -> None:
    if not name or len(name) > MAX_MODEL_NAME:
        raise InvalidRequest(f"model must name a model (at most {MAX_MODEL_NAME} characters)")
    if not version or len(version) > 32 or not all(c.isalnum() or c in "._-" for c in version):
        raise InvalidRequest(f"version {quoted(version, 32)} is not a version name: letters, digits, '.', '_' or '-', at most 32")


def _event(what: str, family: Family, by: str = "admin") -> None:
    log.warning(json.dumps({"event": what, "model": family.name, "version": family.version, "digest": family.digest[:12], "by": by}))


class AdminService:
    """``fewshot.v1.FewShotAdmin`` over :class:`ModelControl`; ``describe(name)`` answers the model as ListModels
    does. Register with :meth:`add_to_server`."""

    def __init__(
        self,
        control: ModelControl,
        auth: AdminAuth,
        describe_model: Callable[[str], pb.ModelInfo | None],
        migrations: Migrations | None = None,
    ) -> None:
        self.control, self.auth, self.describe_model, self.migrations = control, auth, describe_model, migrations

    def add_to_server(self, server: grpc.aio.Server) -> None:
        def unary(fn: Callable) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, response_serializer=lambda m: m.SerializeToString())

        handlers = {
            "LoadModel": unary(self.LoadModel),
            "UnloadModel": unary(self.UnloadModel),
            "SetDefaultVersion": unary(self.SetDefaultVersion),
            "SetCanary": unary(self.SetCanary),
            "MigrateTasks": unary(self.MigrateTasks),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, handlers),))

    async def _call(
        self, rpc: str, raw: bytes, context: grpc.aio.ServicerContext, fn: Callable[..., Family | tuple[Family, Any]], kind: Any = None
    ) -> pb.ModelAdminResponse:
        """Authenticate, parse ``raw`` as ``kind`` (default ``ModelVersionRequest``), run ``fn(model, version)`` (for
        another ``kind``: ``fn(request)``) off the event loop, and answer the model as served after it."""
        try:
            self.auth.check(context.invocation_metadata() or ())
            message = kind or pb.ModelVersionRequest
            try:
                request = message.FromString(raw)
            except Exception:
                raise InvalidRequest(f"the request is not a {message.DESCRIPTOR.name}") from None
            args = (request.model, request.version) if kind is None else (request,)
            done = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
            family, migration = done if isinstance(done, tuple) else (done, None)
            info = self.describe_model(family.name)
            log.info(json.dumps({"rpc": rpc, "code": "OK", "model": family.name, "version": family.version}))
            return pb.ModelAdminResponse(model=info, migration=migration)
        except ServiceError as exc:
            log.info(json.dumps({"rpc": rpc, "code": exc.code.name, "error": str(exc)[:500]}))
            if hasattr(context, "http_status"):
                context.http_status = exc.http_status
            await context.abort(exc.code, str(exc))
            raise  # not reached: abort raises

    async def LoadModel(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelAdminResponse:
        return await self._call("LoadModel", raw, context, self.control.load)

    async def UnloadModel(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelAdminResponse:
        return await self._call("UnloadModel", raw, context, self.control.unload)

    async def SetDefaultVersion(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelAdminResponse:
        return await self._call("SetDefaultVersion", raw, context, self.control.set_default)

    async def SetCanary(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelAdminResponse:
        def run(request: pb.CanaryRequest) -> Family:
            return self.control.set_canary(request.model, request.version, request.percent, list(request.tenants))

        return await self._call("SetCanary", raw, context, run, pb.CanaryRequest)

    async def MigrateTasks(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelAdminResponse:
        def run(model: str, version: str) -> tuple[Family, pb.MigrationStatus]:
            _check_name(model, version)
            if self.migrations is None:
                raise BundleRefused("this server runs no migrations: use `fewshot migrate`")
            target = self.control.models.version(model, version)  # loaded here: the servers answer its tasks after
            progress, running = self.migrations.start(target)
            status = pb.MigrationStatus(
                model=model, version=version, done=progress.done, left=progress.left, failed=len(progress.failed), running=running
            )
            return target, status

        return await self._call("MigrateTasks", raw, context, run)
