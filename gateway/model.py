"""Frozen value types shared by the stages: RequestView, Principal, RouteMatch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config_types import RouteConfig


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the stages see of a request; built by app.py from the aiohttp request."""

    method: str
    raw_path: str  # the path exactly as sent, before normalisation (no query string)
    query_string: str
    host: str  # Host header without port, lower-cased
    headers: Mapping[str, str]  # case-insensitive mapping (multidict) of the client's headers
    client_ip: str  # the real client: X-Forwarded-For walked over trusted proxies, else the peer
    peer_ip: str  # the TCP peer
    scheme: str = "http"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. `claims` is the raw token payload, for claim rules."""

    issuer: str  # the issuer's configured `name`
    iss: str  # the `iss` claim (issuer URL)
    subject: str | None
    scopes: frozenset[str]
    roles: tuple[str, ...]
    tenant: str | None
    session: str | None
    jti: str | None
    iat: int | None
    exp: int | None
    aud: tuple[str, ...]
    claims: Mapping[str, Any] = field(default_factory=dict)
    token_hash: str = ""  # sha256 of the raw token: a stable cache key that never holds the token


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteConfig
    params: Mapping[str, str]  # {name} path parameters, decoded
    path: str  # the normalised path that matched
    upstream_path: str  # what the upstream receives (after strip_prefix)
