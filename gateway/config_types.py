"""The frozen configuration objects; built and validated once by gateway.config.load()."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TLSFiles:
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_header_bytes: int = 16384
    max_body_bytes: int = 0  # 0 = unlimited
    trusted_proxies: tuple[IPNetwork, ...] = ()
    shutdown_grace: float = 20.0
    tls: TLSFiles | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    # The issuer name whose tokens the admin API accepts: SPEC 3's default, whether or not the config has
    # an issuer of that name (none: the admin API refuses every token, and `check` warns).
    issuer: str = "employees"
    scope: str = "gateway:admin"


@dataclass(frozen=True, slots=True)
class ClaimsMap:
    """Dotted paths into the token payload where this issuer keeps identity."""

    subject: str = "sub"
    scopes: str = "scope"
    roles: str = "roles"
    tenant: str = "tenant_id"
    session: str = "sid"


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    name: str
    issuer: str  # the exact `iss` value
    audiences: tuple[str, ...]
    jwks_uri: str | None = None  # None: discovered from {issuer}/.well-known/openid-configuration
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = 30.0
    jwks_refresh: float = 600.0
    jwks_min_refetch: float = 30.0
    claims: ClaimsMap = field(default_factory=ClaimsMap)


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    backend: str = "redis"  # redis | memory
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "gw:revoked:"
    on_backend_error: str = "deny"  # deny | allow
    max_token_lifetime: float = 86400.0
    # Not a key of the file: the largest issuer `leeway`. Tokens pass until exp + leeway, so a key must
    # outlive what it revokes by that much, or a revoked token would be accepted again in between.
    grace: float = 0.0


@dataclass(frozen=True, slots=True)
class InternalTokenConfig:
    issuer: str = "https://gateway.internal"
    algorithm: str = "ES256"  # ES256 | EdDSA | RS256
    ttl: float = 60.0
    key_store: str = "var/signing-keys.json"
    rotate_every: float = 86400.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 2  # tries in all, the first included
    retry_on: frozenset[str] = frozenset({"connect_error", "502", "503"})


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5
    window: float = 10.0
    open_for: float = 30.0
    half_open_requests: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    targets: tuple[str, ...]  # base URLs, e.g. http://127.0.0.1:8081 (no trailing slash)
    connect_timeout: float = 1.0
    read_timeout: float = 30.0
    retries: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    tls: TLSFiles | None = None
    # Requests in flight to one target at once (each holds its own HTTP/1.1 connection); past it a
    # request is refused with 503 at once (Envoy's circuit_breakers max_requests). 0: no cap.
    max_requests: int = 1024


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """One `auth.claims` condition. `claim` is a logical name of the issuer's ClaimsMap
    (subject, scopes, roles, tenant, session) or else a dotted path into the payload.
    The claim must equal one of `values`; a value "{path.NAME}" is bound to that path parameter."""

    claim: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthConfig:
    required: bool = True
    issuers: tuple[str, ...] = ()  # resolved at load: never empty when required (default: every issuer)
    scopes: tuple[str, ...] = ()  # all of these
    any_scopes: tuple[str, ...] = ()  # at least one of these
    roles: tuple[str, ...] = ()  # at least one of these
    claims: tuple[ClaimRule, ...] = ()


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    identity: str = "headers"  # headers | token | none
    audience: str | None = None
    scopes: tuple[str, ...] | None = None  # None: the token's scopes unchanged


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    upstream: str
    path: str | None = None  # template with {param} segments; exactly one of path / path_prefix
    path_prefix: str | None = None
    methods: tuple[str, ...] | None = None  # None: any method
    host: str | None = None
    websocket: bool = False
    strip_prefix: str | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    line: int = 0  # line in the config file, for messages


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    issuers: tuple[IssuerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    internal_token: InternalTokenConfig | None = None

    def issuer_by_name(self, name: str) -> IssuerConfig:
        for issuer in self.issuers:
            if issuer.name == name:
                return issuer
        raise KeyError(name)
