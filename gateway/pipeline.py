"""Gateway.handle(): THE request path — route, authenticate, check revocation, authorize, mutate, forward."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from gateway.authz import Rules
from gateway.config_types import Config, ForwardConfig, RouteConfig
from gateway.errors import InvalidToken
from gateway.identity import Identity, identity_headers, upstream_request_headers
from gateway.model import Principal, RequestView, RouteMatch
from gateway.routes import RouteTable
from gateway.tokens import TokenMemo, bearer_token
from gateway.upstream import UpstreamResponse

_IDENTITY_CACHE = 10_000  # tokens whose identity headers are kept (a few hundred bytes each)
_MINTED_CACHE = 10_000  # internal tokens whose Authorization line is kept (under 1 KB each)


class Verifier(Protocol):
    async def verify(self, raw: str) -> Principal: ...


class Revocations(Protocol):
    async def check(self, p: Principal) -> None: ...  # raises InvalidToken (revoked), BackendUnavailable (deny)
    async def revoked(self, p: Principal) -> bool | None: ...  # uncounted, for watchers; None: cannot tell


class Minter(Protocol):
    def mint(self, p: Principal, forward: ForwardConfig) -> str: ...


class Sender(Protocol):
    async def send(self, upstream: str, method: str, path_qs: str, headers: CIMultiDict[str],
                   body: AsyncIterable[bytes] | None, identity: Identity | None = None) -> UpstreamResponse: ...

    async def open_websocket(self, upstream: str, path_qs: str, headers: CIMultiDict[str],
                             protocols: tuple[str, ...] = ()) -> aiohttp.ClientWebSocketResponse: ...


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity (gateway.lifetime's registry)
class Exchange:
    """Per-request state the access log and metrics read, filled in as the request moves on."""

    request_id: str
    route: str = "-"
    upstream: str = ""
    principal: Principal | None = None  # set once the token verified, even if refused afterwards
    authorized: bool = False  # revocation and rules passed
    issuer: str = ""  # issuer name once known, even when verification failed later
    body_too_large: bool = False  # the request body passed max_body_bytes while streamed upstream
    ended: str | None = None  # "expired"/"revoked": its token ended while it was open (gateway.lifetime)


class _Admitted:
    """One connection's last admission: who passed which route with which parameters, at which
    revocation stamp, and the identity forwarded for them (None in token mode: minted per request)."""

    __slots__ = ("gateway", "route", "params", "principal", "stamp", "identity")

    def __init__(self, gateway: int, route: RouteConfig, params: Mapping[str, str], principal: Principal,
                 stamp: int, identity: Identity | None) -> None:
        self.gateway, self.route, self.params = gateway, route, params
        self.principal, self.stamp, self.identity = principal, stamp, identity


class ConnMemo(TokenMemo):
    """The public listener's per-connection scratch: the token memo (TokenMemo) and the last admission.

    A keep-alive client sends the same token to the same route again and again. Its next request there
    is admitted without running the route's rules again, only when each stage would answer as it did:
    - the token: TokenVerifier.cached_header checks it as every cache hit is checked (exp, its issuer's
      keys, the verifier), and must give back the very Principal that was admitted;
    - revocation: the store's stamp is unchanged (nothing revoked since; RevocationStore.passed_again);
    - the rules: same Gateway (by number: a reload's never trusts the old one's), same route, equal path
      parameters; rules read only the principal and the parameters.
    Counters move as on the full path (a token cache hit, an ok revocation check)."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        super().__init__()
        self.admitted: _Admitted | None = None


_GATEWAYS = itertools.count()


def _unstamped() -> None:
    return None


def _not_again(stamp: int) -> bool:
    return False


def _not_cached(header: str, memo: TokenMemo) -> None:
    return None


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
        # OrderedDict: its FIFO eviction is O(1) (a plain dict's next(iter()) walks deleted slots).
        self._identity: OrderedDict[str, Identity] = OrderedDict()
        self._minted: OrderedDict[str, Identity] = OrderedDict()  # internal token -> its Authorization line
        # Each route's rules compiled once (frozensets, claim checks), found by route name.
        self._rules = {r.name: Rules(r.auth) for r in config.routes if r.auth.required}
        # Synchronous fast paths when the stages offer them (TokenVerifier.cached, check_local): no
        # coroutine per request for a cached token and a live revocation view.
        self._cached: Callable[[str], Principal | None] | None = getattr(verifier, "cached", None)
        self._cached_header: Callable[[str, TokenMemo], Principal | None] | None = getattr(
            verifier, "cached_header", None)
        self._check_local: Callable[[Principal], bool] | None = getattr(revocations, "check_local", None)
        # A connection's last admission (ConnMemo) is kept only when both stages can confirm it again
        # synchronously: the token cache by the connection's memo, the revocation view by its stamp.
        stamp, again = getattr(revocations, "stamp", None), getattr(revocations, "passed_again", None)
        self._stamp: Callable[[], int | None] = _unstamped  # never stamped: no admission is kept
        self._passed_again: Callable[[int], bool] = _not_again
        self._header_again: Callable[[str, TokenMemo], Principal | None] = _not_cached
        if self._cached_header is not None and stamp is not None and again is not None:
            self._stamp, self._passed_again, self._header_again = stamp, again, self._cached_header
        self._number = next(_GATEWAYS)  # ConnMemo's admissions are this Gateway's only

    def match(self, view: RequestView) -> RouteMatch:
        return self.routes.match(view.method, view.raw_path, view.host)  # normalises, or raises BadPath

    async def authenticate(self, view: RequestView, route: RouteConfig, match: RouteMatch, ex: Exchange,
                           found: Principal | None = None) -> Principal:
        """The request's principal once its token, revocation and the route's rules passed. `found`: the
        principal a cache lookup of this very header already gave (so it is not looked up, nor counted, twice)."""
        header = view.headers.get("Authorization")
        principal = found
        if principal is None and self._cached is not None and header is not None and header[:7] == "Bearer ":
            # Only exact strings that verified are cache keys, so a hit needs no bearer syntax check;
            # every other spelling (and a miss) goes through bearer_token() and a full verification.
            memo = view.memo
            if memo is not None and self._cached_header is not None:
                principal = self._cached_header(header, memo)  # the connection's last token: no hashing
            else:
                principal = self._cached(header[7:])
        if principal is None:
            try:
                principal = await self.verifier.verify(bearer_token(header))
            except InvalidToken as exc:
                ex.principal = exc.principal  # signed, but its claims are refused: the log still names them
                raise
        ex.principal = principal  # known from here on: the log names who used a revoked or refused token
        # Revocation is checked on every request, cached tokens included (tests/test_revocation_e2e.py).
        if self._check_local is None or not self._check_local(principal):
            await self.revocations.check(principal)
        rules = self._rules.get(route.name)
        if rules is None or rules.auth is not route.auth:
            rules = Rules(route.auth)  # a route from elsewhere (not this config's): compiled for this call
        rules.check(principal, match.params)
        ex.authorized = True
        return principal

    async def admit(self, view: RequestView, ex: Exchange) -> tuple[RouteMatch, CIMultiDict[str]]:
        """Route, authenticate and authorize; the headers the upstream will receive."""
        match, headers, identity = await self._admit(view, ex)
        if identity is not None:
            # extend, not update: upstream_request_headers already removed every X-Auth-* header.
            headers.extend(identity.pairs)
        return match, headers

    async def _admit(self, view: RequestView, ex: Exchange) -> tuple[RouteMatch, CIMultiDict[str], Identity | None]:
        """admit() with the identity apart (headers mode's X-Auth-*, token mode's Authorization), as
        built once per token: the lean upstream client appends its bytes to the request head."""
        match = self.match(view)
        route = match.route
        ex.route, ex.upstream = route.name, route.upstream
        if not route.auth.required:
            return match, self.upstream_headers(view, route, ex.request_id), None
        memo = view.memo if isinstance(view.memo, ConnMemo) else None
        last = memo.admitted if memo is not None else None
        found = None
        if memo is not None and last is not None:
            memo.admitted = None  # kept below only if this request passes all over again
            header = view.headers.get("Authorization")
            if (last.gateway == self._number and last.route is route and last.params == match.params
                    and header is not None and header[:7] == "Bearer "):
                # This connection's last admission, again (ConnMemo): each check is the stage's own.
                found = self._header_again(header, memo)
                if found is last.principal and self._passed_again(last.stamp):
                    memo.admitted = last
                    ex.principal = found
                    ex.authorized = True
                    identity = last.identity if last.identity is not None else self._forwarded(route, found)
                    return match, self.upstream_headers(view, route, ex.request_id), identity
        stamp = self._stamp()
        principal = await self.authenticate(view, route, match, ex, found)
        identity = self._forwarded(route, principal)
        if stamp is not None and memo is not None and self._stamp() == stamp:
            # The same stamp, live, before and after the checks: the principal passed that very view (a
            # revocation applied meanwhile, or the view lost and rebuilt, changes it: no admission kept).
            memo.admitted = _Admitted(self._number, route, match.params, principal, stamp,
                                      identity if route.forward.identity == "headers" else None)
        return match, self.upstream_headers(view, route, ex.request_id), identity

    def _forwarded(self, route: RouteConfig, principal: Principal) -> Identity | None:
        """What the upstream learns of the principal: headers mode's X-Auth-*, token mode's minted token."""
        mode = route.forward.identity
        if mode == "headers":
            return self._identity_of(principal)
        if mode == "token" and self.minter is not None:
            return self._bearer(self.minter.mint(principal, route.forward))
        return None

    async def handle(self, view: RequestView, body: AsyncIterable[bytes] | None, ex: Exchange) -> UpstreamResponse:
        match, headers, identity = await self._admit(view, ex)
        path_qs = match.upstream_path + ("?" + view.query_string if view.query_string else "")
        return await self.upstreams.send(match.route.upstream, view.method, path_qs, headers, body, identity)

    def upstream_headers(self, view: RequestView, route: RouteConfig, request_id: str) -> CIMultiDict[str]:
        """The client's headers filtered and the forwarding headers; the identity (headers, or the minted
        token) is added by the caller (see _admit)."""
        # Strip before add (Envoy extractor.cc): the client's Authorization and X-Auth-* never pass. Only a
        # GET can be a WebSocket handshake (RFC 6455 s4.1): another method's Upgrade is stripped, so no
        # upstream that skips the method check switches on one.
        return upstream_request_headers(
            view.headers, strip_authorization=route.auth.required,
            keep_upgrade=route.websocket and view.method == "GET",
            client_ip=view.client_ip, peer_ip=view.peer_ip, trusted_proxies=self._trusted,
            scheme=view.scheme, host=view.headers.get("Host", ""), request_id=request_id,
        )

    def _bearer(self, minted: str) -> Identity:
        """Token mode's `Authorization: Bearer <internal token>` as an Identity, built once per minted
        token (the minter returns the same string until it re-mints)."""
        hit = self._minted.get(minted)
        if hit is None:
            if len(self._minted) >= _MINTED_CACHE:
                self._minted.popitem(last=False)
            hit = self._minted[minted] = Identity((("Authorization", "Bearer " + minted),))
        return hit

    def _identity_of(self, p: Principal) -> Identity:
        key = p.token_hash
        hit = self._identity.get(key) if key else None
        if hit is None:
            hit = Identity(tuple(identity_headers(p).items()))  # raises InvalidToken for unsafe values: never cached
            if key:
                if len(self._identity) >= _IDENTITY_CACHE:
                    self._identity.popitem(last=False)  # FIFO: oldest insertion first
                self._identity[key] = hit
        return hit
