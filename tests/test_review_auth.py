"""Auth-side review: NumericDate edge values, one kid shared by two key types, scope and identity values
that an upstream would read differently from the gateway. Real issuer, real JWKS, real signatures."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway import errors
from gateway.config_types import ForwardConfig, InternalTokenConfig, IssuerConfig
from gateway.devissuer import DevIssuer, public_jwk
from gateway.identity import TokenMinter, identity_headers
from gateway.jwks import JwksCache
from gateway.keys import KeyStore
from gateway.model import Principal
from gateway.tokens import TokenVerifier
from tests.support.gateway import config_text
from tests.support.issuer import issuer_config
from tests.support.upstreams import EchoUpstream


@pytest.fixture
async def one_route(issuer: DevIssuer, make_upstream: Any, gateway_factory: Any) -> AsyncIterator[Any]:
    """A gateway with one authenticated route, /r/ (headers mode), to one echo upstream: `(gw, up)`."""
    up: EchoUpstream = await make_upstream()
    routes = "  - name: r\n    match: {path_prefix: /r/}\n    upstream: up\n"
    async with gateway_factory(config_text(issuer.url, {"up": [up.url]}, routes)) as gw:
        yield gw, up


@pytest.fixture
async def verifier_for() -> AsyncIterator[Any]:
    """`await verifier_for(dev, **overrides)`: a TokenVerifier over a started, real JwksCache."""
    session = aiohttp.ClientSession()
    caches: list[JwksCache] = []

    async def make(dev: DevIssuer, **overrides: Any) -> TokenVerifier:
        cfg: IssuerConfig = issuer_config(dev, **{"leeway": 30.0, "jwks_min_refetch": 0.0, **overrides})
        cache = JwksCache(cfg, session)
        await cache.start()
        caches.append(cache)
        return TokenVerifier([cfg], {cfg.name: cache})

    yield make
    for cache in caches:
        await cache.close()
    await session.close()


# ----- NumericDate values JSON can carry but an int cannot hold (RFC 7519 s2: a finite number)

@pytest.mark.parametrize(
    "claims",
    [{"exp": math.inf}, {"exp": math.nan}, {"exp": 10**400}, {"nbf": math.nan}, {"iat": -math.inf},
     {"iat": 10**400}],
    ids=["exp-inf", "exp-nan", "exp-huge-int", "nbf-nan", "iat-minus-inf", "iat-huge-int"],
)
async def test_non_finite_numeric_dates_are_malformed_not_a_crash(
    issuer: DevIssuer, verifier_for: Any, claims: dict[str, Any]
) -> None:
    verifier = await verifier_for(issuer)
    token = issuer.token(claims)  # Python's json writes Infinity/NaN and big ints; json.loads reads them back
    with pytest.raises(errors.InvalidToken) as info:
        await verifier.verify(token)
    assert info.value.reason == "malformed"
    assert not verifier._cache


async def test_infinite_exp_is_401_through_the_gateway(issuer: DevIssuer, one_route: Any) -> None:
    gw, up = one_route
    status, headers, body = await gw.request("GET", "/r/x", token=issuer.token({"exp": math.inf}))
    assert (status, body["error"]) == (401, "invalid_token")
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert up.hits == 0


# ----- RFC 7517 s4.5: keys of different types may share one kid; the token's alg picks among them

async def test_one_kid_shared_by_an_rsa_and_an_ec_key(issuer: DevIssuer, verifier_for: Any) -> None:
    rsa = issuer.keys[issuer.kid("RS256")].private
    ec = issuer.keys[issuer.kid("ES256")].private
    issuer.jwks_body = json.dumps({"keys": [
        public_jwk(rsa, kid="shared", alg="RS256"),
        public_jwk(ec, kid="shared", alg="ES256"),
    ]}).encode()
    verifier = await verifier_for(issuer, algorithms=("RS256", "ES256"))
    assert (await verifier.verify(issuer.token(alg="RS256", headers={"kid": "shared"}))).subject == "alice"
    assert (await verifier.verify(issuer.token(alg="ES256", headers={"kid": "shared"}))).subject == "alice"
    # A key still serves only its own algorithm: PS256 under the shared kid fits neither key.
    with pytest.raises(errors.InvalidToken) as info:
        await verifier.verify(issuer.token(alg="PS256", kid=issuer.kid("PS256"), key=rsa,
                                           headers={"kid": "shared"}))
    assert info.value.reason == "alg_not_allowed"


# ----- scopes: RFC 6749 s3.3 scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), delimited by SP

def _internal_scopes(tmp_path: Path, p: Principal) -> set[str]:
    store = KeyStore(InternalTokenConfig(key_store=str(tmp_path / "keys.json")))
    store.load()
    minter = TokenMinter(store, InternalTokenConfig(issuer="https://gateway.internal", ttl=60.0))
    token = minter.mint(p, ForwardConfig(identity="token", audience="orders-service"))  # forward.scopes unset
    claims = jwt.decode(token, options={"verify_signature": False})
    return set(str(claims.get("scope", "")).split())  # how an upstream reads a scope claim


@pytest.mark.parametrize(
    "scope",
    [["orders:read", "orders:read admin"], ["orders:read", "orders:read\tadmin"],
     ["orders:read", "orders:read\u00a0admin"], "orders:read orders:read\u00a0admin",
     "orders:read orders:read\u2003admin"],
    ids=["list-space", "list-tab", "list-nbsp", "string-nbsp", "string-emspace"],
)
async def test_a_scope_with_whitespace_inside_never_becomes_two_scopes(
    issuer: DevIssuer, verifier_for: Any, tmp_path: Path, scope: Any
) -> None:
    p = await (await verifier_for(issuer)).verify(issuer.token({"scope": scope}))
    assert "admin" not in p.scopes and "orders:read" in p.scopes
    # What the upstream reads: the minted token's scope claim and the X-Auth-Scopes header.
    assert "admin" not in _internal_scopes(tmp_path, p)
    assert "admin" not in identity_headers(p).get("X-Auth-Scopes", "").split()


def _principal(**kw: Any) -> Principal:
    fields: dict[str, Any] = {
        "issuer": "dev", "iss": "https://dev", "subject": "alice", "scopes": frozenset({"orders:read"}),
        "roles": ("user",), "tenant": "acme", "session": None, "jti": "j-1", "iat": 1, "exp": 2, "aud": ("api",),
    }
    fields.update(kw)
    return Principal(**fields)


# ----- identity headers: a value the upstream would read differently is refused (RFC 9110 s5.5, s5.6.1)

@pytest.mark.parametrize(
    "kw",
    [{"subject": "alice "}, {"subject": " alice"}, {"subject": "alice\t"}, {"tenant": "acme "},
     {"jti": " j-1"}, {"subject": "alice\u00a0"}, {"tenant": "\u3000acme"},
     {"scopes": frozenset({"orders:read\u00a0admin"})}, {"scopes": frozenset({"orders:read\u2028admin"})},
     {"scopes": frozenset({"orders:read\x85admin"})}],
)
def test_identity_values_an_upstream_would_trim_or_split_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidToken) as info:
        identity_headers(_principal(**kw))
    assert info.value.reason == "malformed"


def test_a_padded_role_is_left_out_of_x_auth_roles_not_trimmed() -> None:
    """" admin" would read as "admin" upstream: the header lists only the roles it carries as they are."""
    assert identity_headers(_principal(roles=("user", " admin")))["X-Auth-Roles"] == "user"
    assert "X-Auth-Roles" not in identity_headers(_principal(roles=("admin\t",)))
    assert identity_headers(_principal(roles=("admin\u00a0", "user")))["X-Auth-Roles"] == "user"  # str.strip() trims it


async def test_padded_subject_never_reaches_the_upstream_as_another_user(issuer: DevIssuer, one_route: Any) -> None:
    gw, up = one_route
    status, _, _ = await gw.request("GET", "/r/x", token=issuer.token({"sub": "alice"}))
    assert status == 200 and {k.lower(): v for k, v in up.requests[-1][2].items()}["x-auth-subject"] == "alice"
    # "admin " is not "admin", but a header parser strips the trailing space (RFC 9110 s5.5 OWS).
    status, _, body = await gw.request("GET", "/r/x", token=issuer.token({"sub": "admin "}))
    assert (status, body["error"]) == (401, "invalid_token")
    assert up.hits == 1
