"""Every way a bad token, a tricky path or a spoofed header can be sent is refused — through the real gateway."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import RunningGateway, config_text, logged
from tests.support.upstreams import EchoUpstream
from tests.test_h1server import Conn

ROUTES = """\
  - name: orders
    match: {path: "/api/tenants/{tenant}/orders/{id}", methods: [GET, HEAD]}
    upstream: orders
    rewrite: {strip_prefix: /api}
    auth:
      scopes: [orders:read]
      claims: {tenant: "{path.tenant}"}
  - name: admin
    match: {path_prefix: /staff/}
    upstream: secret
    auth: {roles: [admin]}
  - name: public
    match: {path_prefix: /public/}
    upstream: orders
    auth: {required: false}
  - name: upload
    match: {path: /upload, methods: [POST, PUT]}
    upstream: orders
"""

GOOD = {"sub": "alice", "scope": "orders:read", "tenant_id": "acme", "roles": ["user"], "jti": "jti-alice"}


@pytest.fixture
async def gw(issuer: DevIssuer, make_upstream: Any, gateway_factory: Any) -> AsyncIterator[Any]:
    orders: EchoUpstream = await make_upstream()
    secret: EchoUpstream = await make_upstream()
    text = config_text(issuer.url, {"orders": [orders.url], "secret": [secret.url]}, ROUTES,
                       extra="")
    async with gateway_factory(text) as running:
        running.orders, running.secret = orders, secret
        yield running


def _received(up: EchoUpstream) -> dict[str, str]:
    return {k.lower(): v for k, v in up.requests[-1][2].items()}


async def test_a_token_with_an_ldap_dn_role_passes_without_that_role_in_x_auth_roles(
        gw: Any, issuer: DevIssuer) -> None:
    """Group claims that are LDAP DNs hold commas: the token passes, the header lists the other roles, and
    a role rule still sees the DN itself (here: admin, which the DN is not)."""
    token = issuer.token({**GOOD, "roles": ["cn=admins,ou=groups", "user"]})
    status, _, _ = await gw.request("GET", "/api/tenants/acme/orders/1", token=token)
    assert status == 200
    assert _received(gw.orders)["x-auth-roles"] == "user"
    status, _, _ = await gw.request("GET", "/staff/x", token=token)
    assert status == 403


async def test_x_auth_scopes_keeps_the_tokens_order(gw: Any, issuer: DevIssuer) -> None:
    """Space-separated as the issuer wrote them, each once: not re-sorted, so the header reads as the token."""
    token = issuer.token({**GOOD, "scope": "zeta orders:read alpha orders:read"})
    status, _, _ = await gw.request("GET", "/api/tenants/acme/orders/1", token=token)
    assert status == 200
    assert _received(gw.orders)["x-auth-scopes"] == "zeta orders:read alpha"


async def test_valid_token_passes_with_identity(gw: Any, issuer: DevIssuer) -> None:
    status, headers, _ = await gw.request("GET", "/api/tenants/acme/orders/1", token=issuer.token(GOOD))
    assert status == 200
    got = _received(gw.orders)
    assert got["x-auth-subject"] == "alice" and got["x-auth-issuer"] == "dev"
    assert got["x-auth-scopes"] == "orders:read" and got["x-auth-roles"] == "user"
    assert got["x-auth-token-id"] == "jti-alice" and "authorization" not in got
    assert got["x-forwarded-for"] == "127.0.0.1" and got["x-forwarded-proto"] == "http"
    assert got["x-request-id"] == headers["X-Request-Id"]


async def test_missing_token_is_401_invalid_request_without_error_param(gw: Any) -> None:
    status, headers, body = await gw.request("GET", "/api/tenants/acme/orders/1")
    assert status == 401
    assert body["error"] == "invalid_request" and body["request_id"] == headers["X-Request-Id"]
    assert headers["WWW-Authenticate"].startswith("Bearer") and "error=" not in headers["WWW-Authenticate"]
    assert gw.orders.hits == 0
    # RFC 6750 s3.1: a credential of another scheme is no bearer token either (no error code); a Bearer
    # credential that is not a token is a malformed one.
    for authorization, want in (("Basic dXNlcjpwYXNz", "invalid_request"), ("Bearer", "invalid_request"),
                                ("Bearer a b", "invalid_token")):
        status, headers, body = await gw.request("GET", "/api/tenants/acme/orders/1",
                                                 headers={"Authorization": authorization})
        assert (status, body["error"]) == (401, want), authorization
        assert ("error=" in headers["WWW-Authenticate"]) == (want == "invalid_token")
    assert gw.orders.hits == 0


def _bad_tokens(issuer: DevIssuer, other: DevIssuer) -> dict[str, str]:
    now = int(time.time())
    return {
        "alg_none": issuer.token_alg_none(GOOD),
        "hs256_with_rsa_public_key": issuer.token_hs256_with_public_key(GOOD),
        "unpublished_key_known_kid": issuer.token_unpublished_key(GOOD),
        "expired": issuer.token({**GOOD, "exp": now - 120, "iat": now - 600, "nbf": now - 600}),
        "not_yet_valid": issuer.token({**GOOD, "nbf": now + 600, "iat": now, "exp": now + 900}),
        "wrong_audience": issuer.token({**GOOD, "aud": "someone-else"}),
        "wrong_issuer": other.token({**GOOD}),
        "unknown_kid": issuer.token(GOOD, headers={"kid": "no-such-kid"}),
        "malformed": "not.a.jwt",
        "tampered": _tamper(issuer.token(GOOD)),
    }


def _tamper(token: str) -> str:
    import base64
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "orders:read admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


@pytest.mark.parametrize("case", ["alg_none", "hs256_with_rsa_public_key", "unpublished_key_known_kid", "expired",
                                  "not_yet_valid", "wrong_audience", "wrong_issuer", "unknown_kid", "malformed",
                                  "tampered"])
async def test_bad_tokens_are_401_invalid_token(gw: Any, issuer: DevIssuer, other_issuer: DevIssuer, case: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    token = _bad_tokens(issuer, other_issuer)[case]
    status, headers, body = await gw.request("GET", "/api/tenants/acme/orders/1", token=token)
    assert status == 401, case
    assert body["error"] == "invalid_token"
    assert set(body) == {"error", "error_description", "request_id"}
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert token not in json.dumps(body) and gw.orders.hits == 0
    out = logged(capsys)
    assert token not in out  # never log a token
    line = json.loads(out.strip().splitlines()[-1])
    assert line["status"] == 401 and line["auth"] != "ok"


async def test_a_claim_that_cannot_be_a_header_is_401_not_a_crash(gw: Any, issuer: DevIssuer,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A signed token whose subject is a lone surrogate (JSON "\\ud800"): refused as malformed, logged,
    nothing forwarded, no traceback (it has no byte form for an X-Auth-Subject header)."""
    status, _, body = await gw.request("GET", "/api/tenants/acme/orders/1",
                                       token=issuer.token({**GOOD, "sub": "alice\ud800"}))
    assert (status, body["error"]) == (401, "invalid_token") and gw.orders.hits == 0
    line = json.loads(logged(capsys).strip().splitlines()[-1])
    assert (line["status"], line["auth"]) == (401, "malformed")


async def test_precise_reason_in_log_not_in_response(gw: Any, issuer: DevIssuer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    now = int(time.time())
    token = issuer.token({**GOOD, "exp": now - 120, "iat": now - 600, "nbf": now - 600})
    status, _, body = await gw.request("GET", "/api/tenants/acme/orders/1", token=token)
    assert status == 401 and "expired" not in json.dumps(body)
    line = json.loads(logged(capsys).strip().splitlines()[-1])
    assert line["auth"] == "expired"
    assert set(line) >= {"ts", "request_id", "method", "path", "route", "status", "duration_ms", "upstream",
                         "target", "upstream_status", "client_ip", "iss", "sub", "aud", "jti", "auth"}


async def test_insufficient_scope_and_tenant_binding_are_403(gw: Any, issuer: DevIssuer) -> None:
    status, headers, body = await gw.request("GET", "/api/tenants/globex/orders/1", token=issuer.token(GOOD))
    assert status == 403 and body["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert 'scope="orders:read"' in headers["WWW-Authenticate"]
    status, _, _ = await gw.request("GET", "/api/tenants/acme/orders/1",
                                    token=issuer.token({**GOOD, "scope": "orders:write"}))
    assert status == 403
    status, _, _ = await gw.request("GET", "/staff/panel", token=issuer.token(GOOD))
    assert status == 403
    status, _, _ = await gw.request("GET", "/staff/panel", token=issuer.token({**GOOD, "roles": ["admin"]}))
    assert status == 200
    assert gw.orders.hits == 0 and gw.secret.hits == 1


async def test_not_found_and_method_not_allowed(gw: Any, issuer: DevIssuer) -> None:
    status, _, body = await gw.request("GET", "/nowhere")
    assert status == 404 and body["error"] == "not_found"
    status, headers, body = await gw.request("DELETE", "/api/tenants/acme/orders/1", token=issuer.token(GOOD))
    assert status == 405 and body["error"] == "method_not_allowed"
    assert headers["Allow"] == "GET, HEAD"


PATH_TRICKS = [
    "/public/../staff/panel", "/public/%2e%2e/staff/panel", "/public/%2E%2e/staff/panel", "/public/.%2e/staff/panel",
    "/public/..%2fstaff/panel", "/public/%2fstaff", "/public/..%5cstaff/panel", "/public\\..\\staff\\panel",
    "/public/..;/staff/panel", "/public/..;x/staff/panel", "//staff/panel", "/public//../staff/panel",
    "/public/%00/../staff/panel", "/../staff/panel", "/public/%252e%252e/staff/panel", "/staff/panel/%2e%2e/",
]


@pytest.mark.parametrize("path", PATH_TRICKS)
async def test_path_tricks_never_reach_another_routes_upstream(gw: Any, path: str) -> None:
    status, _, body = await gw.request("GET", path)
    assert gw.secret.hits == 0  # the staff upstream is never reached without a token
    if status == 200:  # only the public route may answer, and only with a path still under /public/
        assert gw.orders.requests[-1][1].startswith("/public/"), path
        assert "/../" not in gw.orders.requests[-1][1] and "%2e%2e" not in gw.orders.requests[-1][1].lower()
    else:
        assert status in (400, 401, 404), (path, status)
    if status == 400:
        assert body["error"] == "invalid_request"


async def test_dot_segments_resolved_before_matching(gw: Any, issuer: DevIssuer) -> None:
    status, _, _ = await gw.request("GET", "/api/tenants/acme/x/../orders/%31", token=issuer.token(GOOD))
    assert status == 200
    assert gw.orders.requests[-1][1] == "/tenants/acme/orders/1"


async def test_spoofed_identity_headers_never_reach_upstreams(gw: Any, issuer: DevIssuer) -> None:
    spoof = {"X-Auth-Subject": "mallory", "x-auth-roles": "admin", "X-AUTH-TENANT": "globex",
             "X-Auth-Whatever": "1", "Connection": "X-Auth-Subject, X-Forwarded-For", "X-Forwarded-For": "1.2.3.4",
             # CGI/WSGI servers read these as X-Auth-Roles, X-Auth-Tenant and X-Forwarded-For
             "X_Auth_Roles": "admin", "x_auth_tenant": "globex", "X_Forwarded_For": "6.6.6.6"}
    status, _, _ = await gw.request("GET", "/api/tenants/acme/orders/1", token=issuer.token(GOOD), headers=spoof)
    assert status == 200
    pairs = [(k.lower(), v) for k, v in gw.orders.requests[-1][2].items()]
    got = dict(pairs)
    assert got["x-auth-subject"] == "alice" and got["x-auth-tenant"] == "acme"
    assert got["x-auth-roles"] == "user" and "x-auth-whatever" not in got
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert [k for k, _ in pairs].count("x-auth-subject") == 1
    assert not any("_" in k for k, _ in pairs)
    # a public route: the client's X-Auth-* are stripped and none are added
    status, _, _ = await gw.request("GET", "/public/x", headers=spoof)
    assert status == 200
    assert not any(k.lower().replace("_", "-").startswith("x-auth-") for k in gw.orders.requests[-1][2])


async def test_hop_by_hop_headers_stripped(gw: Any, issuer: DevIssuer) -> None:
    headers = {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
               "TE": "trailers", "Proxy-Authorization": "Basic Zm9vOmJhcg==", "traceparent":
               "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "X-Request-Id": "req-123"}
    status, rh, _ = await gw.request("GET", "/public/x", headers=headers)
    assert status == 200
    got = _received(gw.orders)
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in got, name
    assert got["traceparent"].startswith("00-4bf92f35") and got["x-request-id"] == "req-123"
    assert rh["X-Request-Id"] == "req-123"


async def test_method_override_headers_never_reach_upstreams(gw: Any, issuer: DevIssuer) -> None:
    """The route allows POST and PUT: an upstream that honours a method override (Laravel, Symfony,
    Google APIs, Express middleware) must not turn the admitted POST into a DELETE."""
    override = {"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE",
                "x_http_method_override": "DELETE", "X-Custom": "kept"}
    status, _, _ = await gw.request("POST", "/upload", token=issuer.token(GOOD), headers=override, data=b"x")
    assert status == 200
    method, _, got = gw.orders.requests[-1]
    assert method == "POST" and got.get("X-Custom") == "kept"
    assert "DELETE" not in got.values(), got
    status, _, _ = await gw.request("GET", "/public/x", headers=override)  # public routes too
    assert status == 200 and "DELETE" not in gw.orders.requests[-1][2].values()


async def test_header_block_too_large_is_431(gw: Any) -> None:
    status, _, body = await gw.request("GET", "/public/x", headers={"X-Big": "a" * 20000})
    assert status == 431 and body["error"] == "request_header_too_large"
    headers = {f"X-H{i}": "b" * 200 for i in range(100)}
    status, _, _ = await gw.request("GET", "/public/x", headers=headers)
    assert status == 431


async def test_issuer_key_rotation_accepted_without_restart(gw: Any, issuer: DevIssuer) -> None:
    assert (await gw.request("GET", "/api/tenants/acme/orders/1", token=issuer.token(GOOD)))[0] == 200
    issuer.rotate("RS256", drop_old=True)
    status, _, _ = await gw.request("GET", "/api/tenants/acme/orders/2", token=issuer.token(GOOD))
    assert status == 200


async def test_a_withdrawn_key_stops_its_cached_tokens(gw: Any, issuer: DevIssuer) -> None:
    """An issuer withdraws a (say, leaked) key: a token signed with it and already in the verified-token
    cache is refused as soon as the gateway has fetched the JWKS without it, not at the token's exp."""
    path = "/api/tenants/acme/orders/1"
    old = issuer.token(GOOD, ttl=3600)
    for _ in range(2):
        assert (await gw.request("GET", path, token=old))[0] == 200  # the second is a cache hit
    issuer.rotate("RS256", drop_old=True)
    fresh = issuer.token({**GOOD, "jti": "after"})  # an unknown kid: the gateway fetches the new JWKS
    assert (await gw.request("GET", path, token=fresh))[0] == 200
    status, headers, body = await gw.request("GET", path, token=old)
    assert (status, body["error"]) == (401, "invalid_token") and "invalid_token" in headers["WWW-Authenticate"]
    assert (await gw.request("GET", path, token=fresh))[0] == 200  # other tokens pass, cached again


async def test_garbage_kids_refetch_at_most_once(gw: Any, issuer: DevIssuer) -> None:
    before = issuer.jwks_hits
    results = await asyncio.gather(*(
        gw.request("GET", "/api/tenants/acme/orders/1", token=issuer.token(GOOD, headers={"kid": f"junk-{i}"}))
        for i in range(30)))
    assert all(r[0] == 401 for r in results)
    assert issuer.jwks_hits - before <= 1


async def test_issuer_down_after_start_known_keys_keep_working(gw: Any, issuer: DevIssuer) -> None:
    token = issuer.token(GOOD)
    assert (await gw.request("GET", "/api/tenants/acme/orders/1", token=token))[0] == 200
    await issuer.stop()
    fresh = issuer.token({**GOOD, "jti": "second"})  # signed by a known key, never seen before
    assert (await gw.request("GET", "/api/tenants/acme/orders/1", token=fresh))[0] == 200


async def test_streamed_body_reaches_upstream_intact(gw: Any, issuer: DevIssuer) -> None:
    import hashlib
    chunk = bytes(range(256)) * 256
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            digest.update(chunk)
            yield chunk
    status, _, reply = await gw.request("POST", "/upload", token=issuer.token(GOOD), data=body())
    assert status == 200
    assert reply["body_length"] == 64 * len(chunk) and reply["body_sha256"] == digest.hexdigest()


async def test_body_over_limit_is_413(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any) -> None:
    text = config_text(issuer.url, {"orders": [echo_upstream.url]}, ROUTES.replace("upstream: secret",
                                                                                   "upstream: orders"))
    text = text.replace("  shutdown_grace: 5s", "  shutdown_grace: 5s\n  max_body_bytes: 100000")
    async with gateway_factory(text) as running:
        gw: RunningGateway = running
        status, _, body = await gw.request("POST", "/upload", token=issuer.token(GOOD), data=b"x" * 200000)
        assert status == 413 and body["error"] == "payload_too_large"
        # Refused by its Content-Length before admission, and still logged and counted under its route
        # (it was "-"); a path with no route is 404 first, a wrong method 405.
        from tests.test_resilience_e2e import metric
        assert await metric(gw.session, gw.admin_url, "gateway_requests_total",
                            route="upload", method="POST", status="413") == 1
        assert (await gw.request("POST", "/nothing", data=b"x" * 200000))[0] == 404
        assert (await gw.request("DELETE", "/upload", data=b"x" * 200000))[0] == 405

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"y" * 50000
        status, _, body = await gw.request("POST", "/upload", token=issuer.token(GOOD), data=chunked())
        assert status == 413 and body["error"] == "payload_too_large"
        status, _, _ = await gw.request("POST", "/upload", token=issuer.token(GOOD), data=b"z" * 1000)
        assert status == 200


async def test_admin_paths_are_not_served_on_public_port(gw: Any) -> None:
    for path in ("/metrics", "/healthz", "/readyz", "/.well-known/jwks.json", "/admin/routes"):
        status, _, _ = await gw.request("GET", path)
        assert status == 404, path
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/healthz") as r:
        assert r.status == 200


async def test_discovery_document_names_only_a_valid_host_and_varies_on_it(gw: Any) -> None:
    """The admin listener's discovery document builds jwks_uri from Host: a Host that is a list or carries
    a path would point services' verifiers elsewhere, and a shared cache must keep one copy per Host. With
    no internal_token section (this config) it is still served, with SPEC 3's default issuer."""
    url = gw.admin_url + "/.well-known/openid-configuration"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200 and r.headers["Vary"] == "Host"
            doc = await r.json()
        assert doc["issuer"] == "https://gateway.internal"
        async with s.get(doc["jwks_uri"]) as r:
            assert r.status == 200 and await r.json() == {"keys": []}
        for host in ("x,evil.example", "evil.example/x", "evil.example;a", "evil%2Eexample"):
            async with s.get(url, headers={"Host": host}) as r:
                assert r.status == 400, host
                assert "evil" not in await r.text()


async def test_one_connection_many_tokens_each_request_gets_its_own_identity(gw: Any, issuer: DevIssuer) -> None:
    """The per-connection memo (tokens.TokenMemo, pipeline.ConnMemo): a keep-alive connection's last token
    answers the next request; any other token on it is looked up and checked as usual; another tenant
    is checked against the rules; after a reload the connection keeps no reference to the replaced
    verifier (nor its cache)."""
    alice = issuer.token(GOOD)
    bob = issuer.token({**GOOD, "sub": "bob", "jti": "jti-bob"})
    conn = await Conn.open(gw.app.public_port)

    async def ask(path: str, token: str | None) -> int:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        return (await conn.response())[0]

    path = "/api/tenants/acme/orders/1"
    for token, who in ((alice, "alice"), (alice, "alice"), (bob, "bob"), (alice, "alice"), (bob, "bob")):
        assert await ask(path, token) == 200 and _received(gw.orders)["x-auth-subject"] == who
    assert await ask(path, alice + "x") == 401  # the last token but one byte: never taken for it
    assert await ask(path, bob) == 200
    assert await ask(path, bob) == 200
    (memo,) = [c.state for c in gw.app._public.conns]
    assert memo.entry is not None and memo.entry.principal.subject == "bob"  # the memo is what answered
    assert memo.admitted is not None and memo.admitted.principal.subject == "bob"  # and its last admission
    assert await ask("/api/tenants/globex/orders/1", bob) == 403  # another tenant: the rules run again
    assert await ask(path, bob) == 200 and _received(gw.orders)["x-auth-subject"] == "bob"
    old = weakref.ref(gw.app.gateway.verifier)
    assert await gw.app.reload(str(gw.app.config.path))
    for _ in range(2):
        assert await ask("/public/x", None) == 200  # no Bearer: the memo is not consulted
    gc.collect()
    assert old() is None
    assert await ask(path, alice) == 200 and _received(gw.orders)["x-auth-subject"] == "alice"
    await conn.close()


@pytest.mark.parametrize(("claim", "value"), [
    ("sub", "x\ud800"), ("jti", "x\ud800"), ("sid", "x\ud800"),  # no UTF-8 form: no Redis key, no header
    ("sub", "alice\r\nX-Auth-Roles: admin"), ("sid", "s\x00"), ("roles", ["user\x7f"]),  # control characters
])
async def test_an_unsafe_identity_is_401_on_every_route_while_revocation_asks_redis(
        issuer: DevIssuer, make_upstream: Any, gateway_factory: Any, redis_server: Any, claim: str, value: Any,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A signed token whose sub/jti/sid is a lone surrogate (JSON "\\ud800"), while the revocation view is
    not live (a Redis that answers MGET but cannot SUBSCRIBE, as during a resync): refused 401 malformed on
    a headers route and a token route alike, never a 500 from redis-py failing to encode the key. A CR, LF,
    NUL or DEL in an identity value is refused on both routes too: token mode used to carry it to the
    service inside the internal token (where it could split the service's own header or log line)."""
    redis_server.stop()
    redis_server.start("--rename-command", "SUBSCRIBE", "")  # the view never goes live: direct checks
    orders: EchoUpstream = await make_upstream()
    routes = ROUTES + """\
  - name: minted
    match: {path: "/minted/{tenant}", methods: [GET]}
    upstream: orders
    auth: {scopes: [orders:read], claims: {tenant: "{path.tenant}"}}
    forward: {identity: token, audience: orders-service}
"""
    internal = (f"internal_token:\n  issuer: https://gateway.internal\n  algorithm: ES256\n  ttl: 60s\n"
                f"  key_store: {tmp_path / 'keys.json'}\n")
    text = config_text(issuer.url, {"orders": [orders.url], "secret": [orders.url]}, routes, extra=internal,
                       revocation=f"revocation: {{backend: redis, redis_url: '{redis_server.url}', "
                                  f"on_backend_error: deny}}")
    async with gateway_factory(text) as gw:
        assert not gw.app.gateway.revocations.ready()
        status, _, _ = await gw.request("GET", "/minted/acme", token=issuer.token(GOOD))
        assert status == 200  # Redis answers the direct check
        token = issuer.token({**GOOD, claim: value})
        for path in ("/api/tenants/acme/orders/1", "/minted/acme"):
            status, _, body = await gw.request("GET", path, token=token)
            assert (status, body["error"]) == (401, "invalid_token"), path
        assert orders.hits == 1
        out = logged(capsys)
        assert "request handler failed" not in out and '"status":500' not in out.replace(" ", "")
        line = json.loads(out.strip().splitlines()[-1])
        assert (line["status"], line["auth"]) == (401, "malformed")
