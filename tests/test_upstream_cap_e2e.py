"""`upstreams.<name>.max_requests` end to end: requests in flight per target are capped, the excess is shed
at once with 503 and never counted against a breaker, a slot is held until the answer is done (streamed
bodies and clients that leave included), and aiohttp's client (TLS targets, WebSockets) has no cap of its
own that would queue requests past 1000 sessions and blame a healthy target for the wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import accesslog
from gateway.devissuer import DevIssuer
from tests.support.gateway import eventually
from tests.support.pki import make_pki
from tests.support.upstreams import Answer, MakeRaw
from tests.test_resilience_e2e import (
    WS_ROUTE,
    MakeUpstream,
    WsUpstream,
    gateway_yaml,
    metric,
    public_routes,
    timed,
    upstream_yaml,
    ws_upstream,
)

__all__ = ["ws_upstream"]  # the fixture, used by name


def _stripped(*names: str) -> str:
    """Public routes /NAME/... to upstream NAME, the prefix removed (/up/_bytes/N -> /_bytes/N)."""
    return "".join(public_routes(n) + f"    rewrite: {{strip_prefix: /{n}}}\n" for n in names)


async def _served(gw: Any) -> bool:
    """Does a request to the `up` upstream get through (a slot free)?"""
    return (await gw.request("GET", "/up/ok"))[0] == 200


async def _breaker(gw: Any, upstream: str, target: str) -> float | None:
    return await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream=upstream, target=target)


async def _shed(gw: Any, path: str) -> None:
    status, headers, body, elapsed = await timed(gw, "GET", path)
    assert (status, body["error"], headers.get("Retry-After")) == (503, "upstream_unavailable", "1"), body
    assert elapsed < 0.25  # at once: not queued behind the requests in flight


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_past_max_requests_a_request_is_shed_at_once_and_the_breaker_stays_closed(
        tls: bool, issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_factory: Any) -> None:
    """Plain targets go through the lean client, TLS ones through aiohttp's: the cap is the same."""
    ctx, tls_yaml = None, ""
    if tls:
        pki = make_pki(tmp_path)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki["server"])
        tls_yaml = f"{{ca_file: {pki['ca']}}}"
    target = await make_upstream(ssl_context=ctx)
    target.set_mode("slow", delay=0.6)
    # failures: 1 -- a single verdict against the target would open its breaker.
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, attempts=1, failures=1, tls=tls_yaml,
                                                   max_requests=2)], public_routes("up"))
    async with gateway_factory(text) as gw:
        async def answered_503() -> float:
            return await metric(gw.session, gw.admin_url, "gateway_requests_total",
                                route="up", method="GET", status="503") or 0.0

        before = await answered_503()  # the registry is the process's: other tests count in it too
        held = [asyncio.ensure_future(gw.request("GET", f"/up/{i}")) for i in range(2)]
        await eventually(lambda: asyncio.sleep(0, target.hits == 2), timeout=3)
        for _ in range(3):
            await _shed(gw, "/up/x")
        assert target.hits == 2  # the shed requests never reached it
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
        assert await _breaker(gw, "up", target.url) == 0
        assert await answered_503() - before == 3
        target.set_mode("echo")
        statuses = await asyncio.gather(*(gw.request("GET", f"/up/again{i}") for i in range(2)))
        assert [s[0] for s in statuses] == [200, 200]  # both slots were given back


async def test_a_full_target_is_passed_over_for_one_with_room(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any) -> None:
    slow, fast = await make_upstream(), await make_upstream()
    slow.set_mode("slow", delay=0.6)
    text = gateway_yaml(issuer.url, [upstream_yaml("up", slow.url, fast.url, attempts=1, max_requests=1)],
                        public_routes("up"))
    async with gateway_factory(text) as gw:
        first = asyncio.ensure_future(gw.request("GET", "/up/1"))  # round robin: the slow target
        await eventually(lambda: asyncio.sleep(0, slow.hits == 1), timeout=3)
        assert (await gw.request("GET", "/up/2"))[0] == 200  # round robin: the fast one
        status, _, _, elapsed = await timed(gw, "GET", "/up/3")  # the slow one's turn, but it is full
        assert status == 200 and elapsed < 0.3
        assert (slow.hits, fast.hits) == (1, 2)
        assert (await first)[0] == 200


async def test_a_streamed_answer_holds_its_slot_until_the_client_leaves(
        issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any) -> None:
    """The slot is the target's connection: held while the body streams, given back when the client goes
    away mid-body (a slot lost there would shut the target out for good once `max_requests` leaked)."""
    def respond(head: bytes, index: int) -> Answer:
        if b"/up/stream" in head:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10, "hang"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    target = await make_raw_upstream(respond)
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, attempts=1, failures=1, max_requests=1)],
                        public_routes("up"))
    async with gateway_factory(text) as gw:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
            writer.write(b"GET /up/stream HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            await _shed(gw, "/up/ok")  # the head is out, the body goes on: the slot is still held
            writer.close()
            await writer.wait_closed()

            await eventually(lambda: _served(gw), timeout=3)
        assert await _breaker(gw, "up", target.url) == 0


@pytest.mark.parametrize("upgrade", [b"", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"],
                         ids=["plain", "upgrade-on-a-plain-route"])  # the latter: on aiohttp's server
async def test_a_client_that_stops_reading_is_cut_after_send_timeout_and_frees_its_slot(
        upgrade: bytes, issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A client that reads the head of a large answer and then nothing more, without closing, held the
    target's slot (and the upstream connection) for as long as it stayed: with max_requests of them, the
    target answered every other client 503. After send_timeout with no byte taken it is cut (499)."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "SEND_TIMEOUT", 1.0)
    target = await make_upstream()
    routes = _stripped("up")
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, attempts=1, failures=1, max_requests=1)],
                        routes)
    async with gateway_factory(text) as gw:
        capsys.readouterr()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
        try:
            writer.write(b"GET /up/_bytes/268435456 HTTP/1.1\r\nHost: a\r\n%b\r\n" % upgrade)  # 256 MiB; read no body
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            await _shed(gw, "/up/ok")  # the slot is held while the answer is stuck in the buffers

            took = await eventually(lambda: _served(gw), timeout=6)
            assert took < 4.5  # the buffers fill, then 1 s without progress, then the next sweep (1 s)
        finally:
            writer.close()
        await asyncio.sleep(0.1)
        accesslog.flush()  # lines go out in batches (every 0.5 s)
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert ("/up/_bytes/268435456", 499) in [(line["path"], line["status"]) for line in lines], lines
        assert not [line for line in lines if line["status"] == 500], lines  # one line for the cut, not two
        assert await _breaker(gw, "up", target.url) == 0


class _SlowBodyTarget:
    """A target that answers at once with `answer` bytes, then takes no byte of the request body for
    `pause` seconds (None: never), then reads it all; `.taken` counts the body bytes it read."""

    def __init__(self, answer: int, pause: float | None) -> None:
        self.answer, self.pause, self.taken = answer, pause, 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopped = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.answer)
            writer.write(b"y" * self.answer)  # buffered here: the gateway takes it as its client reads
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), self.pause)  # None: until stopped
            while chunk := await reader.read(2**20):
                self.taken += len(chunk)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.stopped.set()
            for writer in self.writers:
                writer.transport.abort()
            await asyncio.gather(*self.tasks)
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def _upload_to(issuer: DevIssuer, gateway_factory: Any, answer: int, pause: float | None,
                     **upstream: Any) -> AsyncIterator[tuple[_SlowBodyTarget, Any, asyncio.StreamReader,
                                                          asyncio.StreamWriter]]:
    """A _SlowBodyTarget behind the gateway's public route /up/, and a raw connection to the gateway."""
    target = _SlowBodyTarget(answer, pause)
    try:
        url = await target.start()
        text = gateway_yaml(issuer.url, [upstream_yaml("up", url, attempts=1, **upstream)], _stripped("up"))
        async with gateway_factory(text) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
            try:
                yield target, gw, reader, writer
            finally:
                writer.close()
    finally:
        await target.stop()


async def test_a_client_that_stops_both_sending_its_body_and_reading_is_cut(
        issuer: DevIssuer, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparing a client still sending its body must not spare one that stalls both ways: the target has
    taken every byte sent so far, the client sends no more and reads nothing of its large answer. Only
    the send timeout (1 s here, before the 60 s body timeout) ends it, and frees the slot."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "SEND_TIMEOUT", 1.0)
    async with _upload_to(issuer, gateway_factory, 64 * 2**20, 0, read="30s", max_requests=1) as (
            target, gw, _, writer):
        writer.write(b"POST /up/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n")
        writer.write(b"x" * 100_000)
        await writer.drain()
        await eventually(lambda: _true(target.taken == 100_000), timeout=5)
        started = time.monotonic()
        await eventually(lambda: _shed_now(gw), timeout=5)  # the slot is held meanwhile
        await eventually(lambda: _served(gw), timeout=6)
        assert time.monotonic() - started < 5  # not the 30 s read timeout, nor the 60 s body timeout


async def _true(value: bool) -> bool:
    return value


async def _shed_now(gw: Any) -> bool:
    return (await gw.request("GET", "/up/ok"))[0] == 503


async def test_an_upload_held_up_by_a_target_not_reading_is_spared_and_ended_by_its_read_timeout(
        issuer: DevIssuer, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client uploading without reading its answer, stuck because the target takes no byte of the body:
    it is the target that stalls, so its read timeout (nginx's proxy_send_timeout) ends the request, not
    the client's send timeout; and it does end, freeing the slot."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "SEND_TIMEOUT", 1.0)
    async with _upload_to(issuer, gateway_factory, 64 * 2**20, None, read="4s", max_requests=1) as (
            _, gw, _, writer):
        writer.write(b"POST /up/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n")
        with pytest.raises(TimeoutError):
            for _ in range(200):
                writer.write(b"x" * 2**20)
                await asyncio.wait_for(writer.drain(), 0.5)
        stuck = time.monotonic()
        await asyncio.sleep(2.5)  # past the 1 s send timeout and its sweep
        assert await _shed_now(gw)  # still held: the client was not cut for the target's stall
        # The upload gives up after the 4 s read timeout; the client, still not reading, is then cut by
        # the send timeout once the consumer's grace (read timeout + 1 s) has passed too.
        await eventually(lambda: _served(gw), timeout=10)
        assert time.monotonic() - stuck > 3


async def test_an_upload_held_up_for_a_while_by_a_target_is_not_cut(
        issuer: DevIssuer, gateway_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends its whole body before reading its answer, to a target that answers at once and
    takes the body only after a pause longer than the send timeout: the gateway's reads of the body stop
    for that pause (its buffers are full), and the client must not be cut for it (it was, before)."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "SEND_TIMEOUT", 1.0)
    size, answer = 16 * 2**20, 32 * 2**20
    async with _upload_to(issuer, gateway_factory, answer, 3.0, read="10s") as (target, _, reader, writer):
        writer.write(b"POST /up/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(16):
            writer.write(b"x" * (size // 16))
            await asyncio.wait_for(writer.drain(), 10)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        got = 0
        while got < answer:
            chunk = await asyncio.wait_for(reader.read(2**20), 5)
            assert chunk, f"cut after {got} bytes of the answer"
            got += len(chunk)
        await eventually(lambda: _true(target.taken == size), timeout=5)


async def test_a_slow_reader_and_a_client_still_uploading_are_not_cut(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """send_timeout measures progress, not one pause: a client taking ~160 KB/s of a large answer keeps
    it (the transport's buffer only shrinks when the kernel frees a third of its own, seconds apart at
    that rate), and so does a client still sending its body while its answer waits (it reads after)."""
    from gateway import h1server
    monkeypatch.setattr(h1server, "SEND_TIMEOUT", 1.0)

    async def echo_as_it_reads(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk * 4)  # the answer grows as the body arrives, before it has ended
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo_as_it_reads)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    streamer = f"http://127.0.0.1:{runner.addresses[0][1]}"
    target = await make_upstream()
    routes = _stripped("up", "echo")
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, attempts=1),
                                     upstream_yaml("echo", streamer, attempts=1, read="10s")], routes)
    try:
        async with gateway_factory(text) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
            try:
                writer.write(b"GET /up/_bytes/268435456 HTTP/1.1\r\nHost: a\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                taken, started = 0, time.monotonic()
                while time.monotonic() - started < 5:
                    taken += len(await asyncio.wait_for(reader.read(16384), 5))  # raises once cut
                    await asyncio.sleep(0.1)
                assert taken > 200_000
            finally:
                writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
            try:
                size = 30 * 2**17  # 3.75 MiB, sent in 30 equal parts
                writer.write(b"POST /echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                for _ in range(30):  # over 3 s, reading nothing meanwhile
                    writer.write(b"x" * (size // 30))
                    await writer.drain()
                    await asyncio.sleep(0.1)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")
                body = b""
                while not body.endswith(b"0\r\n\r\n"):
                    try:
                        chunk = await asyncio.wait_for(reader.read(2**20), 5)
                    except TimeoutError:
                        raise AssertionError(f"stalled after {len(body)} bytes: {body[-60:]!r}") from None
                    assert chunk, "cut"
                    body += chunk
                assert body.count(b"x") == 4 * size
            finally:
                writer.close()
    finally:
        await runner.cleanup()


async def test_more_than_a_thousand_websocket_sessions_open(
        issuer: DevIssuer, ws_upstream: WsUpstream, gateway_factory: Any) -> None:
    """aiohttp's connector held at most 1000 connections across every TLS target and WebSocket, and a
    session holds one for its life: the 1001st handshake waited out its timeout, was answered 504 and
    counted against the target's breaker. The cap is the targets' max_requests now, which sessions are
    not counted in (they are bounded by the clients' own connections)."""
    sessions = 1010
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url, connect="1s", read="1s", failures=1)],
                        WS_ROUTE.replace("    upstream: ws\n", "    upstream: ws\n    auth: {required: false}\n"))
    async with gateway_factory(text) as gw, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as client:
        url = gw.url.replace("http://", "ws://") + "/ws/chat"
        opened: list[aiohttp.ClientWebSocketResponse] = []
        try:
            for start in range(0, sessions, 100):
                opened += await asyncio.gather(*(client.ws_connect(url) for _ in range(min(100, sessions - start))))
            last = opened[-1]
            await last.send_str("hi")
            assert (await asyncio.wait_for(last.receive(), 5)).data == "?:hi"
            assert ws_upstream.upgrades == sessions
        finally:
            await asyncio.gather(*(ws.close() for ws in opened))
        assert await _breaker(gw, "ws", ws_upstream.url) == 0
