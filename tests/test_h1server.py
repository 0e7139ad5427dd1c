"""The public listener (gateway/h1server.py) over raw sockets: pipelining, HTTP/1.0, 100-continue, parse
errors, Connection: close, chunked bodies, keep-alive and head timeouts, graceful drain."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.http_exceptions import LineTooLong
from multidict import CIMultiDict

from gateway.devissuer import DevIssuer
from gateway.h1server import H1Request, H1Server
from tests.support.gateway import config_text, logged
from tests.support.upstreams import EchoUpstream

ROUTES = """\
  - name: open
    match: {path_prefix: /open/}
    upstream: echo
    auth: {required: false}
    forward: {identity: none}
  - name: closed
    match: {path_prefix: /closed/}
    upstream: echo
  - name: ws
    match: {path_prefix: /ws/, websocket: true}
    upstream: echo
    auth: {required: false}
    forward: {identity: none}
"""


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any) -> AsyncIterator[Any]:
    async with gateway_factory(config_text(issuer.url, {"echo": [echo_upstream.url]}, ROUTES)) as running:
        yield running


class Conn:
    """A raw client connection reading whole responses (Content-Length framed) off the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
        n = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), 5) if n else b""
        return status, headers, body

    async def segments(self, *parts: bytes, gap: float = 0.3) -> None:
        """Each part in a TCP segment of its own (Nagle off), `gap` seconds apart: the server reads it alone."""
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(gap)
            self.writer.write(part)
            await self.writer.drain()

    async def closed(self, within: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(), within) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_pipelined_requests_are_answered_in_order(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /open/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                   b"GET /open/c HTTP/1.1\r\nHost: x\r\n\r\n")
    paths = []
    for _ in range(3):
        status, _, body = await c.response()
        assert status == 200
        paths.append(json.loads(body)["path"])
    assert paths == ["/open/a", "/open/b", "/open/c"]
    await c.close()


async def test_http10_closes_unless_keep_alive_and_connection_close_is_honoured(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.0\r\n\r\n")
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "close" and await c.closed()
    await c.close()
    c = await Conn.open(gw.app.public_port)
    for _ in range(2):
        c.writer.write(b"GET /open/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await c.response()
        assert status == 200 and headers["connection"] == "keep-alive"
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "close" and await c.closed()
    await c.close()


async def test_expect_100_continue_after_admission_only(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.writer.write(b"hello")
    status, _, body = await c.response()
    assert status == 200 and json.loads(body)["body_length"] == 5
    # Refused before the body is needed: the final answer comes without an interim 100.
    c.writer.write(b"POST /closed/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    status, _, body = await c.response()
    assert status == 401
    await c.close()


async def test_chunked_request_body_is_streamed_upstream(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    status, _, body = await c.response()
    assert status == 200 and json.loads(body)["body_length"] == 7
    await c.close()


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid_request"),
    (b"GET /open/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "request_header_too_large"),
    (b"GET /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "invalid_request"),
])
async def test_parse_errors_answer_json_and_close(gw: Any, raw: bytes, status: int, code: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(raw)
    got, headers, body = await c.response()
    assert got == status and json.loads(body)["error"] == code and headers["connection"] == "close"
    assert await c.closed()
    await c.close()
    await asyncio.sleep(0.05)
    line = json.loads(logged(capsys).strip().splitlines()[-1])
    assert line["status"] == status and line["route"] == "-"


@pytest.mark.parametrize("bad", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /open/c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /open/c HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
])
async def test_requests_pipelined_before_a_malformed_one_in_the_same_segment_are_answered(
        gw: Any, echo_upstream: EchoUpstream, bad: bytes) -> None:
    """RFC 9112 s9.3.2: pipelined requests are answered in order; the malformed one is answered 400 and the
    connection closes after it. Sent in one write, so one data_received holds all of them: the parser
    raises on the malformed bytes after it has parsed the requests before them in that segment."""
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /open/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + bad)
    answers = [await c.response() for _ in range(2)]
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/open/a", "/open/b"]
    assert [status for status, _, _ in answers] == [200, 200] and json.loads(answers[1][2])["body_length"] == 5
    status, headers, body = await c.response()
    assert status == 400 and headers["connection"] == "close" and json.loads(body)["error"] == "invalid_request"
    assert await c.closed()
    await c.close()
    assert [path for _, path, _ in echo_upstream.requests] == ["/open/a", "/open/b"]  # never /open/c


async def test_a_body_malformed_in_the_same_segment_refuses_its_own_request_only(
        gw: Any, echo_upstream: EchoUpstream) -> None:
    """The malformed bytes are a chunk size in the third request's body: the two before it are answered,
    and the third is refused (400) without any of it reaching the upstream."""
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"GET /open/b HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /open/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    answers = [await c.response() for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 400]
    assert [json.loads(body)["path"] for _, _, body in answers[:2]] == ["/open/a", "/open/b"]
    assert answers[2][1]["connection"] == "close" and await c.closed()
    await c.close()
    assert [path for _, path, _ in echo_upstream.requests] == ["/open/a", "/open/b"]


PIPELINED = (b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n"
             b"POST /open/b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhelloworld"
             b"GET /open/c HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /open/d HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n")


@pytest.mark.parametrize("cut", [
    PIPELINED.index(b"HTTP/1.1"),  # in the first request line
    PIPELINED.index(b"POST"),  # between two requests
    PIPELINED.index(b"Content-Length"),  # in a head
    PIPELINED.index(b"Content-Length") + 20,  # between a head's last field and its blank line
    PIPELINED.index(b"hello"),  # where a body begins
    PIPELINED.index(b"world"),  # in a body
    PIPELINED.index(b"GET /open/c"),  # where a body ends
    PIPELINED.index(b"/open/c"),  # in the last good request's head
    PIPELINED.index(b"Bad"),  # in the malformed head
])
async def test_requests_pipelined_before_a_malformed_one_are_answered_however_the_bytes_are_cut(
        gw: Any, echo_upstream: EchoUpstream, cut: int) -> None:
    """The same bytes in two segments: the requests before the malformed one are answered whichever
    segment the parser raises in and wherever the segment before it ended, as when all came in one."""
    c = await Conn.open(gw.app.public_port)
    await c.segments(PIPELINED[:cut], PIPELINED[cut:], gap=0.15)
    answers = [await c.response() for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 400], cut
    assert [json.loads(body)["path"] for _, _, body in answers[:3]] == ["/open/a", "/open/b", "/open/c"]
    assert json.loads(answers[1][2])["body_length"] == 10 and await c.closed()
    await c.close()
    assert [path for _, path, _ in echo_upstream.requests] == ["/open/a", "/open/b", "/open/c"]


async def test_head_has_no_body(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"HEAD /open/a HTTP/1.1\r\nHost: x\r\n\r\nGET /open/b HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    status, _, body = await c.response()  # the next answer follows the HEAD's header block directly
    assert status == 200 and json.loads(body)["path"] == "/open/b"
    await c.close()


async def test_websocket_upgrade_after_a_keep_alive_request_on_the_same_connection(gw: Any) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await c.response())[0] == 200
    c.writer.write(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    mask = b"\x01\x02\x03\x04"
    c.writer.write(b"\x81\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi")))
    assert await asyncio.wait_for(c.reader.readexactly(4), 5) == b"\x81\x02hi"
    await c.close()


async def _ok(request: H1Request) -> None:
    if request.raw_path == "/slow":
        await asyncio.sleep(0.3)
    await request.send(200, CIMultiDict(), b"ok")


def _never(exc: BaseException | None, status: int, remote: str | None) -> tuple[int, CIMultiDict[str], bytes]:
    return status, CIMultiDict(), b"refused"


async def test_idle_keep_alive_and_slow_heads_are_closed() -> None:
    server = H1Server(_ok, _never, asyncio.Protocol, max_line=8190, keepalive_timeout=0.5, head_timeout=0.5)
    port = await server.listen("127.0.0.1", 0)
    try:
        idle, slow = await Conn.open(port), await Conn.open(port)
        idle.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await idle.response())[0] == 200
        slow.writer.write(b"GET / HTTP/1.1\r\nHost:")  # the head never ends (slowloris)
        started = time.monotonic()
        assert await idle.closed(4) and await slow.closed(4)
        assert time.monotonic() - started < 3.5
        await idle.close()
        await slow.close()
    finally:
        await server.close()


def _head_cap(exc: BaseException | None, status: int, remote: str | None) -> tuple[int, CIMultiDict[str], bytes]:
    return (431 if isinstance(exc, LineTooLong) else status), CIMultiDict(), b"refused"


_FIELD = b"X-Pad: " + b"p" * 60 + b"\r\n"  # 69 bytes: far below max_line (100) on its own


@pytest.mark.parametrize("parts", [
    # The next request's head follows a whole one in the segment; with the next segment it passes
    # max_head (200), though neither segment alone holds 200 bytes of it.
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n" + _FIELD * 2, _FIELD],
    # It passes max_head within the segment that completed the request before it.
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n" + _FIELD * 3],
    # It follows the end of a body that began in the segment before.
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe", b"lloGET / HTTP/1.1\r\n" + _FIELD * 2, _FIELD],
])
async def test_the_head_cap_counts_a_head_begun_after_a_whole_request_in_its_segment(parts: list[bytes]) -> None:
    server = H1Server(_ok, _head_cap, asyncio.Protocol, max_line=100)
    port = await server.listen("127.0.0.1", 0)
    try:
        c = await Conn.open(port)
        await c.segments(*parts, gap=0.1)
        assert (await c.response())[0] == 200
        status, headers, _ = await c.response()
        assert (status, headers["connection"]) == (431, "close") and await c.closed()
        await c.close()
    finally:
        await server.close()


@pytest.mark.parametrize("parts", [
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost:"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" b"GET / HTTP/1.1\r\nHost:"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost:"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe", b"lloGET / HTTP/1.1\r\nHost:"],
])
async def test_the_head_timeout_applies_to_a_head_begun_after_a_whole_request_in_its_segment(
        parts: list[bytes]) -> None:
    """Not the keep-alive timeout (30 s here): the connection waits on a request head (slowloris)."""
    server = H1Server(_ok, _never, asyncio.Protocol, max_line=8190, keepalive_timeout=30, head_timeout=0.5)
    port = await server.listen("127.0.0.1", 0)
    try:
        c = await Conn.open(port)
        await c.segments(*parts, gap=0.1)
        started = time.monotonic()
        assert (await c.response())[0] == 200
        assert await c.closed(4) and time.monotonic() - started < 3.5
        await c.close()
    finally:
        await server.close()


async def test_a_whole_request_leaves_the_keep_alive_timeout() -> None:
    """What ends a segment at a request's end (its blank line, body or last chunk; a stray CRLF after a
    body, RFC 9112 s2.2) starts no head: the idle connection gets the keep-alive timeout, not the head's."""
    server = H1Server(_ok, _never, asyncio.Protocol, max_line=8190, keepalive_timeout=30, head_timeout=0.5)
    port = await server.listen("127.0.0.1", 0)
    requests = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nab\r\n\r\ncd\r",
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n0\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\n"]
    try:
        conns = [await Conn.open(port) for _ in requests]
        for c, request in zip(conns, requests, strict=True):
            await c.segments(request * 2)
            assert [(await c.response())[0] for _ in range(2)] == [200, 200]
        await asyncio.sleep(2.5)
        for c, request in zip(conns, requests, strict=True):
            c.writer.write(request)
            assert (await c.response())[0] == 200
            await c.close()
    finally:
        await server.close()


async def test_drain_finishes_in_flight_with_connection_close_and_closes_idle() -> None:
    server = H1Server(_ok, _never, asyncio.Protocol, max_line=8190)
    port = await server.listen("127.0.0.1", 0)
    busy, idle = await Conn.open(port), await Conn.open(port)
    idle.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await idle.response())[0] == 200
    busy.writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    drain = asyncio.ensure_future(server.drain(asyncio.get_running_loop().time() + 3))
    assert await idle.closed(2)
    status, headers, body = await busy.response()
    assert (status, headers["connection"], body) == (200, "close", b"ok")
    await drain
    with pytest.raises(OSError):
        await Conn.open(port)
    await busy.close()
    await idle.close()
