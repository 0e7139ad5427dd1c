"""Spellings of a protected path (a trailing slash, a Host with an empty label or a bracketed name) never reach a
broader route's upstream without the protected route's rules — through the real gateway and real upstreams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text
from tests.support.upstreams import EchoUpstream
from tests.test_smuggling_e2e import exchange

# The review's configuration: a host-bound route first, a tenant-bound template, an admin area and a
# catch-all that asks for a token but nothing else.
ROUTES = """\
  - name: internal
    match: {path_prefix: /api/, host: internal.example.com}
    upstream: internal
    auth: {roles: [ops]}
  - name: orders-read
    match: {path: "/api/tenants/{tenant}/orders/{id}", methods: [GET, HEAD]}
    upstream: orders
    rewrite: {strip_prefix: /api}
    auth:
      scopes: [orders:read]
      claims: {tenant: "{path.tenant}"}
  - name: admin-area
    match: {path_prefix: /api/admin/}
    upstream: admin
    auth: {roles: [admin]}
  - name: api-any
    match: {path_prefix: /api/}
    upstream: any
"""

ACME = {"sub": "alice", "scope": "orders:read", "tenant_id": "acme", "roles": ["user"]}


@pytest.fixture
async def gw(issuer: DevIssuer, make_upstream: Any, gateway_factory: Any) -> AsyncIterator[Any]:
    ups: dict[str, EchoUpstream] = {name: await make_upstream() for name in ("internal", "orders", "admin", "any")}
    text = config_text(issuer.url, {name: [up.url] for name, up in ups.items()}, ROUTES)
    async with gateway_factory(text) as running:
        running.ups = ups
        yield running


def _hits(gw: Any) -> dict[str, int]:
    return {name: up.hits for name, up in gw.ups.items()}


TRAILING = ["/", "//", "/.", "/./", "/%2e", "/x/.."]


@pytest.mark.parametrize("tail", TRAILING)
async def test_a_trailing_slash_never_skips_the_templates_tenant_rule(gw: Any, issuer: DevIssuer, tail: str) -> None:
    """`/api/tenants/beta/orders/1/` went to the catch-all (200, tenant acme's token on beta's order). The
    slash-less form is the template's, whose rules differ: every spelling is refused with 400, and nothing
    is forwarded (taking the template for it instead would let a public `/x` take a protected `/x/`)."""
    token = issuer.token(ACME)
    for tenant in ("beta", "acme"):
        status, _, body = await gw.request("GET", f"/api/tenants/{tenant}/orders/1" + tail, token=token)
        assert (status, body["error"]) == (400, "invalid_request"), tail
    assert _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}
    status, headers, _ = await gw.request("DELETE", "/api/tenants/acme/orders/1" + tail, token=token)
    assert status == 200 and gw.ups["any"].hits == 1  # other methods are the catch-all's both ways


@pytest.mark.parametrize("tail", ["", ";x", "/"])
async def test_a_head_never_skips_a_get_only_templates_tenant_rule(issuer: DevIssuer, make_upstream: Any,
                                                                   gateway_factory: Any, tail: str) -> None:
    """With `methods: [GET]` (no HEAD) on the tenant-bound template, `HEAD /api/tenants/beta/orders/1` with
    acme's token went to the catch-all: 200, and the upstream ran beta's order for it (servers answer HEAD
    with their GET handler). Refused now, and nothing is forwarded."""
    ups: dict[str, EchoUpstream] = {name: await make_upstream() for name in ("internal", "orders", "admin", "any")}
    routes = ROUTES.replace("methods: [GET, HEAD]", "methods: [GET]")
    async with gateway_factory(config_text(issuer.url, {n: [u.url] for n, u in ups.items()}, routes)) as gw:
        gw.ups = ups
        token = issuer.token(ACME)
        status, headers, _ = await gw.request("HEAD", "/api/tenants/beta/orders/1" + tail, token=token)
        assert status in (400, 405) and _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}
        if status == 405:
            assert headers["Allow"] == "GET"
        status, _, _ = await gw.request("HEAD", "/api/anything", token=token)
        assert status == 200 and gw.ups["any"].hits == 1  # the catch-all's own paths keep HEAD


@pytest.mark.parametrize("path", ["/api/tenants/beta/orders;x/1/", "/api/tenants;x/beta/orders/1/",
                                  "/api/tenants/beta/orders%3Bx/1/"])
async def test_params_and_a_trailing_slash_together_never_skip_the_templates_tenant_rule(
        gw: Any, issuer: DevIssuer, path: str) -> None:
    """Spring 5 on Tomcat drops `;params` and the trailing slash: `/api/tenants/beta/orders;x/1/` is beta's
    order to it. Each check alone passed it (neither form by itself is the template's), so tenant acme's
    token reached the catch-all with it: 200. Refused now, for HEAD too, and nothing is forwarded."""
    token = issuer.token(ACME)
    for method in ("GET", "HEAD"):
        status, _, _ = await gw.request(method, path, token=token)
        assert status == 400, (method, path)
    assert _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}


async def test_the_bare_path_of_a_slash_prefix_is_that_prefixs(gw: Any, issuer: DevIssuer) -> None:
    """`path_prefix: /api/admin/` takes `/api/admin` (Envoy's path_separated_prefix): it is not the
    catch-all's to serve without the admin role."""
    for path in ("/api/admin", "/api/admin/", "/api/admin//", "/api/admin/."):
        status, _, body = await gw.request("GET", path, token=issuer.token(ACME))
        assert (status, body["error"]) == (403, "insufficient_scope"), path
    assert _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}
    status, _, _ = await gw.request("GET", "/api/admin", token=issuer.token({**ACME, "roles": ["admin"]}))
    assert status == 200 and gw.ups["admin"].requests[-1][1] == "/api/admin"


BAD_HOSTS = ["internal.example.com..", "internal.example.com..:80", "internal..example.com", ".internal.example.com",
             ".", "[evil.com]", "[evil.com]:443", "[internal.example.com]", "[1.2.3.4]", "[::1:]", "[v1.x]",
             "[fe80::1%eth0]"]


@pytest.mark.parametrize("host", BAD_HOSTS)
async def test_a_host_with_an_empty_label_or_a_bracketed_name_is_400(gw: Any, issuer: DevIssuer, host: str) -> None:
    """`internal.example.com..` lost one dot to the host match and skipped the `internal` route for the
    catch-all (200 without the ops role); `[evil.com]` passed as an IP literal. Both are 400 now, before
    routing, and nothing is forwarded."""
    token = issuer.token(ACME)
    request = f"GET /api/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    status, body = await exchange(gw, request)
    assert (status, json.loads(body)["error"]) == (400, "invalid_request"), host
    assert _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}


@pytest.mark.parametrize("host", ["internal.example.com", "INTERNAL.example.com.", "internal.example.com.:8080"])
async def test_the_host_bound_route_takes_every_spelling_of_its_host(gw: Any, issuer: DevIssuer, host: str) -> None:
    token = issuer.token(ACME)
    status, body = await exchange(gw, f"GET /api/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                                      f"\r\n\r\n".encode())
    assert (status, json.loads(body)["error"]) == (403, "insufficient_scope"), host
    assert _hits(gw) == {"internal": 0, "orders": 0, "admin": 0, "any": 0}


@pytest.mark.parametrize("host", ["[::1]", "[::1]:8080", "[fe80::1%25eth0]", "[::ffff:127.0.0.1]", "127.0.0.1:80"])
async def test_ip_literals_pass(gw: Any, issuer: DevIssuer, host: str) -> None:
    token = issuer.token(ACME)
    status, _ = await exchange(gw, f"GET /api/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                                   f"\r\n\r\n".encode())
    assert status == 200 and gw.ups["any"].hits == 1, host


async def test_discovery_document_refuses_the_same_hosts(gw: Any) -> None:
    url = gw.admin_url + "/.well-known/openid-configuration"
    async with aiohttp.ClientSession() as s:
        for host in ("[evil.com]", "[evil.com]:9090", "internal.example.com..", "a..b"):
            async with s.get(url, headers={"Host": host}) as r:
                assert r.status == 400, host
                assert "evil" not in await r.text()
        async with s.get(url, headers={"Host": "[::1]:9090"}) as r:
            assert r.status == 200
            assert (await r.json())["jwks_uri"].startswith("http://[::1]:9090/")
