"""What the upstream receives: stripped and forwarding headers, identity headers, the minted internal token."""

from __future__ import annotations

import ipaddress
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import KeySet
from multidict import CIMultiDict

from gateway import metrics
from gateway.config_types import ForwardConfig, InternalTokenConfig
from gateway.errors import InvalidToken
from gateway.identity import (
    Identity,
    TokenMinter,
    client_ip_from,
    identity_headers,
    request_id_from,
    response_headers,
    upstream_request_headers,
)
from gateway.keys import SUPPORTED_ALGORITHMS, KeyStore, SigningKey
from gateway.model import Principal

T0 = 1_700_000_000.0
NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(**kw: Any) -> Principal:
    base: dict[str, Any] = dict(
        issuer="customers",
        iss="https://login.example.com/realms/customers",
        subject="alice",
        scopes=frozenset({"orders:read", "orders:write", "profile"}),
        roles=("admin", "user"),
        tenant="acme",
        session="sess-1",
        jti="orig-jti-1",
        iat=int(T0) - 10,
        exp=int(T0) + 3600,
        aud=("https://api.example.com",),
        token_hash="hash-1",
    )
    base.update(kw)
    return Principal(**base)


def minted_count() -> float:
    text = metrics.render()[0].decode()
    match = re.search(r"^gateway_internal_tokens_minted_total (\S+)$", text, re.M)
    assert match
    return float(match.group(1))


def verify(token: str, store: KeyStore, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify with joserfc (not PyJWT, which signed) against the published public JWKS only."""
    keyset = KeySet.import_key_set(store.public_jwks())  # type: ignore[arg-type]
    with warnings.catch_warnings():
        # joserfc flags "EdDSA" as superseded by RFC 9864's "Ed25519"; PyJWT and most verifiers
        # know only "EdDSA", so the gateway keeps that name.
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        tok = jose_jwt.decode(token, keyset, algorithms=list(SUPPORTED_ALGORITHMS))
    jose_jwt.JWTClaimsRegistry(
        now=int(now),
        iss={"essential": True, "value": "https://gateway.internal"},
        aud={"essential": True, "value": "orders-service"},
        exp={"essential": True},
    ).validate(tok.claims)
    return dict(tok.header), dict(tok.claims)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_store(tmp_path: Path, clock: Clock, alg: str = "ES256") -> KeyStore:
    store = KeyStore(InternalTokenConfig(key_store=str(tmp_path / "keys.json"), algorithm=alg), clock=clock)
    store.load()
    return store


CFG = InternalTokenConfig(issuer="https://gateway.internal", ttl=60.0)
FWD = ForwardConfig(identity="token", audience="orders-service", scopes=("orders:read", "orders:admin"))


# -- the internal token ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
def test_minted_token_verifies_with_an_independent_library(tmp_path: Path, clock: Clock, alg: str) -> None:
    store = make_store(tmp_path, clock, alg)
    token = TokenMinter(store, CFG, clock=clock).mint(principal(), FWD)
    header, claims = verify(token, store, clock.now)
    assert header == {"alg": alg, "kid": store.current().kid, "typ": "JWT"}
    jti = claims.pop("jti")
    assert re.fullmatch(r"[0-9a-f-]{36}", jti) and jti != "orig-jti-1"
    assert claims == {
        "iss": "https://gateway.internal",
        "aud": "orders-service",
        "sub": "alice",
        # Down-scoping both ways: orders:write and profile (the user has them) are cut;
        # orders:admin (the route asks for it, the user lacks it) is not granted.
        "scope": "orders:read",
        "iat": int(T0),
        "exp": int(T0) + 60,
        "orig_iss": "https://login.example.com/realms/customers",
        "orig_jti": "orig-jti-1",
        "tenant": "acme",
        "sid": "sess-1",
        "roles": ["admin", "user"],
    }
    assert "hash-1" not in token


def test_token_signed_by_another_key_is_refused_by_the_verifier(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path / "a", clock)
    other = make_store(tmp_path / "b", clock)
    token = TokenMinter(other, CFG, clock=clock).mint(principal(), FWD)
    with pytest.raises(JoseError):
        verify(token, store, clock.now)


def test_absent_claims_are_left_out_and_none_scopes_keep_all(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    p = principal(roles=(), tenant=None, session=None, jti=None, subject=None)
    minter = TokenMinter(store, CFG, clock=clock)
    _, claims = verify(minter.mint(p, ForwardConfig(identity="token", audience="orders-service")), store, clock.now)
    assert claims["scope"] == "orders:read orders:write profile"  # forward.scopes None: unchanged, sorted
    for absent in ("roles", "tenant", "sid", "orig_jti", "sub"):
        assert absent not in claims
    fwd = ForwardConfig(identity="token", audience="orders-service", scopes=("billing:read",))
    _, claims = verify(minter.mint(p, fwd), store, clock.now)
    assert claims["scope"] == ""  # an empty intersection grants nothing (the claim is there: SPEC 4 lists it)


def test_exp_is_capped_by_the_original_token(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    minter = TokenMinter(store, CFG, clock=clock)
    _, claims = verify(minter.mint(principal(exp=int(T0) + 20), FWD), store, clock.now)
    assert claims["exp"] == int(T0) + 20
    token = minter.mint(principal(exp=int(T0) + 20, token_hash="h2"), FWD)
    with pytest.raises(ExpiredTokenError):
        verify(token, store, T0 + 20)  # dies with the original


def test_expired_original_is_refused(tmp_path: Path, clock: Clock) -> None:
    minter = TokenMinter(make_store(tmp_path, clock), CFG, clock=clock)
    with pytest.raises(InvalidToken) as info:
        minter.mint(principal(exp=int(T0)), FWD)
    assert info.value.reason == "expired" and info.value.status == 401


def test_cache_reuses_the_signature_until_a_third_of_life_is_left(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    minter = TokenMinter(store, CFG, clock=clock)
    before = minted_count()
    first = minter.mint(principal(), FWD)
    assert minter.mint(principal(), FWD) == first
    clock.now += 39.5  # 20.5 s of 60 left: still reused
    assert minter.mint(principal(), FWD) == first
    clock.now += 0.5  # 20 s = ttl/3 left: time to re-mint
    second = minter.mint(principal(), FWD)
    assert second != first
    assert minter.mint(principal(), FWD) == second
    assert minted_count() - before == 2
    # Another audience, another scope set or another original token is another token.
    before = minted_count()
    minter.mint(principal(), ForwardConfig(identity="token", audience="billing", scopes=FWD.scopes))
    minter.mint(principal(), ForwardConfig(identity="token", audience="orders-service", scopes=("profile",)))
    minter.mint(principal(token_hash="hash-2"), FWD)
    assert minted_count() - before == 3


def test_cache_hit_does_not_sign(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    minter = TokenMinter(store, CFG, clock=clock)
    before = minted_count()
    tokens = {minter.mint(principal(), FWD) for _ in range(100)}
    assert len(tokens) == 1 and minted_count() - before == 1


def test_capped_token_is_reused_until_its_exp(tmp_path: Path, clock: Clock) -> None:
    minter = TokenMinter(make_store(tmp_path, clock), CFG, clock=clock)
    p = principal(exp=int(T0) + 4)  # less than the 5 s floor left: re-minting would not help
    before = minted_count()
    first = minter.mint(p, FWD)
    clock.now += 3
    assert minter.mint(p, FWD) == first and minted_count() - before == 1
    clock.now += 1
    with pytest.raises(InvalidToken):
        minter.mint(p, FWD)


def test_rotation_re_mints_and_old_tokens_stay_verifiable(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    minter = TokenMinter(store, CFG, clock=clock)
    old = minter.mint(principal(), FWD)
    old_kid = store.current().kid
    clock.now += 1
    store.rotate()
    new = minter.mint(principal(), FWD)
    assert new != old
    assert verify(new, store, clock.now)[0]["kid"] == store.current().kid != old_kid
    assert verify(old, store, clock.now)[0]["kid"] == old_kid  # still published


def test_cache_is_bounded(tmp_path: Path, clock: Clock) -> None:
    minter = TokenMinter(make_store(tmp_path, clock), CFG, clock=clock, cache_size=10)
    for i in range(50):
        minter.mint(principal(token_hash=f"h{i}"), FWD)
    assert len(minter._cache) <= 10


class CountingKeys:
    def __init__(self, key: SigningKey) -> None:
        self.key, self.calls = key, 0

    def current(self) -> SigningKey:
        self.calls += 1
        return self.key


def test_any_key_source_works(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    keys = CountingKeys(store.current())
    token = TokenMinter(keys, CFG, clock=clock).mint(principal(), FWD)
    assert keys.calls == 1 and verify(token, store, clock.now)[1]["sub"] == "alice"


# -- identity headers ------------------------------------------------------------------------


def test_identity_headers() -> None:
    assert identity_headers(principal()) == {
        "X-Auth-Subject": "alice",
        "X-Auth-Issuer": "customers",
        "X-Auth-Scopes": "orders:read orders:write profile",
        "X-Auth-Roles": "admin,user",
        "X-Auth-Tenant": "acme",
        "X-Auth-Token-Id": "orig-jti-1",
    }
    bare = principal(subject=None, scopes=frozenset(), roles=(), tenant=None, jti=None)
    assert identity_headers(bare) == {"X-Auth-Issuer": "customers"}


@pytest.mark.parametrize(
    "kw",
    [
        {"subject": "alice\r\nX-Auth-Roles: admin"},
        {"subject": "alice\nx"},
        {"tenant": "acme\r"},
        {"jti": "a\x00b"},
        {"roles": ("user\r\nX-Evil: 1",)},
        {"scopes": frozenset({"orders:read\r\nx: y"})},
        {"subject": "alice\ud800"},  # a lone surrogate (JSON "\\ud800") has no UTF-8 form for the wire
    ],
)
def test_identity_values_that_would_inject_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken) as info:
        identity_headers(principal(**kw))
    assert info.value.reason == "malformed"


def test_a_role_the_comma_list_cannot_carry_is_left_out_of_x_auth_roles() -> None:
    """An LDAP DN holds commas; " admin" would lose its space: neither reaches the header, the rest do."""
    headers = identity_headers(principal(roles=("cn=admins,ou=groups", "user", " admin", "auditor")))
    assert headers["X-Auth-Roles"] == "user,auditor"
    assert "X-Auth-Roles" not in identity_headers(principal(roles=("a,b",)))


# -- request and response headers ------------------------------------------------------------


def forward(headers: list[tuple[str, str]], *, peer: str = "203.0.113.9", **kw: Any) -> CIMultiDict[str]:
    args: dict[str, Any] = dict(
        strip_authorization=True, keep_upgrade=False, client_ip=peer, peer_ip=peer, trusted_proxies=NETS,
        scheme="https", host="api.example.com", request_id="rid-1",
    )
    args.update(kw)
    return upstream_request_headers(CIMultiDict(headers), **args)


def test_client_identity_and_hop_by_hop_are_stripped() -> None:
    out = forward([
        ("Authorization", "Bearer user-token"),
        ("X-Auth-Subject", "root"),
        ("x-auth-subject", "root2"),
        ("X-AUTH-ROLES", "admin"),
        ("X-Auth-Anything-Else", "x"),
        ("Connection", "X-Auth-Subject, close, X-Custom-Hop"),
        ("Connection", "x-other-hop"),
        ("X-Custom-Hop", "1"),
        ("X-Other-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Proxy-Connection", "keep-alive"),
        ("Host", "api.example.com"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("Accept", "a/b"),
        ("Accept", "c/d"),
        ("Cookie", "k=v"),
    ])
    assert sorted({k.lower() for k in out}) == [
        "accept", "cookie", "traceparent", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
        "x-request-id",
    ]
    assert out.getall("Accept") == ["a/b", "c/d"]  # repeated end-to-end headers keep every value
    assert out["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert out["X-Forwarded-Host"] == "api.example.com"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Request-Id"] == "rid-1"
    assert "user-token" not in str(out)


def test_authorization_kept_on_public_routes_and_upgrade_on_websocket_routes() -> None:
    out = forward(
        [("Authorization", "Basic eA=="), ("Upgrade", "websocket"), ("Connection", "Upgrade")],
        strip_authorization=False, keep_upgrade=True,
    )
    assert out["Authorization"] == "Basic eA==" and out["Upgrade"] == "websocket"
    assert "Connection" not in out  # the client lib sets Connection: Upgrade for the next hop


def test_x_forwarded_for_from_untrusted_peer_is_replaced() -> None:
    out = forward([
        ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "evil"),
        ("X-Request-Id", "forged"), ("Forwarded", "for=1.2.3.4"),
    ])
    assert out.getall("X-Forwarded-For") == ["203.0.113.9"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["api.example.com"]
    assert out.getall("X-Request-Id") == ["rid-1"]
    assert "Forwarded" not in out


def test_x_forwarded_for_from_trusted_proxy_is_extended() -> None:
    out = forward(
        [("X-Forwarded-For", "1.2.3.4, 10.0.0.7"), ("X-Forwarded-For", "10.0.0.8"), ("X-Forwarded-Proto", "https"),
         ("X-Forwarded-Host", "shop.example.com")],
        peer="10.0.0.9", scheme="http", host="internal-lb",
    )
    assert out.getall("X-Forwarded-For") == ["1.2.3.4, 10.0.0.7, 10.0.0.8, 10.0.0.9"]
    assert out["X-Forwarded-Proto"] == "https" and out["X-Forwarded-Host"] == "shop.example.com"
    assert forward([], peer="10.0.0.9")["X-Forwarded-For"] == "10.0.0.9"
    assert forward([], peer="::ffff:10.0.0.9", trusted_proxies=NETS[:1])["X-Forwarded-For"] == "::ffff:10.0.0.9"


@pytest.mark.parametrize("peer", ["203.0.113.9", "10.0.0.9"])  # an untrusted client, a trusted proxy
def test_underscore_spellings_of_stripped_names_are_dropped(peer: str) -> None:
    """CGI/WSGI servers map `X_Auth_Roles` and `X-Auth-Roles` to one variable (HTTP_X_AUTH_ROLES): an
    underscore spelling of a name the gateway strips or sets never passes, nor joins the forwarded chain."""
    out = forward([
        ("X_Auth_Roles", "admin"), ("x_auth-subject", "mallory"), ("X_Forwarded_For", "6.6.6.6"),
        ("X_Forwarded_Host", "evil"), ("X_Request_Id", "forged"), ("Proxy_Authorization", "Basic eA=="),
        ("Transfer_Encoding", "chunked"), ("X_Custom_Thing", "kept"), ("X-Forwarded-For", "1.2.3.4"),
    ], peer=peer)
    assert sorted(k.lower() for k in out) == [
        "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-request-id", "x_custom_thing"]
    assert out["X_Custom_Thing"] == "kept"  # an underscore name that collides with nothing is end-to-end
    assert out.getall("X-Forwarded-For") == (["203.0.113.9"] if peer == "203.0.113.9" else ["1.2.3.4, 10.0.0.9"])
    assert "evil" not in out.values() and "forged" not in out.values()


def test_client_ip_from_walks_right_to_left_over_trusted_proxies() -> None:
    assert client_ip_from("1.2.3.4", "203.0.113.9", NETS) == "203.0.113.9"  # untrusted peer
    assert client_ip_from(None, "10.0.0.1", NETS) == "10.0.0.1"
    assert client_ip_from("6.6.6.6, 1.2.3.4, 10.0.0.2", "10.0.0.1", NETS) == "1.2.3.4"
    assert client_ip_from("10.0.0.3, 10.0.0.2", "10.0.0.1", NETS) == "10.0.0.3"
    assert client_ip_from("1.2.3.4, garbage, 10.0.0.2", "10.0.0.1", NETS) == "10.0.0.2"
    assert client_ip_from("2001:db8::1, fd00::2", "fd00::1", NETS) == "2001:db8::1"
    assert client_ip_from("1.2.3.4", "::ffff:10.0.0.1", NETS) == "1.2.3.4"
    assert client_ip_from("1.2.3.4", "10.0.0.1", ()) == "10.0.0.1"


@pytest.mark.parametrize(
    "sent, kept",
    [
        ("abc-123", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("a.b_c:d-e", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a b", False),
        ("a\r\nb", False),
        ("<script>", False),
    ],
)
def test_request_id(sent: str, kept: bool) -> None:
    rid = request_id_from(CIMultiDict({"x-request-id": sent}))
    assert (rid == sent) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert request_id_from(CIMultiDict()) != request_id_from(CIMultiDict())


def test_response_headers_drop_hop_by_hop() -> None:
    out = response_headers(CIMultiDict([
        ("Content-Type", "application/json"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("Upgrade", "h2c"),
    ]))
    assert list(out.items()) == [
        ("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
    ]


@pytest.mark.parametrize("pair", [("X-Auth-Subject", "a\r\nX-Admin: 1"), ("X-Auth-Subject", "a\nb"),
                                  ("X-Auth-Subject", "a\x00"), ("X-Auth Subject", "a"), ("X-Auth-Subject:", "a"),
                                  ("", "a")])
def test_identity_lines_are_checked_once_where_they_are_built(pair: tuple[str, str]) -> None:
    """Identity.raw goes into the request head without the serializer's check: it refuses what would
    split or end the head."""
    with pytest.raises(ValueError, match="unsafe header field"):
        Identity((("X-Auth-Issuer", "dev"), pair))


def test_identity_lines_are_the_pairs_as_a_request_head_writes_them() -> None:
    ident = Identity((("X-Auth-Subject", "alice"), ("X-Auth-Scopes", "a b"), ("Authorization", "Bearer x.y-z_")))
    assert ident.raw == b"X-Auth-Subject: alice\r\nX-Auth-Scopes: a b\r\nAuthorization: Bearer x.y-z_\r\n"
