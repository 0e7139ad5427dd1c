"""X-Forwarded-For is extended only from a trusted proxy, otherwise replaced; the log names the real client."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text, logged
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: hello
    match: {path: /hello}
    upstream: svc
    auth: {required: false}
"""


@pytest.mark.parametrize(("trusted", "expected_xff", "expected_client"), [
    ("[127.0.0.0/8]", "203.0.113.7, 127.0.0.1", "203.0.113.7"),
    ("[10.0.0.0/8]", "127.0.0.1", "127.0.0.1"),
])
async def test_xff_trusted_and_untrusted(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any,
                                         capsys: pytest.CaptureFixture[str], trusted: str, expected_xff: str,
                                         expected_client: str) -> None:
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ROUTES).replace(
        "  shutdown_grace: 5s", f"  shutdown_grace: 5s\n  trusted_proxies: {trusted}")
    async with gateway_factory(text) as gw:
        status, _, _ = await gw.request("GET", "/hello", headers={"X-Forwarded-For": "203.0.113.7",
                                                                   "Host": "api.example.com"})
        assert status == 200
        got = {k.lower(): v for k, v in echo_upstream.requests[-1][2].items()}
        assert got["x-forwarded-for"] == expected_xff
        assert got["x-forwarded-host"] == "api.example.com"
        line = json.loads(logged(capsys).strip().splitlines()[-1])
        assert line["client_ip"] == expected_client


FORWARDED_FAMILY = {
    "Forwarded": "for=203.0.113.7;proto=https", "X-Real-IP": "203.0.113.7", "True-Client-IP": "203.0.113.7",
    "X-Client-IP": "203.0.113.7", "X-Cluster-Client-IP": "203.0.113.7", "CF-Connecting-IP": "203.0.113.7",
    "Fastly-Client-IP": "203.0.113.7", "X-Forwarded-Port": "8443", "X-Forwarded-Prefix": "/evil",
    "X-Forwarded-Ssl": "on", "X-Forwarded-Scheme": "https", "X-Forwarded-Server": "evil.example",
    "X-Forwarded-Protocol": "https", "X-Url-Scheme": "https", "Front-End-Https": "on",
    "X_Real_IP": "203.0.113.7", "X-Forwarded-Uri": "/admin/x", "X-Forwarded-Path": "/admin/x",
    "X-Original-URI": "/admin/x", "X-Original-Host": "internal.example", "X-Host": "internal.example",
    "X-Envoy-Original-Path": "/admin/x",
}


@pytest.mark.parametrize(("trusted", "kept"), [("[127.0.0.0/8]", True), ("[10.0.0.0/8]", False)])
async def test_what_a_proxy_in_front_says_is_kept_only_from_a_trusted_one(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, trusted: str, kept: bool) -> None:
    """A client that is no trusted proxy cannot choose the address, port, prefix or scheme an upstream
    reads from the headers a proxy in front would set; a trusted proxy's reach the upstream as sent."""
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ROUTES).replace(
        "  shutdown_grace: 5s", f"  shutdown_grace: 5s\n  trusted_proxies: {trusted}")
    async with gateway_factory(text) as gw:
        status, _, _ = await gw.request("GET", "/hello", headers={**FORWARDED_FAMILY, "X-Kept": "yes"})
        assert status == 200
        got = {k.lower(): v for k, v in echo_upstream.requests[-1][2].items()}
        assert got["x-kept"] == "yes"
        for name, value in FORWARDED_FAMILY.items():
            if kept and "_" not in name:
                assert got.get(name.lower()) == value, name
            else:
                assert name.lower() not in got, name
