"""Request smuggling and framing tricks on the public port: refused with 400, never forwarded ambiguously."""

from __future__ import annotations

import asyncio
import gzip
import json
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


async def exchange(gw: Any, request: bytes) -> tuple[int, bytes]:
    """`request` sent whole on a fresh connection: the answer's status and body, or (0, b"") when the
    connection was closed without one."""
    conn = await Conn.open(gw.app.public_port)
    conn.writer.write(request)
    await conn.writer.drain()
    try:
        status, _, body = await conn.response()
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, b""
    finally:
        conn.writer.close()
    return status, body


@pytest.mark.parametrize("case", sorted(SMUGGLING))
async def test_ambiguous_framing_is_refused_and_nothing_smuggled(gw: Any, case: str) -> None:
    status, _ = await exchange(gw, SMUGGLING[case])  # 0: closed without an answer, also a refusal
    assert status in (0, 400), (case, status)
    await asyncio.sleep(0.05)
    # nothing reached the upstream, in particular not a smuggled second request
    assert not any(path.startswith("/staff/") for _, path, _ in gw.echo.requests), gw.echo.requests
    if status == 400:
        assert gw.echo.hits == 0, case


_SMUGGLED = b"GET /open/smuggled HTTP/1.1\r\nHost: a\r\n\r\n\x01BAD\r\n\r\n"


@pytest.mark.parametrize(("parts", "answered"), [
    # The review's reproduction: the second request's head is cut in its X-Foo value.
    ([b"GET /open/first HTTP/1.1\r\nHost: a\r\n\r\nGET /open/second HTTP/1.1\r\nX-Foo: ", _SMUGGLED],
     ["/open/first", "/open/second"]),
    # The head follows the end of a chunked body that began in the segment before.
    ([b"POST /open/first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
      b"0\r\n\r\nGET /open/second HTTP/1.1\r\nX-Foo: ", _SMUGGLED],
     ["/open/first", "/open/second"]),
    # A chunked request, then one with a Content-Length body, then the cut head, in one segment: where the
    # second request's body ends cannot be told without parsing the first one's chunks, so nothing of the
    # segment with the malformed bytes is answered but its 400.
    ([b"POST /open/first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
      b"POST /open/first2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
      b"GET /open/second HTTP/1.1\r\nX-Foo: ", _SMUGGLED],
     ["/open/first", "/open/first2"]),
])
async def test_a_head_cut_between_segments_is_never_parsed_again_as_a_request(
        gw: Any, parts: list[bytes], answered: list[str]) -> None:
    """A parse error in a segment that began inside a request head: the bytes of that head (here an
    X-Foo value that reads as a request line) are never served as a request of their own."""
    conn = await Conn.open(gw.app.public_port)
    await conn.segments(*parts)
    answers = [await conn.response() for _ in range(len(answered) + 1)]
    assert [status for status, _, _ in answers] == [200] * len(answered) + [400]
    assert [json.loads(body)["path"] for _, _, body in answers[:-1]] == answered
    if "/open/second" in answered:
        assert json.loads(answers[-2][2])["headers"]["X-Foo"] == "GET /open/smuggled HTTP/1.1"
    assert answers[-1][1]["connection"] == "close" and await conn.closed()
    await conn.close()
    assert [path for _, path, _ in gw.echo.requests] == answered  # never /open/smuggled


UPGRADE = (b"GET /open/up HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("then", [
    # Refused with 400 on a fresh connection (RFC 9112 s6.1); aiohttp's server would have taken it.
    b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    # aiohttp's server decompressed bodies while the client's Content-Encoding and length went upstream.
    b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%b"
    % (len(gzip.compress(b"a" * 2000)), gzip.compress(b"a" * 2000)),
])
async def test_a_declined_upgrade_closes_its_connection(gw: Any, then: bytes) -> None:
    """An Upgrade on a plain route is answered by aiohttp's server (the connection was handed to it); what
    the client pipelines after it must not be served there, without h1server's checks: the answer says
    `Connection: close`, and the connection closes after it."""
    conn = await Conn.open(gw.app.public_port)
    conn.writer.write(UPGRADE + then)
    status, headers, body = await conn.response()
    assert status == 200 and json.loads(body)["path"] == "/open/up"
    assert headers["connection"] == "close" and await conn.closed()
    await conn.close()
    await asyncio.sleep(0.05)
    assert [path for _, path, _ in gw.echo.requests] == ["/open/up"]
    # The same request on a fresh connection goes through h1server, as any other.
    fresh = await Conn.open(gw.app.public_port)
    fresh.writer.write(then)
    status, _, body = await fresh.response()
    await fresh.close()
    if b"gzip, chunked" in then:
        assert status == 400 and len(gw.echo.requests) == 1
    else:
        assert status == 200 and json.loads(body)["body_length"] == 2000  # the echo server inflates it whole


BAD_HEADS = {
    # RFC 9110 s7.2: a Host is a host and an optional port; nginx answers these 400 too.
    "host_with_space": b"GET /open/a HTTP/1.1\r\nHost: a b.example\r\n\r\n",
    "host_with_userinfo": b"GET /open/a HTTP/1.1\r\nHost: shop.example@evil.example\r\n\r\n",
    "host_with_path": b"GET /open/a HTTP/1.1\r\nHost: evil.example/x?\r\n\r\n",
    "host_not_ascii": b"GET /open/a HTTP/1.1\r\nHost: \xc3\xa9.example\r\n\r\n",
    "host_bad_port": b"GET /open/a HTTP/1.1\r\nHost: a.example:80x\r\n\r\n",
    "two_hosts": b"GET /open/a HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    # Sub-delims and percent-encoding are in RFC 3986's reg-name but in no DNS name: relayed as
    # X-Forwarded-Host, `x,admin.example` is a list naming a host the request was not routed as.
    "host_list_shaped": b"GET /open/a HTTP/1.1\r\nHost: x,admin.example\r\n\r\n",
    "host_with_semicolon": b"GET /open/a HTTP/1.1\r\nHost: x;admin.example\r\n\r\n",
    "host_with_equals": b"GET /open/a HTTP/1.1\r\nHost: host=admin.example\r\n\r\n",
    "host_percent_encoded": b"GET /open/a HTTP/1.1\r\nHost: admin%2Eexample\r\n\r\n",
    "no_host_http11": b"GET /open/a HTTP/1.1\r\n\r\n",
    # Not HTTP/1.x: HTTP/0.9 has no head to answer with, HTTP/2 is not spoken on this listener.
    "http09": b"GET /open/a\r\n\r\n",
    "http2_request_line": b"GET /open/a HTTP/2.0\r\nHost: x\r\n\r\n",
    # RFC 9112 s3.2: no fragment in a request-target (it used to go upstream as /open/a%23frag).
    "fragment_in_path": b"GET /open/a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
    "fragment_in_query": b"GET /open/a?x=1#frag HTTP/1.1\r\nHost: x\r\n\r\n",
    # Absolute-form (a forward proxy's): its authority would replace Host for routing (RFC 9112 s3.2.2);
    # refused rather than routed by one of two hosts (README, Departures).
    "absolute_form": b"GET http://x/open/a HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute_form_other_host": b"GET http://admin.example/open/a HTTP/1.1\r\nHost: x\r\n\r\n",
    "authority_form": b"CONNECT x:80 HTTP/1.1\r\nHost: x:80\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
async def test_bad_host_version_or_target_is_400_and_not_forwarded(gw: Any, case: str) -> None:
    status, body = await exchange(gw, BAD_HEADS[case])
    assert status == 400 and json.loads(body)["error"] == "invalid_request", case
    await asyncio.sleep(0.05)
    assert gw.echo.hits == 0


@pytest.mark.parametrize("host", ["", "a.example", "A.Example:8080", "127.0.0.1:80", "[::1]:8080", "[fe80::1%25eth0]",
                                  "xn--caf-dma.example", "a_b.example", "a.example:"])
async def test_valid_hosts_pass(gw: Any, host: str) -> None:
    status, body = await exchange(gw, b"GET /open/a HTTP/1.1\r\nHost: %b\r\n\r\n" % host.encode())
    assert status == 200 and json.loads(body)["path"] == "/open/a", (host, body)
    status, _ = await exchange(gw, b"GET /open/a HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host
    assert status == 200
