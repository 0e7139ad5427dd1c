"""The public listener's request side under hostile or broken clients, through the real gateway: bodies
cut short or malformed mid-stream, request heads that never end, Transfer-Encoding the gateway cannot
forward honestly, and what the access log and metrics say when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.devissuer import DevIssuer
from tests.support.gateway import config_text, eventually, logged
from tests.support.upstreams import Answer, EchoUpstream, MakeRaw
from tests.test_h1server import Conn
from tests.test_smuggling_e2e import ROUTES  # the same two routes: open (public) and staff


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any) -> AsyncIterator[Any]:
    async with gateway_factory(config_text(issuer.url, {"echo": [echo_upstream.url]}, ROUTES)) as running:
        running.echo = echo_upstream
        yield running


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logged(capsys).splitlines() if line.startswith("{")]


def _count(status: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "gateway_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("status") == status:
                    total += sample.value
    return total


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
async def test_client_gone_mid_body_is_one_499_line_and_no_traceback(
        gw: Any, framing: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A client that disconnects halfway through its body: one access-log line (499, nginx's "client closed
    request", not a 5xx that would page someone), no error logged, no second "refused" line."""
    c = await Conn.open(gw.app.public_port)
    if framing == "chunked":
        c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    else:
        c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await asyncio.sleep(0.3)  # the request is admitted and its body is on its way to the upstream
    errors_before = _count("500")
    await c.close()
    await asyncio.sleep(0.5)
    lines = _lines(capsys)
    assert [(line["path"], line["status"]) for line in lines] == [("/open/a", 499)], lines
    assert _count("500") == errors_before
    assert not [r for r in caplog.records if r.name == "gateway" and r.levelno >= logging.ERROR], caplog.records


async def test_client_gone_before_the_answer_is_499_and_the_upstream_call_is_given_up(
        issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The client leaves while the upstream thinks (a long poll): the gateway stops waiting for an answer
    nobody will read and closes the upstream connection at once (nginx's 499, Envoy's downstream reset),
    instead of holding it until the answer or the read timeout."""
    def respond(head: bytes, index: int) -> Answer:
        if b"/open/poll" in head:
            return b"", "hang"  # answers nothing; waits for the gateway to close
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    target = await make_raw_upstream(respond)
    async with gateway_factory(config_text(issuer.url, {"echo": [target.url]}, ROUTES)) as gw:
        for _ in range(2):
            c = await Conn.open(gw.app.public_port)
            c.writer.write(b"GET /open/poll HTTP/1.1\r\nHost: x\r\n\r\n")
            await eventually(lambda: asyncio.sleep(0, target.open == 1), timeout=2)
            errors_before = _count("500")
            await c.close()
            took = await eventually(lambda: asyncio.sleep(0, target.open == 0), timeout=2)
            assert took < 0.5  # at once: not at the 5 s read timeout
            await asyncio.sleep(0.05)
            lines = _lines(capsys)
            assert [(line["status"], line["upstream_status"]) for line in lines] == [(499, None)], lines
            assert _count("500") == errors_before
        assert (await gw.request("GET", "/open/b"))[0] == 200
        assert target.connections == 3  # the given-up connections were not pooled again
    assert not [r for r in caplog.records if r.name == "gateway" and r.levelno >= logging.ERROR], caplog.records


async def test_a_client_gone_during_a_drain_is_499(
        issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM's drain waits for requests in flight; one whose client leaves meanwhile is the client's
    doing (499), not the gateway's own error (it was logged 500 when the drain cut it at the end)."""
    def respond(head: bytes, index: int) -> Answer:
        return b"", "hang"

    target = await make_raw_upstream(respond)
    async with gateway_factory(config_text(issuer.url, {"echo": [target.url]}, ROUTES)) as gw:
        c = await Conn.open(gw.app.public_port)
        c.writer.write(b"GET /open/poll HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: asyncio.sleep(0, target.open == 1), timeout=2)
        errors_before = _count("500")
        draining = asyncio.ensure_future(gw.app.drain_and_stop())
        await asyncio.sleep(0.2)
        await c.close()
        await asyncio.wait_for(draining, 5)
        await eventually(lambda: asyncio.sleep(0, target.open == 0), timeout=2)
        lines = _lines(capsys)
        assert [(line["path"], line["status"]) for line in lines] == [("/open/poll", 499)], lines
        assert _count("500") == errors_before


async def test_malformed_chunk_mid_body_is_answered_400_and_closed(gw: Any,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A chunked body that turns malformed after it started streaming upstream: the request fails at
    once with 400 and the connection closes (it used to wait on a body that could never end)."""
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.sleep(0.3)
    c.writer.write(b"zz\r\nabc\r\n0\r\n\r\nGET /staff/x HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    status, headers, body = await c.response()
    assert (status, json.loads(body)["error"], headers.get("connection")) == (400, "invalid_request", "close")
    assert time.monotonic() - started < 2
    assert await c.closed(2)
    await c.close()
    await asyncio.sleep(0.1)
    assert [(line["path"], line["status"]) for line in _lines(capsys)] == [("/open/a", 400)]
    assert not any(path.startswith("/staff/") for _, path, _ in gw.echo.requests)


async def test_request_head_that_never_ends_is_refused_before_it_is_buffered_whole(gw: Any) -> None:
    """Each line under the parser's per-line limit, fewer fields than its field count limit: without a
    bound on the whole head, the gateway buffered tens of megabytes per connection before its 431."""
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"GET /open/a HTTP/1.1\r\nHost: x\r\n")
    answer = asyncio.ensure_future(c.reader.read(4096))
    sent = 0
    try:
        for i in range(300):  # up to 18 MB of header fields; the head never ends
            c.writer.write(b"X-H%d: " % i + b"a" * 60000 + b"\r\n")
            sent += 60000
            await asyncio.wait_for(c.writer.drain(), 5)
            if answer.done():
                break
    except (ConnectionError, TimeoutError):
        pass
    got = await asyncio.wait_for(answer, 5)
    assert got.startswith(b"HTTP/1.1 431 "), (sent, got[:100])
    assert b'"request_header_too_large"' in got
    await c.close()
    assert gw.echo.hits == 0


@pytest.mark.parametrize("raw", [
    # RFC 9112 s6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (a 1.0 hop in
    # front would have framed it differently): never served, never kept alive.
    b"POST /open/a HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\nGET /staff/x HTTP/1.1\r\nHost: x\r\n\r\n",
    # A coding the gateway does not apply: Transfer-Encoding is hop-by-hop, so forwarding the bytes
    # without it would hand the upstream gzip data as if it were the content.
    b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
], ids=["http10_chunked_keep_alive", "gzip_chunked"])
async def test_transfer_encoding_other_than_plain_chunked_on_http11_is_refused(gw: Any, raw: bytes) -> None:
    c = await Conn.open(gw.app.public_port)
    c.writer.write(raw)
    status, headers, body = await c.response()
    assert (status, json.loads(body)["error"], headers["connection"]) == (400, "invalid_request", "close")
    assert await c.closed(2)
    await c.close()
    await asyncio.sleep(0.05)
    assert gw.echo.hits == 0, gw.echo.requests


async def test_a_body_that_stops_arriving_fails_the_request(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                            gateway_factory: Any, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A client that stops sending its body (gone without a FIN, or stalling on purpose) no longer holds
    its connection and an upstream connection for ever: after BODY_TIMEOUT of silence, 400 and close."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "BODY_TIMEOUT", 1.0, raising=False)
    async with gateway_factory(config_text(issuer.url, {"echo": [echo_upstream.url]}, ROUTES)) as gw:
        c = await Conn.open(gw.app.public_port)
        c.writer.write(b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        started = time.monotonic()
        status, headers, body = await c.response()
        assert (status, json.loads(body)["error"], headers["connection"]) == (400, "invalid_request", "close")
        assert 1.0 <= time.monotonic() - started < 3.5
        assert await c.closed(2)
        await c.close()
        await asyncio.sleep(0.1)
        assert [(line["path"], line["status"]) for line in _lines(capsys)] == [("/open/a", 400)]


async def test_a_refusal_before_the_100_continue_closes_the_connection(gw: Any) -> None:
    """Answered before the interim 100 went out, the client may send its body or skip it (RFC 9110
    s10.1.1): whatever comes next cannot be framed safely (a skipped body would make the next request
    be read as that body), so the answer says Connection: close and the connection ends."""
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"POST /staff/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    status, headers, _ = await c.response()
    assert (status, headers.get("connection")) == (401, "close")
    c.writer.write(b"GET /open/next HTTP/1.1\r\nHost: x\r\n\r\n")  # a client that skipped the body
    assert await c.closed(within=3)  # no answer to it: the gateway closed instead of guessing the framing
    assert not gw.echo.requests
    await c.close()


async def test_a_refusal_with_connection_close_is_not_lost_while_the_body_still_arrives(gw: Any) -> None:
    """A request that says Connection: close is refused (401) while its 8 MiB body is still being sent.
    Closing with unread input resets the connection and the client may lose the answer (RFC 9112 s9.6):
    the gateway half-closes and drops the rest of the body instead, so the 401 is read whole."""
    size = 8 * 2**20
    c = await Conn.open(gw.app.public_port)
    c.writer.write(b"POST /staff/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)

    async def send_body() -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(size // len(chunk)):
                c.writer.write(chunk)
                await c.writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        await asyncio.sleep(0.2)  # the answer went out long ago; the body is still coming
        status, headers, body = await c.response()
        assert (status, headers.get("connection"), json.loads(body)["error"]) == (401, "close", "invalid_request")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        c.writer.close()
