"""Who is calling: bearer tokens, tenants, per-tenant quotas, and rate limits on failed attempts.

Two ways to configure it, usable together (docs/errors-and-security.md, "Security model"):

- ``--token`` / ``--token-file`` / ``$FEWSHOT_TOKEN``: one shared token; it grants the *default
  tenant* (``""``), the same tenant as a server without authentication and as the Triton models.
- ``--tokens FILE``: one ``tenant: sha256-of-token [max_tasks=N] [rps=R]`` per line (``#`` comments),
  reloaded on SIGHUP. Only hashes are stored, so the file does not disclose tokens.

Every task belongs to the tenant that adapted it, and another tenant is answered NOT_FOUND for it,
exactly as for a task that never existed. Checks read only the call's metadata, so a refused call's
body is never parsed. Failed authentications are throttled per peer address and per presented token: past
the rate, the *failing* calls are answered RESOURCE_EXHAUSTED, while a valid token from the same address
is still accepted (it is compared first).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fewshot.errors import FewShotError
from fewshot.server.errors import QuotaExceeded, Unauthenticated

TENANT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEFAULT_TENANT = ""


class TokensFileError(FewShotError, ValueError):
    """A ``--tokens`` file that cannot be used; the message names the line and what is wrong."""


def token_hash(token: str) -> str:
    """The sha256 hex digest that a tokens file stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """A tenant and its quotas (``None``: the server's default; 0: unlimited)."""

    name: str
    max_tasks: int | None = None
    rps: float | None = None


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, Tenant]:
    """``{sha256 hex: Tenant}`` from the text of a tokens file (:class:`TokensFileError` on a bad line)."""
    tenants: dict[str, Tenant] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not TENANT_NAME.fullmatch(name):
            raise TokensFileError(
                f"{where}: expected `tenant: sha256-hex [max_tasks=N] [rps=R]` with a tenant name of 1-64 letters, digits or _.@-"
            )
        fields = rest.split()
        digest = fields[0].lower().removeprefix("sha256:") if fields else ""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TokensFileError(f"{where}: the token hash must be 64 hex digits (sha256 of the token; `fewshot token-hash` prints it)")
        options: dict[str, float] = {}
        for option in fields[1:]:
            key, _, value = option.partition("=")
            if key not in ("max_tasks", "rps"):
                raise TokensFileError(f"{where}: unknown option {key[:32]!r}; use max_tasks=N or rps=R")
            try:
                options[key] = float(value)
            except ValueError:
                raise TokensFileError(f"{where}: {key} needs a number, got {value[:32]!r}") from None
            if options[key] < 0:
                raise TokensFileError(f"{where}: {key} must be >= 0")
        if digest in tenants:
            raise TokensFileError(f"{where}: this token hash is already given to tenant {tenants[digest].name!r}")
        max_tasks = int(options["max_tasks"]) if "max_tasks" in options else None
        tenants[digest] = Tenant(name, max_tasks, options.get("rps"))
    return tenants


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; :meth:`take` says whether one was available."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def refill(self) -> float:
        """Add what accrued since the last call; returns the tokens now available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def take(self) -> bool:
        if self.refill() >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else float("inf")


def peer_address(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``: failures are counted per address, not per connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class Authenticator:
    """Maps a call's ``authorization: Bearer <token>`` metadata to a tenant, enforcing request rates.

    Args:
        token: the single shared token (default tenant), or ``None``.
        tokens_file: path of a tokens file, or ``None``.
        max_tasks, rps: default quotas of every tenant (0: unlimited).
        failures_per_minute: failed attempts an address may make before it is refused for a while.
    """

    def __init__(
        self,
        token: str | None = None,
        tokens_file: Path | None = None,
        max_tasks: int = 0,
        rps: float = 0.0,
        failures_per_minute: float = 30.0,
    ) -> None:
        self.token_digest = token_hash(token) if token else None
        self.tokens_file, self.max_tasks, self.rps = tokens_file, max_tasks, rps
        self.failure_rate = failures_per_minute / 60.0
        self._tenants: dict[str, Tenant] = {}
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._failures: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        if tokens_file is not None:
            self.reload()

    @property
    def required(self) -> bool:
        """Whether calls need a token at all."""
        return self.token_digest is not None or self.tokens_file is not None

    def reload(self) -> int:
        """Read the tokens file again (SIGHUP); a bad file keeps the previous tenants and raises."""
        assert self.tokens_file is not None
        try:
            text = Path(self.tokens_file).read_text()
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {self.tokens_file}: {exc.strerror or exc}") from None
        tenants = parse_tokens(text, str(self.tokens_file))
        with self._lock:
            self._tenants = tenants
        return len(tenants)

    def digests(self) -> set[str]:
        """The sha256 digests of every token that grants a tenant (the admin token must be none of them)."""
        with self._lock:
            return set(self._tenants) | ({self.token_digest} if self.token_digest else set())

    def tenant_names(self) -> Iterable[str]:
        return sorted({t.name for t in self._tenants.values()})

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> Tenant:
        """The calling tenant, after its rate limit (raises :class:`Unauthenticated` or :class:`QuotaExceeded`).
        Without any token configured, every call is the default tenant.

        The presented token is compared first (its sha256 digest, in constant time against the shared token),
        so a valid token is never refused for what other clients did: failures are throttled per address and
        per presented token, and only the failing calls themselves are then answered RESOURCE_EXHAUSTED. An
        attacker's failures cost the attacker, not the users behind the same NAT, proxy or ingress."""
        if not self.required:
            return self._admit(Tenant(DEFAULT_TENANT))
        given = [value.decode(errors="replace") if isinstance(value, bytes) else value for key, value in metadata if key == "authorization"]
        digest = ""
        if len(given) > 1:
            tenant, why = None, f"{len(given)} authorization headers: send exactly one, `authorization: Bearer <token>`"
        else:
            scheme, _, token = (given[0] if given else "").partition(" ")
            tenant, why = None, "missing or wrong token: send metadata `authorization: Bearer <token>`"
            if scheme.lower() == "bearer" and token.strip():
                digest = token_hash(token.strip())
                tenant = self._tenant_of(digest)
        if tenant is not None:
            return self._admit(tenant)
        self._failed(peer_address(peer), digest)
        raise Unauthenticated(why)

    def _tenant_of(self, digest: str) -> Tenant | None:
        if self.token_digest is not None and hmac.compare_digest(digest, self.token_digest):
            return Tenant(DEFAULT_TENANT)
        with self._lock:
            return self._tenants.get(digest)  # keyed by sha256 digests: a lookup reveals nothing of a token

    def _failed(self, address: str, digest: str) -> None:
        """Count a failed authentication against its address and its presented token (if any); past either's
        rate, :class:`QuotaExceeded` (the failing call is refused without more work)."""
        keys = [("address", address)] + ([("token", digest)] if digest else [])
        with self._lock:
            spent = []
            for key in keys:
                bucket = self._failures.pop(key, None) or TokenBucket(self.failure_rate, max(1.0, self.failure_rate * 60))
                self._failures[key] = bucket
                if not bucket.take():
                    spent.append((key[0], bucket.wait()))
            while len(self._failures) > 10000:
                self._failures.popitem(last=False)
        if spent:
            what, wait = max(spent, key=lambda s: s[1])
            raise QuotaExceeded(
                f"too many failed authentications from this {what}; a valid token is still accepted, "
                f"failing ones are refused for {wait:.0f} s"
            )

    def quota_tasks(self, tenant: Tenant) -> int | None:
        """The tenant's live-task quota (``None``: unlimited)."""
        limit = tenant.max_tasks if tenant.max_tasks is not None else self.max_tasks
        return limit or None

    def _admit(self, tenant: Tenant) -> Tenant:
        rate = tenant.rps if tenant.rps is not None else self.rps
        if not rate:
            return tenant
        with self._lock:
            bucket = self._buckets.get(tenant.name)
            if bucket is None or bucket.rate != rate:
                bucket = self._buckets[tenant.name] = TokenBucket(rate, max(1.0, 2 * rate))
            if bucket.take():
                return tenant
            wait = bucket.wait()
        raise QuotaExceeded(f"this tenant's request rate quota ({rate:g} per second) is used up; retry in {wait * 1e3:.0f} ms")
