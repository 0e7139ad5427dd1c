"""Reload in-process: a good file swaps atomically; a bad one — invalid, or failing while built — changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text
from tests.support.upstreams import EchoUpstream

ONE = """\
  - name: one
    match: {path: /one}
    upstream: svc
    auth: {required: false}
"""
TWO = ONE + """\
  - name: two
    match: {path: /two}
    upstream: svc
    auth: {required: false}
"""


async def test_reload_good_bad_and_failing_build(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                 gateway_factory: Any, tmp_path: Path) -> None:
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ONE)
    async with gateway_factory(text) as gw:
        path = tmp_path / "next.yaml"
        assert (await gw.request("GET", "/two"))[0] == 404
        path.write_text(config_text(issuer.url, {"svc": [echo_upstream.url]}, TWO))
        assert await gw.app.reload(str(path)) is True
        assert (await gw.request("GET", "/two"))[0] == 200
        # invalid: refused, the running config keeps serving
        path.write_text("routes: [\n")
        assert await gw.app.reload(str(path)) is False
        assert (await gw.request("GET", "/two"))[0] == 200
        # valid but fails while built (corrupt key store): refused, nothing swapped
        store = tmp_path / "keys.json"
        store.write_text("{not json")
        store.chmod(0o600)
        bad = config_text(issuer.url, {"svc": [echo_upstream.url]}, ONE,
                          extra=f"internal_token: {{key_store: {store}}}\n")
        path.write_text(bad)
        assert await gw.app.reload(str(path)) is False
        assert (await gw.request("GET", "/two"))[0] == 200
        # valid, but the upstream pool cannot be built (a CA file that is no certificate): the new pool
        # is closed again, the running one stays
        ca = tmp_path / "ca.pem"
        ca.write_text("not a certificate")
        bad = config_text(issuer.url, {"svc": [echo_upstream.url]}, ONE).replace(
            "timeouts: {connect: 1s, read: 5s}", f"timeouts: {{connect: 1s, read: 5s}}\n    tls: {{ca_file: {ca}}}")
        path.write_text(bad)
        upstreams_before = gw.app.services.upstreams
        assert await gw.app.reload(str(path)) is False
        assert gw.app.services.upstreams is upstreams_before
        assert (await gw.request("GET", "/two"))[0] == 200


async def test_a_reload_logs_what_gateway_check_would_warn_of(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                              gateway_factory: Any, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ONE)
    async with gateway_factory(text) as gw:
        path = tmp_path / "next.yaml"
        path.write_text(text.replace("  issuer: dev\n", "  issuer: staff\n", 1))  # admin.issuer: not configured
        with caplog.at_level(logging.WARNING, logger="gateway"):
            assert await gw.app.reload(str(path)) is True
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            f"{path}: warning: admin.issuer: 'staff' is not a configured issuer; the admin API refuses every token"]


async def test_a_reload_that_changes_an_issuers_claims_map_is_seen_in_minted_tokens(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    """The minted-token cache is keyed by the original token: after a reload that reads the tenant from
    another claim, the same token must not keep getting the internal token minted with the old reading."""
    import jwt

    routes = """\
  - name: orders
    match: {path_prefix: /orders/}
    upstream: svc
    forward: {identity: token, audience: orders-service}
"""
    internal = f"internal_token: {{key_store: {tmp_path / 'keys.json'}}}\n"
    token = issuer.token({"tenant_id": "acme", "org": "globex"})

    async def tenant_seen() -> str:
        assert (await gw.request("GET", "/orders/1", token=token))[0] == 200
        headers = {k.lower(): v for k, v in echo_upstream.requests[-1][2].items()}
        minted = headers["authorization"].removeprefix("Bearer ")
        return str(jwt.decode(minted, options={"verify_signature": False})["tenant"])

    async with gateway_factory(config_text(issuer.url, {"svc": [echo_upstream.url]}, routes, extra=internal)) as gw:
        assert await tenant_seen() == "acme"
        path = tmp_path / "next.yaml"
        path.write_text(config_text(issuer.url, {"svc": [echo_upstream.url]}, routes, extra=internal,
                                    issuer_extra="    claims: {tenant: org}"))
        assert await gw.app.reload(str(path)) is True
        assert await tenant_seen() == "globex"


async def test_an_issuer_removed_by_a_reload_leaves_no_jwks_keys_series(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    """gateway_jwks_keys{issuer} of an issuer a reload removed kept its last count until restart."""
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ONE)
    renamed = "admin:\n  listen: 127.0.0.1:0\n  issuer: kept\n"
    assert text.count("  - name: dev\n") == 1 and "admin:\n  listen: 127.0.0.1:0\n  issuer: dev\n" in text

    async def series() -> str:
        async with gw.session.get(gw.admin_url + "/metrics") as r:
            return "\n".join(line for line in (await r.text()).splitlines() if line.startswith("gateway_jwks_keys{"))

    async with gateway_factory(text) as gw:
        assert 'gateway_jwks_keys{issuer="dev"} ' in await series()
        path = tmp_path / "next.yaml"
        path.write_text(text.replace("  - name: dev\n", "  - name: kept\n", 1)
                        .replace("admin:\n  listen: 127.0.0.1:0\n  issuer: dev\n", renamed, 1))
        assert await gw.app.reload(str(path)) is True
        lines = await series()
        assert 'issuer="kept"' in lines and 'issuer="dev"' not in lines, lines
