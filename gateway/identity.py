"""Strip inbound identity and hop-by-hop headers, then add forwarding headers, identity headers or a minted token."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from multidict import CIMultiDict

from gateway import metrics
from gateway.config_types import ForwardConfig, InternalTokenConfig, IPNetwork
from gateway.errors import InvalidToken
from gateway.model import Principal
from gateway.tokens import SCOPE_TOKEN, UNSAFE_VALUE

# RFC 9110 s7.6.1 (Connection) and the headers every proxy treats as hop-by-hop (RFC 2616 s13.5.1,
# plus the non-standard Proxy-Connection). They describe one connection, never the next hop's.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)
# Headers the gateway sets itself: the client's copies are removed first (strip before add, as Envoy
# sanitizes the headers it will set) so a client can never smuggle a value past us.
_WE_SET = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "host"})
# Method overrides (Google APIs, Laravel, Symfony, ASP.NET and Express middleware honour them): the
# route's methods and rules were checked for the request's own method, so an upstream must not serve
# another one (a POST carrying `X-HTTP-Method-Override: DELETE` on a route allowing POST only).
_METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# Path overrides, for the same reason: IIS URL Rewrite's X-Original-URL and X-Rewrite-URL are taken as
# the request's path by Symfony (before CVE-2018-14773), Zend Framework (ZF2018-01) and apps behind IIS:
# `GET /public/x` with `X-Original-URL: /admin/users` would be served as the admin path its route's
# rules never saw, when both routes lead to the same service.
_PATH_OVERRIDES = frozenset({"x-original-url", "x-rewrite-url"})
_BASE = HOP_BY_HOP | _WE_SET | _METHOD_OVERRIDES | _PATH_OVERRIDES
# Precomputed per (strip_authorization, keep_upgrade): no set is built per request.
_DROP = {
    (True, False): _BASE | {"authorization"},
    (True, True): (_BASE - {"upgrade"}) | {"authorization"},
    (False, False): _BASE,
    (False, True): _BASE - {"upgrade"},
}
_RESPONSE_DROP = {False: HOP_BY_HOP, True: HOP_BY_HOP - {"upgrade"}}
# What a proxy in front says about the client and the original request, from a peer we do not trust: as
# forgeable as X-Forwarded-For, which is replaced for the same reason. RFC 7239 Forwarded; the client
# address headers nginx's realip (X-Real-IP), Akamai (True-Client-IP), Cloudflare, Fastly and others
# set, which Spring, Django, Rails and rate limiters read as the client's address; and the rest of the
# X-Forwarded-* family that frameworks read beside Proto and Host (Spring's ForwardedHeaderFilter:
# Port, Prefix, Ssl; Rails and Rack: Ssl, Scheme, Port): a client could otherwise choose the address an
# upstream audits or rate-limits, or the prefix and scheme of the links it builds. And the original
# URI and host a proxy in front passes on after a rewrite, which forward-auth services read as the request
# they decide on (Traefik's ForwardAuth and oauth2-proxy: X-Forwarded-Uri; nginx auth_request setups:
# X-Original-URI; Envoy: X-Envoy-Original-Path): a client could name another path or host than the one
# the gateway routed. Kept from a trusted proxy (`trusted_proxies`), which saw the client.
_UNTRUSTED_DROP = frozenset({
    "forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip", "cf-connecting-ip",
    "fastly-client-ip", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-ssl", "x-forwarded-scheme",
    "x-forwarded-server", "x-forwarded-protocol", "x-url-scheme", "front-end-https",
    "x-forwarded-uri", "x-forwarded-path", "x-original-uri", "x-original-host", "x-host", "x-envoy-original-path",
})
_AUTH_PREFIX = "x-auth-"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 s5.1: a token


@functools.lru_cache(maxsize=4096)
def _is_trusted(ip: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(addr in net for net in trusted)


@functools.lru_cache(maxsize=256)
def _with_connection(base: frozenset[str], conn_values: tuple[str, ...], keep_upgrade: bool) -> frozenset[str]:
    """`base` plus the names a Connection field lists. Cached: peers send the same few values
    ("keep-alive", "Upgrade") on every message; the bound keeps arbitrary client values from growing it."""
    named = {tok.strip().lower() for v in conn_values if v for tok in v.split(",")}
    if keep_upgrade:
        named.discard("upgrade")
    return base | named


def client_ip_from(xff: str | None, peer_ip: str, trusted: tuple[IPNetwork, ...]) -> str:
    """The real client address for logs: walk X-Forwarded-For right to left over trusted proxies.

    As uvicorn's proxy_headers.py: only hops appended by proxies we trust are believed; the first
    address (from the right) that is not one of them is the client. Anything left of it is
    client-supplied and could be forged.
    """
    if not trusted or not xff or not _is_trusted(peer_ip, trusted):
        return peer_ip
    hop = peer_ip
    for entry in reversed(xff.split(",")):
        entry = entry.strip()
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            return hop  # garbage from a hop: the last believable address is the nearest proxy's
        if not _is_trusted(entry, trusted):
            return entry
        hop = entry
    return hop


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is safe to log and forward, else a new one."""
    rid = headers.get("X-Request-Id")
    if rid is not None and _REQUEST_ID.fullmatch(rid):
        return rid
    return f"{_rid_prefix}{next(_rid_counter):016x}"


def _reseed_request_ids() -> None:
    """A per-process random 64-bit prefix and a counter: 32 hex digits like uuid4().hex, unique across
    processes and restarts, at a fraction of uuid4's cost (it reads the OS random source per call).
    A request id is a correlation key, not a secret: the client may choose it (SPEC 4)."""
    global _rid_prefix, _rid_counter
    _rid_prefix, _rid_counter = os.urandom(8).hex(), itertools.count()


_rid_prefix = ""
_rid_counter = itertools.count()
_reseed_request_ids()
os.register_at_fork(after_in_child=_reseed_request_ids)  # a forked worker must not repeat its parent's ids


def upstream_request_headers(
    client_headers: Mapping[str, str],
    *,
    strip_authorization: bool,
    keep_upgrade: bool,
    client_ip: str,
    peer_ip: str,
    trusted_proxies: tuple[IPNetwork, ...],
    scheme: str,
    host: str,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers the upstream receives, before identity is added (see identity_headers/TokenMinter).

    `Host` is not set here: the HTTP client sets it for the target (the client's goes in
    X-Forwarded-Host). `client_ip` (from client_ip_from) is only for the caller's log: the forwarded
    chain is built from the socket peer, never from a parsed guess.
    A trusted proxy's X-Forwarded-Proto/Host are kept (it saw the client; we saw the proxy).
    """
    drop = _DROP[(strip_authorization, keep_upgrade)]
    if "Connection" in client_headers:  # the common case (HTTP/1.1 keep-alive) sends none: no list built
        getall = getattr(client_headers, "getall", None)
        conn_values = getall("Connection", ()) if getall else (client_headers.get("Connection", ""),)
        # RFC 9110 s7.6.1: headers named in Connection are hop-by-hop too (Connection: X-Auth-Subject
        # would otherwise make a naive proxy drop the very header it adds).
        # `Connection: Upgrade` is how a WebSocket handshake asks for it: kept when the route proxies them.
        drop = _with_connection(drop, tuple(conn_values), keep_upgrade)
    trusted_peer = bool(trusted_proxies) and _is_trusted(peer_ip, trusted_proxies)
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    xff: list[str] = []
    xfp = xfh = None
    if not trusted_peer:
        # The common case: each name's verdict depends only on the name and `drop`, so it is memoised.
        keep = _memo(_REQUEST_MEMO, drop)
        for name, value in client_headers.items():
            verdict = keep.get(name)
            if verdict is None:
                verdict = _remember(keep, name, _request_keeps(name.lower(), drop))
            if verdict:
                add(name, value)
    else:
        for name, value in client_headers.items():
            lower = name.lower()
            if "_" in lower:
                if _request_keeps(lower, drop):
                    add(name, value)
                continue  # an underscore spelling of a name we set or strip: dropped, never merged in
            if lower.startswith(_AUTH_PREFIX):
                continue  # identity comes only from the verified token (SPEC 4)
            if lower in drop:
                if lower == "x-forwarded-for":
                    xff.append(value)
                elif lower == "x-forwarded-proto" and xfp is None:
                    xfp = value
                elif lower == "x-forwarded-host" and xfh is None:
                    xfh = value
                continue
            add(name, value)
    # A trusted proxy's chain is extended; anyone else's is replaced by what we saw (the socket peer).
    if xff:
        xff.append(peer_ip)
        add("X-Forwarded-For", ", ".join(xff))
    else:
        add("X-Forwarded-For", peer_ip)
    # add, not set: every name below is in every drop set, so `out` cannot hold it yet (no scan needed).
    add("X-Forwarded-Proto", xfp or scheme)
    if xfh or host:
        add("X-Forwarded-Host", xfh or host)
    add("X-Request-Id", request_id)
    return out


def response_headers(upstream_headers: Mapping[str, str], *, keep_upgrade: bool = False) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones (and those its Connection names)."""
    out: CIMultiDict[str] = CIMultiDict()
    relay_response_headers(upstream_headers, out, keep_upgrade=keep_upgrade)
    return out


def relay_response_headers(upstream_headers: Mapping[str, str], out: CIMultiDict[str], *,
                           keep_upgrade: bool = False) -> None:
    """Add the upstream's response headers minus hop-by-hop ones to `out` (a response's own headers:
    no intermediate copy on the hot path)."""
    drop = _RESPONSE_DROP[keep_upgrade]
    if "Connection" in upstream_headers:
        getall = getattr(upstream_headers, "getall", None)
        conn_values = getall("Connection", ()) if getall else (upstream_headers.get("Connection", ""),)
        # RFC 9110 s7.6.1: the headers a Connection field names are hop-by-hop for this response too.
        drop = _with_connection(drop, tuple(conn_values), False)
    add = out.add
    keep = _memo(_RESPONSE_MEMO, drop)
    for name, value in upstream_headers.items():
        verdict = keep.get(name)
        if verdict is None:
            verdict = _remember(keep, name, name.lower() not in drop)
        if verdict:
            add(name, value)


# Per-name verdicts ("forward it or not"), one table per drop set: a name's lower() and set lookups are
# done once, not per message. Names are memoised exactly as received (X-Auth-Foo and x-auth-foo are two
# entries, each decided from its lower-cased form). Bounded: clients choose names (and Connection
# values, hence drop sets), so a table is emptied when full instead of growing.
_MEMO_NAMES = 512
_MEMO_SETS = 64
_REQUEST_MEMO: dict[frozenset[str], dict[str, bool]] = {}
_RESPONSE_MEMO: dict[frozenset[str], dict[str, bool]] = {}


def _memo(tables: dict[frozenset[str], dict[str, bool]], drop: frozenset[str]) -> dict[str, bool]:
    table = tables.get(drop)
    if table is None:
        if len(tables) >= _MEMO_SETS:
            tables.clear()
        table = tables[drop] = {}
    return table


def _remember(table: dict[str, bool], name: str, verdict: bool) -> bool:
    if len(table) >= _MEMO_NAMES:
        table.clear()
    table[name] = verdict
    return verdict


def _request_keeps(lower: str, drop: frozenset[str]) -> bool:
    """Whether a request header from an untrusted peer is forwarded."""
    if "_" in lower:
        # CGI and WSGI servers read `X_Auth_Roles` as `X-Auth-Roles` (both become HTTP_X_AUTH_ROLES), and
        # `X_Forwarded_For` as the chain we set: an underscore spelling of a name stripped here is too.
        lower = lower.replace("_", "-")
    if lower.startswith(_AUTH_PREFIX):
        return False  # identity comes only from the verified token (SPEC 4)
    if lower in drop:
        return False  # hop-by-hop, named by Connection, one we set, or the client's Authorization
    return lower not in _UNTRUSTED_DROP  # what a proxy in front would say, from no proxy we trust


def _safe(value: str) -> str:
    if UNSAFE_VALUE.search(value) or value != value.strip():
        # A claim that would split or end the header block (response splitting, RFC 9110 s5.5), or whose
        # leading/trailing space the upstream's parser strips ("admin " would arrive as "admin"; an
        # application's str.strip() also trims NO-BREAK SPACE and the other Unicode spaces):
        # refuse the request rather than forward a rewritten identity.
        raise InvalidToken("malformed")
    return value


class Identity:
    """One token's identity headers, built once (the same token always yields the same headers).

    `pairs` for aiohttp's client (TLS targets, WebSockets); `raw`, the same fields as the lines of a
    request head, for the lean client (h1client.py), which appends them without its per-character
    check: they are checked here, once (a field name is a token, a value holds no CR, LF, NUL or other
    control character: RFC 9110 s5.1, s5.5).
    """

    __slots__ = ("pairs", "raw")

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        for name, value in pairs:
            if not _FIELD_NAME.fullmatch(name) or UNSAFE_VALUE.search(value):
                raise ValueError(f"unsafe header field {name!r}")
        self.pairs = pairs
        self.raw = "".join(f"{name}: {value}\r\n" for name, value in pairs).encode()


def identity_headers(p: Principal) -> dict[str, str]:
    """SPEC 4 `forward.identity: headers`: each header only when the token carries the value."""
    out: dict[str, str] = {}
    if p.subject:
        out["X-Auth-Subject"] = _safe(p.subject)
    out["X-Auth-Issuer"] = _safe(p.issuer)
    if p.scopes:
        if not all(SCOPE_TOKEN.fullmatch(s) for s in p.scopes):  # RFC 6749 s3.3, as tokens.py reads them
            raise InvalidToken("malformed")  # would read as two scopes upstream (RFC 6749 s3.3)
        out["X-Auth-Scopes"] = _safe(" ".join(p.ordered_scopes))  # as the token lists them
    # A role the comma-separated list cannot carry as itself is left out of the header, as tokens.py leaves
    # out a scope the space-separated one cannot: "user,admin" would read as two roles upstream, " admin"
    # as "admin" (RFC 9110 s5.6.1 OWS; "admin\u00a0" after an application's str.strip()). Fewer roles,
    # never others. Refusing the token instead locked out every user of an IdP whose group claims are LDAP
    # DNs ("cn=admins,ou=groups"); the route's own role rules still see every role, and a minted token
    # carries them all as a JSON list.
    roles = [r for r in p.roles if "," not in r and r == r.strip()]  # strip(): Unicode spaces too, see _safe
    if roles:
        out["X-Auth-Roles"] = _safe(",".join(roles))
    if p.tenant:
        out["X-Auth-Tenant"] = _safe(p.tenant)
    if p.jti:
        out["X-Auth-Token-Id"] = _safe(p.jti)
    return out


class SigningKeyLike(Protocol):
    @property
    def kid(self) -> str: ...
    @property
    def alg(self) -> str: ...
    @property
    def key(self) -> Any: ...


class KeySource(Protocol):
    def current(self) -> SigningKeyLike: ...


@dataclass(frozen=True, slots=True)
class _Minted:
    token: str
    exp: float
    capped: bool  # exp is the original token's: minting again cannot give a longer life


class TokenMinter:
    """Mints the internal token of SPEC 4 and caches it, so signing is not done per request."""

    def __init__(
        self,
        keys: KeySource,
        cfg: InternalTokenConfig,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 50_000,
    ) -> None:
        self._keys = keys
        self._cfg = cfg
        self._clock = clock
        self._cache_size = cache_size
        # OrderedDict: FIFO eviction in O(1) (a plain dict's next(iter()) walks deleted slots).
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...] | None, str], _Minted] = OrderedDict()
        # Re-mint once a third of the life is gone (at least 5 s before expiry): an upstream
        # never receives a token about to expire in transit, and we sign ~once per ttl*2/3.
        self._min_remaining = max(cfg.ttl / 3, 5.0)

    def mint(self, p: Principal, forward: ForwardConfig) -> str:
        now = self._clock()
        if p.exp is not None and p.exp <= now:
            raise InvalidToken("expired", issuer=p.issuer)
        if not forward.audience:
            raise ValueError("forward.audience is required to mint an internal token")
        key = self._keys.current()
        # The scopes minted follow from the token (its hash) and the route's forward.scopes: the key
        # names those, so a hit computes no intersection.
        cache_key = (p.token_hash, forward.audience, forward.scopes, key.kid)
        if p.token_hash:
            hit = self._cache.get(cache_key)
            if hit is not None and now < hit.exp and (hit.capped or hit.exp - now > self._min_remaining):
                return hit.token
        if forward.scopes is None:
            scopes = p.ordered_scopes
        else:
            # Down-scoping: the intersection, so a route can narrow the user's scopes but never widen them
            # (in the token's order, as X-Auth-Scopes).
            scopes = tuple(s for s in p.ordered_scopes if s in forward.scopes)
        exp = now + self._cfg.ttl
        capped = p.exp is not None and p.exp <= exp
        if p.exp is not None and capped:
            exp = p.exp  # never outlive the token it stands for
        claims: dict[str, Any] = {
            "iss": self._cfg.issuer,
            "aud": forward.audience,
            "iat": int(now),
            "exp": int(exp),
            "jti": str(uuid.uuid4()),
            "orig_iss": p.iss,
        }
        if p.subject is not None:
            claims["sub"] = p.subject
        claims["scope"] = " ".join(scopes)  # SPEC 4 lists it: present, if empty, when nothing is left
        if p.jti is not None:
            claims["orig_jti"] = p.jti
        if p.tenant is not None:
            claims["tenant"] = p.tenant
        if p.session is not None:
            claims["sid"] = p.session
        if p.roles:
            claims["roles"] = list(p.roles)
        token = jwt.encode(claims, key.key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})
        metrics.internal_tokens_minted_total.inc()
        if p.token_hash:
            self._cache.pop(cache_key, None)  # re-insert at the end: dict order is insertion age
            if len(self._cache) >= self._cache_size:
                # FIFO eviction: the oldest insertion is also the one nearest its expiry.
                self._cache.popitem(last=False)
            self._cache[cache_key] = _Minted(token, float(int(exp)), capped)
        return token
