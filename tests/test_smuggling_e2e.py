"""Request smuggling and framing tricks on the public port: refused with 400, never forwarded ambiguously."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text
from tests.support.upstreams import EchoUpstream
from tests.test_h1server import Conn

ROUTES = """\
  - name: open
    match: {path_prefix: /open/}
    upstream: echo
    auth: {required: false}
  - name: staff
    match: {path_prefix: /staff/}
    upstream: echo
"""


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any) -> AsyncIterator[Any]:
    async with gateway_factory(config_text(issuer.url, {"echo": [echo_upstream.url]}, ROUTES)) as running:
        running.echo = echo_upstream
        yield running


SMUGGLING = {
    "cl_and_te": b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /staff/secret HTTP/1.1\r\nHost: x\r\n\r\n",
    "two_content_lengths": b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n"
                           b"abcd",
    "te_not_chunked_last": b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"0\r\n\r\n",
    "space_before_colon": b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd",
    "obs_fold": b"GET /open/a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    "bad_content_length": b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
    "bad_chunk_size": b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
async def test_ambiguous_framing_is_refused_and_nothing_smuggled(gw: Any, case: str) -> None:
    conn = await Conn.open(gw.app.public_port)
    conn.writer.write(SMUGGLING[case])
    await conn.writer.drain()
    try:
        status, _, _ = await conn.response()
    except (asyncio.IncompleteReadError, ConnectionError):
        status = 0  # the connection was closed without an answer: also a refusal
    finally:
        conn.writer.close()
    assert status in (0, 400), (case, status)
    await asyncio.sleep(0.05)
    # nothing reached the upstream, in particular not a smuggled second request
    assert not any(path.startswith("/staff/") for _, path, _ in gw.echo.requests), gw.echo.requests
    if status == 400:
        assert gw.echo.hits == 0, case
