"""End to end through the real app: a token verified at the edge, identity forwarded, the token not."""

from __future__ import annotations

from typing import Any

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: orders
    match: {path: "/api/tenants/{tenant}/orders/{id}", methods: [GET]}
    upstream: orders
    rewrite: {strip_prefix: /api}
    auth:
      scopes: [orders:read]
      claims: {tenant: "{path.tenant}"}
"""


async def test_identity_reaches_upstream_token_does_not(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                        gateway_factory: Any) -> None:
    text = config_text(issuer.url, {"orders": [echo_upstream.url]}, ROUTES)
    async with gateway_factory(text) as gw:
        token = issuer.token({"sub": "alice", "scope": "orders:read", "tenant_id": "acme", "jti": "t-1"})
        status, _, body = await gw.request("GET", "/api/tenants/acme/orders/7", token=token,
                                           headers={"X-Auth-Subject": "mallory"})
        assert status == 200, body
        method, path, headers = echo_upstream.requests[-1]
        assert (method, path) == ("GET", "/tenants/acme/orders/7")
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["x-auth-subject"] == "alice"
        assert lower["x-auth-tenant"] == "acme" and lower["x-auth-token-id"] == "t-1"
        assert "authorization" not in lower
