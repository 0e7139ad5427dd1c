"""The upstream (response) side against misbehaving targets: leftover bytes after a response, invalid status
codes, whitespace before a field's colon, a target that stops reading the request body, a body that fails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.breaker import OPEN
from gateway.config_types import BreakerConfig, RetryConfig, UpstreamConfig
from gateway.devissuer import DevIssuer
from gateway.errors import UpstreamTimeout
from gateway.upstream import UpstreamResponse, Upstreams
from tests.support.gateway import config_text, raw_exchange
from tests.support.upstreams import Answer, MakeRaw

ROUTES = """\
  - name: raw
    match: {path_prefix: /raw/}
    upstream: raw
    auth: {required: false}
    forward: {identity: none}
"""
# What a leftover must never become: the head of the next client's answer (a redirect setting a cookie).
POISON = b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nSet-Cookie: sid=attacker\r\nX-Pad: "


def cfg(name: str, *targets: str, read: float = 2.0, failures: int = 5) -> UpstreamConfig:
    return UpstreamConfig(name=name, targets=targets, connect_timeout=1.0, read_timeout=read,
                          retries=RetryConfig(attempts=1, retry_on=frozenset({"connect_error"})),
                          circuit_breaker=BreakerConfig(failures=failures, window=10.0, open_for=30.0))


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


async def body_of(resp: UpstreamResponse) -> bytes:
    async with resp:
        return b"".join([chunk async for chunk in resp.iter_chunks()])


class LateBytes:
    """A keep-alive target whose first answer is followed, `delay` seconds later, by stray bytes."""

    def __init__(self, first: bytes, stray: bytes, delay: float) -> None:
        self.first, self.stray, self.delay = first, stray, delay
        self.connections = self.requests = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.requests == 1:
                    writer.write(self.first)
                    await writer.drain()
                    await asyncio.sleep(self.delay)
                    writer.write(self.stray)
                else:
                    writer.write(ok(b"clean"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def late_bytes() -> AsyncIterator[Callable[[bytes, bytes, float], Awaitable[LateBytes]]]:
    made: list[LateBytes] = []

    async def make(first: bytes, stray: bytes, delay: float) -> LateBytes:
        target = LateBytes(first, stray, delay)
        target.server = await asyncio.start_server(target.serve, "127.0.0.1", 0)
        made.append(target)
        return target

    yield make
    for target in made:
        assert target.server is not None
        for writer in target.writers:
            writer.close()
        target.server.close()
        await target.server.wait_closed()


# --- a keep-alive connection with bytes beyond the response is never reused ---------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_bytes_after_the_response_never_become_the_next_answer(
    make_raw_upstream: MakeRaw, make_upstreams: Callable[..., Awaitable[Upstreams]], method: str
) -> None:
    """A target whose Content-Length is shorter than what it sends (or that sends a body with a HEAD answer):
    the surplus is no message boundary. Parsed on the same connection, a surplus that starts like a head
    would become the head of the next request's answer (here a redirect setting a cookie)."""
    get = method == "GET"

    def respond(head: bytes, i: int) -> Answer:
        if b" /first " in head:  # one write: the answer, then the surplus
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"ok" if get else b"") + POISON
        return ok(b"second") if get else b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"

    target = await make_raw_upstream(respond)
    ups = await make_upstreams(cfg("surplus", target.url))
    resp = await ups.send("surplus", method, "/first", CIMultiDict(), None)
    assert resp.status == 200 and await body_of(resp) == (b"ok" if get else b"")
    resp = await ups.send("surplus", method, "/second", CIMultiDict(), None)
    assert (resp.status, "Set-Cookie" in resp.headers, "X-Pad" in resp.headers) == (200, False, False)
    assert await body_of(resp) == (b"second" if get else b"")
    assert target.connections == 2  # the connection holding the surplus was closed, not reused


@pytest.mark.parametrize(("method", "status"), [("HEAD", b"200 OK"), ("GET", b"204 No Content"),
                                                ("GET", b"304 Not Modified")])
async def test_a_body_sent_with_a_bodiless_answer_does_not_cost_the_answer(
    make_raw_upstream: MakeRaw, make_upstreams: Callable[..., Awaitable[Upstreams]], method: str, status: bytes
) -> None:
    """Some servers send a body with a HEAD (or 204/304) answer, in the same write as its head. The parser
    ends the answer at its head and takes the body for the next answer's status line, which it refuses:
    the answer it had completed was lost with it, and the client got 502 (nginx relays the answer). The
    answer is relayed now, bodiless, and the connection holding the surplus is never reused."""
    def respond(head: bytes, i: int) -> Answer:
        if b" /first " in head:
            return b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nX-Seen: 1\r\n\r\nok"
        return ok(b"second")

    target = await make_raw_upstream(respond)
    ups = await make_upstreams(cfg("bodiless", target.url))
    resp = await ups.send("bodiless", method, "/first", CIMultiDict(), None)
    assert (resp.status, resp.headers.get("X-Seen")) == (int(status[:3]), "1")
    assert await body_of(resp) == b""
    resp = await ups.send("bodiless", "GET", "/second", CIMultiDict(), None)
    assert (resp.status, await body_of(resp)) == (200, b"second")
    assert target.connections == 2  # the connection holding the surplus was closed, not reused


@pytest.mark.parametrize(("method", "first"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"),
], ids=["head-length", "head-chunked", "204", "304"])
async def test_an_answer_that_declares_a_body_it_does_not_carry_is_never_reused(
    late_bytes: Callable[[bytes, bytes, float], Awaitable[LateBytes]],
    make_upstreams: Callable[..., Awaitable[Upstreams]], method: str, first: bytes,
) -> None:
    """A server that answers HEAD like GET writes the body after the head, maybe in a later write. The
    answer ends at its head, so the connection went straight back to the pool; the next request taking
    it at once got that late body parsed as its own answer (here a redirect setting a cookie), which
    the idle-connection check cannot see. An answer without a body whose head declares one (a length,
    chunked) now closes its connection."""
    target = await late_bytes(first, POISON + b"x\r\nContent-Length: 0\r\n\r\n", 0.1)
    ups = await make_upstreams(cfg("late", target.url))
    resp = await ups.send("late", method, "/", CIMultiDict(), None)
    assert await body_of(resp) == b""
    resp = await ups.send("late", "GET", "/", CIMultiDict(), None)  # at once: before the late bytes
    assert (resp.status, "Set-Cookie" in resp.headers) == (200, False)
    assert await body_of(resp) == b"clean"
    assert target.connections == 2


async def test_bytes_arriving_on_an_idle_connection_poison_it(
    late_bytes: Callable[[bytes, bytes, float], Awaitable[LateBytes]],
    make_upstreams: Callable[..., Awaitable[Upstreams]],
) -> None:
    target = await late_bytes(ok(b"ok"), POISON, 0.05)  # the surplus comes while the connection is pooled
    ups = await make_upstreams(cfg("late", target.url))
    assert await body_of(await ups.send("late", "GET", "/", CIMultiDict(), None)) == b"ok"
    await asyncio.sleep(0.2)
    resp = await ups.send("late", "GET", "/", CIMultiDict(), None)
    assert (resp.status, "Set-Cookie" in resp.headers) == (200, False)
    assert await body_of(resp) == b"clean"
    assert target.connections == 2


# --- status codes no final answer may carry ---------------------------------------------------------


async def test_status_outside_200_599_or_an_unasked_101_is_a_bad_response(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any
) -> None:
    """RFC 9110 s15: a status is three digits 100-599; 1xx are interim, and 101 answers only an Upgrade
    (the lean client never sends one). Relayed, `HTTP/1.1 0` or a 101 leaves the client's connection
    unframed (no length, no chunks): the client gets 502 instead."""
    answers = {
        b"/raw/zero": b"HTTP/1.1 000 Zero\r\nContent-Length: 5\r\n\r\nhello",
        b"/raw/low": b"HTTP/1.1 099 Low\r\nContent-Length: 5\r\n\r\nhello",
        b"/raw/switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\nraw",
        b"/raw/high": b"HTTP/1.1 600 High\r\nContent-Length: 5\r\n\r\nhello",
    }
    target = await make_raw_upstream(lambda head, i: answers[head.split(b" ")[1]])
    async with gateway_factory(config_text(issuer.url, {"raw": [target.url]}, ROUTES)) as gw:
        for path in answers:
            async with asyncio.timeout(5):
                status, _, body = await gw.request("GET", path.decode())
            assert (path, status, body["error"]) == (path, 502, "bad_gateway")


# --- whitespace between a field name and its colon ------------------------------------------------------


@pytest.mark.parametrize("field", [b"Content-Length : 5", b"Transfer-Encoding : chunked"])
async def test_whitespace_before_the_colon_is_removed_before_relaying(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any, field: bytes
) -> None:
    """aiohttp's lenient parser frames the answer by `Content-Length : 5` / `Transfer-Encoding : chunked`
    but keeps the space in the name. Relayed as is, next to the gateway's own framing, the client gets
    two framings (`Content-Length : 5` and `Transfer-Encoding: chunked`): RFC 9112 s5.1, a proxy MUST
    remove such whitespace from a response before forwarding it."""
    body = b"hello" if field.startswith(b"Content") else b"5\r\nhello\r\n0\r\n\r\n"
    target = await make_raw_upstream(lambda head, i: b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\n" + body)
    async with gateway_factory(config_text(issuer.url, {"raw": [target.url]}, ROUTES)) as gw:
        reply = await raw_exchange(gw.app.public_port,
                                    b"GET /raw/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert all(name == name.strip() for name in names), head
    framing = [n for n in names if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) == 1, head  # one framing, the one the body is sent with
    assert rest == (b"hello" if framing == [b"content-length"] else b"5\r\nhello\r\n0\r\n\r\n")


# --- the request body: a target that stops reading it, a body that fails -----------------------------


class NoReader:
    """A target that takes the request head and then neither reads the body nor answers."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass


@pytest.fixture
async def no_reader() -> AsyncIterator[NoReader]:
    target = NoReader()
    target.server = await asyncio.start_server(target.serve, "127.0.0.1", 0)
    yield target
    for writer in target.writers:
        writer.close()
    target.server.close()
    await target.server.wait_closed()


async def test_target_that_stops_reading_the_body_times_out_within_the_read_timeout(
    no_reader: NoReader, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    """The read timeout starts once the body is sent; a target that takes none of it (the socket buffers
    full) must not hold the request forever: no progress for read_timeout is a 504, as for a silent target."""
    ups = await make_upstreams(cfg("stuck", no_reader.url, read=0.4, failures=1))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4096):  # 256 MiB: far more than the socket buffers hold
            yield b"x" * 65536

    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout):
        async with asyncio.timeout(5):
            await ups.send("stuck", "POST", "/", CIMultiDict(), body())
    assert time.perf_counter() - started < 2.0
    assert ups.state("stuck", no_reader.url) == OPEN  # the target's fault: counted


async def test_a_request_body_failing_with_a_connection_error_is_not_left_half_sent(
    make_raw_upstream: MakeRaw, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    """The client's body raising ConnectionResetError (its peer went away) is a failure of the body, not of
    the target: the request must fail at once, not wait for an answer to a request never finished."""
    target = await make_raw_upstream(lambda head, i: (b"", "hang"))  # reads the head, waits for the rest
    ups = await make_upstreams(cfg("cut", target.url, read=30.0, failures=1))

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(3):
            await ups.send("cut", "POST", "/", CIMultiDict(), body())
    assert ups.state("cut", target.url) != OPEN
    await asyncio.sleep(0.05)
    assert target.open == 0  # the half-sent request's connection was cut, so the target cannot take it as whole


# --- a transfer coding the gateway cannot undo ---------------------------------------------------------


@pytest.mark.parametrize("field", [b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: gzip",
                                   b"Transfer-Encoding: chunked, identity", b"Transfer-Encoding : gzip, chunked"])
async def test_a_transfer_coding_other_than_chunked_is_a_bad_response(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any, field: bytes
) -> None:
    """The parser undoes `chunked` only; with another transfer coding (RFC 9112 s6.1) the bytes left are
    still coded, and relayed (Transfer-Encoding is hop-by-hop, so dropped) the client would take gzip bytes
    for the body. nginx answers 502 to an unknown Transfer-Encoding: so does the gateway, and the target's
    breaker counts it."""
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcbH\xcd\xc9\xc9\x07\x00\x86\xa6\x106\x05\x00\x00\x00"
    body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(gz), gz) if field.endswith(b"chunked") else gz
    answer = (b"HTTP/1.1 200 OK\r\n" + field + b"\r\nConnection: close\r\n\r\n" + body, "close")
    target = await make_raw_upstream(lambda head, i: answer)
    async with gateway_factory(config_text(issuer.url, {"raw": [target.url]}, ROUTES)) as gw:
        async with asyncio.timeout(5):
            status, _, reply = await gw.request("GET", "/raw/x")
    assert (status, reply["error"]) == (502, "bad_gateway")


async def test_a_204_is_relayed_without_the_content_length_the_target_put_on_it(
    issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any
) -> None:
    """RFC 9110 s8.6: a server never sends Content-Length with a 204. A target that does (and sends no body,
    as the parser rightly reads none) must not make the gateway tell its client a body of 7 follows."""
    answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\nX-Kept: 1\r\n\r\n"
    target = await make_raw_upstream(lambda head, i: answer)
    async with gateway_factory(config_text(issuer.url, {"raw": [target.url]}, ROUTES)) as gw:
        reply = await raw_exchange(gw.app.public_port, b"GET /raw/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 204") and b"x-kept: 1" in lines, head
    assert not [n for n in lines if n.startswith((b"content-length", b"transfer-encoding"))], head
    assert rest == b""
