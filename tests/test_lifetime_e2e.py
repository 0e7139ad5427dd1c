"""HTTP requests that outlive their token's end: a streamed response (server-sent events, a download)
or a long-awaited answer (long polling) on an authenticated route ends when the token that was admitted
is revoked or expires, as a WebSocket session does (gateway.lifetime). Real gateway, real aiohttp
upstream, real Redis for revocation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.devissuer import DevIssuer
from tests.support.gateway import GatewayProcess, RunningGateway, config_text, eventually, free_port
from tests.support.redis_server import RedisServer
from tests.test_h1server import Conn
from tests.test_resilience_e2e import metric
from tests.test_revocation_e2e import ADMIN, admin_post

TICK = 0.05
ROUTES = """\
  - name: feed
    match: {path_prefix: /feed/}
    upstream: feed
  - name: open
    match: {path_prefix: /open/}
    upstream: feed
    auth: {required: false}
"""


class TickUpstream:
    """/…/stream: a chunked body of one line every TICK, for at most 20 s, until its client goes away.
    /…/slow: answers 200 after 2 s. Each of these two puts its end on `ended`: (path, "whole" or "cut",
    when). /…/hello: "hi". /…/big: 64 MiB. POST /…/upload: reads the body, answers its length. POST
    /…/early: 413 at once, without reading the body."""

    def __init__(self) -> None:
        self.ended: asyncio.Queue[tuple[str, str, float]] = asyncio.Queue()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> TickUpstream:
        app = web.Application()
        app.router.add_get("/{prefix}/stream", self.stream)
        app.router.add_get("/{prefix}/slow", self.slow)
        app.router.add_get("/{prefix}/hello", self.hello)
        app.router.add_get("/{prefix}/big", self.big)
        app.router.add_post("/{prefix}/upload", self.upload)
        app.router.add_post("/{prefix}/early", self.early)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        outcome = "cut"
        try:
            for i in range(int(20 / TICK)):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(TICK)
            outcome = "whole"
        finally:
            self.ended.put_nowait((request.path, outcome, time.monotonic()))
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        outcome = "cut"
        try:
            await asyncio.sleep(2)
            outcome = "whole"
        finally:
            self.ended.put_nowait((request.path, outcome, time.monotonic()))
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.StreamResponse:
        """64 MiB of Content-Length-framed body, written as fast as the client takes it."""
        resp = web.StreamResponse()
        resp.content_length = 64 << 20
        await resp.prepare(request)
        chunk = b"x" * (64 << 10)
        for _ in range(1024):
            await resp.write(chunk)
        return resp

    async def hello(self, request: web.Request) -> web.Response:
        return web.Response(text="hi")

    async def early(self, request: web.Request) -> web.Response:
        return web.Response(status=413, text="too large")

    async def upload(self, request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def ticks() -> AsyncIterator[TickUpstream]:
    upstream = await TickUpstream().start()
    yield upstream
    await upstream.stop()


def yaml(issuer: DevIssuer, upstream: TickUpstream, redis: RedisServer | None = None, **kw: Any) -> str:
    if redis is not None:
        kw["revocation"] = (f"revocation: {{backend: redis, redis_url: '{redis.url}', key_prefix: 'life:', "
                            "on_backend_error: deny}")
    return config_text(issuer.url, {"feed": [upstream.url]}, ROUTES, **kw)


async def revoke(gw: RunningGateway, issuer: DevIssuer, jti: str) -> None:
    """Revokes `jti` through the gateway's admin API (SPEC 6), as an operator would."""
    await revoke_at(gw.session, gw.admin_url, issuer, jti)


async def revoke_at(session: aiohttp.ClientSession, admin_url: str, issuer: DevIssuer, jti: str) -> None:
    status, body = await admin_post(session, admin_url, issuer.token(ADMIN), {"type": "jti", "value": jti})
    assert status == 201, body


async def revoked_cuts(gw: RunningGateway) -> float:
    return await metric(gw.session, gw.admin_url, "gateway_auth_failures_total", issuer="dev", reason="revoked") or 0.0


async def lines(resp: aiohttp.ClientResponse, n: int) -> None:
    for _ in range(n):
        assert (await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)).startswith(b"data: ")


async def read_until_cut(resp: aiohttp.ClientResponse, within: float) -> float:
    """Reads the stream until the gateway cuts it (a chunked body broken off); returns when that was."""
    deadline = time.monotonic() + within
    with pytest.raises(aiohttp.ClientPayloadError):
        while time.monotonic() < deadline:
            await asyncio.wait_for(resp.content.readany(), max(0.01, deadline - time.monotonic()))
    return time.monotonic()


async def test_a_streamed_response_is_cut_within_a_second_of_its_revocation(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """Revoked (Redis, as across replicas) while its response streams: that response is cut, its upstream
    request ended, the cut counted; another token's stream goes on; the revoked token is refused anew."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        bob = {"Authorization": f"Bearer {issuer.token({'sub': 'bob', 'jti': 'feed-bob'})}"}
        carol = {"Authorization": f"Bearer {issuer.token({'sub': 'carol', 'jti': 'feed-carol'})}"}
        before = await revoked_cuts(gw)
        async with gw.session.get(gw.url + "/feed/stream", headers=bob) as rb, \
                gw.session.get(gw.url + "/feed/stream", headers=carol) as rc:
            assert rb.status == rc.status == 200
            await asyncio.sleep(0.8)  # both streams are old enough to be watched
            await lines(rb, 3)
            await revoke(gw, issuer, "feed-bob")
            revoked = time.monotonic()
            cut = await read_until_cut(rb, 3)
            assert cut - revoked < 1.0, cut - revoked
            path, outcome, when = await asyncio.wait_for(ticks.ended.get(), 2)
            assert (path, outcome) == ("/feed/stream", "cut") and when - revoked < 1.2
            await asyncio.sleep(3 * 0.25)  # carol's watcher looks again after the view changed
            await lines(rc, 5)
        assert await revoked_cuts(gw) == before + 1
        async with gw.session.get(gw.url + "/feed/stream", headers=bob) as again:
            assert again.status == 401


async def test_a_streamed_response_ends_when_its_token_expires(
        issuer: DevIssuer, ticks: TickUpstream, gateway_factory: Any) -> None:
    """At exp (+ the issuer's leeway, 0 here) the stream is cut; a public route's stream is never watched."""
    async with gateway_factory(yaml(issuer, ticks, issuer_extra="    leeway: 0s")) as gw:
        token = issuer.token({"sub": "alice"}, ttl=2)
        made = time.monotonic()
        async with gw.session.get(gw.url + "/feed/stream", headers={"Authorization": f"Bearer {token}"}) as r, \
                gw.session.get(gw.url + "/open/stream") as public:
            assert r.status == public.status == 200
            cut = await read_until_cut(r, 5)
            assert 1.0 < cut - made < 2.6, cut - made  # exp is whole seconds: 1-2 s after the token was made
            await asyncio.sleep(0.5)
            await lines(public, 5)


async def test_a_long_poll_revoked_before_its_answer_is_told_401(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """Revoked while the upstream has not answered yet: the client is told 401 invalid_token at once
    (not the upstream's answer 2 s later), and the upstream request is given up."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        token = issuer.token({"sub": "dave", "jti": "poll-1"})
        started = time.monotonic()
        polling = asyncio.ensure_future(gw.request("GET", "/feed/slow", token=token))
        await asyncio.sleep(0.2)
        await revoke(gw, issuer, "poll-1")
        status, headers, answer = await asyncio.wait_for(polling, 3)
        took = time.monotonic() - started
        assert status == 401 and answer["error"] == "invalid_token", answer
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert took < 1.5, took
        path, outcome, _ = await asyncio.wait_for(ticks.ended.get(), 2)
        assert (path, outcome) == ("/feed/slow", "cut")
        # The connection stays usable: a request with another token is answered by the upstream.
        other = issuer.token({"sub": "erin"})
        assert (await gw.request("GET", "/feed/slow", token=other))[:1] == (200,)


async def test_a_long_request_whose_token_stays_valid_is_not_touched(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """Watched for 2 s through revocations of other tokens: the answer arrives whole."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        token = issuer.token({"sub": "frank", "jti": "keep-1"})
        polling = asyncio.ensure_future(gw.request("GET", "/feed/slow", token=token))
        for n in range(3):
            await asyncio.sleep(0.4)
            await revoke(gw, issuer, f"other-{n}")
        status, _, body = await asyncio.wait_for(polling, 4)
        assert status == 200 and body == "late"
        assert (await asyncio.wait_for(ticks.ended.get(), 1))[1] == "whole"


async def test_an_upload_cut_by_its_revocation_is_told_401_and_the_connection_serves_on(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """Revoked while its body is still arriving: 401, then the rest of the body is read and dropped and
    the next request on the connection is answered (the cancelled upstream body writer used to still be
    reading the body when the connection lingered on it: RuntimeError, connection reset)."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        token = issuer.token({"sub": "ida", "jti": "upload-1"})
        c = await Conn.open(gw.app.public_port)
        c.writer.write(f"POST /feed/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                       "Content-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
        await asyncio.sleep(0.8)
        await revoke(gw, issuer, "upload-1")
        status, _, body = await c.response()
        assert status == 401 and json.loads(body)["error"] == "invalid_token"
        c.writer.write(b"x" * 99000 + b"GET /open/hello HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await c.response()
        assert (status, body) == (200, b"hi")
        await c.close()


async def test_an_answer_before_the_body_was_sent_leaves_the_connection_serving(
        issuer: DevIssuer, ticks: TickUpstream, gateway_factory: Any) -> None:
    """The same without a cut: the upstream answers 413 before it read the body (its writer cancelled)."""
    async with gateway_factory(yaml(issuer, ticks)) as gw:
        c = await Conn.open(gw.app.public_port)
        c.writer.write(b"POST /open/early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        status, _, body = await c.response()
        assert (status, body) == (413, b"too large")
        c.writer.write(b"x" * 99000 + b"GET /open/hello HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await c.response()
        assert (status, body) == (200, b"hi")
        await c.close()


async def test_a_cut_drops_what_a_client_that_does_not_read_has_not_taken(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """A 64 MiB answer its client stops reading, then revoked: the gateway lets go of the connection at
    once (it used to close it gracefully: the buffered body still waited for a client that never read)."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        token = issuer.token({"sub": "jo", "jti": "big-1"})
        c = await Conn.open(gw.app.public_port)
        c.writer.write(f"GET /feed/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        public = gw.app._public
        assert public is not None and len(public.conns) == 1
        await asyncio.sleep(0.8)  # nothing more is read: the gateway's send buffer fills
        await revoke(gw, issuer, "big-1")
        await eventually(lambda: asyncio.sleep(0, not public.conns), timeout=1.5)
        await c.close()


async def test_a_long_poll_on_aiohttps_server_is_cut_too(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """A request that came with an Upgrade to a route without WebSockets is served by aiohttp's server
    (_AioReply) as plain HTTP: its long poll is told 401 when its token is revoked, as on h1server."""
    async with gateway_factory(yaml(issuer, ticks, redis_server)) as gw:
        token = issuer.token({"sub": "kim", "jti": "aio-1"})
        c = await Conn.open(gw.app.public_port)
        started = time.monotonic()
        c.writer.write(f"GET /feed/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                       "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        await asyncio.sleep(0.2)
        await revoke(gw, issuer, "aio-1")
        status, headers, body = await c.response()
        assert status == 401 and json.loads(body)["error"] == "invalid_token"
        assert time.monotonic() - started < 1.5 and headers.get("connection", "").lower() == "close"
        path, outcome, _ = await asyncio.wait_for(ticks.ended.get(), 2)
        assert (path, outcome) == ("/feed/slow", "cut")
        await c.close()


async def test_gateway_run_on_uvloop_cuts_a_stream_and_answers_a_long_poll_401(
        issuer: DevIssuer, ticks: TickUpstream, redis_server: RedisServer, gateway_processes: Any,
        tmp_path: Path) -> None:
    """The same through `gateway run` (uvloop, whose tasks the cut cancels and takes back)."""
    port, admin_port = free_port(), free_port()
    path = tmp_path / "life.yaml"
    path.write_text(yaml(issuer, ticks, redis_server, listen=f"127.0.0.1:{port}",
                         admin_listen=f"127.0.0.1:{admin_port}"))
    proc: GatewayProcess = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port))
    await proc.wait_ready()
    async with aiohttp.ClientSession() as s:
        streaming = {"Authorization": f"Bearer {issuer.token({'sub': 'gus', 'jti': 'proc-stream'})}"}
        polling = {"Authorization": f"Bearer {issuer.token({'sub': 'hal', 'jti': 'proc-poll'})}"}
        async with s.get(proc.url + "/feed/stream", headers=streaming) as r:
            assert r.status == 200
            await asyncio.sleep(0.6)
            await lines(r, 2)
            poll = asyncio.ensure_future(s.get(proc.url + "/feed/slow", headers=polling))
            await asyncio.sleep(0.1)
            for jti in ("proc-stream", "proc-poll"):
                await revoke_at(s, proc.admin_url, issuer, jti)
            revoked = time.monotonic()
            assert await read_until_cut(r, 3) - revoked < 1.0
        answer = await asyncio.wait_for(poll, 3)
        assert answer.status == 401 and time.monotonic() - revoked < 1.2
        answer.release()


async def test_open_requests_take_back_only_their_own_cancellation() -> None:
    """OpenRequests alone, with a fake store that refuses the principal: the watch's cut is taken back by
    the request (which then answers); a cancellation of someone else's (shutdown), alone or together with
    the cut, goes on; a request not admitted (a public route) never gets a watcher."""
    from types import SimpleNamespace

    from gateway.lifetime import OpenRequests
    from gateway.model import Principal
    from gateway.pipeline import Exchange

    class Refusing:
        async def revoked(self, p: Principal) -> bool | None:
            return True

    gateway = SimpleNamespace(revocations=Refusing(), config=SimpleNamespace(issuers=[]))
    requests = OpenRequests(lambda: gateway, every=0.01)  # type: ignore[arg-type,return-value]
    principal = Principal(issuer="dev", iss="x", subject="a", scopes=frozenset(), roles=(), tenant=None,
                          session=None, jti="j", iat=0, exp=None, aud=())

    async def serve(ex: Exchange) -> str:
        task = asyncio.current_task()
        assert task is not None
        requests.open[ex] = SimpleNamespace(task=task)  # as H1Request.task
        try:
            await asyncio.sleep(5)
            return "whole"
        except asyncio.CancelledError:
            ended = OpenRequests.ended(ex, task)
            if ended is None:
                raise
            return ended
        finally:
            del requests.open[ex]

    def admitted() -> Exchange:
        return Exchange("r", principal=principal, authorized=True)

    sweeping = asyncio.ensure_future(requests.run())
    try:
        assert await asyncio.wait_for(serve(admitted()), 1) == "revoked"

        shutdown = asyncio.ensure_future(serve(admitted()))
        await asyncio.sleep(0)
        shutdown.cancel()
        with pytest.raises(asyncio.CancelledError):
            await shutdown

        both = admitted()
        racing = asyncio.ensure_future(serve(both))
        await asyncio.sleep(0)
        both.ended = "revoked"  # as the watcher's cut leaves it, its cancel and a shutdown's at once
        racing.cancel()
        racing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await racing

        public = asyncio.ensure_future(serve(Exchange("p")))  # not admitted: never watched
        await asyncio.sleep(0.1)
        assert not public.done() and not requests._watchers
        public.cancel()
        with pytest.raises(asyncio.CancelledError):
            await public
    finally:
        sweeping.cancel()
        requests.close()
