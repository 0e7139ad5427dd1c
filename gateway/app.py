"""aiohttp glue: request -> RequestView -> pipeline -> streamed response; admin listener; lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _esc
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway import metrics
from gateway.config import load
from gateway.config_types import Config, IssuerConfig
from gateway.errors import (
    AuthError,
    BadGateway,
    ConfigError,
    GatewayError,
    HeaderTooLarge,
    PayloadTooLarge,
)
from gateway.identity import TokenMinter, client_ip_from, relay_response_headers, request_id_from
from gateway.jwks import JwksCache
from gateway.keys import CHECK_INTERVAL as KEY_CHECK_INTERVAL
from gateway.keys import KeyStore
from gateway.model import RequestView
from gateway.pipeline import Exchange, Gateway
from gateway.revocation import RevocationStore, create_store
from gateway.tokens import TokenVerifier
from gateway.upstream import UpstreamResponse, Upstreams

log = logging.getLogger("gateway")
_CHUNK = 64 * 1024
# Upstream bodies up to this declared length are read whole and sent with their headers in one write.
_SMALL_BODY = 64 * 1024
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # the access log's ts suffixes, formatted once
_NO_PRINCIPAL = ',"iss":null,"sub":null,"aud":null,"jti":null'
# The method label is bounded: the HTTP parser accepts ~35 methods (PROPFIND, PURGE, ...).
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_body(err: GatewayError, request_id: str) -> bytes:
    # SPEC 5: code and a fixed description only; the precise reason goes to the log and metrics.
    return json.dumps({"error": err.code, "error_description": err.description, "request_id": request_id}).encode()


class Services:
    """Long-lived resources shared across config reloads: key caches, revocation, signing keys, upstream pool."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.jwks: dict[str, JwksCache] = {}
        self._jwks_cfg: dict[str, IssuerConfig] = {}
        self.revocation: RevocationStore | None = None
        self.keys: KeyStore | None = None
        self.minter: TokenMinter | None = None
        self.upstreams: Upstreams | None = None
        self._built: dict[str, Any] = {}  # the config section each resource was built from
        self._retired: list[Any] = []
        self._rotator: asyncio.Task[None] | None = None

    async def build(self, config: Config) -> Gateway:
        """A Gateway for `config`, reusing every resource whose configuration did not change.

        Transactional: new resources are built first; only when all are built are they swapped in
        (the replaced ones retired); on any failure the new ones are closed and nothing changes.
        """
        fresh: list[Any] = []  # what this call created, closed again if it fails
        keys, minter = self.keys, self.minter
        itc = config.internal_token
        if itc is None:
            keys = minter = None
        elif keys is None or self._built.get("internal_token") != itc:
            # KeyStoreError (unreadable, corrupt) surfaces here, first: nothing (session, JWKS tasks)
            # is open yet, so `gateway run` exits with one clean line.
            keys = KeyStore(itc)
            keys.load()
            minter = TokenMinter(keys, itc)
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            jwks: dict[str, JwksCache] = {}
            for issuer in config.issuers:
                cache = self.jwks.get(issuer.name)
                if cache is None or self._jwks_cfg.get(issuer.name) != issuer:
                    cache = JwksCache(issuer, self.session)
                    fresh.append(cache)
                    await cache.start()
                jwks[issuer.name] = cache
            revocation = self.revocation
            if revocation is None or self._built.get("revocation") != config.revocation:
                revocation = create_store(config.revocation)
                fresh.append(revocation)
                await revocation.start()
            upstreams = self.upstreams
            if upstreams is None or self._built.get("upstreams") != config.upstreams:
                upstreams = Upstreams(config.upstreams)
                fresh.append(upstreams)
                await upstreams.start()
            gateway = Gateway(config, TokenVerifier(config.issuers, jwks), revocation, minter, upstreams)
        except BaseException:
            for item in fresh:
                with contextlib.suppress(Exception):
                    await item.close()
            raise
        # Commit: swap in, retire what was replaced (closed after in-flight requests had time to finish).
        self._retired.extend(c for n, c in self.jwks.items() if jwks.get(n) is not c)
        self.jwks, self._jwks_cfg = jwks, {i.name: i for i in config.issuers}
        for new, old in ((revocation, self.revocation), (upstreams, self.upstreams)):
            if old is not None and old is not new:
                self._retired.append(old)
        self.revocation, self.upstreams, self.keys, self.minter = revocation, upstreams, keys, minter
        self._built.update(revocation=config.revocation, upstreams=config.upstreams, internal_token=itc)
        if keys is not None and self._rotator is None:
            self._rotator = asyncio.create_task(self._rotate_keys())
        return gateway

    async def _rotate_keys(self) -> None:
        """rotate_every: checked often, so a rotation by another replica is picked up quickly too."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEY_CHECK_INTERVAL)
            keys = self.keys
            if keys is None:
                continue
            try:
                # check() logs each key store problem once and keeps signing with the current key.
                await loop.run_in_executor(None, keys.check)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop later checks
                log.error("signing key check failed: %s", exc)

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for item in retired:
            with contextlib.suppress(Exception):
                await item.close()

    async def close(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotator
        await self.close_retired()
        for item in (*self.jwks.values(), self.revocation, self.upstreams):
            if item is not None:
                with contextlib.suppress(Exception):
                    await item.close()
        if self.session is not None:
            await self.session.close()

    def ready(self) -> dict[str, bool]:
        checks = {f"jwks:{name}": cache.ready for name, cache in self.jwks.items()}
        checks["revocation"] = self.revocation is not None and self.revocation.ready()
        return checks


class _Handler(RequestHandler):
    """aiohttp's protocol handler, answering its own parse errors with the gateway's JSON errors."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        err: GatewayError
        if isinstance(exc, LineTooLong) or (status == 400 and "too many headers" in str(message or "").lower()):
            err = HeaderTooLarge()
        elif status == 400:
            from gateway.errors import BadRequest
            err = BadRequest()
        else:
            err = GatewayError()
        request_id = uuid.uuid4().hex
        resp = web.Response(status=err.status, body=error_body(err, request_id), content_type="application/json",
                            headers={"X-Request-Id": request_id})
        resp.force_close()
        # Refused by the HTTP parser before the gateway saw a request: still counted and logged.
        metrics.requests_total.labels(route="-", method="OTHER", status=str(err.status)).inc()
        sys.stdout.write(json.dumps({
            "ts": _now_iso(), "request_id": request_id, "method": None, "path": None, "route": "-",
            "status": err.status, "duration_ms": 0.0, "upstream": None, "target": None, "upstream_status": None,
            "client_ip": request.remote if request is not None else None, "iss": None, "sub": None, "aud": None,
            "jti": None, "auth": err.reason}, separators=(",", ":")) + "\n")
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class GatewayApp:
    """The public listener, the admin listener and the current Gateway, swapped atomically on reload."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.services = Services()
        self.gateway: Gateway | None = None
        self.reuse_port = reuse_port
        self.draining = False
        self._runners: list[web.BaseRunner] = []
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._labels: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._stamp = _Stamp()
        self._scheme = "http"
        self.public_port = 0
        self.admin_port = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.gateway = await self.services.build(self.config)
        from gateway.admin import admin_app

        cfg = self.config.server
        max_line = max(8190, cfg.max_header_bytes * 4)
        public = _Server(self.handle, max_line_size=max_line, max_field_size=max_line, max_headers=1000,
                         access_log=None)
        runner = web.ServerRunner(public, handle_signals=False, shutdown_timeout=cfg.shutdown_grace)
        await runner.setup()
        server_ssl = _server_ssl(self.config)
        # The listener is never rebuilt on reload: its scheme is fixed here, not looked up per request.
        self._scheme = "https" if server_ssl is not None else "http"
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_port=self.reuse_port or None,
                           ssl_context=server_ssl, backlog=1024)
        await site.start()
        self._runners.append(runner)
        self.public_port = _bound_port(runner)
        admin = web.AppRunner(admin_app(self), handle_signals=False, access_log=None)
        await admin.setup()
        await web.TCPSite(admin, self.config.admin.host, self.config.admin.port,
                          reuse_port=self.reuse_port or None).start()
        self._runners.append(admin)
        self.admin_port = _bound_port(admin)
        self._flusher = asyncio.create_task(self._flush_logs())

    async def drain_and_stop(self) -> None:
        """SIGTERM: not ready at once, stop accepting, let in-flight requests finish within shutdown_grace."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.shutdown_grace
        if self._runners:
            public = self._runners[0]
            for site in list(public.sites):
                await site.stop()  # closes the listening socket: no new connections
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            # Whatever still runs has had its grace: cut it now. Left to runner.cleanup(), each request
            # would get a second shutdown_grace and the process would outlive the orchestrator's patience.
            if isinstance(public, web.ServerRunner) and public.server is not None:
                public.server.pre_shutdown()
                await public.server.shutdown(0.1)  # 0 would mean "no limit" to aiohttp
        await self.stop()

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.services.close()
        sys.stdout.flush()

    async def reload(self, path: str) -> bool:
        """SIGHUP: parse off the request path; a good file swaps atomically, a bad one is refused and counted."""
        try:
            config = await asyncio.get_running_loop().run_in_executor(None, load, path)
            gateway = await self.services.build(config)
        except ConfigError as exc:
            metrics.config_reloads_total.labels(result="error").inc()
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return False
        except Exception as exc:  # noqa: BLE001 - any failure keeps the running config
            metrics.config_reloads_total.labels(result="error").inc()
            log.error("reload refused: %s", exc)
            return False
        self.config, self.gateway = config, gateway  # in-flight requests keep the Gateway they started with
        metrics.config_reloads_total.labels(result="ok").inc()
        log.info("configuration reloaded from %s", path)
        asyncio.get_running_loop().call_later(self.config.server.shutdown_grace or 1.0,
                                              lambda: asyncio.ensure_future(self.services.close_retired()))
        return True

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            sys.stdout.flush()

    # -- the request path ---------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        gateway = self.gateway  # snapshot: a reload does not change a request in flight
        assert gateway is not None
        cfg = gateway.config.server
        ex = Exchange(request_id_from(request.headers))
        self._inflight += 1
        self._idle.clear()
        metrics.inflight_requests.inc()
        status, auth, target, upstream_status = 500, "-", "", 0
        client_ip = request.remote or ""
        try:
            try:
                if _header_bytes(request) > cfg.max_header_bytes:
                    raise HeaderTooLarge()
                view = self._view(request, cfg.trusted_proxies)
                client_ip = view.client_ip
                body = self._body(request, cfg.max_body_bytes, ex)
                if request.headers.get("Upgrade", "").lower() == "websocket":
                    from gateway.websocket import proxy_websocket
                    resp = await proxy_websocket(gateway, request, view, ex)
                    status, auth = resp.status, "ok" if ex.authorized else "none"
                    return resp
                try:
                    up = await gateway.handle(view, body, ex)
                except BadGateway:
                    if ex.body_too_large:
                        raise PayloadTooLarge() from None
                    raise
                auth = "ok" if ex.authorized else "none"
                target, upstream_status = up.target, up.status
                # A small body is read whole before anything is sent: its failure is still an honest 502/504.
                resp = await self._relay(request, up, ex.request_id)
                status = resp.status
                return resp
            except GatewayError as err:
                status = err.status
                if isinstance(err, AuthError):
                    auth = err.reason
                    metrics.auth_failures_total.labels(issuer=err.issuer or "-", reason=err.reason).inc()
                elif ex.authorized:
                    auth = "ok"
                elif ex.principal is not None:  # verified, then the revocation backend failed
                    auth = err.reason
                resp = web.Response(status=err.status, body=error_body(err, ex.request_id),
                                    headers={**err.headers, "X-Request-Id": ex.request_id},
                                    content_type="application/json")
                if self.draining:
                    resp.force_close()
                return resp
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            metrics.inflight_requests.dec()
            elapsed = time.perf_counter() - started
            self._observe(ex.route, request.method if request.method in _METHODS else "OTHER", status, elapsed)
            self._access_log(request, ex, status, elapsed, target, upstream_status, auth, client_ip)

    def _view(self, request: web.BaseRequest, trusted: Any) -> RequestView:
        raw = request.raw_path
        path, _, query = raw.partition("?")
        peer = request.remote or ""
        host = request.headers.get("Host", "")
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return RequestView(
            method=request.method, raw_path=path, query_string=query, host=host.lower(), headers=request.headers,
            client_ip=client_ip_from(request.headers.get("X-Forwarded-For"), peer, trusted) if trusted else peer,
            peer_ip=peer, scheme=self._scheme,
        )

    @staticmethod
    def _body(request: web.BaseRequest, limit: int, ex: Exchange) -> AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None
        if limit and request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge()
        content = request.content

        async def stream() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in content.iter_chunked(_CHUNK):
                seen += len(chunk)
                if limit and seen > limit:
                    ex.body_too_large = True  # the upstream call fails; the client is told 413
                    raise PayloadTooLarge()
                yield chunk
        return stream()

    async def _relay(self, request: web.BaseRequest, up: UpstreamResponse, request_id: str) -> web.StreamResponse:
        status = up.status
        length = up.content_length
        if (length is not None and length <= _SMALL_BODY and status >= 200 and status != 204 and status != 304
                and request.method != "HEAD"):
            # Small and of known length: read it, so aiohttp sends headers and body in one transport.write
            # (a StreamResponse flushes the header block alone, then each chunk: two sends per response).
            try:
                body = await up.read()  # errors come mapped (BadGateway/UpstreamTimeout): nothing sent yet
            finally:
                up.release()
            if len(body) != length:
                # The declared framing and the bytes disagree: relaying both would desynchronise the
                # client's connection (RFC 9112 s6.3), so answer 502 instead.
                raise BadGateway(reason="bad_response")
            small = web.Response(status=status, body=body)
            relay_response_headers(up.headers, small.headers)
            small.headers["X-Request-Id"] = request_id
            if self.draining:
                small.force_close()
            return small
        resp = web.StreamResponse(status=status)
        relay_response_headers(up.headers, resp.headers)
        resp.headers["X-Request-Id"] = request_id
        if self.draining:
            resp.force_close()  # Connection: close, so a keep-alive client reconnects to another replica
        try:
            await resp.prepare(request)
            async for chunk in up.iter_chunks():
                await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, TimeoutError, ConnectionError, GatewayError):
            # The status line is already sent: the only honest signal left is to cut the connection.
            if request.transport is not None:
                request.transport.close()
        finally:
            up.release()
        return resp

    def _observe(self, route: str, method: str, status: int, elapsed: float) -> None:
        key = (route, method, status)
        child = self._labels.get(key)
        if child is None:
            child = self._labels[key] = metrics.requests_total.labels(route=route, method=method, status=str(status))
        child.inc()
        hist = self._durations.get(route)
        if hist is None:
            hist = self._durations[route] = metrics.request_duration_seconds.labels(route=route)
        hist.observe(elapsed)

    def _access_log(self, request: web.BaseRequest, ex: Exchange, status: int, elapsed: float, target: str,
                    upstream_status: int, auth: str, client_ip: str) -> None:
        # One f-string, no dict and no json.dumps of the whole line: every string goes through the C
        # JSON escaper (exact escaping, ASCII output like json.dumps), numbers are formatted as it would.
        p = ex.principal
        if p is None:
            who = _NO_PRINCIPAL
        else:
            who = (f',"iss":{_esc(p.iss)},"sub":{_opt(p.subject)},"aud":[{",".join(map(_esc, p.aud))}]'
                   f',"jti":{_opt(p.jti)}')
        sys.stdout.write(
            f'{{"ts":"{self._stamp()}","request_id":{_esc(ex.request_id)},"method":{_esc(request.method)}'
            f',"path":{_esc(request.raw_path.partition("?")[0])},"route":{_esc(ex.route)},"status":{status}'
            f',"duration_ms":{elapsed * 1000:.3f},"upstream":{_opt(ex.upstream)}'
            f',"target":{_opt(target)},"upstream_status":{upstream_status or "null"}'
            f',"client_ip":{_esc(client_ip)}{who},"auth":{_esc(auth)}}}\n')


def _opt(value: str | None) -> str:
    """A JSON string, or null for None and "" (the log's "not known")."""
    return _esc(value) if value else "null"


class _Stamp:
    """The access log's `ts` (ISO 8601 UTC, milliseconds): the date-time part is formatted once a second."""

    __slots__ = ("_clock", "_sec", "_prefix")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sec = -1
        self._prefix = ""

    def __call__(self) -> str:
        sec, ms = divmod(int(self._clock() * 1000), 1000)
        if sec != self._sec:
            self._sec, self._prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return self._prefix + _MILLIS[ms]


def _header_bytes(request: web.BaseRequest) -> int:
    return sum(len(k) + len(v) + 4 for k, v in request.raw_headers)


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0


def _server_ssl(config: Config) -> ssl.SSLContext | None:
    tls = config.server.tls
    if tls is None or tls.cert_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


async def serve(config_path: str, *, reuse_port: bool = False, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the process exit code."""
    config = load(config_path)
    app = GatewayApp(config, reuse_port=reuse_port)
    await app.start()
    log.info("gateway listening on %s:%d (admin %s:%d)", config.server.host, app.public_port,
             config.admin.host, app.admin_port)
    done = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app.reload(config_path)))
    try:
        await done.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await app.drain_and_stop()
    return 0
