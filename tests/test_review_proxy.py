"""The gateway as an HTTP/1.1 reverse proxy (RFC 9110/9112), against real targets and raw clients: what a
hostile or broken target's answer becomes for the client, and what the client's protocol choices get."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.breaker import OPEN
from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text, raw_exchange
from tests.support.upstreams import EchoUpstream, MakeRaw

ROUTES = """\
  - name: raw
    match: {path_prefix: /raw/}
    upstream: raw
    auth: {required: false}
    forward: {identity: none}
"""


# --- a control character in a field value of the target's answer -----------------------------------------

UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" \
          b"Sec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x0bb", b"caf\xe9\x1b[31m"])
@pytest.mark.parametrize("length", [5, 100_000])  # read whole and sent in one write / streamed
@pytest.mark.parametrize("upgrade", [b"", UPGRADE])  # h1server / aiohttp's server (a declined Upgrade)
async def test_a_control_character_in_an_answers_field_is_a_502(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any, value: bytes, length: int, upgrade: bytes
) -> None:
    """RFC 9110 s5.5: a field value holds no control character but HTAB. aiohttp's response parser lets one
    through (a CR, LF or NUL it refuses); the serializer that writes the client's head refuses it. The
    client got no answer at all (the connection closed, a traceback logged, a 500 counted, the target's
    breaker told it answered well): it gets 502 bad_gateway, and the target's breaker a failure."""
    answer = b"HTTP/1.1 200 OK\r\nX-A: %b\r\nContent-Length: %d\r\n\r\n%b" % (value, length, b"x" * length)
    target = await make_raw_upstream(lambda head, i: answer)
    text = config_text(issuer.url, {"raw": [target.url]}, ROUTES).replace(
        "read: 5s}", "read: 5s}\n    circuit_breaker: {failures: 1}")
    async with gateway_factory(text) as gw:
        reply = await raw_exchange(gw.app.public_port,
                               b"GET /raw/x HTTP/1.1\r\nHost: x\r\n%bConnection: close\r\n\r\n" % upgrade)
        assert gw.app.gateway.upstreams.state("raw", target.url) == OPEN
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), reply[:200]
    assert b'"error": "bad_gateway"' in body


# --- Expect: 100-continue from an HTTP/1.0 client ---------------------------------------------------------


async def test_an_http10_client_gets_no_100_continue(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any
) -> None:
    """RFC 9110 s10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request, and s15.2:
    MUST NOT send a 1xx to an HTTP/1.0 client, which knows no interim answers and would read the 100 as
    its answer (and the real one as garbage after it)."""
    target = await make_raw_upstream(lambda head, i: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with gateway_factory(config_text(issuer.url, {"raw": [target.url]}, ROUTES)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
        try:
            writer.write(b"POST /raw/x HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            writer.write(b"hello")  # an HTTP/1.0 client does not wait
            async with asyncio.timeout(5):
                reply = await reader.read()
        finally:
            writer.close()
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:100]
    assert b" 100 " not in reply


# --- headers an upstream framework takes as the request's path -------------------------------------------


async def test_path_override_headers_never_reach_upstreams(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any
) -> None:
    """IIS URL Rewrite's X-Original-URL / X-Rewrite-URL are the request's path to Symfony (before
    CVE-2018-14773), Zend Framework and apps behind IIS: a public route's request carrying one would be
    served as a protected path of the same service, which its route's rules never saw."""
    routes = ROUTES.replace("upstream: raw", "upstream: echo")
    text = config_text(issuer.url, {"echo": [echo_upstream.url]}, routes)
    overrides = {"X-Original-URL": "/admin/users", "X-Rewrite-URL": "/admin/users",
                 "x_original_url": "/admin/users", "X-Custom": "kept"}
    async with gateway_factory(text) as gw:
        status, _, _ = await gw.request("GET", "/raw/x", headers=overrides)
    assert status == 200
    _, path, got = echo_upstream.requests[-1]
    assert path == "/raw/x" and got.get("X-Custom") == "kept"
    assert "/admin/users" not in got.values(), got
