"""Gateway.handle(): THE request path — route, authenticate, check revocation, authorize, mutate, forward."""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from gateway.authz import authorize
from gateway.config_types import Config, ForwardConfig, RouteConfig
from gateway.identity import identity_headers, upstream_request_headers
from gateway.model import Principal, RequestView, RouteMatch
from gateway.routes import RouteTable
from gateway.tokens import bearer_token
from gateway.upstream import UpstreamResponse

_IDENTITY_CACHE = 10_000  # tokens whose identity headers are kept (a few hundred bytes each)


class Verifier(Protocol):
    async def verify(self, raw: str) -> Principal: ...


class Revocations(Protocol):
    async def check(self, p: Principal) -> None: ...


class Minter(Protocol):
    def mint(self, p: Principal, forward: ForwardConfig) -> str: ...


class Sender(Protocol):
    async def send(self, upstream: str, method: str, path_qs: str, headers: CIMultiDict[str],
                   body: AsyncIterable[bytes] | None) -> UpstreamResponse: ...

    async def open_websocket(self, upstream: str, path_qs: str, headers: CIMultiDict[str],
                             protocols: tuple[str, ...] = ()) -> aiohttp.ClientWebSocketResponse: ...


@dataclass(slots=True)
class Exchange:
    """Per-request state the access log and metrics read, filled in as the request moves on."""

    request_id: str
    route: str = "-"
    upstream: str = ""
    principal: Principal | None = None  # set once the token verified, even if refused afterwards
    authorized: bool = False  # revocation and rules passed
    issuer: str = ""  # issuer name once known, even when verification failed later
    body_too_large: bool = False  # the request body passed max_body_bytes while streamed upstream


class Gateway:
    """Built once per config (reload builds a new one); holds no per-request state."""

    def __init__(self, config: Config, verifier: Verifier, revocations: Revocations, minter: Minter | None,
                 upstreams: Sender) -> None:
        self.config = config
        self.routes = RouteTable(config.routes)
        self.verifier, self.revocations, self.minter, self.upstreams = verifier, revocations, minter, upstreams
        self._trusted = config.server.trusted_proxies
        # token_hash -> the identity headers of that token: the same token always yields the same
        # headers under one config (a reload builds a new Gateway), so they are built once per token.
        self._identity: dict[str, tuple[tuple[str, str], ...]] = {}

    def match(self, view: RequestView) -> RouteMatch:
        return self.routes.match(view.method, view.raw_path, view.host)  # normalises, or raises BadPath

    async def authenticate(self, view: RequestView, route: RouteConfig, match: RouteMatch, ex: Exchange) -> Principal:
        principal = await self.verifier.verify(bearer_token(view.headers.get("Authorization")))
        ex.principal = principal  # known from here on: the log names who used a revoked or refused token
        await self.revocations.check(principal)  # also for tokens served from the verified-token cache
        authorize(route.auth, principal, match.params)
        ex.authorized = True
        return principal

    async def admit(self, view: RequestView, ex: Exchange) -> tuple[RouteMatch, CIMultiDict[str]]:
        """Route, authenticate and authorize; the headers the upstream will receive."""
        match = self.match(view)
        route = match.route
        ex.route, ex.upstream = route.name, route.upstream
        principal = None
        if route.auth.required:
            principal = await self.authenticate(view, route, match, ex)
        return match, self.upstream_headers(view, route, principal, ex.request_id)

    async def handle(self, view: RequestView, body: AsyncIterable[bytes] | None, ex: Exchange) -> UpstreamResponse:
        match, headers = await self.admit(view, ex)
        path_qs = match.upstream_path + ("?" + view.query_string if view.query_string else "")
        return await self.upstreams.send(match.route.upstream, view.method, path_qs, headers, body)

    def upstream_headers(self, view: RequestView, route: RouteConfig, principal: Principal | None,
                         request_id: str) -> CIMultiDict[str]:
        # Strip before add (Envoy extractor.cc): the client's Authorization and X-Auth-* never pass.
        headers = upstream_request_headers(
            view.headers, strip_authorization=route.auth.required, keep_upgrade=route.websocket,
            client_ip=view.client_ip, peer_ip=view.peer_ip, trusted_proxies=self._trusted,
            scheme=view.scheme, host=view.headers.get("Host", ""), request_id=request_id,
        )
        if principal is not None:
            mode = route.forward.identity
            if mode == "headers":
                # extend, not update: upstream_request_headers already removed every X-Auth-* header.
                headers.extend(self._identity_headers(principal))
            elif mode == "token" and self.minter is not None:
                headers["Authorization"] = "Bearer " + self.minter.mint(principal, route.forward)
        return headers

    def _identity_headers(self, p: Principal) -> tuple[tuple[str, str], ...]:
        key = p.token_hash
        hit = self._identity.get(key) if key else None
        if hit is None:
            hit = tuple(identity_headers(p).items())  # raises InvalidToken for unsafe values: never cached
            if key:
                if len(self._identity) >= _IDENTITY_CACHE:
                    del self._identity[next(iter(self._identity))]  # FIFO: oldest insertion first
                self._identity[key] = hit
        return hit
