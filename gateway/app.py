"""The request path around the pipeline (_serve), the listeners, reload and drain: aiohttp and h1server glue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import accesslog, h1server, metrics
from gateway.config import load, warnings
from gateway.config_types import Config, UpstreamConfig
from gateway.errors import (
    AuthError,
    BadGateway,
    BadHost,
    BadPath,
    BadRequest,
    ConfigError,
    GatewayError,
    HeaderTooLarge,
    InvalidToken,
    PayloadTooLarge,
    no_passphrase,
)
from gateway.h1server import H1Request, H1Server
from gateway.httphead import HeadInjection
from gateway.httphead import head as message_head
from gateway.identity import client_ip_from, relay_response_headers, request_id_from
from gateway.lifetime import OpenRequests
from gateway.model import RequestView
from gateway.pipeline import ConnMemo, Exchange, Gateway
from gateway.routes import valid_host
from gateway.services import Services
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway")
_CHUNK = 64 * 1024
# Upstream bodies up to this declared length are read whole and sent with their headers in one write.
_SMALL_BODY = 64 * 1024
_HOSTS_KEPT = 1024  # valid Host values remembered (_check_host)
# The method label is bounded: the HTTP parser accepts ~35 methods (PROPFIND, PURGE, ...).
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))


def error_body(err: GatewayError, request_id: str) -> bytes:
    # SPEC 5: code and a fixed description only; the precise reason goes to the log and metrics.
    return json.dumps({"error": err.code, "error_description": err.description, "request_id": request_id}).encode()


def refused(exc: BaseException | None, status: int, remote: str | None) -> tuple[int, CIMultiDict[str], bytes]:
    """The answer to a request the HTTP parser refused (or a handler bug): counted and logged like any."""
    err: GatewayError
    message = str(getattr(exc, "message", "") or "")
    if isinstance(exc, LineTooLong) or (status == 400 and "too many headers" in message.lower()):
        err = HeaderTooLarge()
    elif status == 400:
        err = BadRequest()
    else:
        err = GatewayError()
    request_id = uuid.uuid4().hex
    headers = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": request_id})
    # Refused by the HTTP parser before the gateway saw a request: still counted and logged.
    metrics.requests_total.labels(route="-", method="OTHER", status=str(err.status)).inc()
    accesslog.refused_line(request_id, err.status, remote, err.reason)
    return err.status, headers, error_body(err, request_id)


class _Handler(RequestHandler):
    """aiohttp's protocol handler (Upgrade requests only), answering its own parse errors like H1Server."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if exc is None and message:
            exc = aiohttp.http_exceptions.HttpProcessingError(message=message)
        code, headers, body = refused(exc, status, request.remote if request is not None else None)
        resp = web.Response(status=code, body=body, headers=headers)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class GatewayApp:
    """The public listener, the admin listener and the current Gateway, swapped atomically on reload."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        # The config the listeners were bound and the workers started with: what a reload cannot change is
        # compared with it, not with the last file loaded (which may have asked for a change not applied).
        self._bound = config
        self.services = Services()
        self.gateway: Gateway | None = None
        self.reuse_port = reuse_port
        self.draining = False
        self._runners: list[web.BaseRunner] = []
        self._public: H1Server | None = None
        self._upgrades: _Server | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurried = asyncio.Event()  # a second stop signal: the drain ends now (hurry)
        # One reload at a time: two overlapping builds could each reuse, then retire, the other's parts
        # (a JWKS cache closed but still in use), and the older file could win.
        self._reloading = asyncio.Lock()
        # Each (route, method, status)'s counter and each route's histogram, resolved once (metrics.py).
        self._labels: dict[tuple[str, str, int], Callable[[float], None]] = {}
        self._durations: dict[str, Callable[[float], None]] = {}
        self._inflight_add = metrics.incrementer(metrics.inflight_requests)
        self._background: list[asyncio.Task[None]] = []  # the access log's flusher, the requests' sweeper
        self._requests = OpenRequests(self._current)  # requests in flight, ended with their token
        self._stamp = accesslog.Stamp()
        self._scheme = "http"
        self._server_ssl: ssl.SSLContext | None = None  # the listener's, built at start
        self._tls_now: ssl.SSLContext | None = None  # the last reload's, switched to per handshake
        self._hosts: set[str] = set()  # Host values already found valid (_check_host)
        self.public_port = 0
        self.admin_port = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._bound = self.config
        self.gateway = await self.services.build(self.config)
        from gateway.admin import admin_app

        cfg = self.config.server
        # The parser's own limits are generous; max_header_bytes is checked on the whole block (handle).
        max_line = max(8190, cfg.max_header_bytes * 4)
        # aiohttp's server answers only Upgrade requests (WebSocket), handed over with their connection.
        # auto_decompress=False: a body passes as the client encoded it, as on the public listener.
        self._upgrades = _Server(self.handle, max_line_size=max_line, max_field_size=max_line, max_headers=1000,
                                 access_log=None, auto_decompress=False)
        self._public = H1Server(self.handle_h1, refused, self._upgrades, max_line=max_line, max_headers=1000,
                                conn_state=ConnMemo)
        server_ssl = _server_ssl(self.config)
        # The listener is never rebuilt on reload: its scheme is fixed here, not looked up per request. A
        # reload builds a fresh context from the certificate files (renewed certificates, new paths) and
        # each later handshake is switched to it (_use_current_tls).
        self._server_ssl = server_ssl
        self._scheme = "https" if server_ssl is not None else "http"
        self.public_port = await self._public.listen(cfg.host, cfg.port, ssl=server_ssl, reuse_port=self.reuse_port)
        admin = web.AppRunner(admin_app(self), handle_signals=False, access_log=None)
        await admin.setup()
        await web.TCPSite(admin, self.config.admin.host, self.config.admin.port,
                          reuse_port=self.reuse_port or None).start()
        self._runners.append(admin)
        self.admin_port = _bound_port(admin)
        self._background = [asyncio.create_task(self._flush_logs()), asyncio.create_task(self._requests.run())]

    async def drain_and_stop(self) -> None:
        """SIGTERM: not ready at once, stop accepting, let in-flight requests finish within shutdown_grace."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.shutdown_grace
        if self._public is not None:
            # Stops accepting, closes idle keep-alive connections, answers in-flight requests with
            # Connection: close, and at the deadline cuts what remains (the process must not outlive
            # the orchestrator's patience).
            await self._public.drain(deadline)
            # What the public listener no longer holds may still be running: WebSocket sessions and other
            # Upgrade requests, served on aiohttp's server. Until they end, the deadline, or a hurry().
            if not self._idle.is_set() and not self._hurried.is_set():
                waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._hurried.wait())]
                try:
                    await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        await self.stop()

    def _use_current_tls(self, conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        """The listener's SNI callback, which OpenSSL calls for every ClientHello (with or without a server
        name): the handshake goes on with the last reload's context, its certificate and key alone."""
        if self._tls_now is not None and ctx is not self._tls_now:
            conn.context = self._tls_now

    def hurry(self) -> None:
        """A second SIGTERM/SIGINT while draining: cut what is in flight now, as the grace's end would, and
        stop in order (the access log flushed, exit 0) instead of dying of the signal's default action."""
        self._hurried.set()
        if self._public is not None:
            self._public.deadline = 0.0

    async def stop(self) -> None:
        if self._public is not None:
            await self._public.close()
            self._public = None
        if self._upgrades is not None:
            self._upgrades.pre_shutdown()
            await self._upgrades.shutdown(0.1)  # WebSocket connections: 0 would mean "no limit" to aiohttp
            self._upgrades = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        self._requests.close()
        await self.services.close()
        accesslog.flush()
        sys.stdout.flush()

    async def reload(self, path: str) -> bool:
        """SIGHUP: parse off the request path; a good file swaps atomically, a bad one is refused and counted."""
        async with self._reloading:
            return await self._reload(path)

    async def _reload(self, path: str) -> bool:
        try:
            config = await asyncio.get_running_loop().run_in_executor(None, load, path)
            try:
                fresh_ssl = _server_ssl(config) if self._server_ssl is not None else None
            except (ssl.SSLError, OSError) as exc:
                tls = config.server.tls
                raise ConfigError([f"{config.path}: server.tls: cannot load a certificate and its key from "
                                   f"{tls.cert_file if tls else None}: {' '.join(str(exc).split())}"]) from None
            gateway = await self.services.build(config)
        except ConfigError as exc:
            _count_reload("error")
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return False
        except Exception as exc:  # noqa: BLE001 - any failure keeps the running config
            _count_reload("error")
            log.error("reload refused: %s", exc)
            return False
        if self._server_ssl is not None and fresh_ssl is not None:
            # The files loaded cleanly into a fresh context just now: every handshake from here on uses it
            # (connections already open keep theirs). Not loaded into the listener's own context: OpenSSL
            # keeps one certificate per key type there, so an RSA certificate replaced by an ECDSA one was
            # still served (old key and all) to every client that offered RSA only; and the files would be
            # read a second time, perhaps half rewritten by then.
            self._tls_now = fresh_ssl
            self._server_ssl.sni_callback = self._use_current_tls
        self.config, self.gateway = config, gateway  # in-flight requests keep the Gateway they started with
        _count_reload("ok")
        log.info("configuration reloaded from %s", path)
        for line in _restart_only(self._bound, config):
            log.warning("%s", line)
        for line in warnings(config):
            log.warning("%s", line)
        asyncio.get_running_loop().call_later(self.config.server.shutdown_grace or 1.0,
                                              lambda: asyncio.ensure_future(self.services.close_retired()))
        return True

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            accesslog.flush()

    # -- the request path ---------------------------------------------------------------------------
    def handle_h1(self, request: H1Request) -> Awaitable[None]:
        """The public listener's requests (gateway.h1server); no coroutine of its own on the hot path."""
        return self._serve(request, request, None)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Requests that came with an Upgrade (handed to aiohttp's server with their connection)."""
        out = _AioReply(request)
        try:
            await self._serve(request, out, request)
        except ConnectionError:
            # The client is gone (or was cut), and _serve logged and counted it (499). Raised on, aiohttp's
            # handle_error would log and count a second line, a 500 with no route.
            if out.response is None:
                out.response = web.Response(status=499)
            out.response.force_close()
        assert out.response is not None
        return out.response

    async def _serve(self, request: _Req, out: _Out, aio: web.BaseRequest | None) -> None:
        started = time.perf_counter()
        gateway = self.gateway  # snapshot: a reload does not change a request in flight
        assert gateway is not None
        cfg = gateway.config.server
        ex = Exchange(request_id_from(request.headers))
        self._inflight += 1
        self._idle.clear()
        self._inflight_add(1)
        status, auth, target, upstream_status = 500, "-", "", 0
        client_ip = request.remote or ""
        try:
            try:
                if _header_bytes(request) > cfg.max_header_bytes:
                    raise HeaderTooLarge()
                view = self._view(request, cfg.trusted_proxies)
                client_ip = view.client_ip
                try:
                    body = self._body(request, cfg.max_body_bytes, ex, out, gateway.config.upstreams)
                except PayloadTooLarge:
                    # Logged and counted under its route, as nginx's client_max_body_size is a location's:
                    # a bad path, no route or a method not allowed is answered first (match raises it).
                    route = gateway.match(view).route
                    ex.route, ex.upstream = route.name, route.upstream
                    raise
                # RFC 6455 s4.1: only a GET is a handshake. The upstream's is always a GET (aiohttp's
                # ws_connect): a DELETE or OPTIONS upgrade, judged by a broader websocket route that takes
                # it, opened a GET-only route's WebSocket without that route's rules.
                if (request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"
                        and self._websocket_route(gateway, view)):
                    status = await self._websocket(gateway, aio, view, ex, out, self._current)
                    auth = "ok" if ex.authorized else "none"
                    return
                # Open, so that it ends with its token (gateway.lifetime): a dict entry, no task or timer.
                opened = self._requests.open
                opened[ex] = out
                try:
                    try:
                        up = await gateway.handle(view, body, ex)
                    except BadGateway:
                        if ex.body_too_large:
                            raise PayloadTooLarge() from None
                        raise
                    auth = "ok" if ex.authorized else "none"
                    target, upstream_status = up.target, up.status
                    # A small body is read whole before anything is sent: its failure is still an honest 502/504.
                    try:
                        await self._relay(request.method, out, up, ex.request_id)
                    except HeadInjection:
                        raise up.unrelayable() from None  # nothing was sent: the client gets a 502
                    status = up.status
                except asyncio.CancelledError:
                    ended = OpenRequests.ended(ex, asyncio.current_task())
                    if ended is None:
                        raise  # not the token's end: shutdown, or the client went away
                    issuer = ex.principal.issuer if ex.principal is not None else ""
                    if not out.started:
                        raise InvalidToken(ended, issuer=issuer) from None  # answered 401 below
                    # The status line is out: as for an upstream failure mid-body, cut the connection.
                    out.abort()
                    status, auth = upstream_status, ended
                    metrics.auth_failures_total.labels(issuer=issuer or "-", reason=ended).inc()
                finally:
                    del opened[ex]
            except GatewayError as err:
                status = err.status
                if isinstance(err, AuthError):
                    auth = err.reason
                    metrics.auth_failures_total.labels(issuer=err.issuer or "-", reason=err.reason).inc()
                elif ex.authorized:
                    auth = "ok"
                elif ex.principal is not None:  # verified, then the revocation backend failed
                    auth = err.reason
                headers = CIMultiDict(err.headers)
                headers["X-Request-Id"] = ex.request_id
                headers["Content-Type"] = "application/json"
                await out.send(err.status, headers, error_body(err, ex.request_id))
        except ConnectionError:
            # The client went away before its answer went out: nginx's 499 ("client closed request"),
            # counted apart from the gateway's own 5xx (the error-rate alert).
            status = 499
            raise
        except asyncio.CancelledError:
            task = out.task
            if not out.gone or task is None or task.uncancel() > 0:
                raise  # shutdown
            status = 499  # the client closed its connection mid-answer (h1server cancelled the work for it)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            self._inflight_add(-1)
            elapsed = time.perf_counter() - started
            self._observe(ex.route, request.method if request.method in _METHODS else "OTHER", status, elapsed)
            accesslog.request_line(self._stamp(), request.method, request.raw_path, ex, status, elapsed, target,
                                   upstream_status, auth, client_ip)

    @staticmethod
    def _websocket_route(gateway: Gateway, view: RequestView) -> bool:
        """Does the request's route proxy WebSockets? Elsewhere an Upgrade is a hop-by-hop header like any
        other (SPEC 4): stripped, and the request proxied as plain HTTP. A request no route takes is
        answered (400/404/405) on the plain path, as any other."""
        try:
            return gateway.match(view).route.websocket
        except GatewayError:
            return False

    def _current(self) -> Gateway | None:
        return self.gateway

    @staticmethod
    async def _websocket(gateway: Gateway, aio: web.BaseRequest | None, view: RequestView, ex: Exchange,
                         out: _Out, current: Callable[[], Gateway | None]) -> int:
        if aio is not None and isinstance(out, _AioReply):
            from gateway.websocket import proxy_websocket
            out.response = await proxy_websocket(gateway, aio, view, ex, current)
            return out.response.status
        # An Upgrade the parser did not switch on (no `Connection: upgrade`): it cannot become one.
        await gateway.admit(view, ex)  # a refused token is still told 401/403 first
        raise BadRequest()

    def _view(self, request: _Req, trusted: Any) -> RequestView:
        raw = request.raw_path
        if "#" in raw:
            # RFC 9112 s3.2: a fragment is never part of a request-target; upstreams cut it or keep it, so
            # the path the rules saw may not be the one served. Refused (400), as Envoy does by default.
            raise BadPath()
        path, _, query = raw.partition("?")
        peer = request.remote or ""
        host = request.headers.get("Host", "")
        if host not in self._hosts:
            self._check_host(host)
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return RequestView(
            method=request.method, raw_path=path, query_string=query, host=host.lower(), headers=request.headers,
            client_ip=client_ip_from(request.headers.get("X-Forwarded-For"), peer, trusted) if trusted else peer,
            peer_ip=peer, scheme=self._scheme, memo=getattr(request, "conn_state", None),
        )

    def _check_host(self, host: str) -> None:
        """RFC 9110 s7.2 / RFC 3986 s3.2.2: a Host is a host name, IPv4 address or [IPv6 address], and an
        optional port; anything else (a space, `user@`, a path, non-ASCII, `,` `;` and the other
        sub-delims, percent-encoding, an empty label as in `a..b`, a name in brackets) is refused with 400:
        it would otherwise reach routing and the upstream (X-Forwarded-Host) as given. Valid values are
        remembered (bounded: a client chooses them)."""
        if not valid_host(host):
            raise BadHost()
        if len(self._hosts) >= _HOSTS_KEPT:
            self._hosts.clear()
        self._hosts.add(host)

    @staticmethod
    def _body(request: _Req, limit: int, ex: Exchange, out: _Out,
              upstreams: Mapping[str, UpstreamConfig]) -> AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None
        if limit and request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge()
        content = request.content

        async def stream() -> AsyncIterator[bytes]:
            out.send_continue()  # admitted: RFC 9110 s10.1.1, the client may now send the body
            # A live consumer takes each next chunk within its upstream's read timeout (the upload's own
            # stall limit, nginx's proxy_send_timeout): while it may, the client is not blamed for waiting.
            up = upstreams.get(ex.upstream)
            grace = (up.read_timeout if up is not None else 0.0) + 1.0
            seen = 0
            try:
                async for chunk in content.iter_chunked(_CHUNK):
                    seen += len(chunk)
                    if limit and seen > limit:
                        ex.body_too_large = True  # the upstream call fails; the client is told 413
                        raise PayloadTooLarge()
                    out.body_pulled(grace)
                    yield chunk
            except RequestPayloadError:
                # The body broke off (malformed chunk, or the client went away): the client's fault, told
                # 400 if it is still there; the upstream call fails with this error as it is.
                raise BadRequest() from None
        return stream()

    @staticmethod
    async def _relay(method: str, out: _Out, up: UpstreamResponse, request_id: str) -> None:
        status = up.status
        length = up.content_length
        headers: CIMultiDict[str] = CIMultiDict()
        if (length is not None and length <= _SMALL_BODY and status >= 200 and status != 204 and status != 304
                and method != "HEAD"):
            # Small and of known length: read it, so headers and body go out in one transport.write.
            try:
                body = await up.read()  # errors come mapped (BadGateway/UpstreamTimeout): nothing sent yet
            finally:
                up.release()
            if len(body) != length:
                # The declared framing and the bytes disagree: relaying both would desynchronise the
                # client's connection (RFC 9112 s6.3), so answer 502 instead.
                raise BadGateway(reason="bad_response")
            relay_response_headers(up.headers, headers)
            headers["X-Request-Id"] = request_id
            await out.send(status, headers, body)
            return
        relay_response_headers(up.headers, headers)
        headers["X-Request-Id"] = request_id
        try:
            await out.start(status, headers)
            async for chunk in up.iter_chunks():
                await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientError, TimeoutError, ConnectionError, GatewayError) as exc:
            # The status line is already sent: the only honest signal left is to cut the connection.
            out.abort()
            if isinstance(exc, ConnectionError):
                raise  # the client's side failed (gone, or cut for taking nothing): 499, not the upstream's status
        finally:
            up.release()

    def _observe(self, route: str, method: str, status: int, elapsed: float) -> None:
        key = (route, method, status)
        inc = self._labels.get(key)
        if inc is None:
            inc = self._labels[key] = metrics.incrementer(
                metrics.requests_total.labels(route=route, method=method, status=str(status)))
        inc(1)
        observe = self._durations.get(route)
        if observe is None:
            observe = self._durations[route] = metrics.observer(metrics.request_duration_seconds.labels(route=route))
        observe(elapsed)

class _Req(Protocol):
    """What the request path reads of a request: H1Request, and aiohttp's BaseRequest for Upgrades."""

    @property
    def method(self) -> str: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> StreamReader: ...


class _Out(Protocol):
    """How the request path answers: H1Request itself, or _AioReply on aiohttp's server."""

    async def send(self, status: int, headers: CIMultiDict[str], body: bytes) -> None: ...
    async def start(self, status: int, headers: CIMultiDict[str]) -> None: ...
    async def write(self, chunk: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    def send_continue(self) -> None: ...
    def body_pulled(self, grace: float) -> None: ...
    @property
    def started(self) -> bool: ...  # the status line went out
    @property
    def task(self) -> asyncio.Task[Any] | None: ...  # the task answering (cancelled when its token ends)
    @property
    def gone(self) -> bool: ...  # the client left mid-answer and `task` was cancelled for it


class _AioReply:
    """_Out on aiohttp's server: the response object its handler returns.

    Every answer that is not a WebSocket (an Upgrade declined on a plain route, a refusal) closes the
    connection: aiohttp's server would go on serving what follows on it without h1server's checks
    (transfer codings, head and body timeouts, drain), so the client reconnects to h1server instead."""

    __slots__ = ("request", "response", "task", "_stream")
    gone = False  # aiohttp's server does not cancel a handler when its client leaves

    def __init__(self, request: web.BaseRequest) -> None:
        self.request = request
        # The task running the handler (aiohttp's request.task is the connection's, which awaits it).
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.response: web.StreamResponse | None = None
        self._stream: web.StreamResponse | None = None

    async def send(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        _writable(headers)
        self.response = web.Response(status=status, body=body, headers=headers)
        self.response.force_close()

    async def start(self, status: int, headers: CIMultiDict[str]) -> None:
        _writable(headers)
        self.response = self._stream = web.StreamResponse(status=status, headers=headers)
        self._stream.force_close()
        await self._stream.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self._stream is not None
        # h1server's sweeper does not see this connection (handed to aiohttp's server): a client that
        # stopped reading would hold the answer's upstream connection and max_requests slot for ever.
        # Cruder than the sweeper's measure: one write may wait for the buffer to drain that long.
        try:
            async with asyncio.timeout(h1server.SEND_TIMEOUT):
                await self._stream.write(chunk)
        except TimeoutError:
            self.abort()
            raise ConnectionResetError("the client took nothing of its answer for send_timeout") from None

    async def write_eof(self) -> None:
        assert self._stream is not None
        await self._stream.write_eof()

    @property
    def started(self) -> bool:
        return self._stream is not None

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()  # as H1Request.abort: buffered bytes are dropped

    def send_continue(self) -> None:
        return None  # aiohttp's low-level server never sent it either; clients send the body after ~1 s

    def body_pulled(self, grace: float) -> None:
        return None  # no sweeper here: each write is bounded by SEND_TIMEOUT instead


def _writable(headers: CIMultiDict[str]) -> None:
    """Raise HeadInjection now, as H1Request would, for a head aiohttp's server would refuse only once the
    handler returned (a control character in a relayed field): the caller can then still answer 502."""
    message_head("HTTP/1.1 200 OK", headers)


def _count_reload(result: str) -> None:
    if metrics.COUNTS_RELOADS:
        metrics.config_reloads_total.labels(result=result).inc()


def _header_bytes(request: _Req) -> int:
    return sum(len(k) + len(v) + 4 for k, v in request.raw_headers)


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0


def _restart_only(bound: Config, new: Config) -> list[str]:
    """What a reload cannot apply: the listeners are bound, and their processes started, once."""
    def listen(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def tls(cfg: Config) -> str:
        return "on" if cfg.server.tls is not None and cfg.server.tls.cert_file is not None else "off"

    # A worker of `--workers N` runs with `--workers 1`: the group's size comes from its supervisor (and
    # `--workers` overrides the file, so the old file's value need not be what runs).
    running = (os.environ.get(metrics.COUNT_ENV) if metrics.MULTIPROCESS else None) or "1"
    changes = [
        ("server.listen", listen(bound.server.host, bound.server.port), listen(new.server.host, new.server.port)),
        ("admin.listen", listen(bound.admin.host, bound.admin.port), listen(new.admin.host, new.admin.port)),
        ("server.workers", str(bound.server.workers), str(new.server.workers)),
        ("server.tls", tls(bound), tls(new)),
    ]
    return [f"{new.path}: warning: {key}: changed from {was} to {now}, which takes a restart; "
            + (f"{running} running" if key == "server.workers" else f"still {was}")
            for key, was, now in changes
            if was != now and not (key == "server.workers" and now == running)]  # asks for what runs already


def _server_ssl(config: Config) -> ssl.SSLContext | None:
    tls = config.server.tls
    if tls is None or tls.cert_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_passphrase)
    return ctx


SAME_STOP = 0.5  # seconds: a second SIGTERM/SIGINT this soon after the first is the same stop, not a hurry


async def serve(config_path: str, *, reuse_port: bool = False, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the process exit code.

    SIGHUP's default action ends the process, so it is handled from before the config is read until
    exit: one that arrives while starting (the JWKS, Redis) reloads once started; one while draining is
    logged and ignored. A second SIGTERM/SIGINT while draining cuts what is still in flight at once."""
    loop = asyncio.get_running_loop()
    hup_while_starting = False

    def early_hup() -> None:
        nonlocal hup_while_starting
        hup_while_starting = True

    loop.add_signal_handler(signal.SIGHUP, early_hup)
    try:
        config = load(config_path)
        app = GatewayApp(config, reuse_port=reuse_port)
        try:
            await app.start()
        except BaseException:
            await app.stop()  # half started (a port taken after `run` checked it): close what did start, quietly
            raise
    except BaseException:
        loop.remove_signal_handler(signal.SIGHUP)
        raise
    log.info("gateway listening on %s:%d (admin %s:%d)", config.server.host, app.public_port,
             config.admin.host, app.admin_port)
    done = stop or asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app.reload(config_path)))
    if hup_while_starting:
        asyncio.ensure_future(app.reload(config_path))
    try:
        await done.wait()
    finally:
        stopping_since = loop.time()

        def again(name: str) -> None:
            if loop.time() - stopping_since < SAME_STOP:
                # The same stop reaching this process twice: systemd's default KillMode (control-group)
                # signals every worker directly and the supervisor passes it on too; a human's second
                # Ctrl-C comes later than this.
                log.info("%s again within %.1f s of the first: the same stop, drain goes on", name, SAME_STOP)
                return
            log.warning("%s while draining: cutting the requests still in flight now", name)
            app.hurry()

        loop.add_signal_handler(signal.SIGTERM, again, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, again, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: the gateway is stopping")
        try:
            await app.drain_and_stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not its default action between here and exit
    return 0
