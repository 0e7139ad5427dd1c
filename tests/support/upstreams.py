"""Test support: real aiohttp upstream servers that echo what they received and can be made sick.

`EchoUpstream` listens on 127.0.0.1 (a free port, kept across stop()/start()) and records every
request as it arrived. Its mode can change at runtime:

- "echo":   200 JSON {method, path, headers, header_list, body_length, body_sha256}; the body is read
            in chunks and hashed, never held whole. `headers` maps each received name (as sent) to its
            value (repeats joined with ", "); `header_list` is the exact [name, value] list in order.
            GET /_bytes/N answers N bytes of a fixed pattern (pattern_bytes(N)), streamed.
            A WebSocket upgrade on any path is accepted and every frame echoed.
- "status": answer `status` with a small JSON body.
- "hang":   never answer (until stopped).
- "slow":   wait `delay` seconds, then echo.
- "reset":  abort the TCP connection (RST) without answering.

`.hits` counts requests, `.connections` counts accepted TCP connections.

`RawUpstream` speaks HTTP/1.1 by hand (framings, interim answers, dropped keep-alive connections) for
the upstream client's own tests.

`Blackhole` is a target whose TCP connect never completes (a listener with a full accept queue: Linux
drops further SYNs), for connect timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.web_runner import BaseSite

from gateway.config_types import UpstreamConfig
from gateway.upstream import Upstreams

_PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    """What GET /_bytes/N answers."""
    reps, rest = divmod(n, len(_PATTERN))
    return _PATTERN * reps + _PATTERN[:rest]


class _CountingSite(BaseSite):
    """A TCP site that counts accepted connections (aiohttp's TCPSite cannot)."""

    def __init__(self, runner: web.AppRunner, port: int, owner: EchoUpstream, ssl_context: Any) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._port = port
        self._owner = owner

    @property
    def name(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        owner = self._owner

        def factory() -> Any:
            owner.connections += 1
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            factory, "127.0.0.1", self._port, ssl=self._ssl_context, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]


class EchoUpstream:
    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.mode = "echo"
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        # Set by stop(): handlers that hang wake up then, even when their client has gone (aiohttp does
        # not cancel a handler on connection loss), so no task outlives the test.
        self._stopped = asyncio.Event()

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def set_mode(self, mode: str, *, status: int = 200, delay: float = 0.0) -> None:
        assert mode in ("echo", "status", "hang", "slow", "reset"), mode
        self.mode, self.status, self.delay = mode, status, delay

    async def start(self) -> EchoUpstream:
        """Listen (again) on the same port as before, or a free one the first time."""
        assert self._runner is None
        self._stopped = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Short shutdown: a hanging handler is cancelled at once when the test stops the server.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = _CountingSite(runner, self.port, self, self._ssl)
        await site.start()
        self.port = site._port
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Close the listener and every open connection: the port refuses connections afterwards."""
        runner, self._runner = self._runner, None
        self._stopped.set()
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        headers = _headers_as_received(request)
        self.requests.append((request.method, request.path_qs, _joined(headers)))
        mode = self.mode
        if mode == "reset":
            _reset(request)
            await self._stopped.wait()
            return web.Response()
        if mode == "hang":
            await self._stopped.wait()
            return web.Response()
        if mode == "status":
            return web.json_response({"status": self.status}, status=self.status)
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _ws_echo(request)
        if request.method == "GET" and request.path.startswith("/_bytes/"):
            return await _stream_bytes(request, int(request.path.rsplit("/", 1)[1]))
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": _joined(headers),
                "header_list": headers,
                "body_length": length,
                "body_sha256": digest.hexdigest(),
            }
        )


def _headers_as_received(request: web.Request) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


def _joined(headers: list[list[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _reset(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _stream_bytes(request: web.Request, n: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    data = memoryview(pattern_bytes(n))
    for start in range(0, n, 65536):
        await resp.write(bytes(data[start : start + 65536]))
    await resp.write_eof()
    return resp


async def _ws_echo(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("echo", "chat"))
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


class Blackhole:
    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # Fill the accept queue (backlog 0 still holds one) with connections nobody accepts.
        self._fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(filler)

    def close(self) -> None:
        for sock in (*self._fillers, self._listener):
            sock.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose every connection is refused, for the whole test: a socket bound to the port and never
    listening answers each SYN with a reset, and holds the port. A stopped server's port is free for
    the next bind to port 0 (a gateway listener started later), which would then answer in its place."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
async def make_upstream() -> AsyncIterator[Callable[..., Awaitable[EchoUpstream]]]:
    """`await make_upstream(ssl_context=None)`: a started EchoUpstream, stopped at teardown."""
    made: list[EchoUpstream] = []

    async def make(*, ssl_context: ssl.SSLContext | None = None) -> EchoUpstream:
        upstream = await EchoUpstream(ssl_context=ssl_context).start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.stop()


@pytest.fixture
async def echo_upstream(make_upstream: Callable[..., Awaitable[EchoUpstream]]) -> EchoUpstream:
    return await make_upstream()



Answer = bytes | tuple[bytes, str]


class RawUpstream:
    """A target that speaks HTTP/1.1 by hand, for framings and connection handling aiohttp would not produce.

    Each request head (up to the blank line; a Content-Length body is read and dropped) is recorded in
    `.requests` and answered with `respond(head, index_on_connection)`: the raw bytes to write, or
    `(bytes, action)` with action "close" (close after writing), "hang" (write, then wait for the client to close) or
    "drop" (close without writing anything). `.connections` counts accepted connections, `.open` those
    still open; `drop_all()` closes every open connection (a target timing out idle keep-alive ones).
    """

    def __init__(self, respond: Callable[[bytes, int], Answer]) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._tasks:  # every handler ends on its closed connection: none is left for the loop to cancel
            await asyncio.wait(self._tasks, timeout=2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.connections += 1
        self.open += 1
        self._writers.add(writer)
        try:
            index = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                self.requests.append(head)
                answer = self.respond(head, index)
                index += 1
                data, action = answer if isinstance(answer, tuple) else (answer, "")
                if action == "drop":
                    return
                writer.write(data)
                await writer.drain()
                if action == "close":
                    return
                if action == "hang":
                    await reader.read()  # until the client closes (or stop() does)
                    return
        except ConnectionError:
            return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()


MakeRaw = Callable[[Callable[[bytes, int], Answer]], Awaitable[RawUpstream]]  # the make_raw_upstream fixture


@pytest.fixture
async def make_raw_upstream() -> AsyncIterator[Callable[[Callable[[bytes, int], Answer]], Awaitable[RawUpstream]]]:
    """`await make_raw_upstream(respond)`: a started RawUpstream, stopped at teardown."""
    made: list[RawUpstream] = []

    async def make(respond: Callable[[bytes, int], Answer]) -> RawUpstream:
        upstream = await RawUpstream(respond).start()
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.stop()


@pytest.fixture
async def make_upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstreams]]]:
    """`await make_upstreams(cfg, ...)`: a started gateway.upstream.Upstreams over those pools, closed at teardown."""
    made: list[Upstreams] = []

    async def make(*cfgs: UpstreamConfig, clock: Callable[[], float] = time.monotonic) -> Upstreams:
        ups = Upstreams({c.name: c for c in cfgs}, clock=clock)
        await ups.start()
        made.append(ups)
        return ups

    yield make
    for ups in made:
        await ups.close()
