"""server.tls: the gateway terminates TLS; the upstream is told the client used https."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text
from tests.support.pki import make_pki
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: hello
    match: {path: /hello}
    upstream: svc
    auth: {required: false}
"""


async def test_tls_termination(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any,
                               tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = f"  tls: {{cert_file: {pki['server']}, key_file: {pki['server']}}}"
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, ROUTES).replace(
        "  shutdown_grace: 5s", "  shutdown_grace: 5s\n" + tls)
    async with gateway_factory(text) as gw:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{gw.app.public_port}/hello", ssl=ctx) as r:
                assert r.status == 200
            got = {k.lower(): v for k, v in echo_upstream.requests[-1][2].items()}
            assert got["x-forwarded-proto"] == "https"
            # plain HTTP on the TLS port is not served
            try:
                async with s.get(f"http://127.0.0.1:{gw.app.public_port}/hello") as r:
                    assert r.status >= 400
            except aiohttp.ClientError:
                pass
        assert echo_upstream.hits == 1
