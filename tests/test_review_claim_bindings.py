"""Path bindings (`claims: {tenant: "{path.tenant}"}`) read the segment as the upstream will: through the
real gateway, with real signed tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.authz import Rules, authorize, evaluate
from gateway.config_types import AuthConfig, ClaimRule
from gateway.devissuer import DevIssuer
from gateway.errors import InsufficientScope
from gateway.model import Principal
from tests.support.gateway import config_text
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: tenant
    match: {path: "/t/{tenant}/orders"}
    upstream: up
    auth:
      claims: {tenant: "{path.tenant}"}
  - name: org
    match: {path: "/o/{org}/orders"}
    upstream: up
    auth:
      claims: {org.id: "{path.org}"}
"""


@pytest.fixture
async def gw(issuer: DevIssuer, make_upstream: Any, gateway_factory: Any) -> AsyncIterator[Any]:
    up: EchoUpstream = await make_upstream()
    async with gateway_factory(config_text(issuer.url, {"up": [up.url]}, ROUTES)) as running:
        running.up = up
        yield running


@pytest.mark.parametrize("path", ["/t/evil;acme/orders", "/t/evil%3Bacme/orders", "/t/evil;/orders"])
async def test_a_bound_segment_with_params_never_matches_the_claim_it_spells(
        gw: Any, issuer: DevIssuer, path: str) -> None:
    # Tomcat and Spring read `/t/evil;acme/orders` as tenant `evil`: a user whose tenant claim is the
    # literal `evil;acme` (a tenant name the IdP let someone choose) must not reach tenant evil's orders.
    claim = "evil;acme" if "acme" in path else "evil;"
    status, _, body = await gw.request("GET", path, token=issuer.token({"tenant_id": claim}))
    assert status == 403 and body["error"] == "insufficient_scope"
    status, _, _ = await gw.request("GET", "/o/evil;acme/orders", token=issuer.token({"org": {"id": "evil;acme"}}))
    assert status == 403
    assert gw.up.requests == []


async def test_plain_bindings_still_hold(gw: Any, issuer: DevIssuer) -> None:
    status, _, _ = await gw.request("GET", "/t/acme/orders", token=issuer.token({"tenant_id": "acme"}))
    assert status == 200
    status, _, _ = await gw.request("GET", "/o/42/orders", token=issuer.token({"org": {"id": 42}}))
    assert status == 200
    status, _, _ = await gw.request("GET", "/t/acme/orders", token=issuer.token({"tenant_id": "other"}))
    assert status == 403


def test_explain_says_a_segment_with_params_never_binds() -> None:
    auth = AuthConfig(claims=(ClaimRule(claim="tenant", values=("{path.tenant}",)),))
    p = Principal(issuer="dev", iss="http://dev", subject="alice", scopes=frozenset(), roles=(),
                  tenant="evil;acme", session=None, jti=None, iat=None, exp=None, aud=())
    (verdict,) = evaluate(auth, p, {"tenant": "evil;acme"})
    assert not verdict.ok
    assert verdict.detail == ("must be one of [{path.tenant} = 'evil;acme', which never binds (it holds ';')]; "
                              "token has ('evil;acme',)")
    (verdict,) = evaluate(auth, p, {"tenant": "acme"})
    assert not verdict.ok and verdict.detail == "must be one of ['acme']; token has ('evil;acme',)"
    for check in (Rules(auth).check, lambda p, params: authorize(auth, p, params)):
        with pytest.raises(InsufficientScope):
            check(p, {"tenant": "evil;acme"})
