"""Value types shared by the stages: RequestView (per request, slots), Principal and RouteMatch (frozen)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config_types import RouteConfig


class RequestView:
    """What the stages see of a request; built by app.py from the aiohttp request.

    A plain __slots__ class, not a frozen dataclass: one is built per request, and a frozen dataclass
    pays an object.__setattr__ call per field (about 2.4 us against 0.5 us). Stages treat it as read-only.
    """

    __slots__ = ("method", "raw_path", "query_string", "host", "headers", "client_ip", "peer_ip", "scheme", "memo")

    def __init__(self, method: str, raw_path: str, query_string: str, host: str, headers: Mapping[str, str],
                 client_ip: str, peer_ip: str, scheme: str = "http", memo: Any = None) -> None:
        self.method = method
        self.raw_path = raw_path  # the path exactly as sent, before normalisation (no query string)
        self.query_string = query_string
        self.host = host  # Host header without port, lower-cased
        self.headers = headers  # case-insensitive mapping (multidict) of the client's headers
        self.client_ip = client_ip  # the real client: X-Forwarded-For walked over trusted proxies, else the peer
        self.peer_ip = peer_ip  # the TCP peer
        self.scheme = scheme
        self.memo = memo  # the connection's tokens.TokenMemo (public listener), else None

    def __repr__(self) -> str:  # headers left out: they hold the client's Authorization
        return (f"RequestView(method={self.method!r}, raw_path={self.raw_path!r}, host={self.host!r}, "
                f"client_ip={self.client_ip!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestView):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a non-frozen dataclass


# The longest `sub`, `sid` or `jti` a revocation can name (gateway revoke, the admin API): a token whose
# value is longer is refused when verified (tokens.py), since nothing could ever revoke it (SPEC 6).
MAX_REVOCABLE = 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. `claims` is the raw token payload, for claim rules."""

    issuer: str  # the issuer's configured `name`
    iss: str  # the `iss` claim (issuer URL)
    subject: str | None
    scopes: frozenset[str]  # for the rules; scope_list keeps the token's order for what is forwarded
    roles: tuple[str, ...]
    tenant: str | None
    session: str | None
    jti: str | None
    iat: int | None
    exp: int | None
    aud: tuple[str, ...]
    claims: Mapping[str, Any] = field(default_factory=dict)
    token_hash: str = ""  # sha256 of the raw token: a stable cache key that never holds the token
    scope_list: tuple[str, ...] = ()  # `scopes` in the token's order, each once (tokens.py fills both)

    @property
    def ordered_scopes(self) -> tuple[str, ...]:
        """The scopes as the token lists them (X-Auth-Scopes, the minted `scope`); sorted for a Principal
        built without scope_list, since a set has no order of its own."""
        return self.scope_list or tuple(sorted(self.scopes))


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteConfig
    params: Mapping[str, str]  # {name} path parameters, decoded
    path: str  # the normalised path that matched
    upstream_path: str  # what the upstream receives (after strip_prefix)
